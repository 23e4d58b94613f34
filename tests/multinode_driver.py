"""A two-node Ray cluster on loopback (ray.cluster_utils: a head and a worker raylet, each with its own address
and pool directories), the KV-Pool app with one engine replica per node, and one scenario on it: a cross-node pool
migration (`pool-migration`), or the router's node dying (`router-node-kill`). Run by tests/test_multinode.py in a
subprocess (a process joins one Ray cluster, and the test session has its own); prints one JSON line of findings
for the test to check.

    python tests/multinode_driver.py <scenario> <tiny-model-dir> <work-dir> <http-port> <router-port>
"""

import contextlib
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster


@contextlib.contextmanager
def two_node_app(model_dir: str, work: str, http_port: int, router_port: int) -> Iterator[tuple]:
    """The cluster with the app up: yields (cluster, worker node, app url, {live replica: its node id}), once both
    replicas serve and the router knows their nodes."""
    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    # Each node's processes see their own KVPOOL_NODE, so "$KVPOOL_NODE" in the pool dirs gives per-node pools,
    # as separate machines have.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": {"KVPOOL_NODE": "n1"},
                                                            "include_dashboard": False})
    # Its own address, as another machine has: a router that moves between the nodes moves to another endpoint.
    worker = cluster.add_node(num_cpus=2, env_vars={"KVPOOL_NODE": "n2"}, node_ip_address="127.0.0.2")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port, "location": "HeadOnly"})
        cfg = KVPoolConfig(model=model_dir, served_model_name="tiny", num_replicas=2, max_replicas_per_node=1,
                           max_model_len=4096, kv_cache_bytes=24 << 20, block_size=32, router_port=router_port,
                           pool_host_dir=f"{work}/$KVPOOL_NODE/host", pool_disk_dir=f"{work}/$KVPOOL_NODE/disk",
                           pool_fetch_timeout_s=60)  # what is checked is that the prefix arrives, not how fast
        serve.run(build_app(cfg), name="mn", route_prefix="/mn", blocking=False)
        url = f"http://127.0.0.1:{http_port}/mn"
        live = wait_routed(url, 300)
        yield cluster, worker, url, live
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def wait_routed(url: str, timeout_s: float) -> dict[str, str]:
    """Until a request succeeds and the router counts both replicas live, with their nodes; returns them. Requests
    keep going meanwhile: one that Serve routes without the router's choice makes Serve's plug-in hand the router
    the replica list (a new or restarted router has none)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            warm = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
                              timeout=30)
            live = live_replicas(url)
            if warm.status_code == 200 and len(live) == 2 and all(live.values()):
                return live
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            pass
        assert time.time() < deadline, "replicas not up"
        time.sleep(1)


def router_stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()["router"] or {}


def live_replicas(url: str) -> dict[str, str]:
    """The replicas the router counts as live, and their nodes."""
    return {r: s["node"] for r, s in router_stats(url).get("replicas", {}).items() if s["live"]}


def pool_migration(url: str, live: dict[str, str], out: dict) -> None:
    """The replica that computed a prompt dies (its node's pool shard lives on): the other node's replica must
    fetch the prefix from that pool, not recompute it."""
    rng = random.Random(7)  # random token ids: the tiny model's greedy output then varies token by token
    body = {"model": "tiny", "prompt": [rng.randrange(3, 390) for _ in range(880)], "max_tokens": 16,
            "temperature": 0}
    out["replica_nodes"] = sorted(set(live.values()))

    first = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert first.status_code == 200, first.text
    out["first"] = {"replica": first.headers["x-kvpool-replica"], "text": first.json()["choices"][0]["text"],
                    "usage": first.json()["usage"]}
    n_blocks = (first.json()["usage"]["prompt_tokens"] - 1) // 32
    deadline = time.time() + 30
    while max(router_stats(url)["pool_blocks_by_node"].values(), default=0) < n_blocks:
        assert time.time() < deadline, ("pool blocks never reported", router_stats(url))
        time.sleep(0.2)

    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if out["first"]["replica"] in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline = time.time() + 10
    while out["first"]["replica"] in live_replicas(url):
        assert time.time() < deadline, "dead replica still routed to"
        time.sleep(0.1)
    second = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    stats = httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()
    out["second"] = {"replica": second.headers["x-kvpool-replica"], "text": second.json()["choices"][0]["text"],
                     "usage": second.json()["usage"], "reason": second.headers["x-kvpool-route-reason"],
                     "predicted": int(second.headers["x-kvpool-predicted-cached-tokens"])}
    out["pool"] = {node: {k: s.get(k) for k in ("blocks", "pulled_blocks", "error")}
                   for node, s in stats["pool"].items()}
    out["fetches"] = stats["fetches"]
    out["router_nodes"] = {r: s["node"] for r, s in stats["router"]["replicas"].items()}
    out["n_blocks"] = n_blocks


def alive_actor(name_prefix: str) -> dict | None:
    """The control store's record of the live actor whose name starts so (its id, node, restarts), if any. (Ray's
    state API needs the dashboard, which this cluster does not run.)"""
    from ray._private.state import actors

    return next((a for a in actors(actor_state_name="ALIVE").values() if a["Name"].startswith(name_prefix)), None)


def router_endpoint(name: str) -> str:
    """Where the router takes the engines' KV events (its node's address)."""
    from actors.router import NAMESPACE

    return ray.get(ray.get_actor(name, namespace=NAMESPACE).endpoint.remote(), timeout=60)[0]


def place_on(node: str, name_prefix: str, url: str) -> int:
    """Kill the actor named so until the one that replaces it (Ray restarts it, or Serve or its owner makes another)
    lives on `node`; returns the kills it took. Where one lands is chance: Serve spreads replicas over the nodes, and
    Ray puts an actor that needs no resources (the router) on a random live node."""
    kills = 0
    while (actor := alive_actor(name_prefix))["Address"]["NodeID"] != node:
        assert kills < 10, actor
        namespace = next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"] == actor["Name"])
        ray.kill(ray.get_actor(actor["Name"], namespace=namespace), no_restart=False)
        kills += 1
        deadline = time.time() + 300
        while (new := alive_actor(name_prefix)) is None or \
                (new["ActorID"], new["NumRestarts"]) == (actor["ActorID"], actor["NumRestarts"]):
            assert time.time() < deadline, f"{actor['Name']} not replaced"
            time.sleep(0.2)
        wait_routed(url, 300)
    return kills


def serve_on(url: str, replica: str, rng: random.Random, max_tokens: int) -> tuple[dict, httpx.Response]:
    """A new prompt computed on `replica`, and its answer. The router sends a cold prompt to either replica (a tie):
    new prompts until one lands there."""
    for _ in range(20):
        body = {"model": "tiny", "prompt": [rng.randrange(3, 390) for _ in range(600)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        if r.headers["x-kvpool-replica"] == replica:
            return body, r
    raise AssertionError(f"no cold prompt went to replica {replica}")


def send(url: str, body: dict, expected: httpx.Response) -> dict:
    """One request and what became of it: status, route, prediction against delivery, and whether its output is
    `expected`'s. Times are time.monotonic()."""
    rec: dict = {"sent": time.monotonic()}
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    except httpx.HTTPError as e:
        return {**rec, "done": time.monotonic(), "status": None, "error": repr(e)}
    rec.update(done=time.monotonic(), status=r.status_code, reason=r.headers.get("x-kvpool-route-reason"),
               replica=r.headers.get("x-kvpool-replica"))
    if r.status_code != 200:
        return {**rec, "error": r.text[:2000]}
    predicted = r.headers.get("x-kvpool-predicted-cached-tokens")
    rec.update(predicted=None if predicted is None else int(predicted),
               cached=r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
               same_output=r.json()["choices"][0]["text"] == expected.json()["choices"][0]["text"])
    rec["exact"] = rec["reason"] == "prefix" and rec["predicted"] == rec["cached"] > 0
    return rec


