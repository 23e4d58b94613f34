"""Agent workload traces as replayable sessions: each session a list of turns, each turn one request.

Five formats (../shared/traces/README.md), chosen with `--trace-format` or detected from the path:

claude-code  Claude Code transcripts: every assistant message (one API response, possibly spread over several
             lines that share a message id) becomes one request carrying the session's messages up to that point,
             with tool calls and tool results rendered as text, as an agent sends them. Each transcript file is a
             session; the subagent and compaction side-sessions under <uuid>/subagents/ are sessions of their own.
swe-agent    SWE-agent trajectories (.traj): every assistant message of the append-only `history` becomes one
             request carrying the messages before it. The trajectories have no output lengths or think times: the
             output is the assistant message's estimated length, the think time zero.
aiperf       aiperf agentic sessions (dataset.jsonl): lines grouped by `session_id`; a turn's prompt is the previous
             prompt, the previous output, then the turn's new hash blocks; `delay` is the think time.
mooncake     Mooncake requests (one file; a folder means its conversation_trace.jsonl): no sessions, so request j
             goes to client j % `clients`, and each client is one closed-loop session with no think time: the
             requests keep their trace order, the trace's open-loop arrival times are not used.
kv-cache-tester  Real Claude Code conversations as block hashes (trace_NNNN.json.gz, or a folder of them, read in
             name order until `clients` sessions are there): each conversation a session of its requests, each
             subagent in it a session of its own; `think_time` is the think time.

claude-code and swe-agent turns are chat messages. aiperf, mooncake and kv-cache-tester carry no text, only hash
ids, each standing for a block of the trace's tokens (512 tokens; kv-cache-tester 64; equal id, equal content):
their turns are token-id prompts, described as pieces (content key, trace tokens) and made into token ids by
`fit_tokens`, which draws each key's tokens from a generator seeded by the key. So equal ids give equal tokens across
sessions, and every request of an aiperf session is an exact prefix of its next one (the previous output is drawn
from a key of the session and turn). To fit a context, `fit_tokens` shrinks every block by one factor instead of
cutting prompts (down to one token per hash block).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import msgspec
import numpy as np

FORMATS = ("claude-code", "aiperf", "mooncake", "swe-agent", "kv-cache-tester")
CHARS_PER_TOKEN = 3  # estimates an answer's tokens from its text where a trace gives no count
BLOCK_TOKENS = 512  # tokens per hash id in the aiperf and Mooncake traces: the unit of fit_tokens' scale
MIN_BLOCK_TOKENS = 1  # scaling stops at one token per 512-token block (each hash block keeps a token); longer cut
FIRST_TOKEN_ID = 100  # synthetic prompts stay above the special and byte tokens
DEFAULT_VOCAB_SIZE = 49152  # the embedded SmolLM2's tokenizer


@dataclass
class Turn:
    messages: list[dict]  # chat traces: the request's messages (OpenAI chat format); token-id traces: empty
    max_tokens: int  # the trace's output length
    think_s: float = 0.0  # the agent's pause before sending this turn
    blocks: list[tuple[object, int]] | None = None  # token-id traces: the prompt as (content key, trace tokens)
    prompt_ids: list[int] | None = None  # token-id traces: the prompt's token ids, made by fit_tokens


@dataclass
class Session:
    name: str
    turns: list[Turn] = field(default_factory=list)


def detect_format(path: Path) -> str:
    """The format a trace path names by its file or folder name; claude-code if none matches."""
    name = " ".join(path.parts[-2:]).lower()
    if path.suffix == ".traj" or "swe-agent" in name:
        return "swe-agent"
    if name.endswith(".json.gz") or "kv-cache-tester" in name:
        return "kv-cache-tester"
    return next((fmt for fmt in ("aiperf", "mooncake") if fmt in name), "claude-code")


def read_sessions(path: Path, trace_format: str | None = None, clients: int = 16) -> list[Session]:
    """The sessions of a trace in `trace_format` (None: detected from the path); `clients` is the sessions wanted
    (mooncake deals its requests to that many; kv-cache-tester reads conversations until it has that many)."""
    trace_format = trace_format or detect_format(path)
    if trace_format == "mooncake":
        return read_mooncake(path, clients)
    if trace_format == "kv-cache-tester":
        return read_kv_cache_tester(path, clients)
    readers = {"claude-code": read_claude_code, "aiperf": read_aiperf, "swe-agent": read_swe_agent}
    return readers[trace_format](path)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(block["text"])
        elif kind == "tool_use":
            parts.append(f"[tool call {block.get('name')}] {json.dumps(block.get('input'), sort_keys=True)}")
        elif kind == "tool_result":
            inner = block.get("content")
            parts.append(f"[tool result] {_text(inner) if isinstance(inner, list) else inner}")
        # thinking blocks are not sent back to the model by agents: dropped
    return "\n".join(p for p in parts if p)


def _time(ts: str | None) -> float | None:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if ts else None


def read_claude_code_file(path: Path) -> Session:
    session = Session(path.stem)
    history: list[dict] = []
    last_end: float | None = None
    current_id, current_parts, current_start = None, [], None

    def close_assistant():
        nonlocal current_id, current_parts
        if current_id is not None:
            history.append({"role": "assistant", "content": _text(current_parts) or "(no text)"})
        current_id, current_parts = None, []

    for line in path.read_text().splitlines():
        ev = json.loads(line)
        kind = ev.get("type")
        if kind not in ("user", "assistant"):
            continue
        msg = ev.get("message") or {}
        if kind == "assistant":
            if msg.get("id") != current_id:
                close_assistant()
                current_id = msg.get("id")
                current_start = _time(ev.get("timestamp"))
                out = (msg.get("usage") or {}).get("output_tokens") or 64
                think = max(0.0, current_start - last_end) if (current_start and last_end) else 0.0
                if history and history[-1]["role"] == "user":
                    session.turns.append(Turn([dict(m) for m in history], int(out), think))
            current_parts.extend(msg.get("content") or [])
            last_end = _time(ev.get("timestamp")) or last_end
        else:
            close_assistant()
            text = _text(msg.get("content"))
            if not text:
                continue
            if history and history[-1]["role"] == "user":  # consecutive tool results: one user message
                history[-1]["content"] += "\n" + text
            else:
                history.append({"role": "user", "content": text})
            last_end = _time(ev.get("timestamp")) or last_end
    return session


def read_claude_code(root: Path) -> list[Session]:
    """The main transcripts (<uuid>.jsonl) and their subagent/compaction side-sessions, largest first."""
    files = sorted(p for p in root.glob("*.jsonl") if len(p.stem) == 36)
    files += sorted(root.glob("*/subagents/*.jsonl"))
    sessions = [s for s in (read_claude_code_file(f) for f in files) if s.turns]
    return sorted(sessions, key=lambda s: -len(s.turns))


def read_swe_agent_file(path: Path) -> Session:
    session = Session(path.stem)
    messages: list[dict] = []
    for m in json.loads(path.read_text())["history"]:
        text = _text(m.get("content"))
        action = (m.get("action") or "").strip()
        if m["role"] == "assistant":
            if action and action not in text:  # function-calling agents send the action as a tool call
                text += f"\n[tool call] {action}"
            if messages:
                session.turns.append(Turn([dict(x) for x in messages], max(1, len(text) // CHARS_PER_TOKEN)))
        # Tool results as user text, as for Claude Code: a chat "tool" message would need the call's id.
        messages.append({"role": "user" if m["role"] == "tool" else m["role"], "content": text or "(no text)"})
    return session


def read_swe_agent(path: Path) -> list[Session]:
    """One .traj file, or every .traj file of a folder, largest first."""
    files = sorted(path.glob("*.traj")) if path.is_dir() else [path]
    sessions = [s for s in (read_swe_agent_file(f) for f in files) if s.turns]
    return sorted(sessions, key=lambda s: -len(s.turns))


def _hash_blocks(hash_ids: list, tokens: int, block_tokens: int = BLOCK_TOKENS) -> list[tuple[object, int]]:
    """The pieces of `tokens` trace tokens spread over `hash_ids` blocks: all full but the last."""
    if not hash_ids:
        return []
    last = min(block_tokens, max(1, tokens - block_tokens * (len(hash_ids) - 1)))
    return [(h, block_tokens) for h in hash_ids[:-1]] + [(hash_ids[-1], last)]


def read_aiperf(path: Path) -> list[Session]:
    """The sessions of an aiperf agentic dataset (a dataset.jsonl file or its folder), in file order."""
    if path.is_dir():
        path = path / "dataset.jsonl"
    sessions: dict[str, Session] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        sid = row["session_id"]
        session = sessions.setdefault(sid, Session(sid))
        blocks = []
        if session.turns:
            prev, prev_index = session.turns[-1], len(session.turns) - 1
            # The previous answer, drawn from keys of the session and turn: the same in every later prompt.
            output = [((sid, prev_index, i), min(BLOCK_TOKENS, prev.max_tokens - i * BLOCK_TOKENS))
                      for i in range(math.ceil(prev.max_tokens / BLOCK_TOKENS))]
            blocks = prev.blocks + output
        blocks = blocks + _hash_blocks(row["hash_ids"], row["input_length"])
        session.turns.append(Turn([], row["output_length"], row.get("delay", 0.0) / 1000, blocks))
    return list(sessions.values())


def read_mooncake(path: Path, clients: int) -> list[Session]:
    """The requests of a Mooncake trace dealt round-robin to `clients` sessions."""
    if path.is_dir():
        path = path / "conversation_trace.jsonl"
    sessions = [Session(f"{path.stem}-client{c}") for c in range(clients)]
    for j, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        turn = Turn([], row["output_length"], 0.0, _hash_blocks(row["hash_ids"], row["input_length"]))
        sessions[j % clients].turns.append(turn)
    return [s for s in sessions if s.turns]


@dataclass
class KVCacheTesterSession:
    """One kv-cache-tester conversation, or one of its subagents (a session of its own)."""
    name: str
    trace_no: int  # the trace file's place in name order: its hash ids are local to it
    trace_id: str
    block_size: int  # tokens per hash id
    requests: list[dict]  # the session's own requests that carry hash ids (its subagents' are theirs)


def kv_cache_tester_sessions(path: Path, sessions_wanted: int) -> list[KVCacheTesterSession]:
    """kv-cache-tester conversations in name order, until `sessions_wanted` sessions are read (whole conversations:
    a subagent is a session of its own, listed after its parent). The one walk of the format: the replays
    (read_kv_cache_tester) and the simulator (kvpool.sim.workload) build their sessions from it."""
    files = sorted(path.glob("trace_*.json.gz")) if path.is_dir() else [path]
    sessions: list[KVCacheTesterSession] = []

    def add(name: str, trace_no: int, trace: dict, requests: list[dict]) -> None:
        session = KVCacheTesterSession(name, trace_no, trace["id"], trace["block_size"], [])
        sessions.append(session)
        for r in requests:
            if r.get("type") == "subagent":
                add(f"{name}/{r.get('agent_id', len(sessions))}", trace_no, trace, r["requests"])
            elif r.get("hash_ids"):
                session.requests.append(r)

    for no, f in enumerate(files):
        if len(sessions) >= sessions_wanted:
            break
        with gzip.open(f) as fh:
            trace = msgspec.json.decode(fh.read())
        add(f.name.removesuffix(".json.gz"), no, trace, trace["requests"])
    return [s for s in sessions if s.requests]


def read_kv_cache_tester(path: Path, sessions_wanted: int) -> list[Session]:
    """kv-cache-tester sessions (kv_cache_tester_sessions) as token-id trace sessions: hash ids are local to their
    conversation, so a block's content key is (trace id, hash id)."""
    return [Session(s.name, [Turn([], max(1, r["out"]), r.get("think_time") or 0.0,
                                  _hash_blocks([(s.trace_id, h) for h in r["hash_ids"]], r["in"], s.block_size))
                             for r in s.requests])
            for s in kv_cache_tester_sessions(path, sessions_wanted)]


