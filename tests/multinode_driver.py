"""A two-node Ray cluster on loopback (ray.cluster_utils: a head and a worker raylet, each with its own pool
directories), the KV-Pool app with one engine replica per node, and one cross-node pool migration. Run by
tests/test_multinode.py in a subprocess (a process joins one Ray cluster, and the test session has its own);
prints one JSON line of findings for the test to check.

    python tests/multinode_driver.py <tiny-model-dir> <work-dir> <http-port> <router-port>
"""

import json
import random
import sys
import time

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster


def main(model_dir: str, work: str, http_port: int, router_port: int) -> None:
    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    # Each node's processes see their own KVPOOL_NODE, so "$KVPOOL_NODE" in the pool dirs gives per-node pools,
    # as separate machines have.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": {"KVPOOL_NODE": "n1"},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, env_vars={"KVPOOL_NODE": "n2"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port, "location": "HeadOnly"})
        cfg = KVPoolConfig(model=model_dir, served_model_name="tiny", num_replicas=2, max_replicas_per_node=1,
                           max_model_len=4096, kv_cache_bytes=24 << 20, block_size=32, router_port=router_port,
                           pool_host_dir=f"{work}/$KVPOOL_NODE/host", pool_disk_dir=f"{work}/$KVPOOL_NODE/disk",
                           pool_fetch_timeout_s=60)  # what is checked is that the prefix arrives, not how fast
        serve.run(build_app(cfg), name="mn", route_prefix="/mn", blocking=False)
        url = f"http://127.0.0.1:{http_port}/mn"
        rng = random.Random(7)  # random token ids: the tiny model's greedy output then varies token by token
        body = {"model": "tiny", "prompt": [rng.randrange(3, 390) for _ in range(880)], "max_tokens": 16,
                "temperature": 0}
        deadline = time.time() + 300
        while True:  # a first request makes Serve hand the replica list to the router
            try:
                warm = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "hi", "max_tokens": 1}, timeout=30)
                stats = httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()
                live = {r: s["node"] for r, s in (stats["router"] or {}).get("replicas", {}).items() if s["live"]}
                if warm.status_code == 200 and len(live) == 2 and all(live.values()):
                    break
            except (httpx.HTTPError, ValueError, TypeError, KeyError):
                pass
            assert time.time() < deadline, "replicas not up"
            time.sleep(1)
        out["replica_nodes"] = sorted(set(live.values()))

        first = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert first.status_code == 200, first.text
        out["first"] = {"replica": first.headers["x-kvpool-replica"], "text": first.json()["choices"][0]["text"],
                        "usage": first.json()["usage"]}
        n_blocks = (first.json()["usage"]["prompt_tokens"] - 1) // 32
        deadline = time.time() + 30
        while max(httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()["router"]["pool_blocks_by_node"].values(),
                  default=0) < n_blocks:
            assert time.time() < deadline, ("pool blocks never reported",
                                            httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json())
            time.sleep(0.2)

        # The replica that computed the prompt dies (its node's pool shard lives on); the other node's replica
        # must fetch the prefix from that pool, not recompute it.
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if out["first"]["replica"] in a["name"])
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        deadline = time.time() + 10
        while out["first"]["replica"] in [r for r, s in httpx.get(f"{url}/v1/kvpool/stats", timeout=10).json()
                                          ["router"]["replicas"].items() if s["live"]]:
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
    finally:
        print(json.dumps(out), flush=True)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
