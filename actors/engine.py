"""An engine replica: one Ray Serve replica holding one vLLM async engine (tensor-parallel over one node's GPUs).

The ingress sends token ids (it tokenized once); the replica streams back text and token-id deltas (with their
logprobs when asked) plus the usage numbers the OpenAI API reports, including how many prompt tokens came from the
prefix cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kvpool.config import KVPoolConfig
from kvpool.model import resolve_model

logger = logging.getLogger("ray.serve")


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # vllm.SamplingParams, built by vLLM's serving code at the ingress
    cache_salt: str | None = None  # scopes prefix-cache reuse (the tenant's, or the request's own)
    # Passed on to AsyncLLM.generate as vLLM's serving code asked (reasoning_ended, priority, ...).
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    # Filled in by the router (issue: prefix routing); read by the Serve request router plug-in.
    route: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplicaOutput:
    """One of vLLM's RequestOutputs, as the engine produced it (delta or final, as the sampling parameters ask),
    without the prompt's token ids: the ingress has them, so they never travel back."""
    output: Any  # vllm.outputs.RequestOutput; None on the first message of a final-only request
    # On the first output: the replica that serves the request (Serve may have sent it elsewhere than routed).
    replica: str | None = None
    # On the first output: when the request reached this replica and, from vLLM's request stats, when the engine
    # queued it, first scheduled it and produced its first token (all wall-clock seconds, this node's clock).
    timing: dict[str, float] | None = None
    # On the last output: how many times vLLM preempted the request (its KV freed, recomputed or reloaded).
    preemptions: int | None = None


def engine_args(cfg: KVPoolConfig, model_path: str, kv_events_endpoint: str | None = None,
                replay_endpoint: str | None = None, app_name: str = ""):
    from vllm import AsyncEngineArgs
    from vllm.config import KVEventsConfig

    kwargs: dict[str, Any] = dict(
        model=model_path,
        served_model_name=cfg.model_name(),
        max_model_len=cfg.max_model_len,
        dtype=cfg.resolved_dtype(),
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        block_size=cfg.block_size,
        kv_cache_memory_bytes=cfg.kv_cache_bytes,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.block_size),
        # vLLM's default stats logger (a log line every 10 s) stays off; its Prometheus metrics and per-request
        # stats are on (EngineReplica passes the logger), as in Ray Serve LLM.
        disable_log_stats=True,
    )
    if cfg.pool_enabled:
        from kvpool.connector import kv_transfer_config

        kwargs["kv_transfer_config"] = kv_transfer_config(*cfg.pool_dirs(app_name))
        # A step must know whether the previous one's pool loads worked before it is planned (kvpool/connector.py).
        kwargs["async_scheduling"] = False
    if kv_events_endpoint:
        # Both node-local ipc paths (vLLM binds them), read by this replica only: the publisher by its EventRelay,
        # the replay socket (the publisher's recent batches) when the router asks for them.
        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=kv_events_endpoint, replay_endpoint=replay_endpoint)
    if cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
        # Workers go into the replica's placement group (see app.builder.engine_deployment_options).
        kwargs["distributed_executor_backend"] = "ray"
    kwargs.update(_engine_kwargs(cfg.engine_kwargs))
    return AsyncEngineArgs(**kwargs)


def fit_to_model(cfg: KVPoolConfig, model_config) -> tuple[KVPoolConfig, str | None]:
    """`cfg` as the model (vLLM's ModelConfig) allows: without the pool where the pool cannot serve it, and why
    (kvpool.connector.unpoolable_reason). The ingress and every engine decide alike, from the same model."""
    from kvpool.connector import unpoolable_reason

    reason = unpoolable_reason(model_config) if cfg.pool_enabled else None
    if reason is None:
        return cfg, None
    logger.warning("serving %s without the KV pool: %s (vLLM's prefix caching and the prefix routing still apply)",
                   cfg.model, reason)
    return cfg.model_copy(update={"pool_enabled": False}), reason


def _engine_kwargs(given: dict[str, Any]) -> dict[str, Any]:
    """`engine_kwargs` as AsyncEngineArgs takes them: a dict given for one of its config objects (as in a YAML file,
    `structured_outputs_config: {disable_any_whitespace: true}`) becomes that config."""
    import dataclasses

    from vllm import AsyncEngineArgs

    factories = {f.name: f.default_factory for f in dataclasses.fields(AsyncEngineArgs)}
    out = dict(given)
    for name, value in given.items():
        if isinstance(value, dict) and factories.get(name, dataclasses.MISSING) is not dataclasses.MISSING:
            config_type = type(factories[name]())
            if dataclasses.is_dataclass(config_type):
                out[name] = config_type(**value)
    return out


REPLAY_END = (-1).to_bytes(8, "big", signed=True)  # vLLM's ZmqEventPublisher.END_SEQ


