"""Which replica holds which KV blocks, exactly, as the engines report it in their KV events.

Every BlockStored event carries the blocks' token ids and the engine's hash of the parent block. The index re-hashes
those token ids with kvpool.hashing, continuing the chain from the parent it already knows, so the keys it stores
are the keys the ingress computes for a request: parity by construction. The engine's own hash is only a handle,
kept per replica to find the block again when it is removed and to continue its chain.

If a parent is unknown (its chain began before the index listened), the blocks cannot be named and are skipped;
the caller is told. Lost events in general are the caller's to detect (sequence numbers, see actors/router.py).

Which replicas hold a block is a BlockTable (routing hash -> one bit per replica), so a 3K-block prompt is matched
in a few array passes. Stored blocks are hashed and enter the table in bulk (numpy costs the same few microseconds a
call for 16 blocks as for 1,000): until then a small per-replica map names each one's place in the batch, so later
events can chain from it; a query, a clear, or a removal of such a block hashes the batch first.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from kvpool import hashing
from kvpool.block_table import BlockTable
from kvpool.events import DEVICE_MEDIA, FULL_ATTENTION_KINDS, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


_HASH = (1 << 64) - 1  # the routing hash's bits of a packed block


@dataclass
class _ReplicaBlocks:
    bit: int
    # engine block hash -> its block's position and our routing hash, packed in one int: (position << 64) | hash.
    # An int rather than a tuple: a dict of atomic values is not tracked by Python's cyclic GC, so a full collection
    # does not walk a million entries (measured: collections of 0.1-0.4 s in a router holding 1M blocks as tuples);
    # one map rather than one per value: a block is one insert into a large (memory-bound) dict, not two.
    blocks: dict = field(default_factory=dict)
    # engine block hash -> its place in the batch not hashed yet (small and cache-resident: the large map above is
    # written once per block, when the batch is hashed)
    batched: dict = field(default_factory=dict)
    # The KV cache group followed, once a full-attention one has reported (vLLM's hybrid memory allocator: a
    # sliding-window group drops a prefix's blocks as the window moves on, while the full-attention group, which
    # a prefix hit needs whole, keeps them). Until then, and for a model of one group, every group's events.
    group: int | None = None

    def follows(self, group_idx: int | None) -> bool:
        return self.group is None or group_idx is None or group_idx == self.group


@dataclass
class _Stored:
    """A BlockStored waiting in the batch: its blocks are numbers first..first+n-1 of the batch."""
    replica: _ReplicaBlocks
    engine_hashes: list
    first: int
    n: int
    pos: int  # chain position of its first block
    seed: int | None  # the parent's routing hash, or None: the parent is block `parent` of the batch
    parent: int = -1


class PrefixIndex:
    # Stored blocks batched before they are hashed and enter the table.
    MAX_BATCH = 4096

    def __init__(self, block_size: int, table: BlockTable | None = None):
        self.block_size = block_size
        self._replicas: dict[str, _ReplicaBlocks] = {}
        # our chain hash -> the bits of the replicas holding the block (the table may be shared: see BlockTable)
        self._owners = table or BlockTable()
        self._batch: list[_Stored] = []
        self._batch_firsts: list[int] = []
        self._batch_tokens: list[np.ndarray] = []  # converted as each event arrives, while its ints are in cache
        self._batch_blocks = 0

    def flush(self) -> None:
        """Hash the batch of stored blocks and put them in the table (before anything reads or removes from it)."""
        if not self._batch:
            return
        batch, n_blocks = self._batch, self._batch_blocks
        lengths = [e.n for e in batch]
        positions = np.arange(n_blocks, dtype=np.uint64) + np.repeat(
            np.array([e.pos - e.first for e in batch], dtype=np.int64).view(np.uint64), lengths)
        sums = np.cumsum(hashing.block_terms(np.concatenate(self._batch_tokens), self.block_size, positions),
                         dtype=np.uint64)
        # Each event's chain is its parent's hash plus the running sum over its own blocks: one offset per event.
        offsets: list[int] = []
        for e in batch:
            seed = e.seed
            if seed is None:  # the parent is in the batch: its hash is its own event's offset plus the sum there
                seed = offsets[bisect_right(self._batch_firsts, e.parent) - 1] + sums.item(e.parent)
            offsets.append((seed - (sums.item(e.first - 1) if e.first else 0)) % (1 << 64))
        hashes = sums + np.repeat(np.array(offsets, dtype=np.uint64), lengths)
        listed = hashes.tolist()
        for e in batch:  # in order: an engine hash stored twice keeps its later block
            e.replica.blocks.update(zip(e.engine_hashes, [pos << 64 | h for pos, h in zip(
                range(e.pos, e.pos + e.n), listed[e.first:e.first + e.n])]))
            e.replica.batched.clear()
        bits = [e.replica.bit for e in batch]
        if len(set(bits)) == 1:
            self._owners.add(hashes, bits[0])
        else:
            of_block = np.repeat(np.array(bits), lengths)
            for bit in set(bits):
                self._owners.add(hashes[of_block == bit], bit)
        self._batch, self._batch_firsts, self._batch_tokens, self._batch_blocks = [], [], [], 0

    # --- replicas ------------------------------------------------------------------------------------------------

    def replicas(self) -> list[str]:
        return list(self._replicas)

    def num_blocks(self, replica: str | None = None) -> int:
        self.flush()
        if replica is None:
            return sum(len(r.blocks) for r in self._replicas.values())
        r = self._replicas.get(replica)
        return len(r.blocks) if r else 0

    def _replica(self, replica: str) -> _ReplicaBlocks:
        r = self._replicas.get(replica)
        if r is None:
            r = self._replicas[replica] = _ReplicaBlocks(self._owners.new_bit())
        return r

    def clear(self, replica: str) -> None:
        """Forget every block of `replica` (it cleared its cache, restarted, or its view became untrustworthy)."""
        r = self._replicas.get(replica)
        if r is None:
            return
        self.flush()
        self._owners.clear_bit(r.bit)
        r.blocks.clear()

    def remove_replica(self, replica: str) -> None:
        if replica in self._replicas:
            self.clear(replica)
            self._owners.free_bit(self._replicas.pop(replica).bit)

    # --- events --------------------------------------------------------------------------------------------------

    def apply(self, replica: str, event: KVEvent) -> bool:
        """Apply one engine event. False when its blocks chain from a parent the index never saw (skipped)."""
        if isinstance(event, BlockStored):
            return self._stored(replica, event)
        if isinstance(event, BlockRemoved):
            if event.medium in DEVICE_MEDIA:
                self._removed(replica, event.block_hashes, event.group_idx)
            return True
        if isinstance(event, AllBlocksCleared):
            self.clear(replica)
        return True

    def _stored(self, replica: str, ev: BlockStored) -> bool:
        if ev.medium not in DEVICE_MEDIA:
            return True
        if ev.block_size != self.block_size:
            raise ValueError(f"engine block_size {ev.block_size} != router block_size {self.block_size}")
        n = len(ev.block_hashes)
        n_tokens = n * self.block_size
        if len(ev.token_ids) < n_tokens:
            raise ValueError(f"{len(ev.token_ids)} token ids for {n} blocks")
        r = self._replica(replica)
        if r.group is None and ev.group_idx is not None and ev.kv_cache_spec_kind in FULL_ATTENTION_KINDS:
            r.group = ev.group_idx
        if not r.follows(ev.group_idx):
            return True
        parent_in_batch = -1
        if ev.parent_block_hash is None:
            first = ev.extra_keys[0] if ev.extra_keys else None
            seed, pos = hashing.chain_seed(tuple(first) if first else ()), 0
        elif (parent_in_batch := r.batched.get(ev.parent_block_hash, -1)) >= 0:
            e = self._batch[bisect_right(self._batch_firsts, parent_in_batch) - 1]
            seed, pos = None, e.pos + parent_in_batch - e.first + 1
        else:
            parent = r.blocks.get(ev.parent_block_hash)
            if parent is None:
                return False
            seed, pos = parent & _HASH, (parent >> 64) + 1
        first = self._batch_blocks
        self._batch.append(_Stored(r, ev.block_hashes, first, n, pos, seed, parent_in_batch))
        self._batch_firsts.append(first)
        tokens = hashing.token_array(ev.token_ids)
        self._batch_tokens.append(tokens if len(tokens) == n_tokens else tokens[:n_tokens])
        r.batched.update(zip(ev.block_hashes, range(first, first + n)))
        self._batch_blocks += n
        if self._batch_blocks >= self.MAX_BATCH:
            self.flush()
        return True

    def _removed(self, replica: str, engine_hashes: list, group_idx: int | None) -> None:
        r = self._replicas.get(replica)
        if r is None or not r.follows(group_idx):
            return
        if r.batched and not r.batched.keys().isdisjoint(engine_hashes):  # a block in the batch has no hash yet
            self.flush()
        pop = r.blocks.pop
        gone = [b & _HASH for b in (pop(eh, None) for eh in engine_hashes) if b is not None]
        if gone:
            self._owners.discard(gone, r.bit)

    # --- queries -------------------------------------------------------------------------------------------------

    def match(self, hashes: np.ndarray | list[int], replicas: list[str] | None = None) -> dict[str, int]:
        """For each replica (default: all known), how many leading blocks of the chain `hashes` it holds."""
        self.flush()
        return self.runs(self._owners.owners(hashes), replicas)

    def runs(self, owners: np.ndarray, replicas: list[str] | None = None) -> dict[str, int]:
        """`match` from the table's owner rows of a chain's blocks (looked up by the caller, with others' ids;
        after `flush`)."""
        names = replicas if replicas is not None else list(self._replicas)
        runs = BlockTable.leading_runs(owners)
        return {n: runs.get(self._replicas[n].bit, 0) if n in self._replicas else 0 for n in names}
