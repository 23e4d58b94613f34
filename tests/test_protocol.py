"""Error mapping: every bad input becomes an OpenAIError with a 4xx status and a body that says what is wrong."""

import json

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