async def read_replay(endpoint: str, timeout_s: float = 30.0) -> list[list[bytes]]:
    """Every KV event message a vLLM publisher's replay socket still buffers, oldest first, as [topic, seq,
    payload] frames (kvpool.events.decode_message). vLLM's protocol: a request carries the first sequence number
    wanted; the answer is the buffered messages from it on, then one with sequence number -1."""
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)  # the whole buffer comes at once; nothing may be dropped on our side
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"", (0).to_bytes(8, "big")])
        messages = []
        async with asyncio.timeout(timeout_s):
            while True:
                _, topic, seq, payload = await sock.recv_multipart()
                if seq == REPLAY_END:
                    return messages
                messages.append([topic, seq, payload])
    finally:
        sock.close()


class EventRelay:
    """Carries an engine's KV events from its vLLM publisher (bound on a node-local ipc path) to wherever the
    router is, under the topic the router accepts. The engine's publisher is fixed when the engine starts; the
    router is not (Ray may restart it on another node, or the ingress make it anew with a new secret), so
    `retarget` re-points the relay and the engine keeps running. Its own thread: its sockets never cross threads;
    the control socket is the caller's (the replica's constructor, then its event loop)."""

    _made = itertools.count()

    def __init__(self, source: str, replica: str):
        import threading

        import zmq

        self.replica = replica
        self.target: tuple[str, str] | None = None
        self.last_seq: int | None = None  # of the last batch the publisher sent (forwarded or not)
        self._ctx = zmq.Context.instance()
        self._control_address = f"inproc://kvpool-relay-{replica}-{next(self._made)}"
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind(self._control_address)
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="kvpool-event-relay")
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def retarget(self, endpoint: str, topic_prefix: str) -> None:
        """Send from now on to `endpoint`, under topic `topic_prefix` + this replica."""
        if self.target != (endpoint, topic_prefix):
            self.target = (endpoint, topic_prefix)
            self._tell([endpoint.encode(), (topic_prefix + self.replica).encode()])

    def close(self) -> None:
        self._tell([b""])
        self._thread.join(timeout=2)
        self._control.close(linger=0)

    def _tell(self, frames: list[bytes]) -> None:
        import zmq

        try:  # never blocks: a relay thread that died has no peer on the control socket
            self._control.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("the KV event relay of replica %s is not running", self.replica)

    def _run(self, source: str) -> None:
        import zmq

        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 100_000)  # vLLM's own publisher bound
        sub.connect(source)
        control = self._ctx.socket(zmq.PAIR)
        control.connect(self._control_address)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        pub, topic = None, b""
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    frames = control.recv_multipart()
                    if frames == [b""]:
                        return
                    if pub is not None:
                        pub.close(linger=0)
                    endpoint, topic = frames
                    pub = self._ctx.socket(zmq.PUB)
                    pub.setsockopt(zmq.SNDHWM, 100_000)
                    pub.connect(endpoint.decode())
                if sub in ready:
                    frames = sub.recv_multipart()
                    if len(frames) != 3:
                        continue
                    self.last_seq = int.from_bytes(frames[1], "big")
                    # No router yet: the batch is dropped here but kept in the engine's replay buffer for it.
                    if pub is not None:
                        pub.send_multipart([topic, frames[1], frames[2]])
        except Exception:  # the replica's health check sees the relay stopped and starts another
            logger.exception("the KV event relay of replica %s stopped", self.replica)
        finally:
            sub.close(linger=0)
            control.close(linger=0)
            if pub is not None:
                pub.close(linger=0)


def _first_output_timing(arrived: float, arrived_monotonic: float, stats) -> dict[str, float]:
    """A request's way through this replica up to its first token, in wall-clock seconds: vLLM's engine core stamps
    its events with time.monotonic() (one clock for the whole node), turned into wall-clock time by the two clocks'
    offset at the request's arrival."""
    timing = {"replica_in": arrived}
    if stats is not None and stats.first_token_ts:
        to_wall = arrived - arrived_monotonic
        timing.update(queued=stats.queued_ts + to_wall, scheduled=stats.scheduled_ts + to_wall,
                      first_token=stats.first_token_ts + to_wall)
    return timing


