"""The HTTP ingress: the OpenAI and Anthropic APIs as vLLM's own server serves them, over routed engine replicas.

This file and app/engine_client.py are the request path. Each endpoint authenticates the caller (`_tenant`), parses
the body with vLLM's protocol model, refusing fields that nothing here would honour (`_parse`), and hands it to
vLLM's serving class for that API: it renders the chat template (tools included), tokenizes once, builds the
sampling parameters and calls `RoutedEngineClient.generate`, which routes the token ids to a replica. vLLM's code
then parses tool calls and reasoning and writes the response; `_respond` turns it into HTTP, answering failures
that happen before the first output with their status (429, 503) rather than a broken 200 stream.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.engine import engine_args, fit_to_model
from actors.router import get_or_create_router, tenant_figures
from app.engine_client import RoutedEngineClient, ServingError, dispatching
from kvpool.config import KVPoolConfig
from kvpool.model import resolve_model
from kvpool.prefix_tokens import PrefixTokenizer

logger = logging.getLogger("ray.serve")

api = FastAPI(title="KV-Pool", description="OpenAI- and Anthropic-compatible API over a prefix-aware KV pool")


class APIError(Exception):
    """An error answered in the API's own style, before any work is queued."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param
        self.headers = headers or {}


def _api_key(request: Request) -> str:
    key = request.headers.get("x-api-key")  # Anthropic clients send their key here
    if key is None:
        scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
        key = key if scheme.lower() == "bearer" else ""
    return key


def tenant_of(cfg: KVPoolConfig, request: Request) -> str | None:
    """The caller's tenant salt (None when the app has no API keys). The salt scopes KV reuse: vLLM mixes it into
    the first block's hash, and the router and pool start their chains from it, so one tenant's prompts are never a
    cache hit for another, and so cannot be probed through response times. Without keys only clients on the
    serving machine are answered, unless `allow_unauthenticated_network`: a cluster config that binds 0.0.0.0 is
    not open to its network by mistake."""
    if not cfg.api_keys and not cfg.admin_api_keys:
        if cfg.allow_unauthenticated_network or (request.client and _is_loopback(request.client.host)):
            return None
        raise APIError(401, "this server has no API keys, so it answers clients on its own machine only: set "
                       "`api_keys` (or `allow_unauthenticated_network: true`, on a trusted network only)",
                       "AuthenticationError")
    key = _api_key(request)
    if any(hmac.compare_digest(key.encode(), k.encode()) for k in cfg.api_keys + cfg.admin_api_keys):
        return hashlib.sha256(b"kvpool-tenant:" + key.encode()).hexdigest()[:32]
    raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
                   "AuthenticationError", headers={"WWW-Authenticate": "Bearer"})


def _is_loopback(host: str) -> bool:
    """Whether the client, as Serve's proxy saw it, is on this machine. (Uvicorn takes X-Forwarded-For from loopback
    peers only: a reverse proxy on the serving machine must send it, or the app needs keys.)"""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _openai_body(e: APIError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.err_type, "param": e.param, "code": e.status}}


def _anthropic_body(e: APIError) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 503: "overloaded_error"}
    return {"type": "error", "error": {"type": kinds.get(e.status, "api_error"), "message": e.message}}


def _anthropic_stream_errors(converter: Callable[[AsyncIterator[str]], AsyncIterator[str]]):
    """vLLM's converter of the chat stream into Anthropic's events, with an error the chat stream yields mid-answer
    (a replica lost: vLLM's OpenAI error chunk, then [DONE]) passed on as Anthropic's error event, which ends the
    stream. vLLM's own converter cannot parse that chunk and emits its parse error (pydantic's text) instead."""
    from vllm.entrypoints.anthropic.serving import wrap_data_with_event

    async def convert(chat_stream: AsyncIterator[str]) -> AsyncIterator[str]:
        errors: list[APIError] = []

        async def until_error() -> AsyncIterator[str]:
            async for item in chat_stream:
                if item.startswith('data: {"error"'):
                    error = json.loads(item[5:])["error"]
                    errors.append(APIError(error.get("code") or 500, error.get("message") or ""))
                    return
                yield item

        async for event in converter(until_error()):
            yield event
        for e in errors:
            yield wrap_data_with_event(json.dumps(_anthropic_body(e)), "error")

    return convert


