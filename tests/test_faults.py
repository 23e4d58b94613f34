"""Faults under load, on the shared 2-replica app: an engine replica is killed while requests run."""

import asyncio
import json
import time

import httpx
import ray

from test_routing import stats, wait_live


async def _one(client: httpx.AsyncClient, url: str, i: int, stream: bool, streaming_on: asyncio.Queue) -> dict:
    body = {"model": "tiny", "prompt": f"request {i} " + "under load " * 60, "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        return {"status": r.status_code, "replica": r.headers.get("x-kvpool-replica"),
                "tokens": r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None}
    events, status, replica = [], None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        status, replica = r.status_code, r.headers.get("x-kvpool-replica")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if not events:
                    streaming_on.put_nowait(replica)  # this replica is mid-answer now
                events.append(line[6:])
    return {"status": status, "replica": replica, "events": events}


def _cut(result: dict) -> bool:
    """The stream ended with an error event instead of its last tokens."""
    return any("error" in json.loads(e) for e in result["events"][:-1])


def test_replica_killed_under_load(tiny_app):
    url, _ = tiny_app
    wait_live(url, 2)

    async def run():
        streaming_on: asyncio.Queue = asyncio.Queue()
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(_one(client, url, i, i % 3 == 0, streaming_on)) for i in range(9)]
            victim = await asyncio.wait_for(streaming_on.get(), timeout=120)  # a replica with a stream mid-answer
            actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return victim, await asyncio.gather(*tasks)

    victim, results = asyncio.run(run())
    for r in results:
        if "events" not in r:  # non-streaming: never fails, retried elsewhere if its replica died
            assert r["status"] == 200 and r["tokens"] == 1500, r
        else:  # streaming: completes, or, if its replica died mid-answer, carries a clear error event (then [DONE],
            # as vLLM's server ends every stream)
            assert r["status"] == 200 and r["events"][-1] == "[DONE]", r
            if _cut(r):
                assert r["replica"] == victim, r
    assert any(_cut(r) for r in results if "events" in r), "no stream was cut: no fault happened"
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
