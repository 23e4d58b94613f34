"""A discrete-event run of one policy on a simulated cluster: N nodes x G GPUs, replicas of TP GPUs each, agent
sessions from a trace arriving to hold a target concurrency.

What is the project's own code here, not a re-implementation: the routing rule, load book and pool view
(kvpool.routing.RouterCore, which the router actor runs), the exact prefix index fed by the engines' KV events
(kvpool.index.PrefixIndex), the block-chain hashing (kvpool.hashing), and the pool's tier budgets and eviction order
(kvpool.pool_store.to_move_out / eviction_order, which the pool shard runs). The engines are models
(kvpool.sim.engine), timed by kvpool.sim.costs.

Pool blocks are named by their routing hash: the real pool's blake2b keys name the same prefixes and differ only in
collision resistance, which matters for loading bytes, and no bytes move here.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from kvpool import hashing
from kvpool.events import BlockRemoved, BlockStored
from kvpool.pool_store import BlockFile, to_move_out
from kvpool.routing import Decision
from kvpool.sim.costs import StepCosts
from kvpool.sim.engine import EngineListener, PoolTiers, SimEngine, SimRequest
from kvpool.sim.policies import make_policy, router_core
from kvpool.sim.workload import SimSession


class BlockNamer:
    """Chain hashes for trace blocks, as the ingress computes them from token ids (kvpool.hashing): a block's tokens
    are its key repeated, so distinct keys are distinct blocks. Memoised per (parent, key), so each block is hashed
    once however many prompts carry it."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.memo: dict[tuple[int, int], int] = {}
        self.parent: dict[int, int | None] = {}
        self.token_of: dict[int, int] = {}

    def chain(self, keys, parent: int | None = None, pos: int = 0) -> list[int]:
        """The chain hashes of blocks `keys` (ints below 2**62), after block `parent` at position `pos`."""
        out: list[int] = []
        memo = self.memo
        for i, key in enumerate(keys):
            h = memo.get((parent or 0, key))
            if h is None:
                return out + self._hash_rest(list(keys[i:]), parent, pos + i)
            out.append(h)
            parent = h
        return out

    def _hash_rest(self, keys: list[int], parent: int | None, pos: int) -> list[int]:
        bs = self.block_size
        tokens = np.repeat(np.asarray(keys, dtype=np.uint64), bs)
        # A routing hash continues its chain (kvpool.hashing).
        hashes = hashing.prefix_sums(tokens, bs, parent if parent is not None else 0, pos).tolist()
        for key, h in zip(keys, hashes):
            self.memo[(parent or 0, key)] = h
            self.parent[h], self.token_of[h] = parent, key
            parent = h
        return hashes

    def stored_events(self, hashes: list[int]) -> list[BlockStored]:
        """BlockStored events for these blocks, one per run that chains parent to child, as an engine sends."""
        events, run = [], []
        for h in hashes:
            if run and self.parent[h] != run[-1]:
                events.append(self._event(run))
                run = []
            run.append(h)
        if run:
            events.append(self._event(run))
        return events

    def _event(self, run: list[int]) -> BlockStored:
        tokens = np.repeat(np.array([self.token_of[h] for h in run], dtype=np.uint64), self.block_size)
        # token_ids as an array: the index hashes it as it is (an engine's event carries a list).
        return BlockStored(block_hashes=run, parent_block_hash=self.parent[run[0]], token_ids=tokens,
                           block_size=self.block_size)


