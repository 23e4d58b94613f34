"""The router actor: one per application. It subscribes to every engine replica's KV events, keeps the exact prefix
index (kvpool.index) and each replica's queue, and answers "which replica should compute this request?".

Faults it survives:
- lost or reordered event batches (a sequence gap): that replica's view is reset (removals may have been lost),
  so the router predicts fewer hits for it until fresh events arrive, never phantom ones; blocks whose parent it
  never saw (chains begun before it listened) stay unindexed;
- a replica that dies: a watchdog pings the replicas' actors and drops a dead one within about half a second (Serve's
  own replica list, pushed by the request-router plug-in, follows a few seconds later);
- its own death: Ray restarts it (max_restarts=-1) and it rebuilds from new events (chains that start after the
  restart); meanwhile the ingress routes on Serve's power-of-two fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import numpy as np
import ray
import zmq
import zmq.asyncio

from kvpool.config import KVPoolConfig
from kvpool.events import decode_message
from kvpool.routing import Decision, ReplicaLoad, RouterCore

logger = logging.getLogger(__name__)

NAMESPACE = "kvpool"


def router_name(app_name: str) -> str:
    return f"router-{app_name}"


def get_or_create_router(cfg: KVPoolConfig, app_name: str):
    """The application's router actor, created by the ingress. An actor dies with the worker that created it, so
    an engine replica (which Serve replaces and faults kill) must never be the one: engines use find_router."""
    return ray.remote(RouterActor).options(
        name=router_name(app_name), namespace=NAMESPACE, get_if_exists=True, max_restarts=-1, max_task_retries=0,
        num_cpus=0, max_concurrency=1000,
    ).remote(cfg)


def find_router(app_name: str, timeout_s: float = 120.0):
    """The application's router actor once the ingress has created it (Serve starts the deployments together)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(router_name(app_name), namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _Metrics:
    """Prometheus metrics through Ray's metrics agent (scraped from each node's metrics export port)."""

    def __init__(self):
        from ray.util import metrics

        self.decisions = metrics.Counter("kvpool_route_decisions", "Routing decisions", tag_keys=("reason",))
        self.prompt = metrics.Counter("kvpool_prompt_tokens", "Prompt tokens served", tag_keys=("replica",))
        self.cached = metrics.Counter("kvpool_cached_tokens", "Prompt tokens the engine took from its cache",
                                      tag_keys=("replica",))
        self.predicted = metrics.Counter("kvpool_predicted_cached_tokens", "Cached tokens the router predicted",
                                         tag_keys=("replica",))
        self.queued = metrics.Gauge("kvpool_queued_prefill_tokens", "Prefill tokens queued", tag_keys=("replica",))
        self.running = metrics.Gauge("kvpool_running_requests", "Requests in flight", tag_keys=("replica",))
        self.blocks = metrics.Gauge("kvpool_indexed_blocks", "KV blocks indexed", tag_keys=("replica",))
        self.gaps = metrics.Counter("kvpool_event_gaps", "Event sequence gaps and broken chains",
                                    tag_keys=("replica",))


