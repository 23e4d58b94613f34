"""`kvpool bench replay`: replays agent sessions against any OpenAI-compatible endpoint, closed loop.

The trace is in any format of kvpool.traces: chat turns go to /v1/chat/completions, token-id turns (aiperf,
Mooncake, kv-cache-tester) to /v1/completions with the token ids as the prompt. `--sessions` sessions run at once;
each sends its next turn when the previous answer has completed and the trace's think time (times `--think-scale`)
has passed, until its turns run out (or `--duration`, if given). Every request streams, so TTFT is measured; usage
gives prompt and cached tokens. The run also computes its own infinite-cache bound: for each request, in send
order, the longest block-aligned prefix of its token ids (before its last token) that earlier requests computed:
their prompts' full blocks and, with `--verify` (where output token ids are known), the blocks their answers
completed (the hit rate a perfect, infinitely large, shared cache would reach on exactly this run). A progress bar on stderr follows the run; `--out X.json`
keeps every request's record there and plots them in X-turns.png. `--verify` also asks for every output token's id
and logprob and checks them against a reference computed with no cache at all (kvpool.bench.verify).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
from tqdm import tqdm

from kvpool.bench.verify import GREEDY
from kvpool.hashing import block_hashes
from kvpool.routing import parse_costs_header
from kvpool.traces import DEFAULT_VOCAB_SIZE, Session, Turn, detect_format, fit_chat, fit_tokens, read_sessions

if TYPE_CHECKING:
    from kvpool.prompt import PromptRenderer  # transformers: loaded only when chat turns need it


@dataclass
class Record:
    session: str
    turn: int
    sent_at: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    bound_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str | None = None
    max_tokens: int = 0
    route_reason: str | None = None  # KV-Pool's x-kvpool-route-reason header
    replica: str | None = None  # KV-Pool's x-kvpool-replica header: the replica that served it
    route_costs: dict[str, int] | None = None  # KV-Pool's x-kvpool-route-costs header: the router's cost per replica
    # With verify on: the prompt's token ids, and the output's token ids and logprobs as the server returned them.
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    logprobs: list[float] | None = None


def _another_agent(session: Session, i: int) -> Session:
    """Agent `i` on the same task as `session`: its own conversation, sharing nothing with the first."""

    def distinct(t: Turn) -> Turn:
        if t.blocks is not None:
            return replace(t, blocks=[((i, key), n) for key, n in t.blocks])
        first = {**t.messages[0], "content": f"[agent {i}] " + t.messages[0]["content"]}
        return replace(t, messages=[first, *t.messages[1:]])

    return Session(f"{session.name}#{i}", [distinct(t) for t in session.turns])


AGENT_TAG_TOKENS = 16  # room for the "[agent i] " that tells copies of a trace session apart


def load_sessions(trace: Path, n: int, max_context: int, max_output: int, renderer: PromptRenderer | None = None,
                  max_turns: int = 0, trace_format: str | None = None) -> list[Session]:
    """`n` sessions from the trace, each cut to `max_turns` turns and then scaled so every request and its answer
    fit `max_context`: chat sessions on the model's own tokens (`renderer`, which chat traces need), token-id
    sessions all by one factor (see kvpool.traces.fit_tokens) within the model's vocabulary."""
    base = read_sessions(trace, trace_format, clients=n)
    if not base:
        raise ValueError(f"no sessions in {trace}")
    if max_turns:
        base = [Session(s.name, s.turns[:max_turns]) for s in base]
    base = base[:n]
    chat = base[0].turns[0].blocks is None
    if chat:
        if renderer is None:
            raise ValueError(f"{trace} is a chat trace: fitting it to the context needs the model's tokenizer")
        budget = max_context - max_output - (AGENT_TAG_TOKENS if n > len(base) else 0)
        base = [fit_chat(s, budget, lambda messages: len(renderer.chat(messages))) for s in base]
    sessions = [base[i] if i < len(base) else _another_agent(base[i % len(base)], i) for i in range(n)]
    if chat:
        return sessions
    vocab_size = len(renderer.tokenizer) if renderer else DEFAULT_VOCAB_SIZE
    return fit_tokens(sessions, max_context - max_output, vocab_size)


