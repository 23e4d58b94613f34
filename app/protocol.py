"""OpenAI-compatible request models, error bodies and response builders.

Requests are validated here, before any work is queued, so a bad request costs nothing and never reaches an engine.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class OpenAIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send many optional ones.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks: generate exactly max_tokens
    # vLLM's extension: logprob tokens as "token_id:123", so a client learns the exact token ids generated.
    return_tokens_as_token_ids: bool = False

    def num_logprobs(self) -> int | None:
        """Top logprobs per token the engine computes besides the sampled token's; None: no logprobs."""
        raise NotImplementedError

    def format_logprobs(self, token_ids: list[int], logprobs: list[dict], text_offset: int) -> dict | None:
        """The response's `logprobs` for these tokens (None when not asked); `text_offset`: the characters of
        completion text before them."""
        raise NotImplementedError

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for vllm.SamplingParams; None means the engine default."""
        kw = dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                  seed=self.seed, presence_penalty=self.presence_penalty,
                  frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos or None,
                  logprobs=self.num_logprobs())
        return {k: v for k, v in kw.items() if v is not None}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # used with logprobs=true only, as in vLLM

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def format_logprobs(self, token_ids: list[int], logprobs: list[dict], text_offset: int) -> dict | None:
        if not self.logprobs:
            return None
        as_ids = self.return_tokens_as_token_ids
        return {"content": [{**_logprob_entry(tid, step[tid], as_ids),
                             "top_logprobs": [_logprob_entry(t, lp, as_ids)
                                              for t, lp in itertools.islice(step.items(), self.top_logprobs or 0)]}
                            for tid, step in zip(token_ids, logprobs)]}


class CompletionRequest(_Request):
    # One prompt per request: a string or token ids (a one-element batch is accepted too).
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def format_logprobs(self, token_ids: list[int], logprobs: list[dict], text_offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        as_ids = self.return_tokens_as_token_ids
        steps = [step[tid] for tid, step in zip(token_ids, logprobs)]
        lengths = [len(lp.decoded_token or "") for lp in steps]
        # The sampled token and the top `logprobs` (OpenAI: up to logprobs + 1 entries per token).
        return {"tokens": [_token(tid, lp, as_ids) for tid, lp in zip(token_ids, steps)],
                "token_logprobs": [_logprob(lp) for lp in steps],
                "top_logprobs": [{_token(t, lp, as_ids): _logprob(lp)
                                  for t, lp in itertools.islice(step.items(), self.logprobs + 1)}
                                 for step in logprobs],
                "text_offset": list(itertools.accumulate(lengths[:-1], initial=text_offset))[:len(steps)]}

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise OpenAIError(400, "batched prompts are not supported; send one prompt per request",
                                  param="prompt")
            p = p[0]
        if len(p) == 0:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        return p

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's completions default


def parse_request(raw: bytes, model_cls: type[_Request]) -> _Request:
    """Bytes -> validated request, or an OpenAIError (400) that says what is wrong."""
    try:
        data = json.loads(raw)  # bytes: invalid UTF-8 raises UnicodeDecodeError, a ValueError
    except ValueError as e:
        raise OpenAIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise OpenAIError(400, f"{param}: {err['msg']}", param=param) from None


def _token(token_id: int, logprob, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else logprob.decoded_token or ""


def _logprob(logprob) -> float:
    return max(logprob.logprob, -9999.0)  # as vLLM and OpenAI: JSON has no -inf


def _logprob_entry(token_id: int, logprob, as_ids: bool) -> dict[str, Any]:
    """One token of chat logprobs; `logprob` is vLLM's Logprob (its decoded_token is the token's text)."""
    return {"token": _token(token_id, logprob, as_ids), "logprob": _logprob(logprob),
            "bytes": list((logprob.decoded_token or "").encode("utf-8", errors="replace"))}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_response(rid: str, model: str, text: str, finish_reason: str | None, use: dict,
                  logprobs: dict | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": logprobs}],
        "usage": use,
    }


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, use: dict,
                        logprobs: dict | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None,
               use: dict | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": logprobs}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_chunk(rid: str, model: str, text: str | None, finish_reason: str | None = None,
                     use: dict | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason,
                                        "logprobs": logprobs}]
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
