"""A hash table of 64-bit block ids -> owner bits, in numpy arrays, looked up a whole prompt at a time.

The router asks, for every block of a 100K-token prompt (3K blocks), which replicas hold it and which nodes' pools
do. A Python dict answers at ~0.3 us a probe at a million entries (memory-bound), ~1 ms a prompt per structure;
this table answers all of a prompt's blocks in a few vectorised passes (open addressing, linear probing; the few ids
left in long probe runs are finished one by one).

- Ids are taken odd (`id | 1`): 0 marks an empty slot, so ids keep 63 bits (ids name blocks where a collision costs
  a mis-route or a mis-predicted pool hit, never wrong output; see kvpool.hashing).
- Owners are bits in uint64 words (one row per slot; words are added when a bit beyond them is used). A row whose
  bits are all gone stays as a key (a tombstone: probing continues past it). When live keys plus tombstones pass a
  third of the slots the table is rebuilt at a quarter load or less (a 3K-block lookup at 1M keys: ~0.2 ms at a
  quarter, ~0.35 ms at a half); that is a stall (~0.3 s at 1M keys), so it should happen only as the table grows.
  Tombstones are therefore swept as they accumulate, a bounded stretch of slots per insert (see _sweep), and churn
  (blocks stored and evicted at the same rate) never rebuilds.
- A slot is one row: its id, then its owner words, so a probe's cache miss brings the owners along. One extra row,
  past the last slot, is always zero: an absent id's owners read from it.
"""

from __future__ import annotations

import numpy as np

_MIN_SLOTS = 1 << 10
_SCALAR_TAIL = 48  # unresolved ids below which probing goes on one by one
_SWEEP_PER_ID = 16  # slots swept per inserted id while tombstones exceed _SWEEP_ABOVE of the slots
_SWEEP_ABOVE = 1 / 24
_SEARCH = 4096  # how far a sweep looks for the empty slot that bounds a stretch


def _bits(word_index: int, x: int):
    """The owner bits set in word `word_index` whose value is `x`."""
    while x:
        low = x & -x
        yield word_index * 64 + low.bit_length() - 1
        x ^= low


