"""The routing rule: send a request to the replica that will compute least.

    cost(r) = uncached prompt tokens on r
              +  pool_load_cost * tokens r loads from its node's pool  +  pool_fetch_cost * tokens fetched from
                 another node's pool first
              +  prefill tokens already queued on r  +  running_cost * running(r)

The first term rewards a replica that holds the prefix; the others price its queue in the same unit (tokens to
compute before this request's first token). So a hot system prompt shared by every session stops attracting
sessions once the replica holding it has more queued prefill than the prompt is long (the others then compute it
once and hold it too); a prefix in the shared pool makes every replica nearly as good as the one holding it, priced
by the measured cost of loading a token (and of copying it between nodes first) over computing it; a session
mid-conversation, whose 50K-token history sits on one replica, stays there unless that replica's queue is 50K tokens
deep; equal replicas tie and share the load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReplicaLoad:
    queued_prefill_tokens: int = 0  # uncached prompt tokens routed here that have not produced a first token
    running: int = 0  # requests routed here and not finished


@dataclass
class InFlight:
    replica: str  # the replica charged: the router's choice until the serving replica is known
    prompt_tokens: int
    uncached_tokens: int
    predicted_cached_tokens: int
    started: bool = False
    rerouted: bool = False  # Serve sent it to another replica than the router chose (that one was full or slow)


class LoadBook:
    """Each replica's queued prefill and running requests, charged to the replica that actually serves.

    The router charges its choice when it decides; Serve may still send the request elsewhere (the chosen replica at
    max_ongoing_requests, or its queue-length probe late), so the first chunk names the serving replica and the
    charge moves there. Invariant: a replica's `running` is the number of in-flight entries charged to it, and its
    `queued_prefill_tokens` the sum of their uncached tokens not started yet.
    """

    def __init__(self):
        self.loads: dict[str, ReplicaLoad] = {}
        self.inflight: dict[str, InFlight] = {}

    def charge(self, request_id: str, replica: str, prompt_tokens: int, predicted_cached_tokens: int) -> None:
        uncached = prompt_tokens - predicted_cached_tokens
        load = self.loads.setdefault(replica, ReplicaLoad())
        load.queued_prefill_tokens += uncached
        load.running += 1
        self.inflight[request_id] = InFlight(replica, prompt_tokens, uncached, predicted_cached_tokens)

    def started(self, request_id: str, served_by: str | None = None) -> set[str]:
        """The request's first chunk came from `served_by`: its prefill no longer queues, and it runs there.
        Returns the replicas whose load changed."""
        f = self.inflight.get(request_id)
        if f is None or f.started:
            return set()
        f.started = True
        changed = {f.replica}
        load = self.loads.get(f.replica)  # None: the replica was dropped, and its load with it
        if load:
            load.queued_prefill_tokens -= f.uncached_tokens
        if served_by and served_by != f.replica:
            if load:
                load.running -= 1
            self.loads.setdefault(served_by, ReplicaLoad()).running += 1
            f.replica, f.rerouted = served_by, True
            changed.add(served_by)
        return changed

    def finished(self, request_id: str) -> InFlight | None:
        """The request ended: it leaves its replica's load. Returns its entry (None if unknown)."""
        self.started(request_id)
        f = self.inflight.pop(request_id, None)
        if f is not None and f.replica in self.loads:
            self.loads[f.replica].running -= 1
        return f

    def drop_replica(self, replica: str) -> None:
        """A dead replica's load goes; its requests' entries stay until they finish (they fail or are retried)."""
        self.loads.pop(replica, None)


@dataclass
class PoolOffer:
    """What the shared pool offers one replica: the prompt's leading tokens in the pool of the replica's own node,
    and the longest leading run some other node's pool holds."""
    local_tokens: int = 0
    remote_tokens: int = 0
    remote_node: str | None = None


@dataclass
class Fetch:
    """Blocks the chosen replica's node must copy from another node's pool before the request runs."""
    source_node: str
    start_token: int
    end_token: int
    target_node: str = ""  # filled in by the router, which knows where replicas live
    layouts: list[str] = field(default_factory=list)  # ditto: the engines' pool layouts (one per rank)


@dataclass
class Decision:
    replica: str
    predicted_cached_tokens: int  # local prefix-cache hit, or the pool's hit if longer
    # "prefix": the best local cache won; "pool": a replica loading from the pool won; "load": a less-cached replica
    # won on its queue; "balance": nothing cached anywhere
    reason: str
    costs: dict[str, int] = field(default_factory=dict)
    fetch: Fetch | None = None


def choose(prompt_tokens: int, cached_tokens: dict[str, int], loads: dict[str, ReplicaLoad],
           running_cost_tokens: int, pool: dict[str, PoolOffer] | None = None, pool_load_cost: float = 0.0,
           pool_fetch_cost: float = 0.0, rng: random.Random = random._inst) -> Decision:
    """Pick the cheapest replica among the keys of `cached_tokens` (the live candidates' own prefix-cache hits).
    `pool`: per replica, what the shared pool offers it (missing: nothing)."""
    if not cached_tokens:
        raise ValueError("no candidate replicas")
    pool = pool or {}
    costs: dict[str, int] = {}
    covered: dict[str, int] = {}  # tokens the replica will not compute
    for r, cached in cached_tokens.items():
        load = loads.get(r) or ReplicaLoad()
        offer = pool.get(r) or PoolOffer()
        local = max(cached, offer.local_tokens)
        covered[r] = max(local, offer.remote_tokens)
        costs[r] = round(prompt_tokens - covered[r] + pool_load_cost * (covered[r] - cached)
                         + pool_fetch_cost * (covered[r] - local)
                         + load.queued_prefill_tokens + running_cost_tokens * load.running)
    best = min(costs.values())
    tied = [r for r, c in costs.items() if c == best]
    # Ties go to the replica with fewer running requests, then at random, so equal replicas share the load.
    fewest = min((loads.get(r) or ReplicaLoad()).running for r in tied)
    chosen = rng.choice([r for r in tied if (loads.get(r) or ReplicaLoad()).running == fewest])
    most_cached = max(cached_tokens.values())
    if most_cached == 0 and max(covered.values()) == 0:
        reason = "balance"
    elif cached_tokens[chosen] < covered[chosen]:
        reason = "pool"
    elif cached_tokens[chosen] == most_cached:
        reason = "prefix"
    else:
        reason = "load"
    offer = pool.get(chosen) or PoolOffer()
    local = max(cached_tokens[chosen], offer.local_tokens)
    fetch = Fetch(offer.remote_node, local, covered[chosen]) if covered[chosen] > local else None
    return Decision(chosen, covered[chosen], reason, costs, fetch)
