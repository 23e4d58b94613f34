"""The routing rule: send a request to the replica that will compute least.

    cost(r) = uncached prompt tokens on r  +  prefill tokens already queued on r  +  running_cost * running(r)

The first term rewards a replica that holds the prefix; the others price its queue in the same unit (tokens to
compute before this request's first token). So a hot system prompt shared by every session stops attracting
sessions once the replica holding it has more queued prefill than the prompt is long (the others then compute it
once and hold it too); a session mid-conversation, whose 50K-token history sits on one replica, stays there unless
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
    predicted_cached_tokens: int
    reason: str  # "prefix": best cache won; "load": a less-cached replica won on queue; "balance": no cache anywhere
    costs: dict[str, int] = field(default_factory=dict)


def choose(prompt_tokens: int, cached_tokens: dict[str, int], loads: dict[str, ReplicaLoad],
           running_cost_tokens: int, rng: random.Random = random._inst) -> Decision:
    """Pick the cheapest replica among the keys of `cached_tokens` (the live candidates)."""
    if not cached_tokens:
        raise ValueError("no candidate replicas")
    costs: dict[str, int] = {}
    for r, cached in cached_tokens.items():
        load = loads.get(r) or ReplicaLoad()
        costs[r] = prompt_tokens - cached + load.queued_prefill_tokens + running_cost_tokens * load.running
    best = min(costs.values())
    tied = [r for r, c in costs.items() if c == best]
    # Ties go to the replica with fewer running requests, then at random, so equal replicas share the load.
    fewest = min((loads.get(r) or ReplicaLoad()).running for r in tied)
    chosen = rng.choice([r for r in tied if (loads.get(r) or ReplicaLoad()).running == fewest])
    most_cached = max(cached_tokens.values())
    if most_cached == 0:
        reason = "balance"
    elif cached_tokens[chosen] == most_cached:
        reason = "prefix"
    else:
        reason = "load"
    return Decision(chosen, cached_tokens[chosen], reason, costs)
