"""Faults under load, on the shared 2-replica app: an engine replica is killed while requests run."""

import asyncio
import json
import time

import httpx
import ray

from test_routing import stats, wait_live


async def _one(client: httpx.AsyncClient, url: str, i: int, stream: str | None, streaming_on: asyncio.Queue) -> dict:
    """Request i: not streamed, or streamed from `stream`'s API ("openai" completions or "anthropic" messages)."""
    text = f"request {i} " + "under load " * 60
    if stream == "anthropic":  # (no ignore_eos in Anthropic's API: the tiny model's answers run to max_tokens anyway)
        path, body = "/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": text}],
                                      "max_tokens": 1500, "temperature": 0, "stream": True}
    else:
        path, body = "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 1500, "temperature": 0,
                                         "ignore_eos": True, "stream": stream is not None}
    if not stream:
        r = await client.post(f"{url}{path}", json=body)
        return {"status": r.status_code, "replica": r.headers.get("x-kvpool-replica"),
                "tokens": r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None}
    events, status, replica = [], None, None
    async with client.stream("POST", f"{url}{path}", json=body) as r:
        status, replica = r.status_code, r.headers.get("x-kvpool-replica")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if not events:
                    streaming_on.put_nowait((stream, replica))  # this replica is mid-answer now
                events.append(line[6:])
    return {"status": status, "replica": replica, "events": events, "api": stream}


def _cut(result: dict) -> dict | None:
    """The error event a stream ended with instead of its last tokens (None: it completed)."""
    for e in result["events"][:-1] if result["api"] == "openai" else result["events"]:
        event = json.loads(e)
        if "error" in event:
            return event
    return None


def test_replica_killed_under_load(tiny_app):
    url, _ = tiny_app
    wait_live(url, 2)
    apis = {0: "openai", 3: "anthropic", 6: "openai"}  # the other requests are not streamed

    async def run():
        streaming_on: asyncio.Queue = asyncio.Queue()
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(_one(client, url, i, apis.get(i), streaming_on)) for i in range(9)]
            while True:  # the victim: a replica with an Anthropic stream mid-answer (OpenAI ones may be there too)
                api, victim = await asyncio.wait_for(streaming_on.get(), timeout=120)
                if api == "anthropic":
                    break
            actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return victim, await asyncio.gather(*tasks)

    victim, results = asyncio.run(run())
    for r in results:
        if "events" not in r:  # non-streaming: never fails, retried elsewhere if its replica died
            assert r["status"] == 200 and r["tokens"] == 1500, r
            continue
        # Streaming: completes, or, if its replica died mid-answer, ends with an error the client may retry on, in
        # its API's style, without Ray's text (hosts, pids, actor ids). vLLM's OpenAI streams end with [DONE].
        assert r["status"] == 200, r
        if r["api"] == "openai":
            assert r["events"][-1] == "[DONE]", r
        cut = _cut(r)
        if cut is None:
            continue
        assert r["replica"] == victim, r
        if r["api"] == "openai":
            assert cut["error"]["code"] == 503, cut
        else:
            assert cut["type"] == "error" and cut["error"]["type"] == "overloaded_error", cut
            assert json.loads(r["events"][-1]) == cut, r  # the stream's last event
        assert "lost mid-answer" in cut["error"]["message"] and "Actor" not in cut["error"]["message"], cut
    assert any(_cut(r) for r in results if r.get("api") == "anthropic"), "the Anthropic stream was not cut"
    # Serve replaces the replica; the new one joins the index and serves.
    deadline = time.time() + 240
    while True:
        live = wait_live(url, 2, timeout=240)
        if victim not in live:
            break
        assert time.time() < deadline
        time.sleep(1)
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "after", "max_tokens": 2})
    assert r.status_code == 200


def test_pool_shard_killed_while_serving(tiny_app):
    """Serving never waits on the pool shard (engines read and write the block files themselves); Ray restarts it
    and it finds the pool in its directories."""
    from actors.pool import NAMESPACE, shard_name

    url, _ = tiny_app
    node = ray.get_runtime_context().get_node_id()
    prompt = "pool shard fault " * 120
    first = httpx.post(f"{url}/v1/completions", timeout=120, json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    n_blocks = (first.json()["usage"]["prompt_tokens"] - 1) // 32
    ray.kill(ray.get_actor(shard_name("tiny", node), namespace=NAMESPACE), no_restart=False)
    for i in range(3):  # served meanwhile, from the engines' caches or the pool's files
        r = httpx.post(f"{url}/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": prompt + f" turn {i}", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_blocks * 32
    deadline = time.time() + 60
    while True:
        pool = httpx.get(f"{url}/v1/kvpool/stats", timeout=30).json()["pool"]
        blocks = (pool.get(node) or {}).get("blocks") or {}
        if sum(blocks.values()) >= n_blocks:
            break
        assert time.time() < deadline, pool
        time.sleep(0.5)
