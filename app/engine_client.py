"""The ingress's engine client: where vLLM's serving code meets KV-Pool's routing.

vLLM's own OpenAI and Anthropic serving classes (app/ingress.py builds them) parse, render the chat template with
tools, tokenize once and build the sampling parameters, then call `EngineClient.generate` as they would on an
engine. Here `generate` runs no engine: it asks the router actor for the replica that will compute least
(`_route`), has that replica's node fetch pool blocks it lacks (`_fetch`), sends the token ids to the replica
through the engine deployment's Serve handle (the plug-in in app/request_router.py honours the choice) and streams
the replica's RequestOutputs back to vLLM's code, which parses tool calls and writes the response. A replica lost
before the answer reached the client means a retry on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Iterator

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from vllm.engine.protocol import EngineClient
from vllm.exceptions import RetryableRequestError, VLLMClientError

from actors.engine import GenerateRequest, ReplicaOutput
from actors.pool import get_or_create_shard
from kvpool.connector import RETAIN_ARG
from kvpool.config import KVPoolConfig
from kvpool.hashing import MEMO_BLOCKS, PoolKeyMemo, block_hashes, pool_key_ids, request_namespace, token_array
from kvpool.routing import Decision, Fetch, costs_header

logger = logging.getLogger("ray.serve")

# The replica (its actor) died or became unreachable: the request may be retried on another.
_REPLICA_LOST = (RayActorError, ActorUnavailableError)


class ServingError(Exception):
    """A request failed before its first output: the ingress answers it with this HTTP status (a stream is then
    never started)."""

    def __init__(self, status: int, message: str, err_type: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.retry_after_s = status, message, err_type, retry_after_s


@dataclass
class Dispatch:
    """One HTTP request's engine call: the caller's tenant in, and what became of the call out (the ingress reads
    it for the response's status and headers)."""
    tenant: str | None = None
    replica: str | None = None
    reason: str = "fallback"
    predicted_cached_tokens: int | None = None
    # The router's cost of each candidate replica (kvpool.routing.choose: its uncached tokens plus its queue, in
    # tokens to compute before this request's first token), to read a decision against its alternatives.
    costs: dict[str, int] | None = None
    error: ServingError | None = None
    retain: bool = False  # the client marked the prompt for caching: the pool keeps it as a live session's
    received_at: float | None = None  # wall-clock time the ingress received the HTTP request
    stages: dict[str, float] | None = None  # where the time to the first output went (STAGES), seconds

    def headers(self) -> dict[str, str]:
        h = {"x-kvpool-route-reason": self.reason}
        if self.replica:
            h["x-kvpool-replica"] = self.replica
        if self.predicted_cached_tokens is not None:
            h["x-kvpool-predicted-cached-tokens"] = str(self.predicted_cached_tokens)
        if self.costs:
            h["x-kvpool-route-costs"] = costs_header(self.costs)
        if self.stages:  # the W3C Server-Timing header: browsers' and HTTP tools' way to show a server's stages
            h["server-timing"] = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in self.stages.items())
        return h


# Where a request's time goes before its first output reaches the ingress, in order (Dispatch.stages, the
# Server-Timing header, `stages_ms` in /v1/kvpool/stats, `kvpool bench overhead`). Clocks: the ingress's and the
# serving replica's node's wall clocks (one machine, or NTP across nodes).
STAGES = {
    "render": "HTTP body parsed, chat template rendered, prompt tokenized (vLLM's serving code)",
    "hashing": "the prompt's chain hashes and pool keys",
    "router_call": "the router actor's decision and the Ray round trip",
    "pool_fetch": "copying pool blocks from another node's pool (only when the route asks for it)",
    "dispatch": "Serve's handle and request router to the chosen replica's generate()",
    "retry": "earlier attempts on replicas lost before their first output (only when there were some)",
    "engine_input": "vLLM's input processing, hand-over to its engine core and, under load mostly, the wait for the "
                    "engine core's step in progress to end (vLLM takes new requests between steps)",
    "queue": "waiting in vLLM's scheduler for the first step",
    "prefill": "first step to first token: prefill, pool loads, steps lost to preemption",
    "first_out": "the first output's way back: engine, replica, Serve's stream, the ingress",
    "replica": "dispatch to first output back, unsplit: the replica did not time its stages (no first token)",
}


