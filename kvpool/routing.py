"""The routing rule: send a request to the replica that will compute least.

    cost(r) = uncached prompt tokens on r  +  pool_load_cost * tokens r loads from the shared pool
              +  prefill tokens already queued on r  +  running_cost * running(r)

The first term rewards a replica that holds the prefix; the others price its queue in the same unit (tokens to
compute before this request's first token). So a hot system prompt shared by every session stops attracting
sessions once the replica holding it has more queued prefill than the prompt is long (the others then compute it
once and hold it too); a prefix in the shared pool makes every replica nearly as good as the one holding it,
priced by pool_load_cost (loading a token over computing it, from measured bandwidth); a session mid-conversation, whose 50K-token history sits on one replica, stays there unless
that replica's queue is 50K tokens deep; equal replicas tie and share the load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReplicaLoad:
    queued_prefill_tokens: int = 0  # uncached prompt tokens routed here that have not produced a first token
    running: int = 0  # requests routed here and not finished


@dataclass
class Decision:
    replica: str
    predicted_cached_tokens: int  # local prefix-cache hit, or the pool's hit if longer
    # "prefix": the best local cache won; "pool": a replica loading from the pool won; "load": a less-cached replica
    # won on its queue; "balance": nothing cached anywhere
    reason: str
    costs: dict[str, int] = field(default_factory=dict)


def choose(prompt_tokens: int, cached_tokens: dict[str, int], loads: dict[str, ReplicaLoad],
           running_cost_tokens: int, pool_tokens: int = 0, pool_load_cost: float = 0.0,
           rng: random.Random = random._inst) -> Decision:
    """Pick the cheapest replica among the keys of `cached_tokens` (the live candidates' own prefix-cache hits).
    `pool_tokens`: the prompt's leading tokens the shared pool holds (any replica can load them)."""
    if not cached_tokens:
        raise ValueError("no candidate replicas")
    costs: dict[str, int] = {}
    for r, cached in cached_tokens.items():
        load = loads.get(r) or ReplicaLoad()
        loaded = max(0, pool_tokens - cached)
        costs[r] = round(prompt_tokens - cached - loaded + pool_load_cost * loaded + load.queued_prefill_tokens
                         + running_cost_tokens * load.running)
    best = min(costs.values())
    tied = [r for r, c in costs.items() if c == best]
    # Ties go to the replica with fewer running requests, then at random, so equal replicas share the load.
    fewest = min((loads.get(r) or ReplicaLoad()).running for r in tied)
    chosen = rng.choice([r for r in tied if (loads.get(r) or ReplicaLoad()).running == fewest])
    most_cached = max(cached_tokens.values())
    if most_cached == 0 and pool_tokens == 0:
        reason = "balance"
    elif cached_tokens[chosen] < pool_tokens:
        reason = "pool"
    elif cached_tokens[chosen] == most_cached:
        reason = "prefix"
    else:
        reason = "load"
    return Decision(chosen, max(cached_tokens[chosen], pool_tokens), reason, costs)