class NodePool:
    """One node's pool: a host tier and a disk tier with byte budgets, trimmed in the real eviction order."""

    def __init__(self, host_bytes: int, disk_bytes: int, block_bytes: int, session_ttl_s: float):
        self.budgets = {"host": host_bytes, "disk": disk_bytes}
        self.block_bytes, self.ttl = block_bytes, session_ttl_s
        self.files: dict[int, BlockFile] = {}
        self.added: list[int] = []
        self.removed: list[int] = []
        self.seq = -1  # the next report is a full one (seq 0)

    def put(self, hashes: list[int], now: float) -> int:
        """Write blocks to the host tier; returns the bytes written."""
        n = 0
        for h in hashes:
            if h not in self.files:
                self.files[h] = BlockFile(h, "host", None, self.block_bytes, now)
                self.added.append(h)
                n += 1
        return n * self.block_bytes

    def leading(self, hashes: list[int], start: int) -> int:
        """Blocks held from `start` on."""
        n, files = 0, self.files
        for h in hashes[start:]:
            if h not in files:
                break
            n += 1
        return n

    def touch(self, hashes: list[int], now: float) -> int:
        """These blocks were used now; returns how many of them are on disk."""
        disk, get = 0, self.files.get
        for h in hashes:
            f = get(h)
            if f is not None:
                f.last_used, f.reused = now, True
                disk += f.tier == "disk"
        return disk

    def maintain(self, now: float) -> tuple[int, int]:
        """The shard's pass: host blocks over budget go to disk (if it has a budget), disk blocks over budget are
        deleted. Returns (blocks demoted, blocks evicted)."""
        demoted = evicted = 0
        held = len(self.files) * self.block_bytes
        if held <= self.budgets["host"]:  # both tiers fit: nothing to sort
            return demoted, evicted
        for tier in ("host", "disk") if self.budgets["disk"] else ("host",):
            in_tier = [f for f in self.files.values() if f.tier == tier] if self.budgets["disk"] else \
                list(self.files.values())  # without a disk tier every block is on the host tier
            for f in to_move_out(in_tier, self.budgets[tier], now, self.ttl):
                if tier == "host" and self.budgets["disk"] > 0:
                    f.tier = "disk"
                    demoted += 1
                else:
                    del self.files[f.key]
                    self.removed.append(f.key)
                    evicted += 1
        return demoted, evicted

    def report(self) -> tuple[int, dict[str, list[int]], dict[str, list[int]]]:
        """What PoolView.update takes: the blocks that arrived and left since the last report, by layout."""
        self.seq += 1
        added, removed = (list(self.files), []) if self.seq == 0 else (self.added, self.removed)
        self.added, self.removed = [], []
        return self.seq, {"sim": added}, {"sim": removed}