class RouterActor:
    def __init__(self, cfg: KVPoolConfig):
        self.cfg = cfg
        self.core = RouterCore(cfg.block_size, cfg.route_running_cost_tokens, cfg.route_pool_load_cost,
                               cfg.route_pool_fetch_cost)
        self.last_seq: dict[str, int] = {}
        self.reasons: Counter = Counter()
        self.per_replica: dict[str, Counter] = {}
        self.gaps: Counter = Counter()
        self.orphans: Counter = Counter()
        self.events_applied = 0
        self.metrics = _Metrics()
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.RCVHWM, 0)
        # Engines connect to us (their endpoint has no '*'), so one fixed port serves every replica and a restarted
        # router is found again by the engines' automatic reconnects.
        # Bound to the node's cluster address only, not every interface: only cluster peers publish events.
        self._endpoint = f"tcp://{ray.util.get_node_ip_address()}:{cfg.router_port}"
        self._sub.bind(self._endpoint)
        self._consumer: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self.actors: dict[str, ray.actor.ActorHandle] = {}  # replica -> its Serve replica actor

    def _ensure_consumer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():
            self._consumer = loop.create_task(self._consume())
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch_replicas())

    async def _watch_replicas(self, period_s: float = 0.2) -> None:
        """Drop replicas whose actor died. Only death counts: a busy replica that answers late is alive."""

        async def ping(replica: str, actor) -> None:
            try:
                await asyncio.wait_for(actor.__ray_ready__.remote(), timeout=2)
            except ray.exceptions.RayActorError:
                logger.warning("replica %s died: dropped from the index", replica)
                self._drop(replica)
            except Exception:  # slow or unreachable for now: not proof of death
                pass

        pending: dict[str, asyncio.Task] = {}
        while True:
            await asyncio.sleep(period_s)
            for gone in set(pending) - set(self.actors):
                pending.pop(gone)
            for replica, actor in list(self.actors.items()):
                if replica not in pending or pending[replica].done():
                    pending[replica] = asyncio.get_running_loop().create_task(ping(replica, actor))

    def _drop(self, replica: str) -> None:
        self.core.drop(replica)
        self.last_seq.pop(replica, None)
        self.actors.pop(replica, None)

    async def _consume(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            try:
                replica, seq, batch = decode_message(frames)
            except Exception:
                logger.exception("undecodable KV event message")
                continue
            self._ingest(replica, seq, batch.events)

    def _ingest(self, replica: str, seq: int, events: list) -> None:
        last = self.last_seq.get(replica)
        self.last_seq[replica] = seq
        if last is not None and seq != last + 1:
            self._reset(replica, f"sequence gap {last} -> {seq}")
        for ev in events:
            if not self.core.index.apply(replica, ev):
                # Its chain started before we listened (e.g. after a router restart): we cannot name these blocks,
                # so they stay unindexed. Nothing stale is kept, so no reset is needed.
                self.orphans[replica] += 1
        self.events_applied += len(events)

    def _reset(self, replica: str, why: str) -> None:
        logger.warning("KV view of replica %s reset: %s", replica, why)
        self.gaps[replica] += 1
        self.metrics.gaps.inc(tags={"replica": replica})
        self.core.index.clear(replica)

    # --- API for the ingress, the engines and the request-router plug-in ------------------------------------------

    async def endpoint(self) -> str:
        self._ensure_consumer()
        return self._endpoint

    async def register(self, replica: str, actor: ray.actor.ActorHandle, node_id: str = "",
                       pool_layouts: list[str] | None = None) -> None:
        """An engine replica announces its actor (so the watchdog notices its death), its node and its pool
        layouts."""
        self._ensure_consumer()
        self.actors[replica] = actor
        self.core.node_of[replica] = node_id
        if pool_layouts:
            self.core.pool.layouts = list(pool_layouts)

    async def pool_update(self, node: str, seq: int, added: list[tuple[str, str]],
                          removed: list[tuple[str, str]]) -> bool:
        """A pool shard reports (layout, key) blocks that arrived on or left its node (see PoolView.update)."""
        return self.core.pool.update(node, seq, added, removed)

    async def set_replicas(self, replicas: list[str]) -> None:
        """Serve's current replica list: replicas that left are dropped from the index and the queues."""
        self._ensure_consumer()
        for gone in set(self.core.set_replicas(replicas)) | (set(self.actors) - set(replicas)):
            self._drop(gone)

    async def route(self, request_id: str, hashes: np.ndarray, prompt_tokens: int,
                    pool_keys: list[str] | None = None) -> Decision | None:
        """The cheapest live replica for a request, given the chain hashes of its prompt (and its pool keys)."""
        self._ensure_consumer()
        d = self.core.route(request_id, hashes, prompt_tokens, pool_keys)
        if d is not None:
            self.reasons[d.reason] += 1
            self.metrics.decisions.inc(tags={"reason": d.reason})
            self._publish_load(d.replica)
        return d

    async def started(self, request_id: str, served_by: str | None = None) -> None:
        """The request produced its first chunk, on replica `served_by`: its prefill no longer queues."""
        for replica in self.core.book.started(request_id, served_by):
            self._publish_load(replica)

    async def finished(self, request_id: str, delivered_cached_tokens: int | None) -> None:
        """The request ended; `delivered_cached_tokens` is what the engine reported (None: it failed)."""
        for replica in self.core.book.started(request_id):
            self._publish_load(replica)
        f = self.core.book.finished(request_id)
        if f is None:
            return
        self._publish_load(f.replica)
        if delivered_cached_tokens is None:
            return
        c = self.per_replica.setdefault(f.replica, Counter())
        c["requests"] += 1
        c["rerouted"] += int(f.rerouted)
        c["prompt_tokens"] += f.prompt_tokens
        c["cached_tokens"] += delivered_cached_tokens
        c["predicted_cached_tokens"] += f.predicted_cached_tokens
        c["predicted_exact"] += int(delivered_cached_tokens == f.predicted_cached_tokens)
        c["abs_error_tokens"] += abs(delivered_cached_tokens - f.predicted_cached_tokens)
        tags = {"replica": f.replica}
        self.metrics.prompt.inc(f.prompt_tokens, tags=tags)
        if delivered_cached_tokens:
            self.metrics.cached.inc(delivered_cached_tokens, tags=tags)
        if f.predicted_cached_tokens:
            self.metrics.predicted.inc(f.predicted_cached_tokens, tags=tags)

    def _publish_load(self, replica: str) -> None:
        load = self.core.book.loads.get(replica) or ReplicaLoad()
        self.metrics.queued.set(load.queued_prefill_tokens, tags={"replica": replica})
        self.metrics.running.set(load.running, tags={"replica": replica})

    async def stats(self) -> dict:
        self._ensure_consumer()
        replicas = {}
        core = self.core
        for r in sorted(set(core.live) | set(core.index.replicas()) | set(self.per_replica)):
            c = self.per_replica.get(r, Counter())
            load = core.book.loads.get(r) or ReplicaLoad()
            self.metrics.blocks.set(core.index.num_blocks(r), tags={"replica": r})
            replicas[r] = {
                "live": r in core.live,
                "node": core.node_of.get(r),
                "indexed_blocks": core.index.num_blocks(r),
                "queued_prefill_tokens": load.queued_prefill_tokens,
                "running": load.running,
                "requests": c["requests"],
                "rerouted_here": c["rerouted"],  # Serve sent them here although the router chose another replica
                "prompt_tokens": c["prompt_tokens"],
                "cached_tokens": c["cached_tokens"],
                "hit_rate": round(c["cached_tokens"] / c["prompt_tokens"], 4) if c["prompt_tokens"] else None,
                "predicted_cached_tokens": c["predicted_cached_tokens"],
                "prediction_exact_rate": round(c["predicted_exact"] / c["requests"], 4) if c["requests"] else None,
                "prediction_mean_abs_error_tokens": round(c["abs_error_tokens"] / c["requests"], 1)
                if c["requests"] else None,
                "event_resets": self.gaps.get(r, 0),
                "orphan_events": self.orphans.get(r, 0),
            }
        pool = {node: core.pool.blocks(node) for node in core.pool.nodes}
        return {"time": time.time(), "block_size": self.cfg.block_size, "decisions": dict(self.reasons),
                "events_applied": self.events_applied, "replicas": replicas, "pool_blocks_by_node": pool,
                "pool_layouts": core.pool.layouts}
