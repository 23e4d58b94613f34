"""The router actor: one per application. It subscribes to every engine replica's KV events, keeps the exact prefix
index (kvpool.index) and each replica's queue, and answers "which replica should compute this request?".

Faults it survives:
- lost or reordered event batches (a sequence gap): that replica's view is reset (removals may have been lost),
  so the router predicts fewer hits for it, never phantom ones, until the engine replays its recent batches (at its
  next health check, within ~5 s; RouterCore.begin_replay);
- a replica that dies: a watchdog pings the replicas' actors and drops a dead one within about half a second (Serve's
  own replica list, pushed by the request-router plug-in, follows a few seconds later);
- its own death: Ray restarts it (max_restarts=-1), on another node if its node died; if it is gone for good
  (its owner, the ingress replica that made it, died), the ingress makes another. Either way the engines register
  again at their next health check (every 5 s), their event relays follow it to its address and topic, and they
  replay the batches their publishers still buffer (vLLM keeps the last 10,000), so it relearns what they hold
  (blocks stored before that stay unindexed); a replay is decoded and applied in pieces, routes answered between
  them. Meanwhile the ingress routes on Serve's power-of-two fallback;
- strangers and bad input on its event port: only topics carrying the app's secret are received, batches from no
  known replica are dropped, an event that cannot be applied resets that replica's view (RouterCore.ingest), and
  the receive queue and message size are bounded;
- a node that leaves (its pool leaves the view) and an ingress that dies mid-request (its requests stop counting
  as load after router_inflight_ttl_s).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter

import numpy as np
import ray
import zmq
import zmq.asyncio

from kvpool.config import KVPoolConfig
from kvpool.events import decode_message, warm_up
from kvpool.routing import Decision, ReplicaLoad, RouterCore

logger = logging.getLogger(__name__)

NAMESPACE = "kvpool"

# A replay is decoded and applied in pieces of this many block events (RouterCore.apply_replay), each followed by a
# turn of the event loop, so a route waits for one piece at most, never for the whole replay (10,000 batches of 16
# blocks: ~0.8 s of CPU on the 2-core dev machine, whatever the piece size from 128 to 512). There a piece took
# 1.2 ms (p99 2.1 ms); the longer stalls left are the index's growth (a block table rebuild or a dict resize, tens
# of ms at 100K blocks), which no piece size splits (`kvpool bench router`, replay_*; BENCHMARKS.md).
REPLAY_PIECE_EVENTS = 256


def router_name(app_name: str) -> str:
    return f"router-{app_name}"


def get_or_create_router(cfg: KVPoolConfig, app_name: str):
    """The application's router actor, created by the ingress. An actor dies with the worker that created it, so
    an engine replica (which Serve replaces and faults kill) must never be the one: engines use find_router. When
    that ingress replica dies, the router is gone for good, and the ingress replicas left call this again."""
    return ray.remote(RouterActor).options(
        name=router_name(app_name), namespace=NAMESPACE, get_if_exists=True, max_restarts=-1, max_task_retries=0,
        num_cpus=0, max_concurrency=1000,
    ).remote(cfg, secrets.token_hex(16))


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


def tenant_figures(c: Counter) -> dict:
    """One tenant's share of the stats: what its requests sent and what the caches gave back."""
    return {"requests": c["requests"], "prompt_tokens": c["prompt_tokens"], "cached_tokens": c["cached_tokens"],
            "hit_rate": round(c["cached_tokens"] / c["prompt_tokens"], 4) if c["prompt_tokens"] else None}


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
    def __init__(self, cfg: KVPoolConfig, topic_secret: str):
        self.cfg = cfg
        self.core = RouterCore(cfg.block_size, cfg.route_running_cost_tokens, cfg.route_pool_load_cost,
                               cfg.route_pool_fetch_cost)
        self.reasons: Counter = Counter()
        self.per_replica: dict[str, Counter] = {}
        self.per_tenant: dict[str, Counter] = {}  # tenant salt ("" without API keys) -> requests, prompt, cached
        self.metrics = _Metrics()
        # Engines publish under topic "<secret>/<replica id>" (they learn the secret over Ray, from `endpoint`);
        # ZMQ drops every other topic, so a stray publisher on the port cannot feed the index. The secret is a
        # constructor argument, so a router that Ray restarts keeps it and the engines' topics stay valid.
        self._topic_prefix = f"{topic_secret}/"
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic_prefix.encode())
        # Bounded: past these, ZMQ drops messages (a sequence gap: that replica's view resets, never wrong).
        self._sub.setsockopt(zmq.RCVHWM, 10_000)
        self._sub.setsockopt(zmq.MAXMSGSIZE, 256 << 20)
        # Engines connect to us (their endpoint has no '*'), so one fixed port serves every replica and a restarted
        # router is found again by the engines' automatic reconnects.
        # Bound to the node's cluster address only, not every interface: only cluster peers publish events.
        self._endpoint = f"tcp://{ray.util.get_node_ip_address()}:{cfg.router_port}"
        self._sub.bind(self._endpoint)
        self._consumer: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._upkeeper: asyncio.Task | None = None
        self.actors: dict[str, ray.actor.ActorHandle] = {}  # replica -> its Serve replica actor
        warm_up()  # the event decoder is compiled before the first message, not while route calls wait behind it

    def _ensure_consumer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():
            self._consumer = loop.create_task(self._consume())
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch_replicas())
        if self._upkeeper is None or self._upkeeper.done():
            self._upkeeper = loop.create_task(self._upkeep())

    async def _watch_replicas(self, period_s: float = 0.2) -> None:
        """Drop replicas whose actor died. Only death counts: a busy replica that answers late is alive."""

        async def ping(replica: str, actor) -> None:
            try:
                await asyncio.wait_for(actor.__ray_ready__.remote(), timeout=2)
            except ray.exceptions.ActorDiedError:  # (not ActorUnavailableError, a RayActorError that may pass)
                logger.warning("replica %s died: dropped from the index", replica)
                self.core.died(replica)
                self.actors.pop(replica, None)
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

    async def _upkeep(self, period_s: float = 5.0) -> None:
        """Slow housekeeping: nodes that left take their pools out of the view, and requests whose end was never
        reported (their ingress died) stop counting as load."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period_s)
            try:
                nodes = await loop.run_in_executor(None, ray.nodes)  # a blocking call: off the event loop
                for node in self.core.keep_nodes({n["NodeID"] for n in nodes if n["Alive"]}):
                    logger.warning("node %s left: its pool leaves the view", node)
                for rid in self.core.book.expire(self.cfg.router_inflight_ttl_s):
                    logger.warning("request %s never reported its end: no longer counted as load", rid)
                for replica in self.core.live:  # (a gauge Ray drops when it is not set for a while)
                    self.metrics.blocks.set(self.core.index.num_blocks(replica), tags={"replica": replica})
                for replica in self.core.expire_replays(60.0):
                    logger.warning("replica %s's replay was given up: never sent, or left half applied", replica)
                    await self._apply_replay(replica)
            except Exception:
                logger.exception("router upkeep failed")

    async def _consume(self) -> None:
        prefix = len(self._topic_prefix)
        while True:
            frames = await self._sub.recv_multipart()
            try:
                topic, seq, batch = decode_message(frames)
            except Exception:
                logger.warning("undecodable KV event message dropped")
                self.core.foreign_batches += 1
                continue
            replica = topic[prefix:]
            if self.core.ingest(replica, seq, batch.events) in ("gap", "malformed"):
                self.metrics.gaps.inc(tags={"replica": replica})

    # --- API for the ingress, the engines and the request-router plug-in ------------------------------------------

    async def endpoint(self) -> tuple[str, str]:
        """Where engines publish their KV events, and the topic prefix to publish under (before their replica
        id)."""
        self._ensure_consumer()
        return self._endpoint, self._topic_prefix

    async def register(self, replica: str, actor: ray.actor.ActorHandle, node_id: str = "",
                       pool_layouts: list[str] | None = None, can_replay: bool = False,
                       published_before: int | None = None) -> dict:
        """An engine replica announces its actor (so the watchdog notices its death), its node and its pool
        layouts, at start and at every health check. The reply says where to publish its KV events and under which
        topic prefix (this router's, wherever it runs now), and `replay`: whether to send, when it `can_replay`,
        the batches its publisher still buffers (this router's view of it is incomplete), by calling `replayed`.
        `published_before`: the sequence number of the last batch the engine had published by its previous
        registration (seconds ago), which this router must have heard."""
        self._ensure_consumer()
        reply = {"endpoint": self._endpoint, "topic_prefix": self._topic_prefix, "replay": False}
        if not self.core.register(replica, node_id):
            return reply
        self.actors[replica] = actor
        if pool_layouts:
            self.core.pool.layouts = list(pool_layouts)
        reply["replay"] = can_replay and self.core.begin_replay(replica, published_before=published_before)
        return reply

    async def replayed(self, replica: str, messages: list[list[bytes]] | None) -> None:
        """The replay `register` asked for: the publisher's buffered messages, oldest first (None: it failed).
        Decoding and applying all of them (up to 10,000) takes the router seconds: they go in pieces, with the
        event loop's other work (routes, live batches) between them."""
        batches = None
        if messages is not None:
            try:  # a message's sequence number is a frame of its own: read without decoding the batch
                batches = [(int.from_bytes(frames[1], "big"), frames) for frames in messages]
            except Exception:
                logger.warning("replica %s sent an undecodable replay", replica)
        if self.core.end_replay(replica, batches, decode=lambda frames: decode_message(frames)[2].events):
            await self._apply_replay(replica)

    async def _apply_replay(self, replica: str) -> None:
        while not self.core.apply_replay(replica, REPLAY_PIECE_EVENTS):
            await asyncio.sleep(0)  # one turn of the loop: what became ready meanwhile runs

    async def pool_update(self, node: str, seq: int, added: dict[str, np.ndarray],
                          removed: dict[str, np.ndarray]) -> bool:
        """A pool shard reports the blocks that arrived on or left its node: layout -> pool-key ids (see
        PoolView.update)."""
        return self.core.pool.update(node, seq, added, removed)

    async def set_replicas(self, replicas: list[str]) -> None:
        """Serve's current replica list: replicas that left are dropped from the index and the queues."""
        self._ensure_consumer()
        for gone in self.core.set_replicas(replicas):  # (dropped from the core already)
            self.actors.pop(gone, None)

    async def route(self, request_id: str, hashes: np.ndarray, prompt_tokens: int,
                    pool_ids: np.ndarray | None = None, tenant: str | None = None) -> Decision | None:
        """The cheapest live replica for a request, given the chain hashes of its prompt (and its pool-key ids)."""
        self._ensure_consumer()
        d = self.core.route(request_id, hashes, prompt_tokens, pool_ids, tenant)
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
        t = self.per_tenant.setdefault(f.tenant or "", Counter())
        t["requests"] += 1
        t["prompt_tokens"] += f.prompt_tokens
        t["cached_tokens"] += delivered_cached_tokens
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
            events = core.event_counts.get(r, Counter())
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
                "event_resets": events["resets"] + events["malformed"] + events["lost_tails"],
                "event_replays": events["replays"],  # replays received; "replaying": one awaited or being applied
                "replaying": r in core.replaying,
                # Every batch its engine still buffers reached the view (from the first on, or replayed and applied).
                "view_complete": core.view_complete(r),
                "orphan_events": events["orphans"],
            }
        pool = {node: core.pool.blocks(node) for node in core.pool.nodes}
        return {"time": time.time(), "block_size": self.cfg.block_size, "decisions": dict(self.reasons),
                "events_applied": sum(c["applied"] for c in core.event_counts.values()),
                "foreign_event_batches": core.foreign_batches, "replicas": replicas,
                "tenants": {t: tenant_figures(c) for t, c in self.per_tenant.items()}, "pool_blocks_by_node": pool,
                "pool_layouts": core.pool.layouts}