class EngineReplica:
    def __init__(self, cfg: KVPoolConfig):
        from ray import serve
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        ctx = serve.get_replica_context()
        self.app_name, self.replica_id = ctx.app_name, ctx.replica_id.unique_id
        # Resolved here, on the replica's node: the embedded model is converted where it is used.
        model_path = resolve_model(cfg.model)
        self.cfg = cfg = fit_to_model(cfg, engine_args(cfg, model_path).create_model_config())[0]
        self.router, self.relay, self.replay_endpoint = None, None, None
        publisher = None
        if cfg.prefix_routing:
            socket_base = f"ipc://{tempfile.gettempdir()}/kvpool-events-{self.replica_id}"
            publisher, self.replay_endpoint = socket_base + ".pub", socket_base + ".replay"
        args = engine_args(cfg, model_path, publisher, replay_endpoint=self.replay_endpoint, app_name=self.app_name)
        # vLLM's engine metrics (vllm:*, preemptions and queue times included) through Ray's metrics port, and the
        # per-request stats the first output's timing is read from.
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[RayPrometheusStatLogger])
        self._introduction: asyncio.Task | None = None
        # The last batch the publisher had sent by the previous registration: a router whose view stops short of it
        # lost the batches since (and no later batch showed it the gap: the engine went quiet).
        self._published_by_last_registration: int | None = None
        if publisher:
            self.publisher = publisher
            self.relay = EventRelay(publisher, self.replica_id)
            self._first_introduction()

    def _first_introduction(self) -> None:
        """Register with the router before serving, so its events count from the first request. Without a router
        (not up yet, or unreachable) the replica serves anyway and the health checks keep trying."""
        import ray

        from actors.router import find_router

        try:
            self.router = find_router(self.app_name)
            self._retarget(ray.get(self.router.register.remote(*self._registration()), timeout=60))
        except Exception:
            logger.exception("router unreachable from replica %s: its health checks try again", self.replica_id)

    def _retarget(self, reply: dict) -> None:
        self.relay.retarget(reply["endpoint"], reply["topic_prefix"])

    async def generate(self, req: GenerateRequest) -> AsyncIterator[ReplicaOutput]:
        """The engine's outputs. A request that wants only the final output still runs as deltas here, so the
        ingress hears when its first token is out (its prefill no longer queues): an empty first message, then
        the deltas merged into one."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompt = TokensPrompt(prompt_token_ids=req.prompt_token_ids)
        if req.cache_salt:
            prompt["cache_salt"] = req.cache_salt
        params, final = req.sampling_params, None
        final_only = params.output_kind == RequestOutputKind.FINAL_ONLY
        if final_only:
            params = params.clone()
            params.output_kind = RequestOutputKind.DELTA
        replica, arrived, arrived_monotonic = self.replica_id, time.time(), time.monotonic()
        preemptions = None
        async for out in self.engine.generate(prompt, params, req.request_id, **req.generate_kwargs):
            stats = out.metrics
            out.prompt_token_ids = out.metrics = None  # the ingress has the prompt; the stats are read here
            timing = _first_output_timing(arrived, arrived_monotonic, stats) if replica else None
            preemptions = stats.num_preemptions if stats is not None and out.finished else None
            if not final_only:
                yield ReplicaOutput(out, replica, timing, preemptions)
                replica = None
            elif final is None:
                final = out
                yield ReplicaOutput(None, replica, timing)
                replica = None
            else:
                final.add(out, aggregate=True)
        if final is not None:
            yield ReplicaOutput(final, preemptions=preemptions)

    def _registration(self) -> tuple:
        """What the router's `register` takes: this replica, its actor, its node and its pool layouts."""
        import ray

        layouts = None
        if self.cfg.pool_enabled:
            from kvpool.connector import layout_name

            layouts = [layout_name(self.engine.vllm_config, rank) for rank in range(self.cfg.tensor_parallel_size)]
        ctx = ray.get_runtime_context()
        return self.replica_id, ctx.current_actor, ctx.get_node_id(), layouts

    async def _introduce(self) -> None:
        """Register with the router (a router made anew or restarted elsewhere learns of this replica so, and the
        relay follows it), and replay the publisher's buffered KV events when it asks: its view of this engine is
        incomplete."""
        import ray

        from actors.router import find_router

        loop = asyncio.get_running_loop()
        try:
            if self.router is None:
                self.router = await loop.run_in_executor(None, find_router, self.app_name, 0)
            published = self.relay.last_seq if self.relay.alive else None
            reply = await asyncio.wait_for(self.router.register.remote(
                *self._registration(), True, self._published_by_last_registration), 30)
            self._published_by_last_registration = published
        except ray.exceptions.ActorDiedError:  # gone for good: the ingress makes another, found next time
            self.router = None
            return
        except Exception:  # restarting, not made yet, or slow: the next health check tries again
            logger.debug("router unreachable from replica %s", self.replica_id, exc_info=True)
            return
        if not self.relay.alive:  # its batches since it stopped are lost: the router sees a gap and asks for a replay
            self.relay.close()
            self.relay = EventRelay(self.publisher, self.replica_id)
        self._retarget(reply)
        if reply["replay"]:
            messages = None
            try:
                messages = await read_replay(self.replay_endpoint)
            except Exception:
                logger.exception("replica %s could not read its KV event replay", self.replica_id)
            self.router.replayed.remote(self.replica_id, messages)

    async def check_health(self) -> None:
        await self.engine.check_health()
        # In the background: a health check must not wait on the router.
        if self.relay is not None and (self._introduction is None or self._introduction.done()):
            self._introduction = asyncio.get_running_loop().create_task(self._introduce())

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "relay", None) is not None:
            self.relay.close()
