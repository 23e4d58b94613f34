"""API keys, per-tenant KV isolation and overload, against a real app (1 engine replica of the tiny model, with
prefix routing and the pool on), over HTTP."""

import asyncio
import time

import httpx
import pytest

from conftest import TEST_BLOCK, wait_ready

KEYS = {"a": "key-tenant-a", "b": "key-tenant-b", "admin": "key-admin"}


@pytest.fixture(scope="module")
def guarded_app(ray_cluster, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    # One engine slot and a queue of two: the fourth concurrent request finds the engine deployment full.
    cfg = KVPoolConfig(model=str(tiny_model_dir), served_model_name="tiny", num_replicas=1, max_model_len=4096,
                       kv_cache_bytes=16 << 20, block_size=TEST_BLOCK, router_port=5593, api_keys=[KEYS["a"], KEYS["b"]],
                       admin_api_keys=[KEYS["admin"]],
                       max_ongoing_requests=1, max_queued_requests=2, retry_after_s=3,
                       pool_host_dir=str(tmp_path_factory.mktemp("g-host")),
                       pool_disk_dir=str(tmp_path_factory.mktemp("g-disk")))
    serve.run(build_app(cfg), name="guarded", route_prefix="/guarded", blocking=False)
    url = "http://127.0.0.1:8000/guarded"
    wait_ready(url, "tiny", headers=auth("a"))
    yield url
    serve.delete("guarded")


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def complete(url, tenant, prompt, max_tokens=4):
    r = httpx.post(f"{url}/v1/completions", headers=auth(tenant), timeout=120,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["a"]}])
def test_requests_without_a_valid_key_are_refused(guarded_app, headers):
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/kvpool/stats"), ("POST", "/tokenize")]:
        r = httpx.request(method, guarded_app + path, headers=headers, timeout=30,
                          json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", (path, r.text)
    assert httpx.get(f"{guarded_app}/health", timeout=10).status_code == 200


def test_anthropic_clients_send_their_key_as_x_api_key(guarded_app):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": f"Bearer {KEYS['a']}"}):
        r = httpx.post(guarded_app + "/v1/messages", headers=headers, timeout=30, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    r = httpx.post(guarded_app + "/v1/messages", headers={"x-api-key": KEYS["a"]}, timeout=60, json=body)
    assert r.status_code == 200 and r.json()["type"] == "message", r.text


def test_one_tenants_prompts_are_never_cache_hits_for_another(guarded_app):
    prompt = "secret design notes of tenant a " * 40
    complete(guarded_app, "a", prompt)
    again = complete(guarded_app, "a", prompt)
    hit = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert hit >= TEST_BLOCK and int(again.headers["x-kvpool-predicted-cached-tokens"]) == hit
    other = complete(guarded_app, "b", prompt)
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other.headers["x-kvpool-predicted-cached-tokens"] == "0"
    # Same words, same output: isolation changes what is reused, never the answer.
    assert other.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_overload_answers_429_with_retry_after_and_loses_nothing(guarded_app):
    async def burst():
        async with httpx.AsyncClient(headers=auth("a"), timeout=300) as c:
            body = {"model": "tiny", "prompt": "load " * 50, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(c.post(f"{guarded_app}/v1/completions", json=body) for _ in range(10)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 48
    # The server recovers: the next request after the burst is served.
    assert complete(guarded_app, "a", "after the burst").status_code == 200


def test_stats_show_a_tenant_its_own_figures_and_an_admin_everything(guarded_app):
    def stats(tenant):
        r = httpx.get(f"{guarded_app}/v1/kvpool/stats", headers=auth(tenant), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    a0, b0 = stats("a")["tenant"], stats("b")["tenant"]
    r = complete(guarded_app, "a", "figures of tenant a " * 20)
    deadline = time.time() + 30
    while (a := stats("a"))["tenant"]["requests"] == a0["requests"]:  # the router hears of the end after the reply
        assert time.time() < deadline, a
        time.sleep(0.2)
    assert set(a) == {"tenant"}  # no replicas, nodes or other tenants
    assert a["tenant"]["requests"] == a0["requests"] + 1
    assert a["tenant"]["prompt_tokens"] == a0["prompt_tokens"] + r.json()["usage"]["prompt_tokens"]
    assert stats("b")["tenant"] == b0
    admin = stats("admin")
    assert admin["router"]["replicas"] and admin["pool"]
    assert a["tenant"] in admin["router"]["tenants"].values()


def test_without_api_keys_only_clients_on_the_serving_machine_are_answered():
    """The shipped serve_config.yaml binds 0.0.0.0: without keys, a client from the network is refused (401, in
    the API's style), one on the machine is served, and a deployment on a trusted network can opt in."""
    from starlette.requests import Request

    from app.ingress import APIError, tenant_of
    from kvpool.config import KVPoolConfig

    def request(host: str, key: str | None = None) -> Request:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
                        "client": (host, 40000)})

    open_cfg = KVPoolConfig()
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert tenant_of(open_cfg, request(local)) is None
    with pytest.raises(APIError) as refused:
        tenant_of(open_cfg, request("10.0.0.7"))
    assert refused.value.status == 401 and "api_keys" in refused.value.message
    assert tenant_of(open_cfg.model_copy(update={"allow_unauthenticated_network": True}), request("10.0.0.7")) is None
    keyed = open_cfg.model_copy(update={"api_keys": [KEYS["a"]]})
    assert tenant_of(keyed, request("10.0.0.7", KEYS["a"])) is not None  # with keys, any client that has one
    with pytest.raises(APIError):
        tenant_of(keyed, request("127.0.0.1"))
