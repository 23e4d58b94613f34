"""The pool actor: keeps the shared KV pool (kvpool/pool_store.py) within its byte budgets and reports on it.

Engines read and write block files directly (the data plane never passes through this actor); the actor owns the
policy: the host tier over its budget demotes its least recently used blocks to disk, the disk tier over its budget
deletes its least recently used. A load refreshes a block's last use, and every turn of an agent session loads its
whole prefix, so live sessions' blocks stay ahead of idle ones. Killing or restarting the actor loses nothing: the
blocks are files, and a new actor picks them up from the directories.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

import ray

from kvpool.config import KVPoolConfig
from kvpool.pool_store import BlockFile, PoolStore

logger = logging.getLogger(__name__)

NAMESPACE = "kvpool"


def get_or_create_pool(cfg: KVPoolConfig, app_name: str):
    return ray.remote(PoolActor).options(
        name=f"pool-{app_name}", namespace=NAMESPACE, get_if_exists=True, max_restarts=-1, num_cpus=0,
    ).remote(cfg)


class PoolActor:
    def __init__(self, cfg: KVPoolConfig, period_s: float = 0.5):
        self.host_root, self.disk_root = Path(cfg.pool_host_dir_resolved()), Path(cfg.pool_disk_dir_resolved())
        self.host_budget, self.disk_budget = cfg.pool_host_bytes, cfg.pool_disk_bytes
        self.period_s = period_s
        self.counts: Counter = Counter()
        self.last: dict = {}
        self._task: asyncio.Task | None = None

    def _stores(self) -> list[PoolStore]:
        layouts = {p.name for root in (self.host_root, self.disk_root) if root.exists() for p in root.iterdir()
                   if p.is_dir()}
        return [PoolStore(self.host_root, self.disk_root, layout) for layout in sorted(layouts)]

    def maintain(self) -> dict:
        """One pass: demote and evict to the budgets; returns the pool's size after it."""
        stores = self._stores()
        files: list[tuple[PoolStore, BlockFile]] = [(s, f) for s in stores for f in s.scan()]
        host_bytes = self._shrink(files, "host", self.host_budget)
        disk_bytes = self._shrink(files, "disk", self.disk_budget)
        self.last = {
            "time": time.time(),
            "host_bytes": host_bytes, "host_budget_bytes": self.host_budget,
            "disk_bytes": disk_bytes, "disk_budget_bytes": self.disk_budget,
            "blocks": {"host": sum(1 for _, f in files if f.tier == "host"),
                       "disk": sum(1 for _, f in files if f.tier == "disk")},
            "layouts": len(stores), **self.counts,
        }
        return self.last

    def _shrink(self, files: list[tuple[PoolStore, BlockFile]], tier: str, budget: int) -> int:
        """Move the tier's least recently used blocks out (host: to disk if it has room, else deleted; disk:
        deleted) until it fits its budget; returns its bytes after."""
        in_tier = sorted((x for x in files if x[1].tier == tier), key=lambda x: x[1].last_used)
        size = sum(f.size for _, f in in_tier)
        for store, f in in_tier:
            if size <= budget:
                break
            size -= f.size
            if tier == "host" and self.disk_budget > 0:
                store.demote(f)
                f.tier = "disk"  # counted against the disk budget in the same pass
                self.counts["demoted"] += 1
            else:
                store.delete([f])
                self.counts["evicted"] += 1
        return size

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.maintain)
            except Exception:
                logger.exception("pool maintenance pass failed")
            await asyncio.sleep(self.period_s)

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stats(self) -> dict:
        await self.start()
        return self.last or await asyncio.get_running_loop().run_in_executor(None, self.maintain)
