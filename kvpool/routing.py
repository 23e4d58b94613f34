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

import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kvpool.block_table import BlockTable
from kvpool.events import BlockRemoved, BlockStored
from kvpool.index import PrefixIndex

logger = logging.getLogger(__name__)


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
    charged_at: float = field(default_factory=time.monotonic)
    tenant: str | None = None  # the caller's tenant (API key salt), for its own figures in the stats


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

    def charge(self, request_id: str, replica: str, prompt_tokens: int, predicted_cached_tokens: int,
               tenant: str | None = None) -> None:
        uncached = prompt_tokens - predicted_cached_tokens
        load = self.loads.setdefault(replica, ReplicaLoad())
        load.queued_prefill_tokens += uncached
        load.running += 1
        self.inflight[request_id] = InFlight(replica, prompt_tokens, uncached, predicted_cached_tokens,
                                             tenant=tenant)

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

    def expire(self, max_age_s: float, now: float | None = None) -> list[str]:
        """Entries charged more than `max_age_s` ago whose end was never reported (the ingress that sent them
        died) leave the load; returns their request ids."""
        cutoff = (time.monotonic() if now is None else now) - max_age_s
        old = [rid for rid, f in self.inflight.items() if f.charged_at < cutoff]
        for rid in old:
            self.finished(rid)
        return old


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


def costs_header(costs: Mapping[str, int]) -> str:
    """A decision's costs as the ingress sends them (x-kvpool-route-costs): "replica=tokens, ...". Replica ids
    are Serve's (letters and digits)."""
    return ", ".join(f"{r}={c}" for r, c in sorted(costs.items()))


def parse_costs_header(value: str) -> dict[str, int]:
    """The inverse of costs_header."""
    return {r: int(c) for r, c in (item.strip().rsplit("=", 1) for item in value.split(",") if item.strip())}


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


class PoolView:
    """The shared pool as its node shards report it: which nodes hold which blocks, in which layouts. A block is
    usable by the app's engines when its node holds it in every one of their layouts (one per engine rank: with
    TP > 1 a block is whole only when every rank's part is there). Blocks are named by pool-key id
    (kvpool.hashing.pool_key_ids) in one BlockTable, one bit per (node, layout), so a prompt's leading run on every
    node comes from one lookup."""

    def __init__(self, table: BlockTable | None = None):
        self.seq: dict[str, int] = {}  # node -> sequence number of its shard's last report
        self.layouts: list[str] = []  # the app's engines' layouts
        self._bits: dict[tuple[str, str], int] = {}
        self._blocks = table or BlockTable()  # pool-key id -> (node, layout) bits; may be shared (see BlockTable)

    @property
    def nodes(self) -> list[str]:
        return list(self.seq)

    def _bit(self, node: str, layout: str) -> int:
        bit = self._bits.get((node, layout))
        if bit is None:
            bit = self._bits[node, layout] = self._blocks.new_bit()
        return bit

    def _node_bits(self, node: str) -> list[int] | None:
        """The owner bits a block must have to be usable on `node` (None: some layout has nothing there)."""
        bits = [self._bits.get((node, layout)) for layout in self.layouts]
        return bits if bits and None not in bits else None

    @staticmethod
    def _run(runs: dict[int, int], bits: list[int] | None) -> int:
        return min(runs.get(b, 0) for b in bits) if bits else 0

    def update(self, node: str, seq: int, added: Mapping[str, Sequence[int] | np.ndarray],
               removed: Mapping[str, Sequence[int] | np.ndarray]) -> bool:
        """Apply a shard's report of the blocks that arrived on or left its node: layout -> their pool-key ids (an
        array: a full report of a million blocks is then a few arrays, not a million Python objects for the
        collector to walk). seq 0 is a full report; one out of sequence (a restart of either side, or a lost
        report) is refused: the shard then sends a full one."""
        if seq == 0:
            self._forget(node)
        elif self.seq.get(node) != seq - 1:
            return False
        self.seq[node] = seq
        for layout, ids in added.items():
            self._blocks.add(ids, self._bit(node, layout))
        for layout, ids in removed.items():
            if (node, layout) in self._bits:
                self._blocks.discard(ids, self._bits[node, layout])
        return True

    def _forget(self, node: str) -> None:
        for key in [k for k in self._bits if k[0] == node]:
            self._blocks.free_bit(self._bits.pop(key))

    def leading_hits(self, node: str, ids) -> int:
        """How many of the blocks `ids`, from the first, `node`'s pool holds in every layout."""
        bits = self._node_bits(node)
        return self._run(BlockTable.leading_runs(self._blocks.owners(ids)), bits) if bits and len(ids) else 0

    def drop_node(self, node: str) -> None:
        """A node left the cluster: its pool went with it."""
        self._forget(node)
        self.seq.pop(node, None)

    def blocks(self, node: str) -> int:
        """Blocks `node`'s pool holds in every layout."""
        bits = self._node_bits(node)
        return self._blocks.count(bits) if bits else 0

    def offers(self, replicas: list[str], node_of: dict[str, str], owners: np.ndarray, block_size: int,
               max_cached: int) -> dict[str, PoolOffer]:
        """What the pool offers each replica: its own node's leading run and the longest one on another node.
        `owners`: the table's owner rows of the prompt's pool-key ids (the caller looks them up with others')."""
        bits = {node: self._node_bits(node) for node in self.seq}
        runs = BlockTable.leading_runs(owners) if any(bits.values()) else {}
        hits = {node: self._run(runs, b) * block_size for node, b in bits.items()}
        offers = {}
        for r in replicas:
            node = node_of.get(r, "")
            remote_node, remote = max(((n, h) for n, h in hits.items() if n != node), key=lambda x: x[1],
                                      default=(None, 0))
            offers[r] = PoolOffer(min(hits.get(node, 0), max_cached), min(remote, max_cached), remote_node)
        return offers