def _shrunk(turn: Turn, f: float) -> Turn:
    cut = lambda s: s[: max(1, math.floor(len(s) * f))]  # noqa: E731
    return Turn([{"role": m["role"], "content": cut(m["content"])} for m in turn.messages], turn.max_tokens,
                turn.think_s)


def fit_chat(session: Session, max_tokens: int, count_tokens: Callable[[list[dict]], int]) -> Session:
    """Shrink a chat session so its longest request renders to at most `max_tokens` tokens (`count_tokens`: the
    model's chat template and tokenizer), keeping its growth pattern: every message is truncated by the same
    factor, and a message is truncated the same way in every turn, so each request is still a prefix of the next
    (what makes agent traffic cacheable). The factor is searched on the model's own tokens, so a tokenizer with
    fewer characters per token still fits and one with more still fills the context.

    The longest request is taken to be the one with the most characters: in an agent session (both chat readers'),
    the last, which holds all the others."""
    if not session.turns:
        return session
    chars = lambda t: sum(len(m["content"]) for m in t.messages)  # noqa: E731
    longest = max(session.turns, key=chars)
    # What no factor shrinks: the template's tokens and the one character each message keeps.
    floor = count_tokens(_shrunk(longest, 0.0).messages)
    if floor > max_tokens:
        raise ValueError(f"{session.name}: a turn of {len(longest.messages)} messages takes {floor} tokens even cut "
                         f"to one character a message, over {max_tokens}; give a larger --max-context or fewer --turns")
    # First guess: 4 characters a token (English and code average a little less), so the first count is of a text
    # near the budget, never of a 100K-token transcript.
    f = min(1.0, 4 * max_tokens / max(1, chars(longest)))
    fits, too_long = 0.0, math.inf  # the largest factor known to fit (0: the floor), the smallest known not to
    for _ in range(12):
        n = count_tokens(_shrunk(longest, f).messages)
        if n <= max_tokens:
            fits = f
            if f == 1.0 or n >= 0.98 * max_tokens:
                break
        else:
            too_long = f
        # The tokens above the floor grow about linearly with the kept characters.
        f = min(1.0, f * (0.995 * max_tokens - floor) / max(1, n - floor))
        if not fits < f < too_long:
            f = (fits + min(too_long, 1.0)) / 2
    return session if fits == 1.0 else Session(session.name, [_shrunk(t, fits) for t in session.turns])


