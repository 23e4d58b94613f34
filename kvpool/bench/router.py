"""`kvpool bench router`: routing's own costs on the live path, without engines or Ray.

Builds the router's state (RouterCore) from synthetic engine events (encoded on the wire as vLLM sends them, decoded
and applied as the router does) and a pool view holding every session's blocks on its node, then times, for long
agent prompts (a session's next turn: its whole context plus a little new tool output):
- the ingress's hashing, from the Python list of token ids vLLM's tokenizer gives: routing hashes, pool keys and their ids,
  cold (a session's first turn) and warm (the previous turn's pool keys memoised, kvpool.hashing.PoolKeyMemo);
- the router's decision from what the ingress passes (routing hashes and pool-key ids as arrays): the prefix lookup
  over every replica, the pool's offers and the cost rule (RouterCore.route; the Ray round trip is not included:
  the live figure is `router_call` in `stages_ms` of /v1/kvpool/stats).
Events/s counts block events (a BlockStored of n blocks is n). Then churn (an engine's steady state): each step
evicts the oldest session's blocks on a replica and stores a new session's there, as events on the wire. Last, a
restarted router taking an engine's replay (the 10,000 batches vLLM's publisher buffers) through the router actor's
own `replayed`, on an asyncio loop: the longest the loop was blocked, as the longest gap between the ticks of a
coroutine ticking every millisecond (what a route arriving meanwhile waits for, at most).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from kvpool.config import KVPoolConfig
from kvpool.events import BlockRemoved, BlockStored, EventBatch, decode_message, encode_message
from kvpool.hashing import (MEMO_BLOCKS, PoolKeyMemo, block_hashes, pool_key_ids, pool_keys, request_namespace,
                            token_array)
from kvpool.routing import RouterCore

REPLAY_BATCHES = 10_000  # what vLLM's publisher buffers for a replay (ZmqEventPublisher's buffer_steps)


def _percentiles(seconds: list[float], name: str) -> dict:
    us = np.array(seconds) * 1e6
    return {f"{name}_p50_us": round(float(np.percentile(us, 50)), 1),
            f"{name}_p99_us": round(float(np.percentile(us, 99)), 1)}


def _engine_messages(contexts: list[np.ndarray], args) -> tuple[list[list[bytes]], int]:
    """Engine events: each session is prefilled on one replica, up to --blocks blocks in all. Returns the wire
    messages and the number of blocks."""
    messages, seq, n_blocks = [], {}, 0
    for s, ctx in enumerate(contexts):
        replica = f"replica-{s % args.replicas}"
        for ev in _session_events(s, ctx, args):
            seq[replica] = seq.get(replica, -1) + 1
            messages.append(encode_message(replica, seq[replica], EventBatch(ts=0.0, events=[ev])))
            n_blocks += len(ev.block_hashes)
            if n_blocks >= args.blocks:
                return messages, n_blocks
    return messages, n_blocks


def _session_events(s: int, ctx: np.ndarray, args) -> list[BlockStored]:
    """Session `s`'s prefill as its engine reports it: --blocks-per-event blocks an event, engine hashes s:i."""
    bs, events, parent = args.block_size, [], None
    for first in range(0, len(ctx) // bs, args.blocks_per_event):
        n = min(args.blocks_per_event, len(ctx) // bs - first)
        hashes = [(s << 32) | (first + i) for i in range(n)]
        events.append(BlockStored(block_hashes=hashes, parent_block_hash=parent,
                                  token_ids=ctx[first * bs:(first + n) * bs].tolist(), block_size=bs))
        parent = hashes[-1]
    return events


def _churn(core: RouterCore, args, indexed_sessions: int, sessions: int, blocks_per_session: int) -> dict:
    """Each step: the oldest indexed session's blocks leave its replica (one BlockRemoved) and a new session's
    prefill is stored there; returns block events/s over the churn, its steps' times (a step moves two sessions'
    worth of blocks: the slowest one would show a stall such as a table rebuild) and the table's rebuilds."""
    rng, steps, moved = np.random.default_rng(2), [], 0
    rebuilds = core.blocks.rebuilds
    for j in range(min(args.churn_sessions, indexed_sessions)):
        replica = f"replica-{j % args.replicas}"
        new = sessions + j
        ctx = rng.integers(0, 50_000, size=blocks_per_session * args.block_size, dtype=np.int64)
        events = [BlockRemoved(block_hashes=[(j << 32) | i for i in range(blocks_per_session)])]
        events += _session_events(new, ctx, args)
        messages = []
        for ev in events:
            core_seq = core.last_seq[replica] + 1 + len(messages)
            messages.append(encode_message(replica, core_seq, EventBatch(ts=0.0, events=[ev])))
        t = time.perf_counter()
        for frames in messages:
            topic, batch_seq, batch = decode_message(frames)
            core.ingest(topic, batch_seq, batch.events)
        core.index.flush()
        steps.append(time.perf_counter() - t)
        moved += 2 * blocks_per_session
    return {"churn_events_per_s": round(moved / sum(steps)) if steps else None,
            "churn_step_p50_ms": round(float(np.median(steps)) * 1e3, 1) if steps else None,
            "churn_worst_step_ms": round(max(steps) * 1e3, 1) if steps else None,
            "churn_rebuilds": core.blocks.rebuilds - rebuilds}


def _replay_stall(args, blocks_per_session: int) -> dict:
    """A restarted router (nothing indexed) takes one engine's replay of REPLAY_BATCHES batches (one event of
    --blocks-per-event blocks each, fresh sessions) while a coroutine ticks every millisecond: the longest gap
    between its ticks, idle and during the replay, and the replay's time from the call to its last piece."""
    from actors.router import RouterActor

    replica, bs, tick_s = "replica-replayed", args.block_size, 0.001
    rng, messages, n_blocks, s = np.random.default_rng(3), [], 0, 0
    while len(messages) < REPLAY_BATCHES:
        ctx = rng.integers(0, 50_000, size=blocks_per_session * bs, dtype=np.int64)
        for ev in _session_events(s, ctx, args)[:REPLAY_BATCHES - len(messages)]:
            messages.append(encode_message(replica, len(messages), EventBatch(ts=0.0, events=[ev])))
            n_blocks += len(ev.block_hashes)
        s += 1
    core = RouterCore(bs, KVPoolConfig().route_running_cost_tokens)
    core.set_replicas([replica])
    core.register(replica, "node-0")
    # The actor's own `replayed` on an actor with only its core: its sockets and metrics take no part in a replay.
    actor = RouterActor.__new__(RouterActor)
    actor.core = core

    async def longest_tick_gaps(done) -> tuple[float, float]:
        """The longest gap between ticks in wall time, and in this thread's CPU time: on a machine shared with
        other work, the wall gaps also hold the time the process waited for a core, the CPU gaps only the loop's
        own work."""
        longest, longest_cpu, last, last_cpu = 0.0, 0.0, time.perf_counter(), time.thread_time()
        while not done():
            await asyncio.sleep(tick_s)
            now, now_cpu = time.perf_counter(), time.thread_time()
            longest, longest_cpu = max(longest, now - last), max(longest_cpu, now_cpu - last_cpu)
            last, last_cpu = now, now_cpu
        return longest, longest_cpu

    async def replay() -> tuple[float, tuple[float, float], float]:
        idle_until = time.perf_counter() + 0.5
        idle, _ = await longest_tick_gaps(lambda: time.perf_counter() > idle_until)
        assert core.begin_replay(replica)  # what `register` does when the engine announces itself
        replayed = asyncio.Event()
        ticking = asyncio.ensure_future(longest_tick_gaps(replayed.is_set))
        await asyncio.sleep(0)  # the ticker starts before the replay does
        t = time.perf_counter()
        await actor.replayed(replica, messages)
        replay_s = time.perf_counter() - t
        replayed.set()
        return idle, await ticking, replay_s

    idle, (during, during_cpu), replay_s = asyncio.run(replay())
    # The block table grows as the replay fills it: each growth is a rebuild of the whole table, in one go.
    return {"replay_batches": len(messages), "replay_blocks": n_blocks,
            "replay_indexed_blocks": core.index.num_blocks(replica), "replay_s": round(replay_s, 2),
            "replay_tick_ms": tick_s * 1e3, "replay_idle_longest_tick_gap_ms": round(idle * 1e3, 1),
            "replay_longest_tick_gap_ms": round(during * 1e3, 1),
            "replay_longest_tick_gap_cpu_ms": round(during_cpu * 1e3, 1), "replay_table_rebuilds": core.blocks.rebuilds}


def run(args) -> dict:
    bs = args.block_size
    blocks_per_session = max(1, args.prompt_tokens // bs)
    sessions = args.sessions or max(1, args.blocks // blocks_per_session)
    indexed_sessions = min(sessions, max(1, args.blocks // blocks_per_session))
    rng = np.random.default_rng(0)
    # Each session's context; all sessions share a common system prompt, as agent sessions do.
    system = rng.integers(0, 50_000, size=min(64, blocks_per_session) * bs, dtype=np.int64)
    contexts = []
    for _ in range(sessions):
        own = rng.integers(0, 50_000, size=blocks_per_session * bs - len(system), dtype=np.int64)
        contexts.append(np.concatenate([system, own]))
    namespace = request_namespace(None)

    # The ingress (its own process: nothing else in memory but its memo). Each decision's prompt is a session's
    # next turn: the whole context plus a few lines of new tool output, as the tokenizer's list; warm, the memo
    # holds the previous turn (the session's context), as when that turn went through this ingress.
    cold, warm, prompts = [], [], []
    memo = PoolKeyMemo(MEMO_BLOCKS)
    for _ in range(args.decisions):
        ctx = contexts[int(rng.integers(0, indexed_sessions))]
        memo.keys(ctx, bs, namespace, block_hashes(ctx, bs).tolist())
        ids = np.concatenate([ctx, rng.integers(0, 50_000, size=200, dtype=np.int64)]).tolist()
        for times, turn_memo in ((cold, PoolKeyMemo(0)), (warm, memo)):
            t = time.perf_counter()
            tokens = token_array(ids)[:-1]  # what RoutedEngineClient._route does
            hashes = block_hashes(tokens, bs)
            keys = pool_key_ids(turn_memo.keys(tokens, bs, namespace, hashes.tolist()))
            times.append(time.perf_counter() - t)
        prompts.append((hashes, len(ids), keys))
    del memo

    # The router: its index from the engines' events, its pool view, then the decisions.
    messages, n_blocks = _engine_messages(contexts, args)
    replicas = [f"replica-{r}" for r in range(args.replicas)]
    cfg = KVPoolConfig()  # the router's default cost rule
    core = RouterCore(bs, cfg.route_running_cost_tokens, cfg.route_pool_load_cost, cfg.route_pool_fetch_cost)
    core.set_replicas(replicas)
    core.node_of = {r: f"node-{i % args.nodes}" for i, r in enumerate(replicas)}
    t0 = time.perf_counter()
    for frames in messages:
        replica, batch_seq, batch = decode_message(frames)
        core.ingest(replica, batch_seq, batch.events)
    core.index.flush()  # the index hashes stored blocks in batches: the last one counts too
    ingest_s = time.perf_counter() - t0
    n_messages = len(messages)
    del messages
    # The pool holds each indexed session's blocks on the node of the replica that computed it.
    core.pool.layouts = ["layout-rank0"]
    for node in range(args.nodes):
        ids = np.concatenate([pool_key_ids(pool_keys(contexts[s], bs, namespace))
                              for s in range(node, indexed_sessions, args.nodes)])
        core.pool.update(f"node-{node}", 0, {"layout-rank0": ids}, {})
    rng_load = np.random.default_rng(1)
    for i, r in enumerate(replicas):  # some queued work everywhere, so the cost rule has something to weigh
        core.book.charge(f"queued-{i}", r, int(rng_load.integers(0, 20_000)), 0)
    decisions = []
    for i, (hashes, n_tokens, keys) in enumerate(prompts):
        t = time.perf_counter()
        core.route(f"request-{i}", hashes, n_tokens, keys)
        decisions.append(time.perf_counter() - t)
        core.book.finished(f"request-{i}")
    return {
        "bench": "router", "indexed_blocks": core.index.num_blocks(), "pooled_blocks": sum(
            core.pool.blocks(f"node-{n}") for n in range(args.nodes)), "replicas": args.replicas,
        "nodes": args.nodes, "sessions": sessions, "prompt_tokens": args.prompt_tokens,
        "blocks_per_event": args.blocks_per_event,
        **_percentiles(decisions, "decision"), **_percentiles(cold, "ingress_hashing_cold"),
        **_percentiles(warm, "ingress_hashing_warm"),
        "events_per_s": round(n_blocks / ingest_s),
        "event_batches_per_s": round(n_messages / ingest_s),
        **_churn(core, args, indexed_sessions, sessions, blocks_per_session),
        **_replay_stall(args, blocks_per_session),
    }