@dataclass
class Replay:
    """A replay of one replica's recent batches (RouterCore.begin_replay): awaited, then applied piece by piece,
    followed by the live batches that arrived meanwhile, so that no piece keeps the router from routing for long."""
    progress_at: float  # when it was asked for, or applied its last piece: expire_replays gives up on a stalled one
    waiting: deque = field(default_factory=deque)  # live (seq, events) batches since it was asked for, oldest first
    batches: deque | None = None  # the replay's (seq, batch) not applied yet; None until it arrives
    decode: Callable[[Any], list] | None = None  # a replayed batch -> its events (None: it is its events)
    newest: int | None = None  # the replay's newest seq: a waiting batch up to it is in the replay already
    applied_events: int = 0  # events already applied of the batch first in line (a batch may span pieces)


def block_events(event) -> int:
    """What an event costs to apply, in block events: its blocks (one for an event with none, e.g. a clear)."""
    return (len(event.block_hashes) if isinstance(event, (BlockStored, BlockRemoved)) else 0) or 1


class RouterCore:
    """The router's state and decision with no I/O: which replica holds which blocks (PrefixIndex, fed the
    engines' KV events), their queues (LoadBook), the pool (PoolView, fed the shards' reports), and `route`. The
    router actor (actors/router.py) feeds it from ZMQ and Ray; the simulator (kvpool/sim) from its engine models."""

    def __init__(self, block_size: int, running_cost_tokens: int, pool_load_cost: float = 0.0,
                 pool_fetch_cost: float = 0.0, rng: random.Random = random._inst):
        self.block_size = block_size
        self.running_cost_tokens = running_cost_tokens
        self.pool_load_cost, self.pool_fetch_cost = pool_load_cost, pool_fetch_cost
        self.rng = rng
        # One table for the index (routing hashes) and the pool view (pool-key ids): a route looks both up at once.
        self.blocks = BlockTable()
        self.index = PrefixIndex(block_size, self.blocks)
        self.book = LoadBook()
        self.pool = PoolView(self.blocks)
        self.live: list[str] = []
        self.node_of: dict[str, str] = {}  # replica -> its node (registered replicas)
        # Replicas whose actor died (the watchdog's proof). Serve never reuses a replica id, and its lists lag a
        # death by seconds: a late list that still names one must not revive it (requests sent there would run
        # elsewhere while the router counts them, and plans fetches, for the dead one). Only death counts: a
        # replica that one list left out (lists from several ingresses cross) comes back with the next.
        # A restarted router starts with none; until Serve's next list a late one may revive a dead replica.
        self.dead: set[str] = set()
        self.last_seq: dict[str, int] = {}  # replica -> sequence number of its last event batch
        self.event_counts: dict[str, Counter] = {}  # replica -> applied, orphans, resets, malformed, replays
        self.complete: set[str] = set()  # replicas whose view holds every batch since the engine's first (or replay)
        self.replaying: dict[str, Replay] = {}  # replica -> its replay, awaited or being applied
        self.foreign_batches = 0  # event batches from a topic that is no replica of the app: dropped

    def ingest(self, replica: str, seq: int, events: list) -> str | None:
        """Apply one batch of KV events that `replica`'s engine published with sequence number `seq`. Returns None
        when it applied cleanly, else what happened instead:
        - "unknown": the topic is no live or registered replica (a stray publisher, or a replica already dropped):
          the batch is dropped, so it can neither create an index entry nor revive a dead replica's;
        - "deferred": a replay of the replica's recent batches is on its way or being applied; this batch applies
          after it;
        - "gap": batches were lost in between (removals among them, maybe): the replica's view was reset first;
        - "malformed": an event could not be applied (e.g. another block size): the replica's view is reset and
          the rest of the batch dropped, so the index never holds a half-applied batch. Never raises."""
        if replica not in self.node_of and replica not in self.live:
            self.foreign_batches += 1
            return "unknown"
        if replica in self.replaying:
            self.replaying[replica].waiting.append((seq, events))
            return "deferred"
        return self._apply(replica, seq, events)

    def _apply(self, replica: str, seq: int, events: list) -> str | None:
        gap = self._sequence(replica, seq)
        return self._apply_events(replica, events) or gap

    def _sequence(self, replica: str, seq: int) -> str | None:
        """Batch `seq` of `replica` is next to apply: "gap" (and the view reset) when batches were lost before it."""
        last = self.last_seq.get(replica)
        self.last_seq[replica] = seq
        if last is None:
            if seq == 0:  # heard from the engine's first batch on: the view is whole
                self.complete.add(replica)
        elif seq != last + 1:
            logger.warning("KV view of replica %s reset: sequence gap %s -> %s", replica, last, seq)
            self.index.clear(replica)
            self.complete.discard(replica)
            self.event_counts.setdefault(replica, Counter())["resets"] += 1
            return "gap"
        return None

    def _apply_events(self, replica: str, events: list) -> str | None:
        """Apply events of a batch: "malformed" (the view reset) when one could not be, the rest then dropped."""
        counts = self.event_counts.get(replica)
        if counts is None:
            counts = self.event_counts[replica] = Counter()
        for ev in events:
            try:
                if not self.index.apply(replica, ev):
                    # Its chain started before we listened (e.g. after a router restart): we cannot name these
                    # blocks, so they stay unindexed. Nothing stale is kept, so no reset is needed.
                    counts["orphans"] += 1
            except Exception as e:
                logger.warning("KV view of replica %s reset: malformed event %s (%s)", replica,
                               type(ev).__name__, e)
                self.index.clear(replica)
                counts["malformed"] += 1
                return "malformed"
            counts["applied"] += 1
        return None

    # A router that started after an engine (it restarted), or lost some of its batches, knows only part of what
    # that engine holds. The engine's publisher keeps its recent batches (vLLM's replay buffer); the engine sends
    # them when the router asks (actors/engine.py), and the view is rebuilt from them.

    def view_complete(self, replica: str) -> bool:
        """Whether every batch `replica`'s engine still buffers reached its view (heard from the engine's first
        batch on, or replayed) and none waits to be applied. (A malformed event, counted in event_resets, empties
        the view without making it incomplete: a replay would bring the same event again.)"""
        return replica in self.complete and replica not in self.replaying

    def begin_replay(self, replica: str, now: float | None = None, published_before: int | None = None) -> bool:
        """Whether `replica`'s view is incomplete and no replay is on its way or being applied; if so, one is now
        awaited: the view is emptied (the removals among the live batches that wait for the replay must not be
        missed meanwhile) and those batches wait for it (see end_replay). `published_before`: a batch the engine
        published long enough ago to have arrived; a view that stops short of it lost the batches since, though no
        later one showed the gap (the engine went quiet after them)."""
        if replica in self.replaying:
            return False
        if replica in self.complete and published_before is not None and \
                self.last_seq.get(replica, -1) < published_before:
            logger.warning("KV view of replica %s misses batches %s..%s: replaying", replica,
                           self.last_seq.get(replica, -1) + 1, published_before)
            self.complete.discard(replica)
            self.event_counts.setdefault(replica, Counter())["lost_tails"] += 1
        if replica in self.complete:
            return False
        self.index.clear(replica)
        self.replaying[replica] = Replay(time.monotonic() if now is None else now)
        return True

    def end_replay(self, replica: str, batches: Sequence[tuple[int, Any]] | None,
                   decode: Callable[[Any], list] | None = None, now: float | None = None) -> bool:
        """The replica's replayed (seq, batch) pairs arrived, oldest first, or None: the replay failed. A batch is
        its events, or what `decode` turns into them as it applies (a replay decoded whole, up to 10,000 batches,
        would keep the router as busy as applying it does, and hold all of it decoded at once). Returns whether the
        replay was awaited (not dropped, given up or answered meanwhile); if so, apply_replay applies it. The view
        is rebuilt from the contiguous run of batches that ends at the newest (a batch lost before it may have
        removed blocks), then the batches that arrived meanwhile apply (or, when it failed, just those)."""
        replay = self.replaying.get(replica)
        if replay is None or replay.batches is not None:
            return False
        replay.progress_at = time.monotonic() if now is None else now
        replay.batches = deque()
        if batches is not None:
            start = max((i for i in range(1, len(batches)) if batches[i][0] != batches[i - 1][0] + 1), default=0)
            replay.batches.extend(batches[start:])
            replay.decode = decode
            self.index.clear(replica)
            self.last_seq.pop(replica, None)
            self.event_counts.setdefault(replica, Counter())["replays"] += 1
            if batches:
                replay.newest = batches[-1][0]
            else:
                self.complete.add(replica)  # as complete as the engine's buffer, which was empty
        return True

    def apply_replay(self, replica: str, max_events: int | None = None, now: float | None = None) -> bool:
        """Apply the next piece of `replica`'s replay once it arrived (end_replay): its batches, then the live ones
        that waited for it, in order, up to `max_events` block events (block_events; a batch counts one more for
        itself; a piece ends on an event, so it holds one at least; None: all). Live batches that arrive before
        the last piece wait too. A replayed batch that cannot be decoded gives the replay up (expire_replays).
        Returns whether nothing of it is left to apply: it is done, or was dropped (or given up and asked for
        again) meanwhile."""
        replay = self.replaying.get(replica)
        if replay is None or replay.batches is None:
            return True
        budget = max_events if max_events is not None else float("inf")
        while budget > 0 and (replay.batches or replay.waiting):
            from_replay = bool(replay.batches)
            line = replay.batches if from_replay else replay.waiting
            seq, events = line[0]
            if not from_replay and replay.newest is not None and seq <= replay.newest:
                line.popleft()  # the replay held it already
                budget -= 1
                continue
            first = end = replay.applied_events
            if first == 0:
                if from_replay and replay.decode is not None:
                    try:
                        events = replay.decode(events)
                    except Exception:
                        logger.warning("replica %s sent an undecodable replay: given up", replica)
                        self._give_up(replica, replay)
                        continue
                    line[0] = (seq, events)  # kept decoded: its events may span pieces
                self._sequence(replica, seq)
            while end < len(events) and budget > 0:
                budget -= block_events(events[end])
                end += 1
            malformed = self._apply_events(replica, events[first:end])
            if end < len(events) and not malformed:
                replay.applied_events = end  # the rest of the batch goes in the next piece
                break
            line.popleft()
            replay.applied_events = 0
            budget -= 1
            if from_replay and not replay.batches:
                self.complete.add(replica)  # as complete as the engine's buffer: older blocks stay unindexed
        # The index hashes stored blocks in bulk when a route reads it; hashing this piece's now bounds that work
        # by the piece too.
        self.index.flush()
        if replay.batches or replay.waiting:
            replay.progress_at = time.monotonic() if now is None else now
            return False
        del self.replaying[replica]
        return True

    def _give_up(self, replica: str, replay: Replay) -> None:
        """The rest of `replay` is not applied: the batches that waited for it apply as after a failed one."""
        if replay.batches:  # its batch first in line may be half applied, its removals missed: the view restarts
            self.index.clear(replica)
            self.last_seq.pop(replica, None)
            self.complete.discard(replica)  # (its batch 0, if it held it, made the view complete so far)
            replay.applied_events = 0
        replay.batches = deque()

    def expire_replays(self, max_age_s: float, now: float | None = None) -> list[str]:
        """Give up on replays that made no progress for `max_age_s`: awaited (their engine died or is unreachable)
        or left half applied (whatever applied them stopped). The batches that waited for them still apply,
        through apply_replay. Returns those replicas."""
        now = time.monotonic() if now is None else now
        late = [r for r, replay in self.replaying.items() if now - replay.progress_at > max_age_s]
        for r in late:
            self._give_up(r, self.replaying[r])
            self.replaying[r].progress_at = now
        return late

    def keep_nodes(self, alive: set[str]) -> list[str]:
        """The cluster's live nodes: the pools of nodes that left leave the view; returns those nodes."""
        gone = sorted(set(self.pool.nodes) - alive)
        for node in gone:
            self.pool.drop_node(node)
        return gone

    def set_replicas(self, replicas: list[str]) -> list[str]:
        """Serve's current replica list; returns the replicas that left (dropped): those it listed before, and any
        unregistered one the index or the queues still name. A replica that registered but is not listed yet (it
        announces itself before Serve sends it traffic) stays; a dead one listed still is left out."""
        replicas = [r for r in replicas if r not in self.dead]
        new = set(replicas)
        gone = (set(self.live) - new) | ((set(self.index.replicas()) | set(self.book.loads)) - new - set(self.node_of))
        for r in gone:
            self.drop(r)
        self.live = replicas
        return sorted(gone)

    def register(self, replica: str, node: str) -> bool:
        """A replica announced itself on `node` (at start and at every health check); False for a dead one (a
        call it sent before it died, arriving late): nothing of it is kept."""
        if replica in self.dead:
            return False
        self.node_of[replica] = node
        return True

    def died(self, replica: str) -> None:
        """A replica's actor died: dropped, and never taken back."""
        self.dead.add(replica)
        self.drop(replica)

    def drop(self, replica: str) -> None:
        """A replica left or died: its blocks and its queue go."""
        self.index.remove_replica(replica)
        self.book.drop_replica(replica)
        self.node_of.pop(replica, None)
        self.last_seq.pop(replica, None)
        self.complete.discard(replica)
        self.replaying.pop(replica, None)
        if replica in self.live:
            self.live = [r for r in self.live if r != replica]

    def route(self, request_id: str, hashes, prompt_tokens: int, pool_ids=None,
              tenant: str | None = None) -> Decision | None:
        """The cheapest live replica for a request, given the chain hashes of its prompt and, with the pool on, its
        pool-key ids (kvpool.hashing). The request is charged to the choice (and counted to `tenant`)."""
        # Serve's list: a restarted router has none until the first request Serve routes without a choice (the
        # request-router plug-in then sends it), so that request falls back.
        replicas = self.live
        if not replicas:
            return None
        bs = self.block_size
        # vLLM always computes at least the last prompt token, so a full hit is one block short.
        max_cached = (prompt_tokens - 1) // bs * bs
        self.index.flush()
        hashes = np.asarray(hashes, dtype=np.uint64)
        with_pool = pool_ids is not None and len(pool_ids) > 0
        owners = self.blocks.owners(np.concatenate([hashes, np.asarray(pool_ids, dtype=np.uint64)]) if with_pool
                                    else hashes)
        # A replica whose replay is being applied counts nothing cached: its view, rebuilt from the oldest buffered
        # batch on, may still hold blocks that a later batch, not applied yet, removed.
        cached = {r: 0 if r in self.replaying else min(n * bs, max_cached)
                  for r, n in self.index.runs(owners[:len(hashes)], replicas).items()}
        offers = self.pool.offers(replicas, self.node_of, owners[len(hashes):], bs, max_cached) if with_pool else None
        d = choose(prompt_tokens, cached, self.book.loads, self.running_cost_tokens, offers, self.pool_load_cost,
                   self.pool_fetch_cost, self.rng)
        if d.fetch:  # the chosen replica's node copies these blocks from the other node first
            d.fetch.target_node, d.fetch.layouts = self.node_of.get(d.replica, ""), self.pool.layouts
        self.book.charge(request_id, d.replica, prompt_tokens, d.predicted_cached_tokens, tenant)
        return d
