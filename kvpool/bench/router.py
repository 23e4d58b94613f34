"""`kvpool bench router`: the router's own costs, without engines.

Builds an index from synthetic engine events (encoded on the wire as vLLM sends them, decoded and applied as the
router does), then times routing decisions for long agent prompts: hashing the prompt's token ids, the prefix
lookup over every replica, and the cost rule. Events/s counts block events (a BlockStored of n blocks is n).
"""

from __future__ import annotations

import time

import numpy as np

from kvpool.events import BlockStored, EventBatch, decode_message, encode_message
from kvpool.hashing import block_hashes
from kvpool.index import PrefixIndex
from kvpool.routing import ReplicaLoad, choose


def run(args) -> dict:
    bs = args.block_size
    blocks_per_session = max(1, args.prompt_tokens // bs)
    sessions = args.sessions or max(1, args.blocks // blocks_per_session)
    rng = np.random.default_rng(0)
    # Each session's context; all sessions share a common system prompt, as agent sessions do.
    system = rng.integers(0, 50_000, size=min(64, blocks_per_session) * bs, dtype=np.int64)
    contexts = []
    for _ in range(sessions):
        own = rng.integers(0, 50_000, size=blocks_per_session * bs - len(system), dtype=np.int64)
        contexts.append(np.concatenate([system, own]))

    # Engine events: each session is prefilled on one replica in chunks of --blocks-per-event blocks.
    messages = []
    seq = {}
    n_blocks = 0
    for s, ctx in enumerate(contexts):
        replica = f"replica-{s % args.replicas}"
        parent = None
        for first in range(0, blocks_per_session, args.blocks_per_event):
            n = min(args.blocks_per_event, blocks_per_session - first)
            hashes = [(s << 32) | (first + i) for i in range(n)]
            ev = BlockStored(block_hashes=hashes, parent_block_hash=parent,
                             token_ids=ctx[first * bs:(first + n) * bs].tolist(), block_size=bs)
            seq[replica] = seq.get(replica, -1) + 1
            messages.append(encode_message(replica, seq[replica], EventBatch(ts=0.0, events=[ev])))
            parent = hashes[-1]
            n_blocks += n
            if n_blocks >= args.blocks:
                break
        if n_blocks >= args.blocks:
            break

    index = PrefixIndex(bs)
    t0 = time.perf_counter()
    for frames in messages:
        replica, _, batch = decode_message(frames)
        for ev in batch.events:
            index.apply(replica, ev)
    ingest_s = time.perf_counter() - t0

    replicas = [f"replica-{r}" for r in range(args.replicas)]
    loads = {r: ReplicaLoad(queued_prefill_tokens=int(rng.integers(0, 20_000)), running=int(rng.integers(0, 8)))
             for r in replicas}
    indexed_sessions = min(len(contexts), max(1, n_blocks // blocks_per_session))
    def decide(prompt) -> None:
        hashes = block_hashes(prompt[: len(prompt) - 1], bs)
        matched = index.match(hashes, replicas)
        choose(len(prompt), {r: n * bs for r, n in matched.items()}, loads, 64)

    times, times_list = [], []
    for i in range(args.decisions):
        ctx = contexts[int(rng.integers(0, indexed_sessions))]
        # The next turn: the whole context plus a few lines of new tool output.
        prompt = np.concatenate([ctx, rng.integers(0, 50_000, size=200, dtype=np.int64)])
        as_list = prompt.tolist()
        t = time.perf_counter()
        decide(prompt)  # token ids as an int64 array, as `tokenizer(..., return_tensors="np")` gives them
        t1 = time.perf_counter()
        decide(as_list)  # a Python list: adds ~12 ns per token of int unboxing
        times.append(t1 - t)
        times_list.append(time.perf_counter() - t1)
    us, us_list = np.array(times) * 1e6, np.array(times_list) * 1e6
    return {
        "bench": "router", "indexed_blocks": index.num_blocks(), "replicas": args.replicas, "sessions": sessions,
        "prompt_tokens": args.prompt_tokens, "blocks_per_event": args.blocks_per_event,
        "decision_p50_us": round(float(np.percentile(us, 50)), 1),
        "decision_p99_us": round(float(np.percentile(us, 99)), 1),
        "decision_from_list_p50_us": round(float(np.percentile(us_list, 50)), 1),
        "decision_from_list_p99_us": round(float(np.percentile(us_list, 99)), 1),
        "events_per_s": round(n_blocks / ingest_s),
        "event_batches_per_s": round(len(messages) / ingest_s),
    }