class Bound:
    """The infinite-cache bound of the requests sent so far, on the model's own tokenization."""

    def __init__(self, block_size: int, renderer: PromptRenderer | None = None):
        self.renderer = renderer  # tokenizes chat turns; token-id turns need none
        self.block_size = block_size
        self.seen: set[int] = set()

    def prompt_ids(self, turn: Turn) -> list[int]:
        return turn.prompt_ids if turn.prompt_ids is not None else self.renderer.chat(turn.messages)

    def observe(self, ids: list[int]) -> int:
        """The cached tokens a perfect cache would give a prompt of these token ids, after all earlier ones: the
        blocks before its last token that earlier prompts computed. A prompt computes all its full blocks, the one
        holding its last token included."""
        hashes = block_hashes(ids, self.block_size).tolist()
        usable = (len(ids) - 1) // self.block_size
        hit = 0
        while hit < usable and hashes[hit] in self.seen:
            hit += 1
        self.seen.update(hashes)
        return hit * self.block_size

    def completed(self, ids: list[int]) -> None:
        """A request finished having computed these tokens (its prompt and all but its last output token): an
        engine caches their full blocks too, and a later prompt may share them where the model's answer matches
        the trace's next message."""
        self.seen.update(block_hashes(ids, self.block_size).tolist())


def _output_tokens(choice: dict, chat: bool) -> list[tuple[int, float]]:
    """(token id, logprob) of a streamed choice's tokens, from logprobs asked with return_tokens_as_token_ids."""
    lp = choice.get("logprobs")
    if not lp:
        return []
    pairs = [(e["token"], e["logprob"]) for e in lp["content"] or []] if chat else \
        zip(lp["tokens"], lp["token_logprobs"])
    return [(int(token.removeprefix("token_id:")), logprob) for token, logprob in pairs]


async def _send(client: httpx.AsyncClient, url: str, model: str, turn: Turn, rec: Record, verify: bool) -> None:
    body = {"model": model, "max_tokens": rec.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    chat = turn.prompt_ids is None
    if chat:
        body["messages"] = turn.messages
    else:
        body["prompt"] = turn.prompt_ids
    if verify:
        # The sampled token's logprob only (chat: top_logprobs defaults to 0; completions: logprobs=0).
        body.update(GREEDY, logprobs=True if chat else 0, return_tokens_as_token_ids=True)
        rec.output_ids, rec.logprobs = [], []
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            rec.route_reason, rec.replica = r.headers.get("x-kvpool-route-reason"), r.headers.get("x-kvpool-replica")
            try:
                rec.route_costs = parse_costs_header(r.headers.get("x-kvpool-route-costs") or "") or None
            except ValueError:  # a diagnostic only: the request itself went fine
                pass
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"].get("message", "stream error")
                    return
                if chunk.get("choices"):
                    choice = chunk["choices"][0]
                    piece = choice["delta"].get("content") if chat else choice.get("text")
                    if piece and rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - t0
                    for token_id, logprob in _output_tokens(choice, chat) if verify else ():
                        rec.output_ids.append(token_id)
                        rec.logprobs.append(logprob)
                if chunk.get("usage"):
                    u = chunk["usage"]
                    rec.prompt_tokens, rec.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
                    rec.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        rec.latency_s = time.perf_counter() - t0
        if rec.ttft_s is None:
            rec.ttft_s = rec.latency_s
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"


def ingress_figures(url: str) -> dict:
    """From a KV-Pool app's /v1/kvpool/stats: where its last requests' time to a first output went, per stage
    (stages_ms: render, hashing, the router's answer, dispatch, engine queue, prefill, ...) and how often vLLM
    preempted them (preemptions); nothing from any other server."""
    r = httpx.get(f"{url}/v1/kvpool/stats", timeout=30)
    stats = r.json() if r.status_code == 200 else {}
    return {k: stats[k] for k in ("stages_ms", "preemptions") if k in stats}


async def replay(url: str, sessions: list[Session], duration_s: float, max_turns: int, think_scale: float,
                 max_output: int, bound: Bound, progress: bool = True, concurrency: int = 0,
                 verify: bool = False) -> tuple[list[Record], float]:
    """`concurrency`: sessions run at most this many at once, the next starting when one ends (0: all at once).
    `verify`: records keep what kvpool.bench.verify checks (prompt ids, output ids and logprobs)."""
    slots = asyncio.Semaphore(concurrency or len(sessions))
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=10)) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        records: list[Record] = []
        start = time.perf_counter()
        deadline = start + duration_s if duration_s > 0 else math.inf  # none: the workload is fixed

        async def run_session(s: Session) -> None:
            async with slots:
                if time.perf_counter() < deadline:  # sessions still waiting for a slot at the end never start
                    await run_turns(s)

        async def run_turns(s: Session) -> None:
            for i, turn in enumerate(s.turns[:max_turns] if max_turns else s.turns):
                await asyncio.sleep(min(turn.think_s * think_scale, 30.0))
                if time.perf_counter() >= deadline:
                    return
                max_tokens = max(1, min(turn.max_tokens, max_output))
                rec = Record(s.name, i, time.perf_counter() - start, max_tokens=max_tokens)
                ids = bound.prompt_ids(turn)
                rec.bound_tokens = bound.observe(ids)
                if verify:
                    rec.prompt_ids = ids
                records.append(rec)
                await _send(client, url, model, turn, rec, verify)
                if rec.output_ids:  # known with --verify; without it the bound counts prompts only
                    bound.completed(ids + rec.output_ids[:-1])

        # Without a deadline the work is known, so the bar counts turns; otherwise seconds up to --duration.
        turns_total = 0 if duration_s > 0 else sum(len(s.turns[:max_turns] if max_turns else s.turns)
                                                   for s in sessions)
        bar = tqdm(total=turns_total or int(duration_s), unit="turn", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True, bar_format=None if turns_total else "{l_bar}{bar}| {n}/{total} s{postfix}")

        def show() -> None:
            done = [r for r in records if r.latency_s is not None or r.error is not None]
            ok = [r for r in done if r.error is None]
            prompt = sum(r.prompt_tokens for r in ok)
            bar.n = len(done) if turns_total else min(int(time.perf_counter() - start), int(duration_s))
            bar.set_postfix(done=len(done), in_flight=len(records) - len(done), errors=len(done) - len(ok),
                            hit=f"{sum(r.cached_tokens for r in ok) / prompt if prompt else 0:.1%}")

        async def tick() -> None:
            while True:
                show()
                await asyncio.sleep(1)

        ticker = asyncio.create_task(tick())
        try:
            await asyncio.gather(*(run_session(s) for s in sessions))
        finally:
            ticker.cancel()
            show()
            bar.close()
        return records, time.perf_counter() - start


