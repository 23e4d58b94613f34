"""The HTTP ingress: OpenAI API in, tokenize once, hand token ids to an engine replica, stream out.

This file is the request path. Read it top to bottom: `chat_completions` / `completions` authenticate, parse and
tokenize; `_generate` checks limits and builds sampling parameters; `_dispatch` asks the router actor for the
replica that will compute least (`_route`), has that replica's node fetch pool blocks it lacks (`_fetch`), and sends
the token ids to the replica through the engine deployment's Serve handle (the plug-in in app/request_router.py
honours the choice); `_collect` / `_stream` turn the engine's chunks into an OpenAI response or an SSE stream while
`_tracked` reports the request's progress back to the router. A replica lost before the answer reached the client
means a retry elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.engine import GenerateChunk, GenerateRequest
from actors.pool import get_or_create_shard
from actors.router import get_or_create_router
from app import protocol as oa
from kvpool.config import KVPoolConfig
from kvpool.hashing import block_hashes
from kvpool.pool_store import pool_keys, request_namespace
from kvpool.routing import Decision, Fetch
from kvpool.model import resolve_model
from kvpool.prompt import PromptError, PromptRenderer

logger = logging.getLogger("ray.serve")

# The replica (its actor) died or became unreachable: the request may be retried on another.
_REPLICA_LOST = (RayActorError, ActorUnavailableError)


class _ReplicaLost(Exception):
    pass


api = FastAPI(title="KV-Pool", description="OpenAI-compatible API over a prefix-aware KV pool")


@api.exception_handler(oa.OpenAIError)
async def _openai_error(_: Request, exc: oa.OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = oa.OpenAIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, cfg: KVPoolConfig):
        self.engine = engine
        self.cfg = cfg
        self.model_name = cfg.model_name()
        self.renderer = PromptRenderer.from_pretrained(resolve_model(cfg.model))
        self.app_name = serve.get_replica_context().app_name
        self.router = get_or_create_router(cfg, self.app_name) if cfg.prefix_routing else None
        self.shards: dict[str, Any] = {}  # node id -> its pool shard
        self._shards_checked = 0.0
        self._keep_shards()

    def _keep_shards(self, period_s: float = 10) -> None:
        """A pool shard on every live node (nodes join and leave with autoscaling). This ingress owns them, so they
        end with the app; a restarted ingress makes them again (the pool itself is files and survives)."""
        import ray

        if not self.cfg.pool_enabled or time.monotonic() - self._shards_checked < period_s:
            return
        self._shards_checked = time.monotonic()
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for node in alive - set(self.shards):
            self.shards[node] = get_or_create_shard(self.cfg, self.app_name, node)
            self.shards[node].start.remote()
        for node in set(self.shards) - alive:
            del self.shards[node]

    # --- endpoints -----------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/kvpool/stats")
    async def kvpool_stats(self, request: Request) -> dict[str, Any]:
        """For people: the router's view (per replica hit rate, prediction accuracy, queues, decisions by reason)
        and the pool's, per node (bytes and blocks per tier, live-session blocks, demotions, evictions, pulls)."""
        self._tenant(request)

        async def ask(actor) -> dict:
            try:
                return await asyncio.wait_for(actor.stats.remote(), timeout=5)
            except Exception as e:
                return {"error": f"unavailable: {type(e).__name__}"}

        self._keep_shards()
        return {"router": await ask(self.router) if self.router else None,
                "pool": {node: await ask(shard) for node, shard in self.shards.items()}
                if self.cfg.pool_enabled else None}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._tenant(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "kvpool",
                                            "max_model_len": self.cfg.max_model_len}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        tenant = self._tenant(request)
        req = oa.parse_request(await request.body(), oa.ChatCompletionRequest)
        self._check_model(req.model)
        try:
            ids = self.renderer.chat([m.model_dump() for m in req.messages])
        except PromptError as e:
            raise oa.OpenAIError(400, str(e), param="messages") from None
        return await self._generate(req, ids, "chat", tenant)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        tenant = self._tenant(request)
        req = oa.parse_request(await request.body(), oa.CompletionRequest)
        self._check_model(req.model)
        try:
            ids = self.renderer.completion(req.single_prompt())
        except PromptError as e:
            raise oa.OpenAIError(400, str(e), param="prompt") from None
        return await self._generate(req, ids, "completion", tenant)

    # --- the request path ----------------------------------------------------------------------------------------

    def _tenant(self, request: Request) -> str | None:
        """The caller's tenant salt (None when the app has no API keys). The salt scopes KV reuse: vLLM mixes it
        into the first block's hash, and the router and pool start their chains from it, so one tenant's prompts
        are never a cache hit for another, and so cannot be probed through response times."""
        if not self.cfg.api_keys:
            return None
        scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(key.encode(), k.encode())
                                              for k in self.cfg.api_keys):
            return hashlib.sha256(b"kvpool-tenant:" + key.encode()).hexdigest()[:32]
        raise oa.OpenAIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise oa.OpenAIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                                 param="model", code="model_not_found")

    async def _generate(self, req: oa._Request, ids: list[int], kind: str, tenant: str | None):
        from vllm import SamplingParams

        room = self.cfg.max_model_len - len(ids)
        if room <= 0:
            raise oa.OpenAIError(400, f"prompt has {len(ids)} tokens; this model's context is "
                                 f"{self.cfg.max_model_len} tokens", param="messages" if kind == "chat" else "prompt",
                                 code="context_length_exceeded")
        asked = req.requested_max_tokens()
        if asked is not None and asked > room:
            raise oa.OpenAIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({asked}) exceeds the context of "
                                 f"{self.cfg.max_model_len} tokens", param="max_tokens",
                                 code="context_length_exceeded")
        max_tokens = asked or min(self.cfg.max_tokens_default, room)
        try:
            params = SamplingParams(**req.sampling_kwargs(max_tokens))
        except (ValueError, TypeError) as e:
            raise oa.OpenAIError(400, f"invalid sampling parameters: {e}") from None
        # A replica that dies before a request's answer has reached the client costs a retry on another replica,
        # not an error: a stream, once its first chunk is out, ends with an error event instead.
        for attempt in range(1 + self.cfg.engine_retries):
            rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            try:
                chunks, headers = await self._dispatch(rid, ids, params, tenant)
                if req.stream:
                    return StreamingResponse(self._stream(chunks, rid, req, kind, len(ids)),
                                             media_type="text/event-stream", headers=headers)
                return JSONResponse(await self._collect(chunks, rid, req, kind, len(ids)), headers=headers)
            except _ReplicaLost as e:
                logger.warning("request %s lost its replica (%s): attempt %d", rid, e, attempt + 1)
        raise oa.OpenAIError(503, "engine replicas failed while serving this request", type="server_error",
                             headers={"Retry-After": str(self.cfg.retry_after_s)})

    async def _dispatch(self, rid: str, ids: list[int], params, tenant: str | None):
        """Route, fetch pool blocks the chosen node lacks, send to the replica; returns its chunks once the first
        is in, and the response headers that tell where the request went."""
        self._keep_shards()
        decision, keys = await self._route(rid, ids, tenant)
        if decision and decision.fetch:
            await self._fetch(decision.fetch, keys)
        gen = GenerateRequest(request_id=rid, prompt_token_ids=ids, sampling_params=params, cache_salt=tenant,
                              route={"replica": decision.replica} if decision else {})
        served_by, chunks = await self._started(
            self._tracked(self.engine.options(stream=True).generate.remote(gen), rid, decision), rid)
        headers = {"x-kvpool-route-reason": decision.reason if decision else "fallback"}
        if served_by:
            headers["x-kvpool-replica"] = served_by
        if decision:
            headers["x-kvpool-predicted-cached-tokens"] = str(decision.predicted_cached_tokens)
        return chunks, headers

    async def _route(self, rid: str, ids: list[int], tenant: str | None) -> tuple[Decision | None, list[str] | None]:
        """Ask the router for the cheapest replica; None (Serve's fallback rule) if it is off, down or slow.
        Also returns the prompt's pool keys (when the pool is on)."""
        if self.router is None:
            return None, None
        # Only full blocks before the last token can be cache hits (the engine always computes the last token).
        # A tenant's chains start from its salt, as vLLM's do (the salt is the first block's extra key).
        hashes = block_hashes(ids[:-1], self.cfg.block_size, (tenant,) if tenant else ())
        keys = pool_keys(ids[:-1], self.cfg.block_size, request_namespace(tenant)) if self.cfg.pool_enabled \
            else None
        try:
            return await asyncio.wait_for(self.router.route.remote(rid, hashes, len(ids), keys),
                                          timeout=self.cfg.route_timeout_s), keys
        except Exception as e:
            logger.warning("routing %s by the fallback rule: router %s", rid, type(e).__name__)
            # A late answer may still have counted this request against a replica's queue: take it back.
            self.router.finished.remote(rid, None)
            return None, keys

    async def _fetch(self, fetch: Fetch, keys: list[str]) -> None:
        """Have the chosen replica's node copy the blocks it lacks from another node's pool. Best effort: what does
        not arrive in time is recomputed by the engine."""
        bs = self.cfg.block_size
        try:
            shard = self.shards.get(fetch.target_node) or get_or_create_shard(self.cfg, self.app_name,
                                                                              fetch.target_node)
            await asyncio.wait_for(shard.pull.remote(fetch.source_node, fetch.layouts,
                                                     keys[fetch.start_token // bs:fetch.end_token // bs]),
                                   timeout=self.cfg.pool_fetch_timeout_s)
        except Exception as e:
            logger.warning("pool fetch from node %s failed (%s): recomputing", fetch.source_node, type(e).__name__)

    async def _started(self, chunks: AsyncIterator[GenerateChunk],
                       rid: str) -> tuple[str | None, AsyncIterator[GenerateChunk]]:
        """Wait for the engine's first chunk before answering, so that a full queue is a 429 with Retry-After and a
        failed engine a 503, not a broken 200 stream. Returns the serving replica (the first chunk names it) and
        all the chunks."""
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except _REPLICA_LOST as e:
            await chunks.aclose()
            raise _ReplicaLost(type(e).__name__) from None
        except BackPressureError:
            await chunks.aclose()
            raise oa.OpenAIError(429, "the server is at capacity; retry after the time in Retry-After",
                                 type="server_overloaded", code="overloaded",
                                 headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        except Exception as e:
            await chunks.aclose()
            logger.exception("request %s failed in the engine", rid)
            raise oa.OpenAIError(503, f"engine failed: {type(e).__name__}", type="server_error",
                                 headers={"Retry-After": str(self.cfg.retry_after_s)}) from None

        async def replay_first() -> AsyncIterator[GenerateChunk]:
            if first is not None:
                yield first
            async for c in chunks:
                yield c

        return (first.replica if first else None), replay_first()

    async def _tracked(self, chunks: AsyncIterator[GenerateChunk], rid: str,
                       decision: Decision | None) -> AsyncIterator[GenerateChunk]:
        """Pass chunks through, telling the router when prefill ended and what the engine actually had cached."""
        cached, ok = None, False
        try:
            async for c in chunks:
                if cached is None and decision:
                    self.router.started.remote(rid, c.replica)
                cached = max(cached or 0, c.num_cached_tokens)
                yield c
            ok = True
        finally:
            if decision:
                self.router.finished.remote(rid, cached if ok else None)

    async def _collect(self, chunks: AsyncIterator[GenerateChunk], rid: str, req: oa._Request, kind: str,
                       n_prompt: int):
        text, token_ids, logprobs, cached, finish = [], [], [], 0, None
        try:
            async for c in chunks:
                text.append(c.text)
                token_ids += c.token_ids
                logprobs += c.logprobs or []
                cached = max(cached, c.num_cached_tokens)
                finish = c.finish_reason or finish
        except _REPLICA_LOST as e:  # nothing has reached the client yet: the whole request can be retried
            raise _ReplicaLost(type(e).__name__) from None
        except Exception as e:
            logger.exception("request %s failed in the engine", rid)
            raise oa.OpenAIError(503, f"engine failed: {type(e).__name__}", type="server_error") from None
        use = oa.usage(n_prompt, len(token_ids), cached)
        build = oa.chat_response if kind == "chat" else oa.completion_response
        return build(rid, self.model_name, "".join(text), finish, use, req.format_logprobs(token_ids, logprobs, 0))

    async def _stream(self, chunks: AsyncIterator[GenerateChunk], rid: str, req: oa._Request, kind: str,
                      n_prompt: int) -> AsyncIterator[str]:
        chat = kind == "chat"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n_out, n_chars, cached = 0, 0, 0
        if chat:
            yield oa.sse(oa.chat_chunk(rid, self.model_name, {"role": "assistant", "content": ""}))
        try:
            async for c in chunks:
                n_out += len(c.token_ids)
                cached = max(cached, c.num_cached_tokens)
                # A token whose text is not complete yet (part of a UTF-8 character) still gets its chunk: its
                # logprob belongs to it.
                if not c.token_ids and c.finish_reason is None:
                    continue
                logprobs = req.format_logprobs(c.token_ids, c.logprobs or [], n_chars)
                n_chars += len(c.text)
                # Usage rides on the final chunk even without include_usage, so every response reports cached tokens.
                use = oa.usage(n_prompt, n_out, cached) if c.finish_reason and not include_usage else None
                if chat:
                    delta = {"content": c.text} if c.text else {}
                    yield oa.sse(oa.chat_chunk(rid, self.model_name, delta, c.finish_reason, use, logprobs))
                else:
                    yield oa.sse(oa.completion_chunk(rid, self.model_name, c.text, c.finish_reason, use, logprobs))
        except Exception as e:
            logger.exception("stream %s failed in the engine", rid)
            err = oa.OpenAIError(503, f"engine failed mid-stream: {type(e).__name__}", type="server_error")
            yield oa.sse(err.body())
            return
        if include_usage:
            use = oa.usage(n_prompt, n_out, cached)
            last = oa.chat_chunk(rid, self.model_name, None, use=use) if chat else \
                oa.completion_chunk(rid, self.model_name, None, use=use)
            yield oa.sse(last)
        yield oa.sse("[DONE]")