# Set by the ingress for each HTTP request; `generate` runs in its context when the ingress pulls the first output.
_current: contextvars.ContextVar[Dispatch | None] = contextvars.ContextVar("kvpool_dispatch", default=None)


@contextlib.contextmanager
def dispatching(tenant: str | None, retain: bool = False, received_at: float | None = None) -> Iterator[Dispatch]:
    """The scope of one HTTP request: engine calls made inside it report to the Dispatch it yields."""
    dispatch = Dispatch(tenant=tenant, retain=retain, received_at=received_at)
    token = _current.set(dispatch)
    try:
        yield dispatch
    finally:
        _current.reset(token)


def _replica_stages(sent_at: float, timing: dict[str, float] | None, first_out_at: float) -> dict[str, float]:
    """The stages from sending a request to its replica until its first output is back at the ingress, from the
    replica's timing (actors/engine.py)."""
    if not timing:
        return {"replica": first_out_at - sent_at}
    marks = [("dispatch", "replica_in"), ("engine_input", "queued"), ("queue", "scheduled"),
             ("prefill", "first_token")]
    stages, last = {}, sent_at
    for stage, mark in marks:
        if mark in timing:
            stages[stage], last = timing[mark] - last, timing[mark]
    stages["first_out"] = first_out_at - last
    return stages


class _ReplicaLost(Exception):
    pass


