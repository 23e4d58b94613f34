"""The pool shards: one actor per node and application, owning that node's part of the shared KV pool.

The ingress keeps one on every live node (it owns them: they end with the app, and a node that joins gets one).

Engines read and write block files on their own node directly (kvpool/pool_store.py; the data plane of loads and
saves never passes through an actor). The shard owns the rest:
- policy: over its byte budget the host tier demotes to disk and the disk tier deletes, in eviction_order (idle
  sessions and one-off prompts first, live sessions last, LRU within each);
- the directory: it tells the router which blocks its node holds (a diff after each pass), so the router can price
  loading a prefix from the pool, on this node or another;
- brokering: `pull` copies blocks another node holds into this node's pool, shard to shard through Ray's object
  store, before a request that needs them runs here.
Killing or restarting a shard loses nothing: the blocks are files, and a new shard picks them up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvpool.config import KVPoolConfig
from kvpool.hashing import pool_key_ids
from kvpool.pool_store import BlockFile, PoolStore, to_move_out

logger = logging.getLogger(__name__)

NAMESPACE = "kvpool"


def shard_name(app_name: str, node_id: str) -> str:
    return f"pool-{app_name}-{node_id}"


def get_or_create_shard(cfg: KVPoolConfig, app_name: str, node_id: str | None = None):
    """The pool shard of `node_id` (default: the caller's node), pinned to that node."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return ray.remote(PoolShard).options(
        name=shard_name(app_name, node_id), namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
        num_cpus=0, max_concurrency=16, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(cfg, app_name)


def report_ids(blocks: Iterable[tuple[str, str]]) -> dict[str, np.ndarray]:
    """(layout, pool key) blocks as the router takes them (PoolView.update): layout -> an array of pool-key ids."""
    keys: dict[str, list[str]] = {}
    for layout, key in blocks:
        keys.setdefault(layout, []).append(key)
    return {layout: pool_key_ids(k) for layout, k in keys.items()}


class PoolShard:
    def __init__(self, cfg: KVPoolConfig, app_name: str = "", period_s: float = 0.5):
        """`app_name` empty: a shard on its own (tests), reporting to no router."""
        self.cfg = cfg
        self.app_name = app_name
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host_root, self.disk_root = Path(cfg.pool_host_dir_resolved()), Path(cfg.pool_disk_dir_resolved())
        self.period_s = period_s
        self.counts: Counter = Counter()
        self.last: dict = {}
        self._task: asyncio.Task | None = None
        self.held: set[tuple[str, str]] = set()  # (layout, key) of every block on this node, as of the last pass
        self._reported: set[tuple[str, str]] | None = None  # (layout, key) the router knows; None: send all
        self._report_seq = 0

    def _stores(self) -> list[PoolStore]:
        layouts = {p.name for root in (self.host_root, self.disk_root) if root.exists() for p in root.iterdir()
                   if p.is_dir()}
        return [PoolStore(self.host_root, self.disk_root, layout) for layout in sorted(layouts)]

    def _store(self, layout: str) -> PoolStore:
        return PoolStore(self.host_root, self.disk_root, layout)

    def maintain(self) -> dict:
        """One pass: demote and evict to the budgets; returns the pool's size after it."""
        stores = self._stores()
        files: list[tuple[PoolStore, BlockFile]] = [(s, f) for s in stores for f in s.scan()]
        host_bytes = self._shrink(files, "host", self.cfg.pool_host_bytes)
        disk_bytes = self._shrink(files, "disk", self.cfg.pool_disk_bytes)
        now = time.time()
        self.last = {
            "time": now, "node": self.node_id,
            "host_bytes": host_bytes, "host_budget_bytes": self.cfg.pool_host_bytes,
            "disk_bytes": disk_bytes, "disk_budget_bytes": self.cfg.pool_disk_bytes,
            "blocks": {"host": sum(1 for _, f in files if f.tier == "host"),
                       "disk": sum(1 for _, f in files if f.tier == "disk")},
            "live_session_blocks": sum(1 for _, f in files if f.reused and now - f.last_used
                                       <= self.cfg.pool_session_ttl_s),
            "layouts": len(stores), **self.counts,
        }
        self.held = {(s.tiers["host"].name, f.key) for s, f in files if f.tier != "gone"}
        return self.last

    def _shrink(self, files: list[tuple[PoolStore, BlockFile]], tier: str, budget: int) -> int:
        """Move the tier's blocks out in eviction order (host: to disk if it has room, else deleted; disk:
        deleted) until it fits its budget; returns its bytes after."""
        in_tier = [f for _, f in files if f.tier == tier]
        store_of = {id(f): s for s, f in files}
        size = sum(f.size for f in in_tier)
        for f in to_move_out(in_tier, budget, time.time(), self.cfg.pool_session_ttl_s):
            size -= f.size
            if tier == "host" and self.cfg.pool_disk_bytes > 0 and store_of[id(f)].demote(f):
                f.tier = "disk"  # counted against the disk budget in the same pass
                self.counts["demoted"] += 1
            else:  # no disk tier, or it cannot take the block (full): the host tier must shrink all the same
                PoolStore.delete([f])
                f.tier = "gone"
                self.counts["evicted"] += 1
        return size

    async def _report(self) -> None:
        """Tell the router what changed in this node's pool since the last report (everything after a restart of
        either side: the router answers False to a report it cannot apply)."""
        from actors.router import router_name

        try:
            router = ray.get_actor(router_name(self.app_name), namespace=NAMESPACE)
        except ValueError:
            return  # no router (yet, or prefix routing off)
        held = self.held
        if self._reported is None:
            self._report_seq = 0
            added, removed = held, set()
        else:
            added, removed = held - self._reported, self._reported - held
            if not added and not removed:
                return
            self._report_seq += 1
        try:
            ok = await router.pool_update.remote(self.node_id, self._report_seq, report_ids(added),
                                                 report_ids(removed))
        except ray.exceptions.RayError:
            ok = False
        self._reported = held if ok else None

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.maintain)
                if self.app_name:
                    await self._report()
            except Exception:
                logger.exception("pool maintenance pass failed")
            await asyncio.sleep(self.period_s)

    async def start(self) -> str:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self.node_id

    async def stats(self) -> dict:
        await self.start()
        last = self.last or await asyncio.get_running_loop().run_in_executor(None, self.maintain)
        return {**last, **self.counts}

    # --- brokering between nodes ------------------------------------------------------------------------------

    def read_raw(self, layouts: list[str], keys: list[str]) -> list[list[bytes] | None]:
        """Block files for another shard: per key, its file in each layout (None from the first key that is
        missing in some layout: later blocks of the chain would be useless without it)."""
        stores = [self._store(layout) for layout in layouts]
        out: list[list[bytes] | None] = []
        for key in keys:
            files = [s.read_raw(key) for s in stores]
            if any(f is None for f in files):
                break
            out.append(files)
        return out

    async def pull(self, source_node: str, layouts: list[str], keys: list[str]) -> int:
        """Copy the blocks `keys` (each in every one of `layouts`, i.e. every engine rank) from the shard of
        `source_node` into this node's pool; returns how many leading blocks arrived."""
        source = ray.get_actor(shard_name(self.app_name, source_node), namespace=NAMESPACE)
        blocks = await source.read_raw.remote(layouts, keys)
        stores = [self._store(layout) for layout in layouts]

        def write() -> None:
            for key, files in zip(keys, blocks):
                for store, data in zip(stores, files):
                    store.write_raw(key, data)

        await asyncio.get_running_loop().run_in_executor(None, write)
        self.counts["pulled_blocks"] += len(blocks)
        return len(blocks)
