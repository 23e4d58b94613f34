"""The routing and KV-reuse policies the simulator compares: KV-Pool's (the project's own code, kvpool.routing) and
the peers' rules as their projects document them.

Each policy says how requests are routed (`route`), whether engines cache prefixes, and which pool tier backs the
engines: none, a private host tier per replica (LMCache-style), or KV-Pool's shared per-node pool.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import TYPE_CHECKING

from kvpool.routing import Decision, RouterCore

if TYPE_CHECKING:
    from kvpool.sim.cluster import Cluster
    from kvpool.sim.engine import SimRequest

POLICIES = ["no-cache", "p2c", "rayllm-prefix", "session-sticky", "kv-overlap", "lmcache", "kvpool-router",
            "kvpool"]


class Policy:
    name = ""
    prefix_caching = True
    tier = "none"  # "none", "private" (a host tier per replica) or "shared" (KV-Pool's per-node pool)
    uses_index = False  # routes on the exact prefix index fed by the engines' KV events

    def __init__(self, cluster: "Cluster", rng: random.Random):
        self.cluster, self.rng = cluster, rng

    def route(self, req: "SimRequest") -> tuple[str, Decision | None]:
        raise NotImplementedError

    def _power_of_two(self, candidates: list[str]) -> str:
        """Ray Serve's default request router: of two replicas drawn at random, the one with fewer ongoing
        requests (ray/serve/_private/request_router/pow_2_router.py)."""
        pair = self.rng.sample(candidates, 2) if len(candidates) > 1 else candidates
        return min(pair, key=lambda r: len(self.cluster.engines[r].running) + len(self.cluster.engines[r].waiting))


class NoCache(Policy):
    """No reuse at all: prefix caching off, power-of-two routing."""
    name, prefix_caching = "no-cache", False

    def route(self, req):
        return self._power_of_two(self.cluster.replicas), None


class PowerOfTwo(Policy):
    """vLLM's own prefix caching behind Ray Serve's default power-of-two routing."""
    name = "p2c"

    def route(self, req):
        return self._power_of_two(self.cluster.replicas), None


class SessionSticky(Policy):
    """Consistent hashing on the session (rendezvous hashing: a session moves only when its replica leaves), as
    session-affinity routers do (vLLM production-stack's session router, Envoy/Nginx hash on a header)."""
    name = "session-sticky"

    def route(self, req):
        def weight(r: str) -> bytes:
            return hashlib.blake2b(f"{req.session}|{r}".encode(), digest_size=8).digest()
        return max(self.cluster.replicas, key=weight), None


class LMCacheStyle(SessionSticky):
    """Per-replica private host offload (LMCache's local CPU backend: LRU, the replica's share of the host tier)
    behind session affinity: the deployment LMCache documents with vLLM production-stack."""
    name, tier = "lmcache", "private"


class RayPrefixAffinity(Policy):
    """Ray Serve LLM's PrefixCacheAffinityRouter (ray/llm/_internal/serve/routing_policies/prefix_aware/
    prefix_aware_router.py, defaults of initialize_state): a prefix tree of the prompts' *text* sent to each
    replica, not of what the engines hold; with balanced load (imbalanced_threshold = inf by default, so always),
    the replicas with the longest match if the match rate is >= 0.1, else the replicas with the smallest trees; the
    pick among them is power-of-two. Each replica's tree keeps eviction_threshold_chars = 400,000 characters (LRU).
    Here the tree is kept per 64-token block at 4 characters per token."""
    name = "rayllm-prefix"
    MATCH_RATE_THRESHOLD = 0.1
    TREE_CHARS = 400_000
    CHARS_PER_TOKEN = 4

    def __init__(self, cluster, rng):
        super().__init__(cluster, rng)
        self.trees: dict[str, OrderedDict[int, None]] = {r: OrderedDict() for r in cluster.replicas}
        self.tree_blocks = self.TREE_CHARS // (self.CHARS_PER_TOKEN * cluster.block_size)

    def route(self, req):
        matches = {}
        for r in self.cluster.replicas:
            tree, n = self.trees[r], 0
            for h in req.hashes:
                if h not in tree:
                    break
                n += 1
            matches[r] = n
        best = max(matches.values())
        blocks = max(1, len(req.hashes))
        if best / blocks >= self.MATCH_RATE_THRESHOLD and best > 0:
            candidates = [r for r, n in matches.items() if n == best]
        else:
            smallest = min(len(t) for t in self.trees.values())
            candidates = [r for r, t in self.trees.items() if len(t) == smallest]
        chosen = self._power_of_two(candidates)
        tree = self.trees[chosen]
        for h in req.hashes:
            tree[h] = None
            tree.move_to_end(h)
        while len(tree) > self.tree_blocks:
            tree.popitem(last=False)
        return chosen, None


class KVOverlap(Policy):
    """A KV-overlap-vs-load router in the manner of Dynamo's KV router (docs/router/kv_cache_routing.md;
    lib/llm/src/kv_router/scheduler.rs): from the engines' KV events, per worker cost = overlap_score_weight (1.0)
    x blocks to prefill + the worker's active blocks (decode load), lowest cost wins (temperature 0). llm-d's
    precise-prefix-cache scorer weighs the same two signals."""
    name, uses_index = "kv-overlap", True

    def route(self, req):
        bs = self.cluster.block_size
        overlap = self.cluster.core.index.match(req.hashes, self.cluster.replicas)
        prompt_blocks = -(-req.prompt_tokens // bs)

        def cost(r: str) -> float:
            e = self.cluster.engines[r]
            active = sum(-(-(q.prompt_tokens + q.max_tokens) // bs) for q in e.running) + sum(
                -(-q.prompt_tokens // bs) for q in e.waiting)
            return (prompt_blocks - overlap[r]) + active

        costs = {r: cost(r) for r in self.cluster.replicas}
        low = min(costs.values())
        return self.rng.choice([r for r, c in costs.items() if c == low]), None


class KVPoolRouting(Policy):
    """KV-Pool's router with the pool off: kvpool.routing.RouterCore, the router actor's own code."""
    name, uses_index = "kvpool-router", True

    def route(self, req):
        d = self.cluster.core.route(req.rid, req.hashes, req.prompt_tokens)
        return d.replica, d


class KVPool(KVPoolRouting):
    """KV-Pool complete: RouterCore with the pool's offers, engines backed by the shared per-node pool."""
    name, tier = "kvpool", "shared"

    def route(self, req):
        d = self.cluster.core.route(req.rid, req.hashes, req.prompt_tokens, req.hashes)
        return d.replica, d


def make_policy(name: str, cluster: "Cluster", rng: random.Random) -> Policy:
    classes = {c.name: c for c in (NoCache, PowerOfTwo, RayPrefixAffinity, SessionSticky, KVOverlap, LMCacheStyle,
                                   KVPoolRouting, KVPool)}
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return classes[name](cluster, rng)


def router_core(cluster: "Cluster", running_cost_tokens: int, pool_load_cost: float, pool_fetch_cost: float,
                rng: random.Random) -> RouterCore:
    core = RouterCore(cluster.block_size, running_cost_tokens, pool_load_cost, pool_fetch_cost, rng)
    core.live = list(cluster.replicas)
    core.node_of = dict(cluster.node_of)
    core.pool.layouts = ["sim"]
    return core
