"""OpenAI-compatible request models, error bodies and response builders.

Requests are validated here, before any work is queued, so a bad request costs nothing and never reaches an engine.
"""

from __future__ import annotations

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

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for vllm.SamplingParams; None means the engine default."""
        kw = dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                  seed=self.seed, presence_penalty=self.presence_penalty,
                  frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos or None)
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

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    # One prompt per request: a string or token ids (a one-element batch is accepted too).
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_response(rid: str, model: str, text: str, finish_reason: str | None, use: dict) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": use,
    }


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, use: dict) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None,
               use: dict | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_chunk(rid: str, model: str, text: str | None, finish_reason: str | None = None,
                     use: dict | None = None) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason,
                                        "logprobs": None}]
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