def router_node_kill(cluster, worker, url: str, out: dict) -> None:
    """The router's node dies (with its engine replica and pool shard): Ray restarts the router on the head, the
    surviving engine registers with it and replays its KV events, and routing to that engine is exact again. No
    request fails meanwhile: requests in flight on the dead replica are retried, later ones routed by the fallback
    rule until the router is back."""
    from actors.router import router_name

    name = router_name("mn")
    head = out["head"] = cluster.head_node.node_id
    out["worker"] = worker.node_id
    # The router on the worker (the head cannot die without the cluster), its creator the ingress on the head: Serve's
    # proxy fails the requests it has sent to an ingress replica whose node dies (the app runs one), which is not
    # what this test is about.
    out["placing_kills"] = {"ingress": place_on(head, "SERVE_REPLICA::mn#OpenAIIngress#", url),
                            "router": place_on(worker.node_id, name, url)}
    live = wait_routed(url, 300)
    router_before = alive_actor(name)
    out["router_before"] = {"node": router_before["Address"]["NodeID"], "restarts": router_before["NumRestarts"],
                            "endpoint": router_endpoint(name)}
    survivor = next(r for r, node in live.items() if node == head)
    victim = next(r for r, node in live.items() if node == worker.node_id)
    out["replicas"] = {"survivor": survivor, "victim": victim}

    rng = random.Random(11)
    # A prompt the surviving replica holds, routed to it exactly before the kill; after it, until routing is exact
    # again.
    probe, first = serve_on(url, survivor, rng, max_tokens=16)
    out["before"] = send(url, probe, first)
    # Requests in flight when the node dies: long ones, on a prompt the victim holds. The router sends one there,
    # the other either there too or (the first one's load outweighs a pool fetch) to the survivor, which then fetches
    # the prefix from the victim's node.
    long_body, long_first = serve_on(url, victim, rng, max_tokens=1000)
    pool = ThreadPoolExecutor(2)
    in_flight = [pool.submit(send, url, long_body, long_first) for _ in range(2)]
    deadline = time.time() + 120
    while not ((st := router_stats(url)["replicas"])[victim]["running"] and
               sum(s["running"] for s in st.values()) == len(in_flight)):
        assert time.time() < deadline and not any(f.done() for f in in_flight), st
        time.sleep(0.05)

    killed_at = time.monotonic()
    cluster.remove_node(worker, allow_graceful=False)
    # Seconds after the kill when the control store had the node dead, then the router alive on the head, then the
    # first probe the moved router routed exactly came back. (A probe sent before the router had moved may have been
    # routed by the old router, whose process outlives its raylet by a moment.)
    seen = out["seen_s"] = {}
    probes = out["after"] = []
    deadline = killed_at + 300
    while "exact" not in seen:
        assert time.monotonic() < deadline, "routing never exact again"
        if probes:
            time.sleep(0.5)  # pacing: a probe a little over every half second
        if "node_dead" not in seen and not next(n["Alive"] for n in ray.nodes() if n["NodeID"] == worker.node_id):
            seen["node_dead"] = round(time.monotonic() - killed_at, 2)
        router = alive_actor(name)
        if "router_on_head" not in seen and router and router["Address"]["NodeID"] == head:
            seen["router_on_head"] = round(time.monotonic() - killed_at, 2)
        probes.append(send(url, probe, first))
        if "router_on_head" in seen and probes[-1].get("exact"):
            seen["exact"] = round(probes[-1]["done"] - killed_at, 2)
    probes.extend(send(url, probe, first) for _ in range(3))  # and it stays exact
    # The moved router's view of the head's pool, which changes no more: the shard's next report is refused (out of
    # sequence for a router that knows nothing of it), and the full one follows.
    while not router_stats(url)["pool_blocks_by_node"].get(head):
        assert time.monotonic() < deadline, ("the moved router never learned the head's pool", router_stats(url))
        time.sleep(0.2)
    seen["pool_view"] = round(time.monotonic() - killed_at, 2)
    out["in_flight"] = [f.result(timeout=300) for f in in_flight]
    pool.shutdown()
    for rec in [out["before"], *probes, *out["in_flight"]]:  # seconds after the kill
        rec["sent"], rec["done"] = (round(rec[k] - killed_at, 2) for k in ("sent", "done"))
    router_after = alive_actor(name)
    out["router_after"] = {"node": router_after["Address"]["NodeID"], "restarts": router_after["NumRestarts"],
                           "endpoint": router_endpoint(name),
                           "same_actor": router_after["ActorID"] == router_before["ActorID"]}
    out["router_stats"] = router_stats(url)


def main(scenario: str, model_dir: str, work: str, http_port: int, router_port: int) -> None:
    out: dict = {}
    with two_node_app(model_dir, work, http_port, router_port) as (cluster, worker, url, live):
        try:
            if scenario == "pool-migration":
                pool_migration(url, live, out)
            elif scenario == "router-node-kill":
                router_node_kill(cluster, worker, url, out)
            else:
                raise ValueError(f"no scenario {scenario!r}")
        finally:
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
