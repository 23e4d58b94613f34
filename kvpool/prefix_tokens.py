"""Tokenizing an agent's next turn without tokenizing its whole history again.

Each turn of an agent session is the previous prompt's text plus a few new messages, and tokenizing it from scratch
is the ingress's largest cost before routing: 100K tokens take ~0.3 s on this project's CPU machine (HF fast
tokenizer, ~3 us a token). A fast tokenizer splits its special tokens (`<|im_start|>`, ...) out of the text before
anything else, and tokenizes the pieces between them on their own; so up to the last special token that a recent
prompt shares with this one, this prompt's tokens are that prompt's, and only the rest is tokenized (from that
special token on, so the piece after it is not the text's first, as it is not in the whole).

Exactness is checked, not assumed: `PrefixTokenizer` refuses tokenizers whose special tokens are normalised or
whose post-processor appends tokens, tests itself on rendered conversations when made (a mismatch turns it off), and
every `audit_every`-th reuse also tokenizes the whole text and compares: a mismatch turns it off for good and the
whole tokenization is what the request gets. Either way the request's tokens are the from-scratch ones.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_KEY_CHARS = 1024  # recent prompts are found by their first characters (a session's system prompt and tools)


@dataclass
class _Tokenized:
    key: str  # the text's first characters and whether special tokens were added: how it is found
    text: str
    ids: list[int]
    # (start character, token index) of each special token in the text, in order
    specials: list[tuple[int, int]]


class PrefixTokenizer:
    """`encode(text, **kwargs)`: the token ids `tokenizer(text, **kwargs)` gives, reusing a recent prompt's tokens
    up to the last special token both texts share. Keeps recent prompts up to `capacity_tokens` tokens in all.
    Thread-safe (vLLM tokenizes in a thread pool)."""

    def __init__(self, tokenizer, capacity_tokens: int = 4_000_000, min_reuse_chars: int = 4096,
                 audit_every: int = 64):
        self.tokenizer = tokenizer
        self.capacity_tokens, self.min_reuse_chars, self.audit_every = capacity_tokens, min_reuse_chars, audit_every
        self._recent: OrderedDict[int, _Tokenized] = OrderedDict()  # LRU, by id(entry)
        self._by_key: dict[str, list[int]] = {}
        self._tokens = 0
        self._lock = threading.Lock()
        self.counts = {"reused": 0, "whole": 0, "reused_tokens": 0, "audited": 0}
        self.off_reason = self._unsupported_reason()
        if self.off_reason is None:
            self.off_reason = self._self_test()
            self._recent.clear(), self._by_key.clear()
            self._tokens = 0
            self.counts = dict.fromkeys(self.counts, 0)
        if self.off_reason:
            logger.info("prompts are tokenized whole: %s", self.off_reason)

    def stats(self) -> dict:
        """For /v1/kvpool/stats: prompts tokenized by reuse and whole, tokens reused, audits, and why reuse is off."""
        return {**self.counts, "off": self.off_reason}

    def _unsupported_reason(self) -> str | None:
        tok = self.tokenizer
        added = getattr(tok, "added_tokens_decoder", None)
        if not getattr(tok, "is_fast", False) or added is None:
            return "not a fast (Rust) tokenizer"
        specials = [a for a in added.values() if a.special]
        if not specials or any(a.normalized or a.single_word for a in specials):
            return "its special tokens are matched on normalised text"
        probe = "hello world"
        with_specials, plain = tok(probe, add_special_tokens=True).input_ids, tok(probe, add_special_tokens=False).input_ids
        if with_specials[len(with_specials) - len(plain):] != plain:
            return "its post-processor appends tokens"
        self._adds_specials = len(with_specials) != len(plain)
        self._special_ids = {tok.convert_tokens_to_ids(a.content) for a in specials}
        contents = sorted({a.content for a in specials}, key=len, reverse=True)  # leftmost-longest, as HF matches
        self._special_re = re.compile("|".join(map(re.escape, contents)))
        self._max_special = len(contents[0])
        return None

    def _self_test(self) -> str | None:
        """Tokenize a few growing conversations both ways: any difference turns reuse off."""
        template = getattr(self.tokenizer, "chat_template", None)
        pieces = ["Hello there", "  leading spaces\n\nand blank lines", "unicode: déjà vu — 日本語 🙂", "x = 1  # 42\n\t",
                  "trailing space ", "<not special>", "\n"]
        messages = [{"role": "system", "content": "You are a coding agent. " * 300}]
        for i in range(6):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": pieces[i % len(pieces)] * 5})
            if template:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = "".join(m["content"] for m in messages)
            for add in (False, True):
                if self.encode(text, add_special_tokens=add, _audit=True) != \
                        self.tokenizer(text, add_special_tokens=add).input_ids:
                    return "its tokens differ when reused (self-test)"
        if self.counts["reused"] == 0:
            return "the self-test reused nothing"
        return self.off_reason  # set by an audit that failed

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None, _audit: bool = False) -> list[int]:
        if self.off_reason is not None or len(text) < self.min_reuse_chars:
            self.counts["whole"] += 1
            return self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=truncation,
                                  max_length=max_length).input_ids
        ids = self._reuse(text, add_special_tokens, _audit)
        if ids is None:
            self.counts["whole"] += 1
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
            self._remember(text, ids, add_special_tokens)
        if not truncation or max_length is None or len(ids) <= max_length:
            return ids
        if add_special_tokens and self._adds_specials:  # the tokenizer keeps room for its BOS: let it cut
            return self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length).input_ids
        # What the tokenizer's own truncation keeps: the first or (vLLM's default) the last max_length tokens.
        return ids[:max_length] if self.tokenizer.truncation_side == "right" else ids[len(ids) - max_length:]

    def _reuse(self, text: str, add_special_tokens: bool, audit: bool) -> list[int] | None:
        with self._lock:
            best, shared = None, 0
            for key in self._by_key.get(_key(text, add_special_tokens), ()):
                entry = self._recent.get(key)
                if entry is not None and (n := _common_prefix(entry.text, text)) > shared:
                    best, shared = entry, n
            if best is None:
                return None
            self._recent.move_to_end(id(best))
        # The last special token wholly inside the shared prefix (and no longer one could start there).
        split = next(((start, at) for start, at in reversed(best.specials)
                      if start + self._max_special <= shared), None)
        if split is None:
            return None
        start, at = split
        tail = self.tokenizer(text[start:], add_special_tokens=False).input_ids
        ids = best.ids[:at] + tail
        self.counts["reused"] += 1
        self.counts["reused_tokens"] += at
        if audit or self.counts["reused"] % self.audit_every == 0:
            self.counts["audited"] += 1
            whole = self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
            if whole != ids:
                self.off_reason = "a reused tokenization differed from the whole one (audit)"
                logger.error("prompt tokens reuse turned off: %s", self.off_reason)
                return whole
        # The shared part's special tokens are the recent prompt's: only the tail's are looked for.
        head = [(c, t) for c, t in best.specials if c < start]
        # A text that extends the recent one whole shares at least as much with any later text: it replaces it, so
        # a session keeps one entry (its latest turn), not one a turn to compare each next turn with.
        self._remember(text, ids, add_special_tokens, head, start, at,
                       replaces=best if shared == len(best.text) else None)
        return ids

    def _remember(self, text: str, ids: list[int], add_special_tokens: bool,
                  head: list[tuple[int, int]] | None = None, from_char: int = 0, from_token: int = 0,
                  replaces: _Tokenized | None = None) -> None:
        special_at = [i for i in range(from_token, len(ids)) if ids[i] in self._special_ids]
        starts = [m.start() for m in self._special_re.finditer(text, from_char)]
        if add_special_tokens and not from_token and len(special_at) == len(starts) + 1:
            special_at = special_at[1:]  # a BOS the post-processor put first is no special token of the text
        if len(special_at) != len(starts):
            return  # the text's special tokens and the ids' do not pair up: never reused
        entry = _Tokenized(_key(text, add_special_tokens), text, ids, (head or []) + list(zip(starts, special_at)))
        with self._lock:
            if replaces is not None and id(replaces) in self._recent:
                self._forget(id(replaces))
            self._recent[id(entry)] = entry
            self._by_key.setdefault(entry.key, []).append(id(entry))
            self._tokens += len(ids)
            while self._tokens > self.capacity_tokens and len(self._recent) > 1:
                self._forget(next(iter(self._recent)))

    def _forget(self, entry_id: int) -> None:
        """Drop an entry (the caller holds the lock)."""
        old = self._recent.pop(entry_id)
        self._tokens -= len(old.ids)
        same_key = self._by_key[old.key]
        same_key.remove(entry_id)
        if not same_key:
            del self._by_key[old.key]


def _key(text: str, add_special_tokens: bool) -> str:
    return f"{add_special_tokens:d}" + text[:_KEY_CHARS]


def _common_prefix(a: str, b: str, chunk: int = 4096) -> int:
    """Length of the common prefix of `a` and `b`: chunk by chunk, then bisected within the first that differs."""
    n = min(len(a), len(b))
    i = 0
    while i + chunk <= n and a[i:i + chunk] == b[i:i + chunk]:
        i += chunk
    if a[i:n] == b[i:n]:
        return n
    lo, hi = i, min(i + chunk, n)  # a[:lo] == b[:lo], and a[lo:hi] != b[lo:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
