"""`kvpool bench prompt`: tokenizing agent turns whole against reusing the previous turn's tokens.

Renders every turn of real agent sessions with the model's chat template (text, as the ingress's renderer does),
then tokenizes it twice: whole, and with kvpool.prefix_tokens.PrefixTokenizer, which holds the session's earlier
turns. Every turn's two token lists are compared (`mismatched` must be 0); times are per turn, in ms.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run(args) -> dict:
    from transformers import AutoTokenizer

    from kvpool.bench.replay import load_sessions
    from kvpool.model import resolve_model
    from kvpool.prefix_tokens import PrefixTokenizer
    from kvpool.prompt import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    sessions = load_sessions(Path(args.trace), args.sessions, args.max_context, 0, PromptRenderer(tokenizer),
                             args.turns)
    reuse = PrefixTokenizer(tokenizer)
    whole_s, reused_s, tokens, mismatched, turns = [], [], [], 0, 0
    for session in sessions:
        for turn in session.turns:
            text = tokenizer.apply_chat_template(turn.messages, add_generation_prompt=True, tokenize=False)
            t = time.perf_counter()
            whole = tokenizer(text, add_special_tokens=False).input_ids
            t1 = time.perf_counter()
            reused = reuse.encode(text, add_special_tokens=False)
            reused_s.append(time.perf_counter() - t1)
            whole_s.append(t1 - t)
            tokens.append(len(whole))
            mismatched += reused != whole
            turns += 1
    ms = lambda xs, q: round(float(np.percentile(np.array(xs) * 1e3, q)), 2)  # noqa: E731
    return {"bench": "prompt", "trace": args.trace, "sessions": len(sessions), "turns": turns,
            "prompt_tokens_p50": int(np.percentile(tokens, 50)), "prompt_tokens_max": max(tokens),
            "whole_p50_ms": ms(whole_s, 50), "whole_p90_ms": ms(whole_s, 90),
            "reused_p50_ms": ms(reused_s, 50), "reused_p90_ms": ms(reused_s, 90),
            "whole_total_s": round(sum(whole_s), 2), "reused_total_s": round(sum(reused_s), 2),
            "reused_turns": reuse.counts["reused"], "reused_token_share": round(
                reuse.counts["reused_tokens"] / max(1, sum(tokens)), 4),
            "audited": reuse.counts["audited"], "mismatched": mismatched, "reuse_off": reuse.off_reason}
