"""Which replica holds which KV blocks, exactly, as the engines report it in their KV events.

Every BlockStored event carries the blocks' token ids and the engine's hash of the parent block. The index re-hashes
those token ids with kvpool.hashing, continuing the chain from the parent it already knows, so the keys it stores
are the keys the ingress computes for a request: parity by construction. The engine's own hash is only a handle,
kept per replica to find the block again when it is removed and to continue its chain.

If a parent is unknown (its chain began before the index listened), the blocks cannot be named and are skipped;
the caller is told. Lost events in general are the caller's to detect (sequence numbers, see actors/router.py).

Which replicas hold a block is a BlockTable (routing hash -> one bit per replica), so a 3K-block prompt is matched
in a few array passes. Stored blocks are buffered and enter the table in bulk (a table insert costs the same few
microseconds for 16 blocks as for 1,000), before any removal, clear or query sees the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvpool import hashing
from kvpool.block_table import BlockTable
from kvpool.events import DEVICE_MEDIA, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass
class _ReplicaBlocks:
    bit: int
    # engine block hash -> (our routing hash, block position)
    blocks: dict = field(default_factory=dict)


class PrefixIndex:
    # Stored blocks buffered before they enter the table in one insert.
    MAX_BUFFERED = 4096

    def __init__(self, block_size: int, table: BlockTable | None = None):
        self.block_size = block_size
        self._replicas: dict[str, _ReplicaBlocks] = {}
        # our chain hash -> the bits of the replicas holding the block (the table may be shared: see BlockTable)
        self._owners = table or BlockTable()
        self._stored_buffer: list[tuple[int, np.ndarray]] = []  # (replica bit, chain hashes) not in the table yet
        self._buffered = 0

    def flush(self) -> None:
        """Every stored block into the table (before anything reads or removes from it)."""
        if not self._stored_buffer:
            return
        by_bit: dict[int, list[np.ndarray]] = {}
        for bit, hashes in self._stored_buffer:
            by_bit.setdefault(bit, []).append(hashes)
        for bit, parts in by_bit.items():
            self._owners.add(np.concatenate(parts), bit)
        self._stored_buffer.clear()
        self._buffered = 0

    # --- replicas ------------------------------------------------------------------------------------------------

    def replicas(self) -> list[str]:
        return list(self._replicas)

    def num_blocks(self, replica: str | None = None) -> int:
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
                self._removed(replica, event.block_hashes)
            return True
        if isinstance(event, AllBlocksCleared):
            self.clear(replica)
        return True

    def _stored(self, replica: str, ev: BlockStored) -> bool:
        if ev.medium not in DEVICE_MEDIA:
            return True
        if ev.block_size != self.block_size:
            raise ValueError(f"engine block_size {ev.block_size} != router block_size {self.block_size}")
        r = self._replica(replica)
        if ev.parent_block_hash is None:
            first = ev.extra_keys[0] if ev.extra_keys else None
            seed, pos = hashing.chain_seed(tuple(first) if first else ()), 0
        else:
            parent = r.blocks.get(ev.parent_block_hash)
            if parent is None:
                return False
            seed, pos = parent[0], parent[1] + 1
        n = len(ev.block_hashes)
        ours = hashing.prefix_sums(ev.token_ids[: n * self.block_size], self.block_size, seed, pos)
        r.blocks.update(zip(ev.block_hashes, zip(ours.tolist(), range(pos, pos + n))))
        self._stored_buffer.append((r.bit, ours))
        self._buffered += n
        if self._buffered >= self.MAX_BUFFERED:
            self.flush()
        return True

    def _removed(self, replica: str, engine_hashes: list) -> None:
        r = self._replicas.get(replica)
        if r is None:
            return
        pop = r.blocks.pop
        gone = [entry[0] for entry in (pop(eh, None) for eh in engine_hashes) if entry is not None]
        if gone:
            self.flush()
            self._owners.discard(gone, r.bit)

    # --- queries -------------------------------------------------------------------------------------------------

    @property
    def table(self) -> BlockTable:
        return self._owners

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