def _error_response(request: Request, e: APIError) -> JSONResponse:
    body = _anthropic_body(e) if request.url.path.endswith(("/v1/messages", "/v1/messages/count_tokens")) \
        else _openai_body(e)
    return JSONResponse(body, status_code=e.status, headers=e.headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(request, exc)


@api.exception_handler(ServingError)
async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else {}
    return _error_response(request, APIError(exc.status, exc.message, exc.err_type, headers=headers))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(request, APIError(exc.status_code, str(exc.detail),
                                             "NotFoundError" if exc.status_code == 404 else "BadRequestError"))


@api.exception_handler(Exception)
async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return _error_response(request, APIError(500, f"internal error: {type(exc).__name__}", "InternalServerError"))


# A JSON string escape of a UTF-16 surrogate: only a pair of them is a character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json_object(raw: bytes) -> dict:
    """A request body -> the JSON object it must be, or a 400 that says why not."""
    try:
        # Strict UTF-8 first (a byte-order mark allowed): json.loads(bytes) would let encoded surrogates through
        # (it decodes "surrogatepass").
        data = json.loads(raw.decode("utf-8-sig"))
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except ValueError as e:  # invalid UTF-8 (UnicodeDecodeError) or JSON
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(raw):  # rare (pairs are emoji escaped): then the exact, slower check
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate is no text: the tokenizer, the engine and every response that quotes it would fail.
            raise APIError(400, "request body has an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which "
                           "is not text") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def _parse(data: dict, model_cls: type[BaseModel]) -> Any:
    """A request body (_json_object) -> vLLM's request model, or a 400 that says what is wrong. A field the model
    does not know would be ignored by vLLM: here it is refused by name, so nothing an agent sends is silently
    dropped."""
    known = {name for name, f in model_cls.model_fields.items()} | \
        {f.alias for f in model_cls.model_fields.values() if f.alias}
    unknown = sorted(set(data) - known)
    if unknown:
        raise APIError(400, f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{param}: {err['msg']}", param=param) from None
    except Exception as e:  # vLLM's own validators raise their own errors (an empty prompt, messages of null)
        raise APIError(400, f"invalid request: {e}", param=getattr(e, "parameter", None)) from None


def _asks_caching(body: dict) -> bool:
    """An Anthropic request marks a prefix for caching with `cache_control` on a block of its tools, system prompt
    or messages (vLLM's protocol models drop the field). Its prompt's blocks are then pooled as a live session's,
    kept ahead of idle sessions and one-off prompts for `pool_session_ttl_s` after their last use, within the
    pool's budgets; the marker's own `ttl` is not read."""
    def blocks(value) -> list:
        return [b for b in value if isinstance(b, dict)] if isinstance(value, list) else []

    marked = blocks(body.get("tools")) + blocks(body.get("system"))
    for m in blocks(body.get("messages")):
        marked += blocks(m.get("content"))
    return any("cache_control" in b for b in marked)


def build_serving(cfg: KVPoolConfig, engine: DeploymentHandle, router, app_name: str) -> dict[str, Any]:
    """vLLM's serving objects, as `vllm serve` builds them for a render-only front end (no engine here: the
    replicas have those), over the routed engine client."""
    import vllm.envs as envs
    from vllm.config import VllmConfig
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
    from vllm.renderers import renderer_from_config
    from vllm.renderers.chat_utils import load_chat_template
    from vllm.renderers.online_renderer import OnlineRenderer

    model_path = resolve_model(cfg.model)
    args = engine_args(cfg, model_path)
    model_config = args.create_model_config()
    cfg, pool_off = fit_to_model(cfg, model_config)
    model_config.quantization = None  # the front end runs no kernels
    envs.VLLM_CPU_KVCACHE_SPACE = 0  # and allocates no KV cache
    vllm_config = VllmConfig(model_config=model_config, structured_outputs_config=args.create_structured_outputs_config())
    renderer = renderer_from_config(vllm_config)
    prompt_tokens = reuse_prompt_tokens(renderer)
    client = RoutedEngineClient(cfg, vllm_config, renderer, engine, router, app_name)
    models = OpenAIServingModels(engine_client=client,
                                 base_model_paths=[BaseModelPath(name=cfg.model_name(), model_path=model_path)])
    template = load_chat_template(cfg.chat_template)
    tools = dict(enable_auto_tools=cfg.tool_call_parser is not None, tool_parser=cfg.tool_call_parser,
                 reasoning_parser=cfg.reasoning_parser or "")
    renderer_tools = dict(tools, reasoning_parser=cfg.reasoning_parser)
    online = OnlineRenderer(model_config=model_config, renderer=renderer, request_logger=None, chat_template=template,
                            chat_template_content_format="auto", **renderer_tools)
    online.warmup()
    common = dict(request_logger=None, chat_template=template, chat_template_content_format="auto",
                  enable_prompt_tokens_details=True, **tools)
    chat = OpenAIServingChat(client, models, "assistant", online_renderer=online, **common)
    messages = AnthropicServingMessages(client, models, "assistant", online_renderer=online, **common)
    messages.message_stream_converter = _anthropic_stream_errors(messages.message_stream_converter)
    for serving in (chat, messages):  # a chat request without max_tokens: the configured cap, not the context
        serving.default_sampling_params.setdefault("max_tokens", cfg.max_tokens_default)
    return {
        "cfg": cfg,
        "pool_off": pool_off,  # why the pool cannot serve this model (None: it can, or it is off by config)
        "prompt_tokens": prompt_tokens,
        "client": client,
        "models": models,
        "chat": chat,
        "messages": messages,
        "completion": OpenAIServingCompletion(client, models, online_renderer=online, request_logger=None,
                                              enable_prompt_tokens_details=True),
        "tokenize": ServingTokenization(models, online, request_logger=None, chat_template=template,
                                        chat_template_content_format="auto"),
    }


def reuse_prompt_tokens(renderer) -> PrefixTokenizer:
    """Have vLLM's renderer tokenize a prompt that extends a recent one by reusing that one's tokens
    (kvpool.prefix_tokens): its `_tokenize_prompt`, and the async wrapper over it, go through a PrefixTokenizer.
    Requests that want character offsets, and any PrefixTokenizer turned off, tokenize as vLLM does."""
    from vllm.utils.async_utils import make_async

    tokens = PrefixTokenizer(renderer.get_tokenizer())
    if tokens.off_reason:
        return tokens
    whole = renderer._tokenize_prompt

    def tokenize_prompt(prompt, params):
        kwargs = params.get_encode_kwargs()
        if renderer._wants_offsets(prompt, params) or set(kwargs) - {"add_special_tokens", "truncation",
                                                                     "max_length"}:
            return whole(prompt, params)
        return renderer._build_tokens_prompt(tokens.encode(prompt["prompt"], **kwargs), prompt)

    renderer._tokenize_prompt = tokenize_prompt
    renderer._tokenize_prompt_async = make_async(tokenize_prompt, executor=renderer._executor)
    return tokens


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, cfg: KVPoolConfig):
        self.app_name = serve.get_replica_context().app_name
        router = get_or_create_router(cfg, self.app_name) if cfg.prefix_routing else None
        self.serving = build_serving(cfg, engine, router, self.app_name)
        self.cfg = self.serving["cfg"]
        self.client: RoutedEngineClient = self.serving["client"]

    # --- endpoints -----------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/kvpool/stats")
    async def kvpool_stats(self, request: Request) -> dict[str, Any]:
        """For people: the router's view (per replica hit rate, prediction accuracy, queues, decisions by reason)
        and the pool's, per node (bytes and blocks per tier, live-session blocks, demotions, evictions, pulls), and
        this ingress's cross-node fetches (requests, blocks wanted, blocks that arrived, failures) and what routing
        added to its requests, with the rest of where their time to a first output went (stages_ms, see
        app/engine_client.py STAGES), and how often vLLM preempted them (preemptions)."""
        import asyncio

        tenant = self._tenant(request)

        async def ask(actor) -> dict:
            try:
                return await asyncio.wait_for(actor.stats.remote(), timeout=5)
            except Exception as e:
                return {"error": f"unavailable: {type(e).__name__}"}

        if tenant is not None and not self._is_admin(request):
            # A tenant sees its own figures only: the others' traffic, and where it runs, are not its business.
            router = await ask(self.client.router) if self.client.router else {}
            return {"tenant": router.get("tenants", {}).get(tenant) or tenant_figures(Counter())}
        self.client.ensure_upkeep()
        return {"router": await ask(self.client.router) if self.client.router else None,
                "pool": {node: await ask(shard) for node, shard in list(self.client.shards.items())}
                if self.cfg.pool_enabled else None,
                "pool_off": self.serving["pool_off"],  # why the pool cannot serve this model, if so
                "fetches": dict(self.client.fetches), "stages_ms": self.client.stages_ms(),
                "preemptions": dict(self.client.preemptions),
                "prompt_tokens": self.serving["prompt_tokens"].stats()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._tenant(request)
        return JSONResponse((await self.serving["models"].show_available_models()).model_dump())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        received_at = time.time()
        tenant = self._tenant(request)
        req = _parse(_json_object(await request.body()), ChatCompletionRequest)
        return await self._respond(self.serving["chat"].create_chat_completion(req, request), tenant,
                                   stream=bool(req.stream), received_at=received_at)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        received_at = time.time()
        tenant = self._tenant(request)
        req = _parse(_json_object(await request.body()), CompletionRequest)
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)) \
                and len(req.prompt) != 1:
            raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
        return await self._respond(self.serving["completion"].create_completion(req, request), tenant,
                                   stream=bool(req.stream), received_at=received_at)

    @api.post("/v1/messages")
    async def messages(self, request: Request):
        from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

        received_at = time.time()
        tenant = self._tenant(request)
        data = _json_object(await request.body())
        req = _parse(data, AnthropicMessagesRequest)
        return await self._respond(self.serving["messages"].create_messages(req, request), tenant,
                                   stream=bool(req.stream), dump=lambda r: r.model_dump(exclude_none=True),
                                   retain=_asks_caching(data), received_at=received_at)

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request):
        from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest

        self._tenant(request)
        req = _parse(_json_object(await request.body()), AnthropicCountTokensRequest)
        return await self._respond(self.serving["messages"].count_tokens(req, request), None, stream=False,
                                   dump=lambda r: r.model_dump(exclude_none=True))

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's: the token ids this server computes for a request (chat with tools, or a prompt)."""
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

        self._tenant(request)
        data = _json_object(await request.body())
        req = _parse(data, TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest)
        return await self._respond(self.serving["tokenize"].create_tokenize(req, request), None, stream=False)

    # --- the request path ----------------------------------------------------------------------------------------

    def _is_admin(self, request: Request) -> bool:
        key = _api_key(request).encode()
        return any(hmac.compare_digest(key, k.encode()) for k in self.cfg.admin_api_keys)

    def _tenant(self, request: Request) -> str | None:
        return tenant_of(self.cfg, request)

    async def _respond(self, call, tenant: str | None, stream: bool,
                       dump: Callable[[Any], Any] = lambda r: r.model_dump(), retain: bool = False,
                       received_at: float | None = None) -> Response:
        """Run one of vLLM's serving calls and answer it. A failure before the first output (a full queue, lost
        replicas) is answered with its status, also for streams: they start only once the first output is in."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        with dispatching(tenant, retain, received_at) as dispatch:
            try:
                result = await call
            except ServingError:
                raise
            except RecursionError:  # vLLM's code walking a deeply nested field (a tool's schema, say)
                raise APIError(400, "request is nested too deeply") from None
            except Exception as e:
                if dispatch.error is not None:
                    raise dispatch.error from e
                result = create_error_response(e)  # vLLM's own mapping: a bad request is a 4xx, as in `vllm serve`
                if result.error.code >= 500:
                    logger.exception("request failed in vLLM's serving code")
            if dispatch.error is not None:  # vLLM's code answered our failure as an error response of its own
                raise dispatch.error
            if isinstance(result, ErrorResponse):
                raise APIError(result.error.code, result.error.message, result.error.type, result.error.param)
            if not stream or isinstance(result, BaseModel):
                return JSONResponse(dump(result), headers=dispatch.headers())
            # The stream's first events come once generate() has dispatched (or failed): read until then.
            head: list[str] = []
            async for event in result:
                head.append(event)
                if dispatch.replica is not None or dispatch.error is not None:
                    break
            if dispatch.error is not None:
                raise dispatch.error

        async def body() -> AsyncIterator[str]:
            for event in head:
                yield event
            async for event in result:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream", headers=dispatch.headers())

