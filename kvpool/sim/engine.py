"""A simulated engine replica: vLLM's scheduler and prefix cache in miniature, timed by a cost model.

Memory is vLLM's block pool: cached blocks are referenced by running requests or sit free in LRU order (a request
frees its blocks last-first, so a chain's tail goes before its head, as in vLLM's FreeKVCacheBlockQueue); a new
block takes an unused one, else evicts the least recently used free one. As in vLLM v1's scheduler
(vllm/v1/core/sched/scheduler.py), blocks are allocated as tokens are scheduled, not for a whole request up front:
a waiting request is admitted, first come first served, when its first chunk's blocks fit and fewer than
`max_num_seqs` run; when a running request's next tokens do not fit, the newest running request is preempted (its
blocks are freed, its full blocks stay cached, and it waits first in line to be computed again). Each step decodes
one token for every decoding request and fills the rest of `max_num_batched_tokens` with prefill, oldest first
(chunked prefill); a chunk's full blocks join the prefix cache as it completes. Steps with the same make-up run as
one macro-step; a request arriving mid-way cuts it at the next step boundary, so admission happens when it would in
the engine.

A replica tells its listener what a real one publishes: the blocks it stored and removed (KV events), a request's
first token and its end.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from kvpool.sim.costs import StepCosts


@dataclass
class SimRequest:
    rid: str
    session: str
    turn: int
    hashes: list[int]  # chain hashes of the prompt's full blocks before its last token (what can be cached)
    prompt_tokens: int
    max_tokens: int
    sent_at: float
    bound_tokens: int = 0
    # filled in as it runs
    replica: str = ""
    cached_tokens: int = 0  # taken from the engine's prefix cache
    loaded_tokens: int = 0  # loaded from a pool tier into the engine
    load_s: float = 0.0  # stall of the step that loads them
    arrived_at: float = 0.0  # at the replica (after any cross-node copy)
    first_token_at: float | None = None
    finished_at: float | None = None
    prefill_left: int = 0
    decode_left: int = 0
    blocks_held: int = 0  # uncached blocks allocated to it (prompt blocks until stored, output, partial)
    preemptions: int = 0
    recomputed_output: int = 0  # answer tokens computed again with the prompt after a preemption (vLLM's recompute)
    pool_touched: bool = False  # the connector told the pool its prefix is in use (once a request)
    refs: list[int] = field(default_factory=list)  # cached blocks it references

    @property
    def prefill_tokens(self) -> int:
        """The tokens its prefill computes: the prompt, and after a preemption the answer so far too."""
        return self.prompt_tokens + self.recomputed_output


@dataclass
class _Plan:
    """A macro-step: `steps` identical engine steps from `start`, each `step_s` long."""
    start: float
    step_s: float
    steps: int
    decodes: list[SimRequest]
    prefills: list[tuple[SimRequest, int]]  # (request, tokens a step)
    grown: list[tuple[SimRequest, int]]  # blocks allocated to running requests for all `planned` steps
    planned: int


class EngineListener:
    """What a replica reports; the cluster overrides what it needs."""

    def stored(self, engine: "SimEngine", hashes: list[int]) -> None: ...

    def removed(self, engine: "SimEngine", hashes: list[int]) -> None: ...

    def first_token(self, engine: "SimEngine", req: SimRequest) -> None: ...

    def finished(self, engine: "SimEngine", req: SimRequest) -> None: ...


class PoolTiers:
    """The connector's part: the blocks a pool tier holds after the engine's hit, asked at every admission attempt
    (as vLLM's scheduler asks its connector), and their load, once the request is admitted."""

    def lookup(self, engine: "SimEngine", req: SimRequest, hit: int) -> int:
        return 0

    def load(self, engine: "SimEngine", req: SimRequest, hit: int, n: int) -> float:
        """Load blocks hit..hit+n-1 of the request; returns the seconds the load stalls its step."""
        return 0.0


class SimEngine:
    def __init__(self, name: str, node: str, costs: StepCosts, block_size: int, listener: EngineListener,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, prefix_caching: bool = True,
                 pool: PoolTiers | None = None):
        self.name, self.node, self.costs, self.block_size = name, node, costs, block_size
        self.listener = listener
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.prefix_caching = prefix_caching
        self.pool = pool or PoolTiers()
        self.capacity = costs.kv_capacity_tokens // block_size
        self.free: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first
        self.refs: dict[int, int] = {}  # cached and referenced: block -> running requests that use it
        self.held = 0  # uncached blocks of running requests
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.clock = 0.0
        # The macro-step in progress: its start, step time, number of steps, and what each step does.
        self._plan: _Plan | None = None
        self.busy_s = 0.0
        self.evicted_blocks = 0
        self.preemptions = 0

    # --- the cluster's calls ----------------------------------------------------------------------------------

    def submit(self, req: SimRequest, now: float) -> None:
        req.arrived_at, req.replica = now, self.name
        self.waiting.append(req)
        if self._plan is None:
            self.clock = max(self.clock, now)
        else:  # admit it at the next step boundary: cut the macro-step there
            plan = self._plan
            plan.steps = min(plan.steps, max(1, math.floor((now - plan.start) / plan.step_s) + 1))

    def next_event_s(self) -> float | None:
        """When the macro-step in progress ends (None: idle, or it has not planned since a submit)."""
        if self._plan is None:
            return self.clock if self.waiting else None
        return self._plan.start + self._plan.steps * self._plan.step_s

    def advance(self) -> None:
        """Finish the macro-step in progress (if any) and plan the next."""
        if self._plan is not None:
            self._finish_plan()
        self._make_plan()

    def cached_blocks(self) -> int:
        return len(self.free) + len(self.refs)

    # --- memory -----------------------------------------------------------------------------------------------

    def _hit_blocks(self, req: SimRequest) -> int:
        if not self.prefix_caching:
            return 0
        n = 0
        for h in req.hashes:
            if h not in self.refs and h not in self.free:
                break
            n += 1
        return n

    def _allocate(self, n: int) -> None:
        """Make room for `n` new blocks (the caller checked they fit): unused ones first, then the LRU free ones."""
        evict = n - self._unused()
        if evict > 0:
            gone = [self.free.popitem(last=False)[0] for _ in range(evict)]
            self.evicted_blocks += evict
            self.listener.removed(self, gone)
        self.held += n

    def _ref(self, h: int) -> None:
        if h in self.free:
            del self.free[h]
            self.refs[h] = 1
        else:
            self.refs[h] = self.refs.get(h, 0) + 1

    def _unref(self, h: int) -> None:
        c = self.refs[h] - 1
        if c:
            self.refs[h] = c
        else:
            del self.refs[h]
            self.free[h] = None

    def _admit(self, budget: int) -> list[tuple[SimRequest, int]]:
        """Admit waiting requests, first come first served, while the step has token budget and their first
        chunk's blocks fit; returns them with their chunks (their blocks allocated)."""
        bs, admitted = self.block_size, []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if math.ceil((req.prompt_tokens + req.max_tokens) / bs) > self.capacity:
                raise ValueError(f"a request of {req.prompt_tokens + req.max_tokens} tokens cannot fit "
                                 f"{self.capacity} blocks of KV")
            hit = self._hit_blocks(req)
            loaded = self.pool.lookup(self, req, hit)
            cached = (hit + loaded) * bs  # < prompt_tokens: the last prompt token is always computed
            chunk = min(req.prefill_tokens - cached, budget)
            need = math.ceil((cached + chunk) / bs) - hit  # vLLM allocates for the tokens it schedules
            evictable = len(self.free) - sum(1 for h in req.hashes[:hit] if h in self.free)
            if need > self._unused() + evictable:
                break
            self.waiting.popleft()
            for h in req.hashes[:hit]:
                self._ref(h)
            req.refs = list(req.hashes[:hit])
            self._allocate(need)
            req.blocks_held = need
            req.load_s = self.pool.load(self, req, hit, loaded) if loaded else 0.0
            if loaded:  # loaded blocks are cached at once (their KV is complete)
                self._store(req, req.hashes[hit:hit + loaded])
            if not req.preemptions:  # what the request is reported to have found cached: its first admission's
                req.cached_tokens, req.loaded_tokens = hit * bs, loaded * bs  # (vLLM's num_cached_tokens)
            req.prefill_left = req.prefill_tokens - cached
            if req.first_token_at is None:
                req.decode_left = req.max_tokens
            self.running.append(req)
            admitted.append((req, chunk))
            budget -= chunk
        return admitted

    def _unused(self) -> int:
        return self.capacity - self.held - len(self.refs) - len(self.free)

    def _preempt(self, req: SimRequest) -> None:
        """Out of blocks: `req` (the newest running request) gives its blocks back and waits first in line; its
        full blocks stay cached. Its answer so far is kept; as in vLLM, its prompt and that answer are computed (the
        prompt's cached or pooled blocks loaded) again, and the last of that prefill samples its next token."""
        self.running.remove(req)
        self._release(req)
        req.recomputed_output = req.max_tokens - req.decode_left if req.first_token_at is not None else 0
        req.prefill_left, req.preemptions = req.prefill_tokens, req.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _store(self, req: SimRequest, hashes: list[int]) -> None:
        """The request's blocks `hashes` are full and computed (or loaded): they join the prefix cache (without
        prefix caching they stay the request's own, freed with it)."""
        if not self.prefix_caching:
            return
        stored = []
        for h in hashes:
            known = h in self.refs or h in self.free
            self._ref(h)
            req.refs.append(h)
            req.blocks_held -= 1
            self.held -= 1
            if not known:
                stored.append(h)
        if stored:
            self.listener.stored(self, stored)

    def _release(self, req: SimRequest) -> None:
        self.held -= req.blocks_held
        req.blocks_held = 0
        for h in reversed(req.refs):  # tail first: the LRU end evicts a chain from its end
            self._unref(h)
        req.refs = []

    # --- steps ------------------------------------------------------------------------------------------------

    def _make_plan(self) -> None:
        """The next macro-step, as vLLM's scheduler makes a step: the running requests first (the newest preempted
        while their next tokens' blocks do not fit), then, if none was preempted, waiting requests within the
        token budget left."""
        preempted = False
        while True:  # a step's blocks for the running requests, preempting the newest while they do not fit
            decodes, prefills, budget = self._schedule_running()
            grow = self._growth(1, decodes, prefills)
            if sum(n for _, n in grow) <= self._unused() + len(self.free):
                break
            self._preempt(self.running[-1])
            preempted = True
        self._take(grow)
        admitted = [] if preempted else self._admit(budget)
        if admitted:
            prefills, k = prefills + admitted, 1
        else:  # no one joins: the same step repeats while it can (its blocks for all of them fit)
            k = self._repeats(decodes, prefills)
            if k > 1:
                more = self._growth(k, decodes, prefills)
                if sum(n for _, n in more) <= self._unused() + len(self.free):
                    self._take(more)
                    grow = [(r, n + m) for (r, n), (_, m) in zip(grow, more)]
                else:
                    k = 1
        if not decodes and not prefills:
            self._plan = None
            return
        p_tokens = sum(c for _, c in prefills)
        # Mean context a prefill token attends to, over the k steps (the chunks' offsets grow step by step).
        p_ctx = (sum((r.prefill_tokens - r.prefill_left + c * k / 2) * c for r, c in prefills) / p_tokens
                 if p_tokens else 0.0)
        d_ctx = sum(r.prompt_tokens + r.max_tokens - r.decode_left for r in decodes)
        step_s = self.costs.step_s(len(decodes), d_ctx, p_tokens, p_ctx)
        stall = sum(r.load_s for r, _ in prefills)  # loads run before the step's forward pass
        for r, _ in prefills:
            r.load_s = 0.0
        start = self.clock + stall
        self.busy_s += stall
        self._plan = _Plan(start, step_s, k, decodes, prefills, grow, k)

    def _schedule_running(self) -> tuple[list[SimRequest], list[tuple[SimRequest, int]], int]:
        """What a step computes of the running requests: every decode, then prefill chunks oldest first within
        the token budget; and the budget left."""
        decodes = [r for r in self.running if r.prefill_left == 0]
        budget = max(0, self.budget - len(decodes))
        prefills: list[tuple[SimRequest, int]] = []
        for r in self.running:
            if budget <= 0:
                break
            if r.prefill_left > 0:
                chunk = min(r.prefill_left, budget)
                prefills.append((r, chunk))
                budget -= chunk
        return decodes, prefills, budget

    @staticmethod
    def _repeats(decodes: list[SimRequest], prefills: list[tuple[SimRequest, int]]) -> int:
        """How many steps repeat unchanged: the first prefill still has more than a chunk left, no decode
        finishes."""
        k = min((r.decode_left for r in decodes), default=math.inf)
        if prefills:
            head, chunk = prefills[0]
            k = min(k, max(1, head.prefill_left // chunk) if len(prefills) == 1 else 1)
        return int(max(1, k)) if k != math.inf else 1

    def _growth(self, k: int, decodes: list[SimRequest],
                prefills: list[tuple[SimRequest, int]]) -> list[tuple[SimRequest, int]]:
        """New blocks each request needs for k more steps: its KV then holds its computed prompt, and each decode
        step writes the KV of the token it feeds (the prompt plus all but the newest generated token)."""
        bs = self.block_size
        tokens = [(r, r.prompt_tokens + r.max_tokens - r.decode_left - 1 + k) for r in decodes]
        tokens += [(r, r.prefill_tokens - r.prefill_left + chunk * k) for r, chunk in prefills]
        return [(r, max(0, math.ceil(t / bs) - len(r.refs) - r.blocks_held)) for r, t in tokens]

    def _resize(self, grown: list[tuple[SimRequest, int]], k: int, decodes: list[SimRequest],
                prefills: list[tuple[SimRequest, int]]) -> list[tuple[SimRequest, int]]:
        """The blocks `grown` for more steps shrink to those of `k` steps (the rest are unused again)."""
        for r, n in grown:
            r.blocks_held -= n
            self.held -= n
        return self._take(self._growth(k, decodes, prefills))

    def _take(self, grow: list[tuple[SimRequest, int]]) -> list[tuple[SimRequest, int]]:
        """Allocate each request its new blocks (the caller checked they fit)."""
        self._allocate(sum(n for _, n in grow))
        for r, n in grow:
            r.blocks_held += n
        return grow

    def _finish_plan(self) -> None:
        plan = self._plan
        k, decodes, prefills = plan.steps, plan.decodes, plan.prefills
        if k < plan.planned:  # an arrival cut the macro-step short: the blocks of the steps not run go back
            self._resize(plan.grown, k, decodes, prefills)
        step_s = plan.step_s
        end = plan.start + k * step_s
        self.busy_s += k * step_s
        self.clock = end
        self._plan = None
        for r in decodes:
            r.decode_left -= k
        for r, chunk in prefills:
            r.prefill_left -= chunk * k
            # The chunk's full blocks join the prefix cache (r.refs: the prompt's leading blocks held so far).
            computed = min(len(r.hashes), (r.prefill_tokens - r.prefill_left) // self.block_size)
            self._store(r, r.hashes[len(r.refs):computed])
            if r.prefill_left == 0:  # its last chunk samples a token: its first, or the next after a preemption
                r.decode_left -= 1
                if r.first_token_at is None:
                    r.first_token_at = end
                    self.listener.first_token(self, r)
        for r in [r for r in self.running if r.prefill_left == 0 and r.decode_left <= 0]:
            r.finished_at = end
            self.running.remove(r)
            self._release(r)
            self.listener.finished(self, r)