class BlockTable:
    """Several structures may share one table, each with owner bits of its own (the router's index: one per replica;
    its pool view: one per node and layout): a prompt's lookup for all of them is then one lookup, paying numpy's
    per-call cost once (the random reads, ~25 ns a block here, are paid per id either way)."""

    def __init__(self, slots: int = _MIN_SLOTS):
        self._alloc(slots, 1)
        self.rebuilds = 0
        self._free_bits: list[int] = []
        self._next_bit = 0

    def new_bit(self) -> int:
        """An owner bit no one uses (it holds nothing)."""
        if self._free_bits:
            return self._free_bits.pop()
        self._next_bit += 1
        return self._next_bit - 1

    def free_bit(self, bit: int) -> None:
        """Owner `bit` is gone: it holds nothing, and may be handed out again."""
        self.clear_bit(bit)
        self._free_bits.append(bit)

    def _alloc(self, slots: int, words: int) -> None:
        assert slots & (slots - 1) == 0, "slots must be a power of two"
        self._rows = np.zeros((slots + 1, 1 + words), dtype=np.uint64)  # [id, owner words...] per slot
        self._mask = slots - 1
        self._used = 0  # slots holding an id (live or tombstone); may over-count (see _claim)
        self._tombstones = 0  # slots holding an id no owner holds
        self._cursor = 0  # where the next sweep starts

    @property
    def slots(self) -> int:
        return self._mask + 1

    @property
    def words(self) -> int:
        return self._rows.shape[1] - 1

    @staticmethod
    def _ids(ids) -> np.ndarray:
        return np.asarray(ids, dtype=np.uint64) | np.uint64(1)

    def _find(self, q: np.ndarray) -> np.ndarray:
        """The slot of each id in `q` (already odd), the zero row for an absent one. The lookup of a prompt: every
        pass works on all its ids (a numpy call costs microseconds whatever its size), few passes are needed."""
        flat, stride, mask = self._rows.reshape(-1), self._rows.shape[1], self._mask
        slot = ((q >> np.uint64(1)) & np.uint64(mask)).view(np.int64)
        while True:
            k = flat.take(slot * stride)
            moving = np.flatnonzero((k != q) & (k != 0))  # neither found nor known absent: probe the next slot
            if len(moving) <= _SCALAR_TAIL:
                break
            slot[moving] = (slot[moving] + 1) & mask
        for i in moving.tolist():
            s, x = int(slot[i]), int(q[i])
            while (k_i := int(flat[s * stride])) not in (x, 0):
                s = (s + 1) & mask
            slot[i], k[i] = s, k_i
        return np.where(k == q, slot, self.slots)

    def _claim(self, q: np.ndarray) -> np.ndarray:
        """The slot of each id in `q` (already odd), taking a free one for an absent id (room must have been
        reserved). Each pass works on the ids still unresolved: a table insert can be a whole rebuild."""
        flat, stride, mask = self._rows.reshape(-1), self._rows.shape[1], self._mask
        out = np.empty(len(q), dtype=np.int64)
        pending = np.arange(len(q))
        cq, cs = q, ((q >> np.uint64(1)) & np.uint64(mask)).view(np.int64)
        while len(pending) > _SCALAR_TAIL:
            empty = flat.take(cs * stride) == 0
            # Two new ids may claim one slot in the same pass: the last write wins, the other probes on.
            # (Identical ids both win; `_used` then counts the slot twice, which only rebuilds sooner.)
            flat[cs[empty] * stride] = cq[empty]
            found = flat.take(cs * stride) == cq
            self._used += int(np.count_nonzero(empty & found))
            out[pending[found]] = cs[found]
            rest = ~found
            pending, cq, cs = pending[rest], cq[rest], (cs[rest] + 1) & mask
        for i, x, s in zip(pending.tolist(), cq.tolist(), cs.tolist()):
            while (k := int(flat[s * stride])) != x:
                if k == 0:
                    flat[s * stride] = x
                    self._used += 1
                    break
                s = (s + 1) & mask
            out[i] = s
        return out

    def _reserve(self, n: int) -> None:
        if (self._used + n) * 3 > self.slots:
            self._rebuild(n)

    def _rebuild(self, extra: int) -> None:
        rows = self._rows[:-1]
        live = rows[rows[:, 1:].any(axis=1)]
        slots = _MIN_SLOTS
        while slots < 4 * (len(live) + extra):
            slots <<= 1
        self._alloc(slots, self.words)
        self._rows[self._claim(live[:, 0]), 1:] = live[:, 1:]
        self.rebuilds += 1

    def _sweep(self, span: int) -> None:
        """Compact about `span` slots from the cursor: tombstones go, and the live ids there are placed again. A
        stretch of slots between two empty ones holds every id whose probe started in it (a probe never crosses an
        empty slot), so it can be compacted on its own; at the table's end, the stretch that wraps around to its
        start is compacted with the last one."""
        keys, n = self._rows[:, 0], self.slots
        a = self._cursor
        empty = np.flatnonzero(keys[a:min(a + _SEARCH, n)] == 0)
        if not len(empty):  # a long stretch: skipped
            self._cursor = a + _SEARCH if a + _SEARCH < n else 0
            return
        a += int(empty[0]) + 1  # slot a-1 is empty
        b0 = a + span
        end = np.flatnonzero(keys[b0:min(b0 + _SEARCH, n)] == 0) if b0 < n else ()
        if len(end):
            self._cursor = b0 + int(end[0])  # empty: the stretch ends there
            self._compact([slice(a, self._cursor)])
            return
        # The table's end: up to its last empty slot, then the stretch that wraps around (to the first one).
        tail, head = np.flatnonzero(keys[max(a - 1, n - _SEARCH):n] == 0), np.flatnonzero(keys[:_SEARCH] == 0)
        self._cursor = 0
        if len(tail) and len(head):  # (else a stretch too long to look for its ends: skipped)
            last, first = max(a - 1, n - _SEARCH) + int(tail[-1]), int(head[0])
            self._compact(([slice(a, last)] if a < last else []) + [slice(last + 1, n), slice(0, first)])
            self._cursor = first

    def _compact(self, stretches: list[slice]) -> None:
        """Tombstones out of `stretches` (which together hold every id whose probe starts in them)."""
        parts = [self._rows[s] for s in stretches]
        held = sum(int(np.count_nonzero(p[:, 0])) for p in parts)
        live = [p[p[:, 1:].any(axis=1)] for p in parts]  # (copies)
        kept = sum(len(rows) for rows in live)
        if held == kept:
            return
        for p in parts:
            p[:] = 0
        self._used -= held
        self._tombstones = max(0, self._tombstones - (held - kept))
        rows = np.concatenate(live)
        self._rows[self._claim(rows[:, 0]), 1:] = rows[:, 1:]

    def _word(self, bit: int) -> tuple[int, np.uint64]:
        """The column of owner `bit` and its mask there (adding words as needed)."""
        w, b = divmod(bit, 64)
        if w >= self.words:
            self._rows = np.hstack([self._rows, np.zeros((len(self._rows), w + 1 - self.words), np.uint64)])
        return 1 + w, np.uint64(1 << b)

    # --- changes -----------------------------------------------------------------------------------------------

    def add(self, ids, bit: int) -> None:
        """Owner `bit` holds the blocks `ids`."""
        q = self._ids(ids)
        if not len(q):
            return
        if self._tombstones > _SWEEP_ABOVE * self.slots:
            self._sweep(_SWEEP_PER_ID * len(q))
        self._reserve(len(q))
        col, m = self._word(bit)
        used = self._used
        slots = self._claim(q)
        ownerless = int(np.count_nonzero(~self._rows[slots, 1:].any(axis=1)))  # new slots, and tombstones revived
        self._rows[slots, col] |= m
        self._tombstones = max(0, self._tombstones - (ownerless - (self._used - used)))

    def discard(self, ids, bit: int) -> None:
        """Owner `bit` no longer holds the blocks `ids` (ids it never held are ignored)."""
        q = self._ids(ids)
        if not len(q) or bit >= 64 * self.words:
            return
        col, m = self._word(bit)
        slots = self._find(q)
        held = self._rows[slots, 1:].any(axis=1)
        self._rows[slots, col] &= ~m  # absent ids AND the zero row: it stays zero
        self._tombstones += int(np.count_nonzero(held & ~self._rows[slots, 1:].any(axis=1)))

    def clear_bit(self, bit: int) -> None:
        """Owner `bit` holds nothing."""
        if bit < 64 * self.words:
            col, m = self._word(bit)
            held = self.count([])
            self._rows[:, col] &= ~m
            self._tombstones += held - self.count([])

    # --- queries -----------------------------------------------------------------------------------------------

    def owners(self, ids) -> np.ndarray:
        """The owner words of each id, shape (len(ids), words); zeros for an unknown id."""
        slots = self._find(self._ids(ids))
        if self.words == 1:  # one column, read from the flat rows (take on a 2-D array is several times slower)
            return self._rows.reshape(-1).take(slots * 2 + 1).reshape(-1, 1)
        return self._rows.take(slots, axis=0)[:, 1:]

    def count(self, bits: list[int]) -> int:
        """Blocks that every owner in `bits` holds (all blocks with an owner when `bits` is empty)."""
        own = self._rows[:-1, 1:]
        if not bits:
            return int(np.count_nonzero(own.any(axis=1)))
        if max(bits) >= 64 * self.words:
            return 0
        held = np.ones(len(own), dtype=bool)
        for bit in bits:
            held &= (own[:, bit // 64] & np.uint64(1 << bit % 64)) != 0
        return int(np.count_nonzero(held))

    @staticmethod
    def leading_runs(owners: np.ndarray) -> dict[int, int]:
        """For rows of owner words (a prompt's blocks, first to last), each owner bit's leading run: how many rows
        from the first hold it; owners without one are absent. (Rows that hold all of several bits: the least of
        their runs.)"""
        if not len(owners):
            return {}
        # Running AND: an owner's bit stays set exactly as long as its run does; only rows where it changes matter.
        acc = np.bitwise_and.accumulate(owners, axis=0)
        runs: dict[int, int] = {}
        if acc.shape[1] == 1:
            changes = np.flatnonzero(acc[1:, 0] != acc[:-1, 0]) + 1
        else:
            changes = np.flatnonzero((acc[1:] != acc[:-1]).any(axis=1)) + 1
        for i in changes.tolist():
            for w, x in enumerate((acc[i - 1] & ~acc[i]).tolist()):
                runs.update((bit, i) for bit in _bits(w, x))
        for w, x in enumerate(acc[-1].tolist()):
            runs.update((bit, len(owners)) for bit in _bits(w, x))
        return runs