def summarize(records: list[Record], makespan_s: float) -> dict:
    """Figures over the completed records; `makespan_s`: the time the run took to finish them."""
    ok = [r for r in records if r.error is None and r.latency_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    ttft = np.array([r.ttft_s for r in ok]) if ok else np.array([np.nan])
    lat = np.array([r.latency_s for r in ok]) if ok else np.array([np.nan])
    bound = sum(r.bound_tokens for r in ok)
    pct = lambda a, q: round(float(np.percentile(a, q)), 3)  # noqa: E731
    hit = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    return {
        "requests": len(ok), "errors": len(records) - len(ok), "makespan_s": round(makespan_s, 1),
        "input_tokens": prompt, "input_tok_s": round(prompt / makespan_s, 1),
        "output_tok_s": round(sum(r.completion_tokens for r in ok) / makespan_s, 2),
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "latency_mean_s": round(float(lat.mean()), 3), "latency_p50_s": pct(lat, 50), "latency_p90_s": pct(lat, 90),
        "hit_rate": round(hit, 4), "bound_hit_rate": round(bound / prompt, 4) if prompt else 0.0,
        "hit_rate_vs_bound": round(hit / (bound / prompt), 4) if bound else None,
        # What failed, without a dig through the records: the most common error texts and how often each came.
        "error_texts": dict(Counter(r.error[:200] for r in records if r.error is not None).most_common(3)),
    }


def run(args) -> dict:
    from kvpool.model import resolve_model
    from kvpool.prompt import PromptRenderer

    url = args.url.rstrip("/")
    model_path = args.tokenizer or resolve_model("")
    renderer = PromptRenderer.from_pretrained(model_path)
    sessions = load_sessions(Path(args.trace), args.sessions, args.max_context, args.max_output, renderer,
                             args.turns, args.trace_format)
    records, wall = asyncio.run(replay(url, sessions, args.duration, args.turns, args.think_scale, args.max_output,
                                       Bound(args.block_size, renderer), verify=args.verify))
    result = {"bench": "replay", "url": args.url, "sessions": args.sessions, "trace": str(args.trace),
              "trace_format": args.trace_format or detect_format(Path(args.trace)), "max_context": args.max_context,
              **summarize(records, wall)}
    result.update(ingress_figures(url))
    if args.verify:
        from kvpool.bench.verify import verify_runs

        # KV-Pool and vLLM's server say their context length in /v1/models; Ray Serve LLM does not.
        max_model_len = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0].get("max_model_len")
        result.update(verify_runs(model_path, {"replay": records}, max_model_len, args.verify_tolerance)["replay"])
    if args.out:
        from kvpool.bench.plots import plot_turns

        out = Path(args.out)
        out.write_text(json.dumps({"summary": result, "records": [asdict(r) for r in records]}))
        plot_turns({"replay": records}, out)
    return result
