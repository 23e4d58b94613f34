"""The pool shards: one actor per node and application, owning that app's part of the node's shared KV pool.

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

Each app's blocks are in a namespace of its own (KVPoolConfig.pool_dirs), never another app's cache hits; the
budgets are the node's: one of its shards keeps every app's blocks within them (kvpool.pool_catalog.NodeKeeping).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvpool.config import KVPoolConfig
from kvpool.pool_catalog import NodeKeeping, PoolCatalog, report_ids
from kvpool.pool_store import pool_namespace

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


# A report or a fetch moves at most about this much in one Ray call: a million-block full report, or a long prefix
# fetched from another node, goes in pieces, none of which holds up the caller or the object store for long.
REPORT_IDS = 1 << 16  # 512 KiB of pool-key ids
FETCH_BYTES = 64 << 20


class _Metrics:
    """The node's pool in Prometheus, through Ray's metrics agent (the Grafana dashboard's KV pool row)."""

    def __init__(self, node_id: str, app_name: str):
        from ray.util import metrics

        self.tags = {"node": node_id}
        self.app = {"app": app_name}  # each app's shard counts its own namespace's blocks
        self.bytes = metrics.Gauge("kvpool_pool_bytes", "Bytes of an app's KV blocks in the node's pool, per tier",
                                   tag_keys=("node", "tier", "app"))
        self.blocks = metrics.Gauge("kvpool_pool_blocks", "An app's KV blocks in the node's pool, per tier",
                                    tag_keys=("node", "tier", "app"))
        self.moved = metrics.Counter("kvpool_pool_moved_blocks", "Blocks demoted to disk, evicted, or pulled in "
                                     "from another node's pool", tag_keys=("node", "kind"))

    def count(self, kind: str, n: int) -> None:
        if n:
            self.moved.inc(n, tags={**self.tags, "kind": kind})


class PoolShard:
    def __init__(self, cfg: KVPoolConfig, app_name: str = "", period_s: float = 0.5):
        """`app_name` empty: a shard on its own (tests), reporting to no router."""
        self.cfg = cfg
        self.app_name = app_name
        self.node_id = ray.get_runtime_context().get_node_id()
        self.catalog = PoolCatalog(*cfg.pool_dirs(app_name))  # this app's blocks: reports, reads, pulls
        roots = cfg.pool_host_dir_resolved(), cfg.pool_disk_dir_resolved()
        self.keeping = NodeKeeping(*roots, pool_namespace(app_name), cfg.pool_host_bytes, cfg.pool_disk_bytes)
        self.node_catalog: PoolCatalog | None = None  # every app's blocks, while this shard keeps the node's pool
        self.period_s = period_s
        self.counts: Counter = Counter()
        self.metrics = _Metrics(self.node_id, app_name)
        self._task: asyncio.Task | None = None
        self._report_seq = 0
        self._router = None  # the app's router actor, looked up again after it fails

    def _pass(self) -> None:
        """One pass: catch up with the app's directories; if this shard keeps the node's pool (or no live one
        does), demote and evict every app's blocks to the node's budgets."""
        if self.node_catalog is None and self.keeping.keep():
            self.node_catalog = PoolCatalog(*self.keeping.roots.values(), namespaced=True)
            self.node_catalog.start_following()
        if self.node_catalog is not None:
            demoted, evicted = self.node_catalog.upkeep(*self.keeping.budgets(), self.cfg.pool_session_ttl_s)
            self.counts["demoted"] += demoted
            self.counts["evicted"] += evicted
            self.metrics.count("demoted", demoted)
            self.metrics.count("evicted", evicted)
        self.catalog.refresh()  # (after the upkeep: what it moved, the app's catalog has heard of by now)
        with self.catalog.lock:
            for tier, queue in self.catalog.tiers.items():
                tags = {**self.metrics.tags, **self.metrics.app, "tier": tier}
                self.metrics.bytes.set(queue.bytes, tags=tags)
                self.metrics.blocks.set(len(queue), tags=tags)

    def describe(self) -> dict:
        """The app's part of the node's pool, the node's budgets, and the counters of the node's upkeep where this
        shard keeps it (live_session_blocks looks at every block: on demand only)."""
        host_budget, disk_budget = self.keeping.budgets()
        with self.catalog.lock:
            tiers = self.catalog.tiers
            return {
                "time": time.time(), "node": self.node_id, "keeps_node": self.node_catalog is not None,
                "host_bytes": tiers["host"].bytes, "host_budget_bytes": host_budget,
                "disk_bytes": tiers["disk"].bytes, "disk_budget_bytes": disk_budget,
                "blocks": {t: len(q) for t, q in tiers.items()},
                "live_session_blocks": self.catalog.live_session_blocks(self.cfg.pool_session_ttl_s),
                "layouts": len(self.catalog.stores), "rescans": self.catalog.rescans, **self.counts,
            }

    def maintain(self) -> dict:
        """One pass, then the pool's size after it."""
        self._pass()
        return self.describe()

    async def _report(self) -> None:
        """Tell the router what changed in this node's pool since the last report (everything after a restart of
        either side: the router answers False to a report it cannot apply), in pieces of REPORT_IDS blocks."""
        from actors.router import router_name

        if self._router is None:
            try:  # (a blocking call: off the event loop)
                self._router = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: ray.get_actor(router_name(self.app_name), namespace=NAMESPACE))
            except ValueError:
                return  # no router (yet, or prefix routing off)
        router = self._router
        full, added, removed = self.catalog.take_report()
        if full:
            self._report_seq = -1
        pieces = [(added[i:i + REPORT_IDS], []) for i in range(0, len(added), REPORT_IDS)] + \
            [([], removed[i:i + REPORT_IDS]) for i in range(0, len(removed), REPORT_IDS)]
        if not pieces:
            # Nothing changed (or, full, an empty pool: the router forgets what it knew of this node). Sent all the
            # same: a router that restarted knows nothing of this node and refuses it, and so gets a full report,
            # though the pool stays quiet.
            pieces = [([], [])]
        try:
            for piece_added, piece_removed in pieces:
                self._report_seq += 1
                if not await router.pool_update.remote(self.node_id, self._report_seq, report_ids(piece_added),
                                                       report_ids(piece_removed)):
                    self.catalog.full_report = True  # out of sequence (a restart of either side): start over
                    return
        except ray.exceptions.RayError:  # the router gone: what was taken is resent whole, to the next one
            self.catalog.full_report = True
            self._router = None
        except BaseException:  # a bad block name, a cancelled pass: the same, and the cause is logged
            self.catalog.full_report = True
            raise

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._pass)
                if self.app_name:
                    await self._report()
            except Exception:
                logger.exception("pool maintenance pass failed")
            await asyncio.sleep(self.period_s)

    async def start(self) -> str:
        self.catalog.start_following()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self.node_id

    async def stats(self) -> dict:
        await self.start()
        return await asyncio.get_running_loop().run_in_executor(None, self.maintain)

    # --- brokering between nodes ------------------------------------------------------------------------------

    def read_raw(self, layouts: list[str], keys: list[str], max_bytes: int = FETCH_BYTES) -> list[list[bytes]]:
        """Block files for another shard: per key, its file in each layout, from the first key up to the first that
        is missing in some layout (later blocks of the chain would be useless without it), and at most about
        `max_bytes` (at least one block): the caller asks again for the rest."""
        stores = [self.catalog.store(layout) for layout in layouts]
        out: list[list[bytes]] = []
        size = 0
        for key in keys:
            files = [s.read_raw(key) for s in stores]
            if any(f is None for f in files):
                break
            out.append(files)
            size += sum(len(f) for f in files)
            if size >= max_bytes:
                break
        return out

    async def pull(self, source_node: str, layouts: list[str], keys: list[str]) -> int:
        """Copy the blocks `keys` (each in every one of `layouts`, i.e. every engine rank) from the shard of
        `source_node` into this node's pool, in pieces of about FETCH_BYTES; returns how many leading blocks
        arrived."""
        loop = asyncio.get_running_loop()
        source = await loop.run_in_executor(  # a blocking lookup (a call to the control store): off the event loop
            None, lambda: ray.get_actor(shard_name(self.app_name, source_node), namespace=NAMESPACE))
        stores = [self.catalog.store(layout) for layout in layouts]

        def write(first: int, blocks: list[list[bytes]]) -> int:
            """Store the blocks; returns how many, from the first, every layout took (a full tier takes none)."""
            for n, (key, files) in enumerate(zip(keys[first:], blocks)):
                if not all([store.write_raw(key, data) for store, data in zip(stores, files)]):
                    return n
            return len(blocks)

        got = 0
        while got < len(keys):
            blocks = await source.read_raw.remote(layouts, keys[got:])
            written = await loop.run_in_executor(None, write, got, blocks) if blocks else 0
            got += written
            if written < len(blocks) or not blocks:
                break
        self.counts["pulled_blocks"] += got
        self.metrics.count("pulled", got)
        return got