class PrivateTier:
    """One replica's own host tier (LMCache's local CPU backend): LRU, `capacity` blocks."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def put(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                n += 1
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return n

    def leading(self, hashes: list[int], start: int) -> int:
        n = 0
        for h in hashes[start:]:
            if h not in self.blocks:
                break
            n += 1
        return n

    def touch(self, hashes: list[int]) -> None:
        for h in hashes:
            self.blocks.move_to_end(h)


class SharedTiers(PoolTiers):
    """KV-Pool's connector: the engine's node pool (host, then disk tier) behind every replica of the node."""

    def __init__(self, cluster: "Cluster"):
        self.cluster = cluster

    def lookup(self, engine, req, hit):
        pool = self.cluster.pools[engine.node]
        if not req.pool_touched:  # the session is live: its pooled prefix is kept ahead of idle ones, even where the
            pool.touch(req.hashes, self.cluster.now)  # engine's own cache serves it (KVPoolConnector._state)
            req.pool_touched = True
        return pool.leading(req.hashes, hit)

    def load(self, engine, req, hit, n):
        c = self.cluster
        return c.load(n, c.pools[engine.node].touch(req.hashes[hit:hit + n], c.now))


class PrivateTiers(PoolTiers):
    """LMCache's local CPU backend: a host tier of each replica's own, behind only that replica."""

    def __init__(self, cluster: "Cluster"):
        self.cluster = cluster

    def lookup(self, engine, req, hit):
        return self.cluster.private[engine.name].leading(req.hashes, hit)

    def load(self, engine, req, hit, n):
        self.cluster.private[engine.name].touch(req.hashes[hit:hit + n])
        return self.cluster.load(n, 0)


@dataclass
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    tp: int
    costs: StepCosts
    block_size: int = 64
    host_bytes_per_node: int = 0  # pool host tier (shared, or split between the node's replicas when private)
    disk_bytes_per_node: int = 0  # KV-Pool's disk tier
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    running_cost_tokens: int = 64
    pool_load_cost: float = 0.05
    pool_fetch_cost: float = 0.1
    session_ttl_s: float = 600.0
    max_model_len: int = 0  # 0: as long as the engine's KV holds
    pool_period_s: float = 10.0  # the shard's pass and its report to the router; the real ones run every 0.5 s

    @property
    def replicas_per_node(self) -> int:
        return self.gpus_per_node // self.tp


@dataclass
class Workload:
    sessions: list[SimSession]
    concurrency: int
    duration_s: float  # 0: a fixed workload, every session once to its end
    think_scale: float = 1.0
    ramp_s: float = 60.0  # sessions start spread over this long
    max_output: int = 0  # 0: the trace's output lengths


@dataclass
class Outcome:
    records: list = field(default_factory=list)  # kvpool.bench.replay.Record, one per finished request
    sent: int = 0
    refused: int = 0  # longer than max_model_len
    bytes: dict = field(default_factory=lambda: {"pool_host_to_engine": 0, "pool_disk_to_engine": 0,
                                                  "pool_writes": 0, "node_links": 0})
    engine_evicted_blocks: int = 0
    engine_preemptions: int = 0  # running requests preempted for want of blocks (vLLM's num_preemptions)
    busy_s: float = 0.0
    makespan_s: float = 0.0  # the duration, or for a fixed workload the time its last request finished
    decisions: dict = field(default_factory=dict)


class Cluster(EngineListener):
    def __init__(self, spec: ClusterSpec, policy: str, seed: int = 0):
        self.spec, self.block_size = spec, spec.block_size
        self.rng = random.Random(seed)
        self.replicas = [f"r{i}" for i in range(spec.nodes * spec.replicas_per_node)]
        self.node_of = {r: f"n{i // spec.replicas_per_node}" for i, r in enumerate(self.replicas)}
        self.policy = make_policy(policy, self, self.rng)
        self.core = router_core(self, spec.running_cost_tokens, spec.pool_load_cost, spec.pool_fetch_cost,
                                self.rng)
        block_bytes = spec.costs.kv_bytes_per_token * spec.block_size
        self.block_bytes = block_bytes
        self.pools = {n: NodePool(spec.host_bytes_per_node, spec.disk_bytes_per_node, block_bytes,
                                  spec.session_ttl_s) for n in set(self.node_of.values())} \
            if self.policy.tier == "shared" else {}
        per_replica = spec.host_bytes_per_node // spec.replicas_per_node // block_bytes
        self.private = {r: PrivateTier(per_replica) for r in self.replicas} if self.policy.tier == "private" else {}
        tiers = SharedTiers(self) if self.pools else PrivateTiers(self) if self.private else None
        self.engines = {r: SimEngine(r, self.node_of[r], spec.costs, spec.block_size, self,
                                     spec.max_num_seqs, spec.max_num_batched_tokens, self.policy.prefix_caching,
                                     tiers) for r in self.replicas}
        self.out = Outcome()
        # The longest request an engine takes (prompt + output): its KV must fit, and the model's context.
        # (whole blocks: an engine holds no part-block).
        kv = spec.costs.kv_capacity_tokens // spec.block_size * spec.block_size
        self.max_model_len = min(kv, spec.max_model_len or kv)
        self.now = 0.0
        self._heap: list = []
        self._tie = itertools.count()
        self._version = {r: 0 for r in self.replicas}
        self._sessions: dict[str, tuple[SimSession, int]] = {}  # live session -> (its trace, next turn)

    def load(self, blocks: int, disk: int) -> float:
        """Seconds to load `blocks` from a pool into an engine, `disk` of them first read from its disk tier;
        counted in bytes moved."""
        self.out.bytes["pool_host_to_engine"] += (blocks - disk) * self.block_bytes
        self.out.bytes["pool_disk_to_engine"] += disk * self.block_bytes
        c = self.spec.costs
        return blocks * self.block_bytes / c.load_bytes_per_s + disk * self.block_bytes / c.disk_bytes_per_s

    # --- what engines report ----------------------------------------------------------------------------------

    def stored(self, engine, hashes):
        if self.policy.uses_index:
            for ev in self.namer.stored_events(hashes):
                self.core.index.apply(engine.name, ev)
        if self.pools:  # the connector saves every computed block
            self.out.bytes["pool_writes"] += self.pools[engine.node].put(hashes, self.now)
        elif self.private:
            self.out.bytes["pool_writes"] += self.private[engine.name].put(hashes) * self.block_bytes

    def removed(self, engine, hashes):
        if self.policy.uses_index:
            self.core.index.apply(engine.name, BlockRemoved(block_hashes=hashes))

    def first_token(self, engine, req):
        self.core.book.started(req.rid, engine.name)

    def finished(self, engine, req):
        from kvpool.bench.replay import Record

        self.core.book.finished(req.rid)
        rec = Record(req.session, req.turn, req.sent_at, prompt_tokens=req.prompt_tokens,
                     cached_tokens=req.cached_tokens + req.loaded_tokens, completion_tokens=req.max_tokens,
                     bound_tokens=req.bound_tokens, ttft_s=req.first_token_at - req.sent_at,
                     latency_s=req.finished_at - req.sent_at, max_tokens=req.max_tokens)
        if req.finished_at <= self.duration:
            self.out.records.append(rec)
        self._last_finish = max(self._last_finish, req.finished_at)
        self._next_turn(req.session, req.finished_at)

    def _next_turn(self, name: str, t: float) -> None:
        session, turn = self._sessions[name]
        if turn < len(session.turns):
            self._push(t + session.turns[turn].think_s * self.workload.think_scale, "send", name)
        else:
            del self._sessions[name]
            self._last_prompt.pop(name, None)
            self._start_next_session(t)

    # --- the event loop -----------------------------------------------------------------------------------------

    def _push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self._heap, (t, next(self._tie), kind, payload))

    def _schedule(self, engine: SimEngine) -> None:
        t = engine.next_event_s()
        if t is not None:
            self._version[engine.name] += 1
            self._push(t, "engine", (engine.name, self._version[engine.name]))

    def _start_next_session(self, t: float) -> None:
        i = next(self._next_session)
        if not self.workload.duration_s and i >= len(self.workload.sessions):
            return  # a fixed workload: every session once
        base = self.workload.sessions[i % len(self.workload.sessions)]
        lap = i // len(self.workload.sessions)
        name = f"{base.name}#{lap}" if lap else base.name
        self._sessions[name] = (base, 0)
        self._lap[name] = lap
        self._push(t, "send", name)

    def _send(self, name: str) -> None:
        session, turn = self._sessions[name]
        self._sessions[name] = (session, turn + 1)
        t = session.turns[turn]
        lap = self._lap[name]
        # As the ingress: the full blocks before the prompt's last token can be cache hits.
        keys = t.keys[:(t.prompt_tokens - 1) // self.block_size]
        if lap:  # a trace replayed again is a new session: new keys
            keys = keys ^ np.int64(lap << 44)
        hashes = self._chain(name, keys)
        max_tokens = min(t.max_tokens, self.workload.max_output) if self.workload.max_output else t.max_tokens
        bound = 0
        for h in hashes:
            if h not in self._seen:
                break
            bound += 1
        self._seen.update(hashes)
        req = SimRequest(f"{name}/{turn}", name, turn, hashes, t.prompt_tokens, max(1, max_tokens), self.now,
                         bound_tokens=bound * self.block_size)
        self.out.sent += 1
        if t.prompt_tokens + req.max_tokens > self.max_model_len:  # refused with a 400, as vLLM does: the agent
            self.out.refused += 1  # goes on
            self._next_turn(name, self.now)
            return
        replica, decision = self.policy.route(req)
        reason = decision.reason if decision else "policy"
        self.out.decisions[reason] = self.out.decisions.get(reason, 0) + 1
        delay = self._fetch(decision, req) if decision and decision.fetch and self.pools else 0.0
        if delay:
            self._push(self.now + delay, "arrive", (replica, req))
        else:
            self._arrive(replica, req)

    def _chain(self, session: str, keys: np.ndarray) -> list[int]:
        """The prompt's chain hashes; the part it shares with the session's previous prompt is not looked up again."""
        prev_keys, prev_hashes = self._last_prompt.get(session, (keys[:0], []))
        n = min(len(keys), len(prev_keys))
        same = keys[:n] == prev_keys[:n]
        common = n if same.all() else int(np.argmin(same))
        hashes = prev_hashes[:common] + self.namer.chain(keys[common:].tolist(),
                                                         prev_hashes[common - 1] if common else None, common)
        self._last_prompt[session] = (keys, hashes)
        return hashes

    def _fetch(self, d: Decision, req: SimRequest) -> float:
        """Copy the blocks the decision names from another node's pool into the chosen node's; returns the time."""
        bs = self.block_size
        keys = req.hashes[d.fetch.start_token // bs:d.fetch.end_token // bs]
        source, target = self.pools[d.fetch.source_node], self.pools[self.node_of[d.replica]]
        have = [h for h in keys if h in source.files]
        target.put(have, self.now)
        moved = len(have) * self.block_bytes
        self.out.bytes["node_links"] += moved
        c = self.spec.costs
        return c.link_latency_s + moved / c.link_bytes_per_s

    def _arrive(self, replica: str, req: SimRequest) -> None:
        engine = self.engines[replica]
        engine.submit(req, self.now)
        self._schedule(engine)

    def run(self, workload: Workload) -> Outcome:
        self.workload, self.duration = workload, workload.duration_s or float("inf")
        self.namer = BlockNamer(self.block_size)
        self._seen: set[int] = set()
        self._lap: dict[str, int] = {}
        self._last_prompt: dict[str, tuple[np.ndarray, list[int]]] = {}
        self._next_session = itertools.count()
        self._last_finish = 0.0
        for i in range(workload.concurrency):
            self._start_next_session(workload.ramp_s * i / max(1, workload.concurrency))
        if self.pools:
            self._push(self.spec.pool_period_s, "maintain", None)
        while self._heap:
            t, _, kind, payload = heapq.heappop(self._heap)
            if t > self.duration:
                break
            self.now = t
            if kind == "send":
                self._send(payload)
            elif kind == "arrive":
                self._arrive(*payload)
            elif kind == "engine":
                name, version = payload
                if version == self._version[name]:
                    engine = self.engines[name]
                    engine.advance()
                    self._schedule(engine)
            elif kind == "maintain":
                self._maintain()
                if self._sessions:
                    self._push(t + self.spec.pool_period_s, "maintain", None)
        self.out.engine_evicted_blocks = sum(e.evicted_blocks for e in self.engines.values())
        self.out.engine_preemptions = sum(e.preemptions for e in self.engines.values())
        self.out.makespan_s = self.duration if self.workload.duration_s else self._last_finish
        self.out.busy_s = sum(min(e.busy_s, self.out.makespan_s) for e in self.engines.values())
        return self.out

    def _maintain(self) -> None:
        for node, pool in self.pools.items():
            pool.maintain(self.now)
            self.core.pool.update(node, *pool.report())


def gpu_seconds_per_million(outcome: Outcome, spec: ClusterSpec, duration_s: float) -> float | None:
    tokens = sum(r.prompt_tokens for r in outcome.records)
    gpus = spec.nodes * spec.gpus_per_node
    return round(gpus * duration_s / (tokens / 1e6), 1) if tokens else None
