"""The OpenAI API end to end: a real Serve app, real vLLM CPU engines, real HTTP, the official openai client."""

import asyncio
import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def client(tiny_app):
    url, _ = tiny_app
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


MSG = [{"role": "user", "content": "the quick brown fox jumps over a lazy dog while agents read files " * 4}]


def test_models_and_health(tiny_app, client):
    url, cfg = tiny_app
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 32
    assert r.usage.prompt_tokens_details.cached_tokens is not None


def test_completion_with_text_and_token_ids(client):
    r = client.completions.create(model="tiny", prompt="def f(): return", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r2 = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert r2.usage.prompt_tokens == 4


def test_streaming_chat_equals_non_streaming(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens is not None


def _token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.removeprefix("token_id:"))


def test_chat_logprobs_with_token_ids(tiny_app, client):
    """One logprob entry per completion token, its token id decoding to the text, the same streamed or not."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_app[1].model)
    kw = dict(model="tiny", messages=MSG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"return_tokens_as_token_ids": True})
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens >= 1
    ids = [_token_id(e.token) for e in entries]
    assert tokenizer.decode(ids, skip_special_tokens=True) == r.choices[0].message.content
    for e in entries:
        assert [_token_id(t.token) for t in e.top_logprobs][0] == _token_id(e.token)  # greedy: the top token
        assert e.logprob == e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and e.logprob <= 0
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [_token_id(e.token) for e in streamed] == ids
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-3)


def test_completion_logprobs_as_text_and_token_ids(tiny_app, client):
    tokenizer = AutoTokenizer.from_pretrained(tiny_app[1].model)
    kw = dict(model="tiny", prompt="agents read files and", max_tokens=6, temperature=0, logprobs=1)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and top[t] == v for top, t, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    chunks = list(client.completions.create(stream=True, extra_body={"return_tokens_as_token_ids": True}, **kw))
    ids = [_token_id(t) for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(ids) == r.usage.completion_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == r.choices[0].text


def test_streaming_usage_comes_with_include_usage(client):
    """As vLLM's server and OpenAI's: a stream carries usage (cached tokens included) when asked for it."""
    chunks = list(client.completions.create(model="tiny", prompt="tests and write", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens_details is not None


def test_repeated_request_reports_cached_tokens(client):
    messages = [{"role": "user", "content": "cache block prefix router pool " * 30}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    # Both replicas may need to see it once before every route is a hit; three more tries are plenty.
    cached = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
              .usage.prompt_tokens_details.cached_tokens for _ in range(3)]
    assert max(cached) >= 32 * ((first.usage.prompt_tokens - 1) // 32) > 0


def _post(url, body: bytes):
    return httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                      timeout=60)


def _chat(**kw) -> bytes:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return json.dumps(body).encode()


BAD = {  # name: (body, status, the parameter the error names, or None)
    "malformed json": (b'{"model": "tiny", "messages": [', 400, None),
    "invalid utf-8": (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    "missing messages": (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
    "unknown model": (_chat(model="gpt-17"), 404, "model"),
    "prompt too long": (_chat(messages=[{"role": "user", "content": "fox " * 5000}]), 400, None),
    "max_tokens past context": (_chat(max_tokens=10_000), 400, None),
    "temperature": (_chat(temperature=-1), 400, None),
    "top_p": (_chat(top_p=1.5), 400, None),
    "max_tokens zero": (_chat(max_tokens=0), 400, None),
    "stop type": (_chat(stop=5), 400, "stop"),
    "top_logprobs": (_chat(logprobs=True, top_logprobs=21), 400, None),
    "a field nothing here honours": (_chat(audio={"voice": "alloy"}, prediction=1), 400, "audio"),
    # Found by tests/test_fuzz.py (each was a 500):
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, 400, None),
    "an unpaired surrogate, escaped": (_chat(model="\ud800"), 400, None),
    "an unpaired surrogate, encoded": (_chat(stop=["a"]).replace(b'"a"', b'"\xed\xa0\x80"'), 400, None),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_an_error_in_vllms_openai_style(tiny_app, name):
    url, _ = tiny_app
    body, status, param = BAD[name]
    r = _post(url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] == status and err["type"].endswith("Error"), err
    if param:
        assert err["param"].split(".")[0] == param, err


def test_a_surrogate_pair_is_text(tiny_app):
    r = _post(tiny_app[0], _chat(messages=[{"role": "user", "content": "\U0001f642"}], max_tokens=1))  # "\ud83d\ude42"
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages",
                                  "/v1/messages/count_tokens", "/tokenize"])
@pytest.mark.parametrize("body", [b"null", b"1e999999", b"[]"])
def test_a_body_that_is_not_a_json_object_is_a_400_in_the_apis_style(tiny_app, path, body):
    r = httpx.post(f"{tiny_app[0]}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text  # /tokenize answered 500 (found by tests/test_fuzz.py)
    err = r.json()["error"]
    assert err["message"] == "request body must be a JSON object"
    assert (r.json().get("type") == "error") == path.startswith("/v1/messages")


def test_unknown_route_is_json_404(tiny_app):
    r = httpx.get(f"{tiny_app[0]}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_bad_requests_do_not_harm_good_ones(tiny_app):
    url, _ = tiny_app

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            good = [c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": f"fox {i}", "max_tokens": 4,
                                                          "temperature": 0}) for i in range(4)]
            bad = [c.post(f"{url}/v1/chat/completions", content=BAD[k][0],
                          headers={"content-type": "application/json"}) for k in BAD]
            return await asyncio.gather(*good, *bad)

    results = asyncio.run(run())
    assert [r.status_code for r in results[:4]] == [200] * 4
    assert [r.status_code for r in results[4:]] == [BAD[k][1] for k in BAD]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in results[:4])
