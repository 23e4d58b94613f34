"""Traces as the simulator takes them: per session, per turn, the keys of the prompt's engine blocks (int64 below
2**62; equal key and equal preceding keys = equal KV), its length, output length and think time. Compact (a numpy array per
turn), so all 530 kv-cache-tester conversations load in seconds and a few hundred MB."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvpool.traces import _key_seed, detect_format, kv_cache_tester_sessions, read_sessions


@dataclass
class SimTurn:
    keys: np.ndarray  # int64, one per full block of the prompt
    prompt_tokens: int
    max_tokens: int
    think_s: float


@dataclass
class SimSession:
    name: str
    turns: list[SimTurn] = field(default_factory=list)


def load(path: Path, trace_format: str | None, sessions_wanted: int, block_size: int, max_context: int = 0,
         max_output: int = 0, max_turns: int = 0) -> list[SimSession]:
    """The trace's sessions at full length; with `max_context`, the sessions `kvpool bench replay` and `kvpool
    compare` send with the same options (scaled to fit, tokenized by the embedded model), to predict such a run."""
    trace_format = trace_format or detect_format(path)
    if max_context:
        return _as_replayed(path, trace_format, sessions_wanted, block_size, max_context, max_output, max_turns)
    if trace_format == "kv-cache-tester":
        return _kv_cache_tester(path, sessions_wanted, block_size)
    sessions = read_sessions(path, trace_format, sessions_wanted)
    if sessions and sessions[0].turns[0].blocks is None:
        raise ValueError(f"{trace_format} is a chat trace: give --max-context to tokenize it as a replay would")
    return [_from_pieces(s, block_size) for s in sessions][:sessions_wanted]


def _as_replayed(path: Path, trace_format: str, n: int, block_size: int, max_context: int, max_output: int,
                 max_turns: int) -> list[SimSession]:
    from kvpool.bench.replay import Bound, load_sessions
    from kvpool.model import resolve_model
    from kvpool.prompt import PromptRenderer

    renderer = PromptRenderer.from_pretrained(resolve_model(""))
    bound = Bound(block_size, renderer)
    out = []
    for s in load_sessions(path, n, max_context, max_output, renderer, max_turns, trace_format):
        session = SimSession(s.name)
        for t in s.turns:
            ids = bound.prompt_ids(t)
            blocks = np.asarray(ids[:len(ids) // block_size * block_size], dtype=np.int64).reshape(-1, block_size)
            keys = np.array([_key_seed(b.tobytes()) >> 2 for b in blocks], dtype=np.int64)
            session.turns.append(SimTurn(keys, len(ids), min(t.max_tokens, max_output) if max_output else
                                         t.max_tokens, t.think_s))
        out.append(session)
    return out


def _kv_cache_tester(path: Path, sessions_wanted: int, block_size: int) -> list[SimSession]:
    """kv-cache-tester sessions (kvpool.traces.kv_cache_tester_sessions). A key is the trace's number in the high
    bits and its hash id in the low ones: hash ids are local to their trace."""
    out = []
    for s in kv_cache_tester_sessions(path, sessions_wanted):
        if s.block_size != block_size:
            raise ValueError(f"{s.name}: the trace's blocks are {s.block_size} tokens; simulate with "
                             f"--block-size {s.block_size}")
        session = SimSession(s.name)
        for r in s.requests:
            prompt = r["in"]
            full = min(len(r["hash_ids"]), prompt // block_size)
            keys = (np.int64(s.trace_no) << np.int64(32)) | np.asarray(r["hash_ids"][:full], dtype=np.int64)
            session.turns.append(SimTurn(keys, prompt, max(1, r["out"]), r.get("think_time") or 0.0))
        out.append(session)
    return out


def _from_pieces(session, block_size: int) -> SimSession:
    """A token-id trace session (kvpool.traces: pieces of (content key, tokens), all full but the last) in engine
    blocks: a piece longer than a block is that many blocks."""
    out = SimSession(session.name)
    for t in session.turns:
        keys: list[int] = []
        for key, n in t.blocks:
            keys += [_key_seed(key) >> 2] if n <= block_size else \
                [_key_seed((key, j)) >> 2 for j in range(-(-n // block_size))]
        prompt = sum(n for _, n in t.blocks)
        out.turns.append(SimTurn(np.asarray(keys[:prompt // block_size], dtype=np.int64), prompt, t.max_tokens,
                                 t.think_s))
    return out
