"""Which replica holds which KV blocks, exactly, as the engines report it in their KV events.

Every BlockStored event carries the blocks' token ids and the engine's hash of the parent block. The index re-hashes
those token ids with kvpool.hashing, continuing the chain from the parent it already knows, so the keys it stores
are the keys the ingress computes for a request: parity by construction. The engine's own hash is only a handle,
kept per replica to find the block again when it is removed and to continue its chain.

If a parent is unknown (its chain began before the index listened), the blocks cannot be named and are skipped;
the caller is told. Lost events in general are the caller's to detect (sequence numbers, see actors/router.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvpool import hashing
from kvpool.events import DEVICE_MEDIA, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass
class _ReplicaBlocks:
    bit: int
    # engine block hash -> (our routing hash, block position)
    blocks: dict = field(default_factory=dict)


class PrefixIndex:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self._replicas: dict[str, _ReplicaBlocks] = {}
        self._owners: dict[int, int] = {}  # our chain hash -> bitmask of replicas holding the block
        self._free_bits: list[int] = []
        self._next_bit = 0

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
            bit = self._free_bits.pop() if self._free_bits else self._next_bit
            self._next_bit = max(self._next_bit, bit + 1)
            r = self._replicas[replica] = _ReplicaBlocks(bit)
        return r

    def clear(self, replica: str) -> None:
        """Forget every block of `replica` (it cleared its cache, restarted, or its view became untrustworthy)."""
        r = self._replicas.get(replica)
        if r is None:
            return
        mask = ~(1 << r.bit)
        owners = self._owners
        for h, _ in r.blocks.values():
            m = owners.get(h, 0) & mask
            if m:
                owners[h] = m
            else:
                owners.pop(h, None)
        r.blocks.clear()

    def remove_replica(self, replica: str) -> None:
        if replica in self._replicas:
            self.clear(replica)
            self._free_bits.append(self._replicas.pop(replica).bit)

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
        ours = hashing.prefix_sums(ev.token_ids[: n * self.block_size], self.block_size, seed, pos).tolist()
        bit = 1 << r.bit
        owners, blocks = self._owners, r.blocks
        for i, (eh, h) in enumerate(zip(ev.block_hashes, ours), pos):
            blocks[eh] = (h, i)
            owners[h] = owners.get(h, 0) | bit
        return True

    def _removed(self, replica: str, engine_hashes: list) -> None:
        r = self._replicas.get(replica)
        if r is None:
            return
        mask = ~(1 << r.bit)
        owners = self._owners
        for eh in engine_hashes:
            entry = r.blocks.pop(eh, None)
            if entry is None:
                continue
            m = owners.get(entry[0], 0) & mask
            if m:
                owners[entry[0]] = m
            else:
                owners.pop(entry[0], None)

    # --- queries -------------------------------------------------------------------------------------------------

    def match(self, hashes: np.ndarray | list[int], replicas: list[str] | None = None) -> dict[str, int]:
        """For each replica (default: all known), how many leading blocks of the chain `hashes` it holds."""
        names = replicas if replicas is not None else list(self._replicas)
        bit_of = {n: self._replicas[n].bit for n in names if n in self._replicas}
        result = {n: 0 for n in names}
        active = 0
        for b in bit_of.values():
            active |= 1 << b
        depth_of_bit: dict[int, int] = {}
        owners = self._owners
        depth = 0
        get = owners.get
        for h in hashes.tolist() if isinstance(hashes, np.ndarray) else hashes:
            held = get(h, 0) & active
            if held != active:  # some replicas' prefixes end here (rare: the hot loop is just the lookup)
                dropped = active & ~held
                while dropped:
                    low = dropped & -dropped
                    depth_of_bit[low.bit_length() - 1] = depth
                    dropped ^= low
                active = held
                if not active:
                    break
            depth += 1
        while active:
            low = active & -active
            depth_of_bit[low.bit_length() - 1] = depth
            active ^= low
        for n, b in bit_of.items():
            result[n] = depth_of_bit.get(b, 0)
        return result
