"""Error mapping: every bad input becomes an OpenAIError with a 4xx status and a body that says what is wrong."""

import json
from types import SimpleNamespace

import pytest

from app import protocol as oa


def _chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return json.dumps(body).encode()


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b"\xff\xfe{}", None),
    (b"[1, 2]", None),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (_chat(messages=[]), "messages"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
    (_chat(temperature=5), "temperature"),
    (_chat(top_p=0), "top_p"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(n=2), "n"),
    (_chat(presence_penalty=9), "presence_penalty"),
])
def test_bad_chat_requests(raw, param):
    with pytest.raises(oa.OpenAIError) as e:
        oa.parse_request(raw, oa.ChatCompletionRequest)
    assert e.value.status == 400 and e.value.param == param
    body = e.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]


def test_good_requests_parse_and_ignore_unknown_fields():
    req = oa.parse_request(_chat(temperature=0, stream=True, stream_options={"include_usage": True},
                                 tools_we_ignore=[1]), oa.ChatCompletionRequest)
    assert req.stream and req.stream_options.include_usage
    assert req.sampling_kwargs(7) == {"max_tokens": 7, "temperature": 0}
    c = oa.parse_request(json.dumps({"model": "m", "prompt": [[1, 2, 3]]}).encode(), oa.CompletionRequest)
    assert c.single_prompt() == [1, 2, 3] and c.requested_max_tokens() == 16


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"]])
def test_bad_completion_prompts(prompt):
    c = oa.parse_request(json.dumps({"model": "m", "prompt": prompt}).encode(), oa.CompletionRequest)
    with pytest.raises(oa.OpenAIError) as e:
        c.single_prompt()
    assert e.value.status == 400 and e.value.param == "prompt"


def test_usage_reports_cached_tokens():
    assert oa.usage(10, 2, 8)["prompt_tokens_details"] == {"cached_tokens": 8}


def test_logprobs_requests_ask_the_engine_and_format_as_vllm():
    chat = oa.parse_request(_chat(logprobs=True, top_logprobs=3), oa.ChatCompletionRequest)
    assert chat.sampling_kwargs(1)["logprobs"] == 3
    assert "logprobs" not in oa.parse_request(_chat(top_logprobs=3), oa.ChatCompletionRequest).sampling_kwargs(1)
    comp = oa.parse_request(json.dumps({"model": "m", "prompt": "x", "logprobs": 1,
                                        "return_tokens_as_token_ids": True}).encode(), oa.CompletionRequest)
    assert comp.sampling_kwargs(1)["logprobs"] == 1
    # vLLM's logprob dicts: the sampled token first, then the top ones.
    steps = [{7: SimpleNamespace(logprob=-0.1, decoded_token="ab"), 3: SimpleNamespace(logprob=-2.5, decoded_token="c"),
              4: SimpleNamespace(logprob=-3.0, decoded_token="d")},
             {9: SimpleNamespace(logprob=float("-inf"), decoded_token="e")}]
    assert comp.format_logprobs([7, 9], steps, text_offset=10) == {
        "tokens": ["token_id:7", "token_id:9"], "token_logprobs": [-0.1, -9999.0],
        "top_logprobs": [{"token_id:7": -0.1, "token_id:3": -2.5}, {"token_id:9": -9999.0}], "text_offset": [10, 12]}
    content = oa.parse_request(_chat(logprobs=True, top_logprobs=1), oa.ChatCompletionRequest).format_logprobs(
        [7], steps[:1], 0)["content"]
    assert content == [{"token": "ab", "logprob": -0.1, "bytes": [97, 98],
                        "top_logprobs": [{"token": "ab", "logprob": -0.1, "bytes": [97, 98]}]}]