def scaled_tokens(trace_tokens, per_block: int):
    """A piece's length (int or array) when a full block holds `per_block` tokens; a partial block keeps its share,
    rounded up so it never vanishes."""
    return -(-trace_tokens * per_block // BLOCK_TOKENS)


def tokens_per_block(sessions: list[Session], max_tokens: int) -> int:
    """The most tokens per hash block, from 512 down to MIN_BLOCK_TOKENS, at which every prompt fits."""
    pieces = [np.array([n for _, n in t.blocks], dtype=np.int64) for s in sessions for t in s.turns]

    def fits(per_block: int) -> bool:
        return all(scaled_tokens(p, per_block).sum() <= max_tokens for p in pieces)

    lo, hi = MIN_BLOCK_TOKENS, BLOCK_TOKENS  # binary search: prompt lengths grow with per_block
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _key_seed(key: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def fit_tokens(sessions: list[Session], max_tokens: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[Session]:
    """Token-id sessions with their prompts made, the longest fitting `max_tokens`. Every block shrinks from 512
    tokens to the same `tokens_per_block` (one factor for all sessions, so blocks they share stay equal), which keeps
    the growth pattern and the exact-prefix chain of each session. Prompts still too long at MIN_BLOCK_TOKENS are
    cut to `max_tokens`, with a warning: still a prefix of the next prompt, but a cut prompt may repeat the previous
    one whole."""
    per_block = tokens_per_block(sessions, max_tokens)
    block_ids: dict[object, list[int]] = {}
    fitted, cut = [], 0
    for s in sessions:
        turns = []
        for t in s.turns:
            ids: list[int] = []
            for key, n in t.blocks:
                if key not in block_ids:
                    rng = np.random.default_rng(_key_seed(key))
                    block_ids[key] = rng.integers(FIRST_TOKEN_ID, vocab_size, per_block).tolist()
                ids += block_ids[key][: scaled_tokens(n, per_block)]
            cut += len(ids) > max_tokens
            turns.append(Turn([], t.max_tokens, t.think_s, t.blocks, ids[:max_tokens]))
        fitted.append(Session(s.name, turns))
    if cut:
        warnings.warn(f"{cut} prompts cut to {max_tokens} tokens even at {per_block} tokens per hash block")
    return fitted