class RoutedEngineClient(EngineClient):
    def __init__(self, cfg: KVPoolConfig, vllm_config, renderer, engine: DeploymentHandle, router, app_name: str):
        from vllm.v1.engine.input_processor import InputProcessor

        self.cfg = cfg
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = InputProcessor(vllm_config, renderer)  # vLLM's beam search asks it for watermarks
        self.engine = engine
        self.router = router
        self.app_name = app_name
        self.shards: dict[str, Any] = {}  # node id -> its pool shard
        # cross-node pool fetches: requests, wanted_blocks, blocks, failed (and failed:<cause>, the why of each)
        self.fetches: Counter = Counter()
        self._router_lost = False  # a call found the router gone for good: upkeep makes another
        # finished requests, those vLLM preempted at least once, and their preemptions (vllm:num_preemptions)
        self.preemptions: Counter = Counter()
        # Dispatch.stages of the last requests: where the time to their first output went
        self.stage_times: deque[dict[str, float]] = deque(maxlen=1000)
        # Pool keys of recent prompts' blocks by routing hash: a session's next turn hashes only its new blocks.
        self.key_memo = PoolKeyMemo(MEMO_BLOCKS)
        self._upkeeper: asyncio.Task | None = None
        self.keep_shards()

    def keep_shards(self) -> None:
        """A pool shard on every live node (nodes join and leave with autoscaling). The ingress owns them, so they
        end with the app; a restarted ingress makes them again (the pool itself is files and survives). Blocking
        (ray.nodes): off the event loop, in `_upkeep`."""
        import ray

        if not self.cfg.pool_enabled:
            return
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        shards = {node: shard for node, shard in self.shards.items() if node in alive}
        for node in alive - set(shards):
            shards[node] = get_or_create_shard(self.cfg, self.app_name, node)
            shards[node].start.remote()
        self.shards = shards  # swapped whole: the event loop may be iterating the old one

    async def _upkeep(self, period_s: float = 1.0, shards_every: int = 10) -> None:
        """Background upkeep, off the request path: a router gone for good is made anew, and the pool shards follow
        the cluster's nodes. Blocking Ray calls run in the executor."""
        from actors.router import get_or_create_router

        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            await asyncio.sleep(period_s)
            tick += 1
            try:
                if self._router_lost:
                    self.router = await loop.run_in_executor(None, get_or_create_router, self.cfg, self.app_name)
                    self._router_lost = False
                    logger.warning("router of app %s was gone: made anew", self.app_name)
                if tick % shards_every == 0:
                    await loop.run_in_executor(None, self.keep_shards)
            except Exception:
                logger.exception("ingress upkeep failed")

    def stages_ms(self) -> dict:
        """Percentiles, in ms, of where the last requests' (up to 1,000) time to their first output went, per stage
        (STAGES; a stage a request did not go through, such as a pool fetch, is not counted for it)."""
        out: dict[str, Any] = {"requests": len(self.stage_times)}
        for stage in STAGES:
            ms = np.array([t[stage] for t in self.stage_times if stage in t]) * 1e3
            if len(ms):
                p50, p90, p99 = np.percentile(ms, [50, 90, 99])
                out[stage] = {"requests": len(ms), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
                              "p99": round(float(p99), 3)}
        return out

    def ensure_upkeep(self) -> None:
        if self._upkeeper is None or self._upkeeper.done():
            self._upkeeper = asyncio.get_running_loop().create_task(self._upkeep())

    # --- the request path ----------------------------------------------------------------------------------------

    async def generate(self, prompt, sampling_params, request_id: str, *, prompt_text=None, lora_request=None,
                       tokenization_kwargs=None, trace_headers=None, priority: int = 0, data_parallel_rank=None,
                       session_id=None, kv_hints=None, reasoning_ended=None,
                       reasoning_parser_kwargs=None) -> AsyncGenerator[Any, None]:
        if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt or prompt.get("type", "token") != "token":
            raise ValueError("this server takes text prompts only")
        called_at = time.time()
        ids = list(prompt["prompt_token_ids"])
        dispatch = _current.get() or Dispatch()
        # A tenant's salt scopes its reuse; a request's own `cache_salt` scopes it further within the tenant.
        salt = ":".join(s for s in (dispatch.tenant, prompt.get("cache_salt")) if s) or None
        kwargs = {k: v for k, v in dict(priority=priority, reasoning_ended=reasoning_ended,
                                        reasoning_parser_kwargs=reasoning_parser_kwargs).items() if v}
        if dispatch.retain and self.cfg.pool_enabled:  # read by the pool's connector in the engine
            sampling_params.extra_args = {**(sampling_params.extra_args or {}), RETAIN_ARG: True}
        for attempt in range(1 + self.cfg.engine_retries):
            rid = request_id if attempt == 0 else f"{request_id}-retry{attempt}"
            gen = GenerateRequest(request_id=rid, prompt_token_ids=ids, sampling_params=sampling_params,
                                  cache_salt=salt, generate_kwargs=kwargs)
            answered = finished = False
            try:
                served_by, outputs = await self._dispatch(gen, dispatch, called_at, attempt)
                dispatch.replica = served_by
                try:
                    async for out in outputs:
                        if out is not None:
                            out.prompt_token_ids = ids
                            answered, finished = True, out.finished
                            yield out
                except _REPLICA_LOST as e:
                    # Lost before any of the answer went out (a non-streaming request's only output is its last):
                    # it can start again elsewhere. Lost after its last output: nothing is missing. Mid-answer,
                    # the caller has tokens: it gets an error it may retry on (vLLM answers it as a 503), not
                    # Ray's text, which names hosts and processes.
                    if finished:
                        return
                    if answered:
                        logger.warning("request %s lost its replica mid-answer (%s)", rid, type(e).__name__)
                        raise RetryableRequestError("the engine replica serving this request was lost mid-answer; "
                                                    "retry the request") from None
                    raise _ReplicaLost(type(e).__name__) from None
                if dispatch.stages:  # once per request, its last attempt's (earlier ones: its `retry` stage)
                    self.stage_times.append(dispatch.stages)
                return
            except _ReplicaLost as e:
                logger.warning("request %s lost its replica (%s): attempt %d", rid, e, attempt + 1)
            except ServingError as e:
                dispatch.error = e
                raise
        dispatch.error = ServingError(503, "engine replicas failed while serving this request", "ServiceUnavailable",
                                      self.cfg.retry_after_s)
        raise dispatch.error

    async def _dispatch(self, gen: GenerateRequest, dispatch: Dispatch, called_at: float, attempt: int):
        """Route, fetch pool blocks the chosen node lacks, send to the replica; returns the serving replica and its
        outputs once the first is in. Times the stages on the way (Dispatch.stages)."""
        self.ensure_upkeep()
        stages = {"render": called_at - dispatch.received_at} if dispatch.received_at else {}
        if attempt:
            stages["retry"] = time.time() - called_at
        decision, keys = await self._route(gen.request_id, gen.prompt_token_ids, gen.cache_salt, dispatch.tenant,
                                           stages)
        if decision and decision.fetch:
            t0 = time.perf_counter()
            await self._fetch(decision.fetch, keys)
            stages["pool_fetch"] = time.perf_counter() - t0
        if decision:
            gen.route = {"replica": decision.replica}
            dispatch.reason, dispatch.predicted_cached_tokens = decision.reason, decision.predicted_cached_tokens
            dispatch.costs = decision.costs
        else:  # (a retry routed by the fallback rule: an earlier attempt's route no longer describes it)
            dispatch.reason, dispatch.predicted_cached_tokens, dispatch.costs = "fallback", None, None
        sent_at = time.time()
        stream = self.engine.options(stream=True).generate.remote(gen)
        first, outputs = await self._started(self._tracked(stream, gen.request_id, decision), gen.request_id)
        stages.update(_replica_stages(sent_at, first.timing if first else None, time.time()))
        dispatch.stages = stages
        return (first.replica if first else None), outputs

    async def _route(self, rid: str, ids: list[int], salt: str | None, tenant: str | None,
                     stages: dict[str, float]) -> tuple[Decision | None, list[str] | None]:
        """Ask the router for the cheapest replica; None (Serve's fallback rule) if it is off, down or slow.
        Also returns the prompt's pool keys (when the pool is on). Times hashing and the router call into
        `stages`."""
        if self.router is None:
            return None, None
        # Only full blocks before the last token can be cache hits (the engine always computes the last token).
        # A salted prompt's chains start from its salt, as vLLM's do (the salt is the first block's extra key).
        # Pool keys here only predict (the router's pool view, fetches: the engine computes its own for loads), so
        # the 64-bit routing hash is a good enough identity to memoise them by.
        t0 = time.perf_counter()
        tokens = token_array(ids)[:-1]
        hashes = block_hashes(tokens, self.cfg.block_size, (salt,) if salt else ())
        keys = self.key_memo.keys(tokens, self.cfg.block_size, request_namespace(salt),
                                  hashes.tolist()) if self.cfg.pool_enabled else None
        key_ids = pool_key_ids(keys) if keys is not None else None
        t1 = time.perf_counter()
        stages["hashing"] = t1 - t0
        try:
            decision = await asyncio.wait_for(self.router.route.remote(rid, hashes, len(ids), key_ids, tenant),
                                              timeout=self.cfg.route_timeout_s)
            return decision, keys
        except Exception as e:
            logger.warning("routing %s by the fallback rule: router %s", rid, type(e).__name__)
            self._router_lost |= isinstance(e, ActorDiedError)
            # A late answer may still have counted this request against a replica's queue: take it back.
            self.router.finished.remote(rid, None)
            return None, keys
        finally:  # answered or not (a timeout is the slowest call of all)
            stages["router_call"] = time.perf_counter() - t1

    async def _fetch(self, fetch: Fetch, keys: list[str]) -> None:
        """Have the chosen replica's node copy the blocks it lacks from another node's pool. Best effort: what does
        not arrive in time is recomputed by the engine. Outcomes are counted in `fetches` (/v1/kvpool/stats)."""
        bs = self.cfg.block_size
        wanted = keys[fetch.start_token // bs:fetch.end_token // bs]
        self.fetches["requests"] += 1
        self.fetches["wanted_blocks"] += len(wanted)
        if not fetch.target_node:  # the router does not know the replica's node (yet): nowhere to copy to
            self._fetch_failed("unknown_target_node")
            return
        try:
            shard = self.shards.get(fetch.target_node) or get_or_create_shard(self.cfg, self.app_name,
                                                                              fetch.target_node)
            self.fetches["blocks"] += await asyncio.wait_for(
                shard.pull.remote(fetch.source_node, fetch.layouts, wanted), timeout=self.cfg.pool_fetch_timeout_s)
        except Exception as e:
            self._fetch_failed(type(e).__name__)
            logger.warning("pool fetch from node %s failed (%s): recomputing", fetch.source_node, type(e).__name__)

    def _fetch_failed(self, cause: str) -> None:
        self.fetches["failed"] += 1
        self.fetches[f"failed:{cause}"] += 1

    async def _started(self, outputs: AsyncIterator[ReplicaOutput],
                       rid: str) -> tuple[ReplicaOutput | None, AsyncIterator[Any]]:
        """Wait for the replica's first output before answering, so that a full queue is a 429 with Retry-After
        and a failed engine a 503, not a broken 200 stream. Returns the first output (it names the serving replica
        and its timing) and the RequestOutputs."""
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            first = None
        except _REPLICA_LOST as e:
            await outputs.aclose()
            raise _ReplicaLost(type(e).__name__) from None
        except BackPressureError:
            await outputs.aclose()
            raise ServingError(429, "the server is at capacity; retry after the time in Retry-After",
                               "TooManyRequests", self.cfg.retry_after_s) from None
        except Exception as e:
            await outputs.aclose()
            cause = getattr(e, "cause", e)  # a RayTaskError carries what the replica raised
            if isinstance(cause, (VLLMClientError, ValueError)):  # the engine refused the request (a bad grammar)
                raise ServingError(400, str(cause), "BadRequestError") from None
            logger.exception("request %s failed in the engine", rid)
            raise ServingError(503, f"engine failed: {type(e).__name__}", "ServiceUnavailable",
                               self.cfg.retry_after_s) from None

        async def replay_first() -> AsyncIterator[Any]:
            if first is not None:
                yield first.output
            async for o in outputs:
                yield o.output

        return first, replay_first()

    async def _tracked(self, outputs: AsyncIterator[ReplicaOutput], rid: str,
                       decision: Decision | None) -> AsyncIterator[ReplicaOutput]:
        """Pass outputs through, telling the router when prefill ended, where the request runs and what the engine
        actually had cached."""
        cached, ok, first = None, False, True
        try:
            async for o in outputs:
                if first and decision:
                    self.router.started.remote(rid, o.replica)
                first = False
                if o.output is not None:
                    cached = max(cached or 0, o.output.num_cached_tokens or 0)
                if o.preemptions is not None:
                    self.preemptions.update(finished=1, preempted_requests=int(o.preemptions > 0),
                                            preemptions=o.preemptions)
                yield o
            ok = True
        finally:
            if decision:
                self.router.finished.remote(rid, cached if ok else None)

    # --- the rest of vLLM's EngineClient: this client serves generation only ---------------------------------------

    @property
    def is_running(self) -> bool:
        return True

    @property
    def is_stopped(self) -> bool:
        return False

    @property
    def errored(self) -> bool:
        return False

    @property
    def dead_error(self) -> BaseException:
        return RuntimeError("engine replicas are managed by Ray Serve")

    async def is_paused(self) -> bool:
        return False

    async def is_sleeping(self) -> bool:
        return False

    async def is_tracing_enabled(self) -> bool:
        return False

    async def check_health(self) -> None:
        return None

    async def do_log_stats(self) -> None:
        return None

    async def abort(self, request_id) -> None:
        return None  # closing the replica's stream (the client went away) cancels its request there

    def _unsupported(self, *_, **__):
        raise NotImplementedError("not supported by KV-Pool's ingress")

    encode = add_lora = notify_kv_transfer_request_rejected = pause_generation = resume_generation = _unsupported
    release_kv_cache_memory = reset_encoder_cache = reset_mm_cache = reset_prefix_cache = _unsupported
    shutdown = sleep = wake_up = start_profile = stop_profile = _unsupported
