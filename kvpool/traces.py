"""Agent workload traces as replayable sessions: each session a list of turns, each turn one chat request.

Claude Code transcripts (../shared/traces/claude-code): every assistant message (one API response, possibly spread
over several lines that share a message id) becomes one request carrying the session's messages up to that point,
with tool calls and tool results rendered as text, as an agent sends them. Each transcript file is a session; the
subagent and compaction side-sessions under <uuid>/subagents/ are sessions of their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass
class Turn:
    messages: list[dict]  # the request's messages (OpenAI chat format)
    max_tokens: int  # the trace's output length
    think_s: float = 0.0  # the agent's pause before sending this turn


@dataclass
class Session:
    name: str
    turns: list[Turn] = field(default_factory=list)


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


def fit_context(session: Session, max_chars: int) -> Session:
    """Shrink a session so its longest request fits `max_chars`, keeping its growth pattern: every message is
    truncated by the same factor, and a message is truncated the same way in every turn, so each request is still
    a prefix of the next (what makes agent traffic cacheable)."""
    longest = max(sum(len(m["content"]) for m in t.messages) for t in session.turns)
    if longest <= max_chars:
        return session
    f = max_chars / longest
    cut = lambda s: s[: max(1, math.floor(len(s) * f))]  # noqa: E731
    return Session(session.name, [Turn([{"role": m["role"], "content": cut(m["content"])} for m in t.messages],
                                       t.max_tokens, t.think_s) for t in session.turns])
