"""Prefix routing against real parts: 2 vLLM CPU engines publishing KV events, the router actor, Serve, HTTP."""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ray

from conftest import TEST_BLOCK, TINY_KV_BYTES, TINY_KV_BYTES_PER_TOKEN

WORDS = "the quick brown fox jumps over a lazy dog while agents read files run tests and write code".split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def chat(url, messages, max_tokens=8):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                   json={"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def stats(url):
    return httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()["router"]


def wait_live(url, n, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        live = [r for r, s in stats(url)["replicas"].items() if s["live"]]
        if len(live) == n:
            return live
        time.sleep(0.5)
    raise TimeoutError(f"not {n} live replicas")


def test_multi_turn_sessions_hit_cache_every_turn_and_spread(tiny_app):
    from kvpool.routing import parse_costs_header

    url, _ = tiny_app
    live = wait_live(url, 2)
    rerouted_before = sum(s["rerouted_here"] for s in stats(url)["replicas"].values())
    rng = random.Random(7)
    sessions = [[{"role": "system", "content": f"session {s}: " + text(rng, 150)}] for s in range(6)]
    replicas, exact, turns, not_cheapest = set(), 0, 0, 0
    for turn in range(4):
        for msgs in sessions:
            msgs.append({"role": "user", "content": text(rng, 60)})
        # The first turns (cold prompts) go together: equal replicas tie on cost and the tie goes to the one with
        # fewer running requests, so they spread (sent one by one, both are idle and the tie is a coin toss).
        first = None
        if turn == 0:
            with ThreadPoolExecutor(len(sessions)) as pool:
                first = list(pool.map(lambda m: chat(url, m), sessions))
        for s, msgs in enumerate(sessions):
            r = first[s] if first else chat(url, msgs)
            body = r.json()
            msgs.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
            cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            predicted = int(r.headers["x-kvpool-predicted-cached-tokens"])
            # Server-Timing: the stages to the first output, which cannot add up to more than the whole response.
            timing = {k: float(v) for k, v in (i.split(";dur=") for i in r.headers["server-timing"].split(", "))}
            assert {"render", "router_call", "queue", "prefill", "first_out"} <= set(timing), timing
            assert 0 < sum(timing.values()) <= r.elapsed.total_seconds() * 1e3, timing
            replicas.add(r.headers["x-kvpool-replica"])
            # The router's cost of every candidate; the replica that served is a cheapest one unless Serve passed
            # over the router's choice (counted as rerouted below).
            costs = parse_costs_header(r.headers["x-kvpool-route-costs"])
            assert sorted(costs) == sorted(live), costs
            not_cheapest += costs[r.headers["x-kvpool-replica"]] > min(costs.values())
            if turn > 0:
                turns += 1
                assert cached > 0, f"session {s} turn {turn}: no cache hit ({r.headers})"
                assert r.headers["x-kvpool-route-reason"] == "prefix"
                exact += predicted == cached
    assert len(replicas) == 2, "sessions did not spread over both replicas"
    # Hash parity with the engine: the router predicts exactly what the engine then reports.
    assert exact >= 0.9 * turns, f"predicted == delivered in only {exact}/{turns} turns"
    st = stats(url)
    assert not_cheapest <= sum(s["rerouted_here"] for s in st["replicas"].values()) - rerouted_before
    assert st["decisions"].get("prefix", 0) >= turns
    assert all(s["prediction_exact_rate"] is not None for s in st["replicas"].values() if s["live"])
    # The ingress says where these requests' time to a first output went, routing included.
    stages = httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()["stages_ms"]
    assert stages["requests"] >= 4 * len(sessions)
    for stage in ("render", "hashing", "router_call", "dispatch", "engine_input", "queue", "prefill", "first_out"):
        assert stages[stage]["requests"] >= 4 * len(sessions), stage
        assert 0 <= stages[stage]["p50"] <= stages[stage]["p90"] <= stages[stage]["p99"], stage
    assert stages["prefill"]["p50"] > 0 and stages["router_call"]["p50"] > 0
    # vLLM's preemptions of these requests are counted (none need be: each replica's KV holds them all).
    preemptions = httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()["preemptions"]
    assert preemptions["finished"] >= 4 * len(sessions)
    assert preemptions["preempted_requests"] <= min(preemptions["finished"], preemptions["preemptions"])


def test_evictions_leave_the_index(tiny_app):
    url, _ = tiny_app
    capacity_blocks = TINY_KV_BYTES // TINY_KV_BYTES_PER_TOKEN // TEST_BLOCK
    rng = random.Random(11)
    first = [{"role": "user", "content": text(rng, 1500)}]
    chat(url, first, max_tokens=1)
    # Distinct long prompts well past both replicas' KV capacity force LRU evictions.
    for _ in range(24):
        chat(url, [{"role": "user", "content": text(rng, 1500)}], max_tokens=1)
    # The engines' last removals reach the router just after their replies: wait for the index to shrink back.
    deadline = time.time() + 10
    while True:
        live = [s for s in stats(url)["replicas"].values() if s["live"]]
        if all(0 < s["indexed_blocks"] <= capacity_blocks for s in live):
            break
        assert time.time() < deadline, live
        time.sleep(0.1)
    # The router's picture still equals the engine's: what it predicts for the evicted prompt is what is there.
    r = chat(url, first, max_tokens=1)
    assert int(r.headers["x-kvpool-predicted-cached-tokens"]) == r.json()["usage"]["prompt_tokens_details"][
        "cached_tokens"]


def test_a_restarted_router_falls_back_then_relearns_what_the_engines_hold(tiny_app):
    url, _ = tiny_app
    from actors.router import NAMESPACE, router_name

    live = wait_live(url, 2)
    rng = random.Random(3)
    before, during = ([{"role": "user", "content": text(rng, 300)}] for _ in range(2))
    chat(url, before)  # computed while the router listens
    ray.kill(ray.get_actor(router_name("tiny"), namespace=NAMESPACE), no_restart=False)
    # Requests keep flowing while it restarts (Serve's fallback rule); their KV events reach no router.
    reasons = [chat(url, during).headers["x-kvpool-route-reason"] for _ in range(3)]
    # The engines register again at their next health check and replay their publishers' buffered events (an
    # engine that published its first batch while the router was down needs none: the batches waiting on the
    # router's port reach it); a request Serve routes without a choice makes its plug-in hand the restarted router
    # the replica list.
    deadline = time.time() + 60
    while not all((s := ((stats(url).get("replicas") or {}).get(r) or {})).get("view_complete") and s["live"]
                  for r in live):
        reasons.append(chat(url, [{"role": "user", "content": "fox"}]).headers["x-kvpool-route-reason"])
        assert time.time() < deadline, (reasons, stats(url))
        time.sleep(0.5)
    for msgs in (before, during):
        r = chat(url, msgs)
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert r.headers["x-kvpool-route-reason"] == "prefix", (reasons, dict(r.headers))
        assert int(r.headers["x-kvpool-predicted-cached-tokens"]) == cached > 0


def test_a_router_gone_for_good_is_made_anew_and_found_by_the_engines(tiny_app):
    """As when the ingress replica that owns the router dies: the router is not restarted. The ingress makes another
    (with a new topic secret, so the engines' relays must follow it) and the engines register with it."""
    url, _ = tiny_app
    from actors.router import NAMESPACE, router_name

    live = wait_live(url, 2)
    rng = random.Random(4)
    msgs = [{"role": "user", "content": text(rng, 300)}]
    chat(url, msgs)
    old = ray.get_actor(router_name("tiny"), namespace=NAMESPACE)
    _, old_prefix = ray.get(old.endpoint.remote())
    ray.kill(old, no_restart=True)
    deadline = time.time() + 90
    while not all((s := ((stats(url).get("replicas") or {}).get(r) or {})).get("view_complete") and s["live"]
                  for r in live):
        chat(url, msgs)  # never fails meanwhile (fallback); the first one tells the ingress the router is gone
        assert time.time() < deadline, stats(url)
        time.sleep(0.5)
    _, prefix = ray.get(ray.get_actor(router_name("tiny"), namespace=NAMESPACE).endpoint.remote())
    assert prefix != old_prefix
    r = chat(url, msgs)
    assert r.headers["x-kvpool-route-reason"] == "prefix", dict(r.headers)
    assert int(r.headers["x-kvpool-predicted-cached-tokens"]) == r.json()["usage"]["prompt_tokens_details"][
        "cached_tokens"] > 0
    # New prompts' events reach the new router live, under its topic.
    fresh = [{"role": "user", "content": text(rng, 300)}]
    chat(url, fresh)
    deadline = time.time() + 30
    while (r := chat(url, fresh)).headers["x-kvpool-route-reason"] != "prefix":
        assert time.time() < deadline, dict(r.headers)
        time.sleep(0.2)
    assert int(r.headers["x-kvpool-predicted-cached-tokens"]) == r.json()["usage"]["prompt_tokens_details"][
        "cached_tokens"] > 0


def test_dead_replica_leaves_the_index_and_its_replacement_joins(tiny_app):
    url, _ = tiny_app
    wait_live(url, 2)
    # The replica that computed this prompt dies; the prompt must then come from the pool, not be recomputed.
    msgs = [{"role": "user", "content": text(random.Random(5), 1200)}]
    pooled_before = sum(stats(url)["pool_blocks_by_node"].values())  # earlier tests' blocks share this pool
    first = chat(url, msgs, max_tokens=1)
    victim, n_first = first.headers["x-kvpool-replica"], first.json()["usage"]["prompt_tokens"]
    # The pool writes in the background and its shard reports the blocks to the router after its next pass.
    deadline = time.time() + 10
    while sum(stats(url)["pool_blocks_by_node"].values()) < pooled_before + n_first // TEST_BLOCK - 1:
        assert time.time() < deadline, stats(url)["pool_blocks_by_node"]
        time.sleep(0.2)
    handle = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if victim in a["name"])
    ray.kill(ray.get_actor(handle["name"], namespace=handle["namespace"]), no_restart=True)
    t0 = time.time()
    while victim in [r for r, s in stats(url)["replicas"].items() if s["live"] or s["indexed_blocks"]]:
        assert time.time() - t0 < 5, "dead replica still in the index"  # ~0.2-1.5 s measured; a bound, not a benchmark
        time.sleep(0.05)
    print(f"dead replica left the index after {time.time() - t0:.2f}s")
    # The router's pool view still holds the prompt's blocks (a shard or router restarted by an earlier test
    # re-reports in full; until then the view is empty).
    deadline = time.time() + 10
    while sum(stats(url)["pool_blocks_by_node"].values()) < n_first // TEST_BLOCK - 1:
        assert time.time() < deadline, stats(url)["pool_blocks_by_node"]
        time.sleep(0.2)
    # Serve replaces it; the new replica joins and serves.
    msgs.append({"role": "user", "content": "and now?"})
    r = chat(url, msgs)
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert r.headers["x-kvpool-replica"] != victim and r.headers["x-kvpool-route-reason"] == "pool"
    # The view may lag the files by a shard's pass: the wait above counts every block in the pool, and blocks of the
    # earlier tests' prompts still being reported can make up the count (measured once: 35 of this prompt's 37
    # blocks predicted, 37 loaded). What the view holds is there, so it never predicts more than is loaded.
    assert cached >= (n_first // TEST_BLOCK - 1) * TEST_BLOCK
    assert int(r.headers["x-kvpool-predicted-cached-tokens"]) <= cached
    after = wait_live(url, 2, timeout=240)
    assert victim not in after
    chat(url, [{"role": "user", "content": "fox"}])


def test_the_event_port_takes_only_the_apps_engines(tiny_app):
    import zmq

    from actors.router import NAMESPACE, router_name
    from kvpool.events import BlockStored, EventBatch, encode_message

    url, cfg = tiny_app
    live = wait_live(url, 2)
    endpoint, prefix = ray.get(ray.get_actor(router_name("tiny"), namespace=NAMESPACE).endpoint.remote())
    msgs = [{"role": "user", "content": "a prompt no test sends before: " + text(random.Random(55), 400)}]
    ids = httpx.post(f"{url}/tokenize", json={"model": "tiny", "messages": msgs}, timeout=30).json()["tokens"]
    n = (len(ids) - 1) // TEST_BLOCK
    # An outsider on the port claims that a live replica holds this prompt (never computed anywhere)...
    lie = EventBatch(ts=0.0, events=[BlockStored(block_hashes=list(range(n)), parent_block_hash=None,
                                                 token_ids=ids[:n * TEST_BLOCK], block_size=TEST_BLOCK)])
    before = stats(url)["foreign_event_batches"]
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.connect(endpoint)
    try:
        deadline = time.time() + 30
        # ...then, on the same connection (ZMQ keeps its order), a batch under the app's topic prefix from no
        # replica: once the router has counted that one, it has seen the lie before it.
        while stats(url)["foreign_event_batches"] == before:
            assert time.time() < deadline, "the router never received the control batch"
            pub.send_multipart(encode_message(live[0], 0, lie))
            pub.send_multipart(encode_message(prefix + "no-such-replica", 0, lie))
            time.sleep(0.2)  # resend pacing: a PUB socket drops what it sends before its connection is up
    finally:
        pub.close(linger=0)
    r = chat(url, msgs, max_tokens=1)
    assert int(r.headers["x-kvpool-predicted-cached-tokens"]) == 0
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_the_replica_stages_split_the_time_from_sending_to_the_first_output_back():
    from app.engine_client import STAGES, _replica_stages

    timing = {"replica_in": 10.2, "queued": 10.5, "scheduled": 11.0, "first_token": 13.0}
    stages = _replica_stages(10.0, timing, 13.25)
    assert list(stages) == ["dispatch", "engine_input", "queue", "prefill", "first_out"]
    assert [round(v, 6) for v in stages.values()] == [0.2, 0.3, 0.5, 2.0, 0.25]
    assert set(stages) <= set(STAGES)
    # A replica that could not time its stages (no first token yet): the whole span, unsplit, under its own name.
    assert _replica_stages(10.0, {"replica_in": 10.2}, 13.25) == {"dispatch": 10.2 - 10.0,
                                                                  "first_out": 13.25 - 10.2}
    assert _replica_stages(10.0, None, 13.25) == {"replica": 13.25 - 10.0}


def test_the_engines_model_runners_run_with_the_settings_that_bound_their_memory(tiny_app):
    """The settings that bound the model runner's memory under prompts of ever new lengths (KVPoolConfig.engine_env:
    oneDNN's global primitive cache off, a fixed mmap threshold for glibc) reach the processes that run the model:
    vLLM's engine core and workers, spawned by each engine replica."""
    import psutil

    def title(p: psutil.Process) -> str:  # what Ray and vLLM name their processes
        try:
            return (p.cmdline() or [""])[0]
        except psutil.Error:
            return ""

    replicas = [p for p in psutil.process_iter() if title(p).startswith("ray::ServeReplica:tiny:EngineReplica")]
    assert len(replicas) == 2
    for replica in replicas:
        spawned = replica.children(recursive=True)
        assert spawned, "no engine processes under the replica"
        for p in spawned:
            env = p.environ()
            assert env.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == "0", (p.name(), p.cmdline()[:1])
            assert env.get("MALLOC_MMAP_THRESHOLD_") == str(1 << 20), (p.name(), p.cmdline()[:1])
