"""The prefix index and the routing rule, on synthetic engine events (the real-engine tests are in test_routing)."""

import random
import time

import numpy as np
import pytest

from kvpool.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, decode_message, encode_message
from kvpool.block_table import BlockTable
from kvpool.hashing import (PoolKeyMemo, block_hashes, chain_seed, pool_key_ids, pool_keys, prefix_sums,
                            request_namespace)
from kvpool.index import PrefixIndex
from kvpool.routing import (Fetch, LoadBook, PoolOffer, PoolView, ReplicaLoad, RouterCore, choose, costs_header,
                            parse_costs_header)

BS = 32


def stored(tokens, first_block, n_blocks, parent=None, tag=0):
    """A BlockStored for blocks [first_block, first_block + n_blocks) of `tokens`, engine hashes made up."""
    ehash = [hash((tag, first_block + i)) for i in range(n_blocks)]
    return BlockStored(block_hashes=ehash, parent_block_hash=parent,
                       token_ids=tokens[first_block * BS:(first_block + n_blocks) * BS], block_size=BS)


def test_hash_chain_is_prefix_dependent_and_deterministic():
    a = list(range(100, 100 + 4 * BS))
    b = a[:BS] + [7] + a[BS + 1:]
    ha, hb = block_hashes(a, BS), block_hashes(b, BS)
    assert len(ha) == 4 and ha[0] == hb[0]
    assert all(ha[i] != hb[i] for i in range(1, 4))  # a change in block 1 changes every later hash
    assert np.array_equal(ha, block_hashes(a + [1, 2, 3], BS))  # partial trailing block ignored
    assert not np.array_equal(ha, block_hashes(a, BS, extra_keys=("tenant-b",)))
    swapped = a[1:2] + a[0:1] + a[2:]
    assert block_hashes(swapped, BS)[0] != ha[0]  # order inside a block matters


def test_chain_continues_across_split_events():
    toks = list(range(5 * BS))
    whole = prefix_sums(toks, BS)
    part = prefix_sums(toks[2 * BS:], BS, seed=int(whole[1]), first_pos=2)
    assert np.array_equal(whole[2:], part)


def test_memoised_pool_keys_are_the_computed_ones_and_a_next_turn_hashes_only_its_new_blocks():
    rng = random.Random(3)
    history = [rng.randrange(50_000) for _ in range(10 * BS)]
    memo = PoolKeyMemo(capacity=64)
    for salt in (None, "tenant-a"):
        turn, ns, seen_blocks = history[:4 * BS + 5], request_namespace(salt), 0
        for _ in range(3):  # each turn: the whole history so far plus new tokens
            ids = block_hashes(turn, BS, (salt,) if salt else ()).tolist()
            before = memo.misses
            assert memo.keys(turn, BS, ns, ids) == pool_keys(turn, BS, ns)
            assert memo.misses - before == len(turn) // BS - seen_blocks  # a salt starts its own chain
            seen_blocks = len(turn) // BS
            turn = history[:len(turn) + 3 * BS]
    assert pool_keys(history, BS, request_namespace("tenant-a")) != pool_keys(history, BS, request_namespace(None))
    # Bounded: entries beyond two generations of `capacity` go, and keys stay right.
    small = PoolKeyMemo(capacity=2)
    ids = block_hashes(history, BS).tolist()
    assert small.keys(history, BS, b"", ids) == pool_keys(history, BS) == small.keys(history, BS, b"", ids)
    assert len(small._new) <= 2 and len(small._old) <= 2
    with pytest.raises(ValueError):
        memo.keys(history, BS, b"", ids[:3])


def test_index_parity_with_request_hashes_across_events():
    toks = [random.Random(1).randrange(50_000) for _ in range(6 * BS + 5)]
    idx = PrefixIndex(BS)
    e1 = stored(toks, 0, 2)
    e2 = stored(toks, 2, 4, parent=e1.block_hashes[-1])
    assert idx.apply("A", e1) and idx.apply("A", e2)
    assert idx.match(block_hashes(toks, BS)) == {"A": 6}
    other = toks[: 3 * BS] + [0] * (3 * BS)
    assert idx.match(block_hashes(other, BS)) == {"A": 3}


def test_a_batch_of_events_hashed_together_indexes_what_one_at_a_time_does():
    """The index hashes stored blocks in batches (chains continuing from blocks earlier in the same batch, several
    replicas, a salted chain, evictions and clears in between); hashing each event on its own must give the same
    view."""
    rng = random.Random(5)
    batched, single = PrefixIndex(BS), PrefixIndex(BS)
    single.MAX_BATCH = 1
    sessions = [[rng.randrange(50_000) for _ in range(12 * BS)] for _ in range(6)]
    salts = [()] * 5 + [("salt",)]
    held: list[list] = [[] for _ in sessions]  # engine hashes of each session's blocks on its replica, in order
    seen = 0
    for tag in range(400):
        s = rng.randrange(6)
        replica = f"r{s % 3}"
        action = rng.random()
        if action < 0.7 and len(held[s]) < 12:
            first = len(held[s])
            ev = stored(sessions[s], first, rng.randint(1, 12 - first), parent=held[s][-1] if held[s] else None,
                        tag=tag)
            if not first and salts[s]:
                ev.extra_keys = [list(salts[s])] + [None] * (len(ev.block_hashes) - 1)
            held[s] += ev.block_hashes
        elif action < 0.97 and held[s]:  # the session's last blocks are evicted
            k = rng.randint(1, len(held[s]))
            ev = BlockRemoved(block_hashes=held[s][-k:])
            del held[s][-k:]
        else:
            ev = AllBlocksCleared()
            for i in range(s % 3, 6, 3):
                held[i] = []
        assert batched.apply(replica, ev) == single.apply(replica, ev)
        if rng.random() < 0.1 or tag == 399:
            for chain, salt in zip(sessions, salts):
                hashes = block_hashes(chain, BS, salt)
                assert batched.match(hashes) == single.match(hashes)
                seen += sum(single.match(hashes).values())
    assert batched.num_blocks() == single.num_blocks()
    assert seen > 100  # the views held something


def test_unknown_parent_is_reported_not_guessed():
    idx = PrefixIndex(BS)
    assert not idx.apply("A", stored(list(range(4 * BS)), 2, 2, parent=12345))
    assert idx.num_blocks("A") == 0


def test_eviction_and_clear_remove_blocks():
    toks = list(range(4 * BS))
    idx = PrefixIndex(BS)
    ev = stored(toks, 0, 4)
    idx.apply("A", ev)
    idx.apply("B", stored(toks, 0, 4, tag=1))
    idx.apply("A", BlockRemoved(block_hashes=ev.block_hashes[2:]))
    assert idx.match(block_hashes(toks, BS)) == {"A": 2, "B": 4}
    idx.apply("B", AllBlocksCleared())
    assert idx.match(block_hashes(toks, BS)) == {"A": 2, "B": 0}
    idx.remove_replica("A")
    assert idx.replicas() == ["B"] and idx.num_blocks() == 0
    # Offload-tier events do not count as device cache.
    idx.apply("B", BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=toks[:BS], block_size=BS,
                               medium="CPU"))
    assert idx.num_blocks("B") == 0


def test_a_sliding_window_groups_events_never_hide_the_full_attention_blocks():
    """With vLLM's hybrid memory allocator an engine reports each KV cache group's blocks, under the same block
    hashes; the window group's blocks leave as the window moves on while the full-attention group keeps the prefix.
    The index follows the full-attention group (a prefix hit needs all of its blocks), so the window's removals
    take nothing from it; a model with one group (whatever its kind) is followed as before."""
    toks = list(range(6 * BS))
    idx = PrefixIndex(BS)
    full = stored(toks, 0, 6)
    full.group_idx, full.kv_cache_spec_kind = 1, "full_attention"
    window = stored(toks, 0, 6)
    window.group_idx, window.kv_cache_spec_kind = 0, "sliding_window"
    idx.apply("A", window)
    idx.apply("A", full)
    idx.apply("A", BlockRemoved(block_hashes=window.block_hashes[:4], group_idx=0))
    assert idx.match(block_hashes(toks, BS)) == {"A": 6}
    idx.apply("A", BlockRemoved(block_hashes=full.block_hashes[3:], group_idx=1))
    assert idx.match(block_hashes(toks, BS)) == {"A": 3}
    one = stored(toks, 0, 6, tag=2)
    one.group_idx, one.kv_cache_spec_kind = 0, "sliding_window"  # every layer sliding (Mistral v0.1): one group
    idx.apply("B", one)
    assert idx.match(block_hashes(toks, BS), ["B"]) == {"B": 6}


def test_block_size_mismatch_is_loud():
    with pytest.raises(ValueError):
        PrefixIndex(64).apply("A", stored(list(range(BS)), 0, 1))


def test_salted_chains_do_not_match_unsalted_requests():
    toks = list(range(2 * BS))
    idx = PrefixIndex(BS)
    idx.apply("A", BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=toks, block_size=BS,
                               extra_keys=[["salt-a"], None]))
    assert idx.match(block_hashes(toks, BS)) == {"A": 0}
    assert idx.match(block_hashes(toks, BS, extra_keys=("salt-a",))) == {"A": 2}
    assert chain_seed(("salt-a",)) != 0


def test_wire_round_trip_matches_vllm_encoding():
    """Token ids of every msgpack width (vLLM's encoder writes each int as short as it fits), in several events of
    one batch, decode into arrays of the ids sent."""
    import msgspec
    from vllm.distributed.kv_events import BlockRemoved as VBlockRemoved, BlockStored as VBlockStored, KVEventBatch

    widths = [0, 1, 127, 128, 200, 255, 256, 4096, 65535, 65536, 151_000, 2**32 - 1]
    ids = [[widths[(i * 7 + j) % len(widths)] for i in range(2 * BS)] for j in range(3)]
    v = KVEventBatch(ts=1.5, events=[
        VBlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=ids[0], block_size=BS, lora_id=None,
                     medium="GPU", lora_name=None, group_idx=1, kv_cache_spec_kind="full_attention"),
        VBlockRemoved(block_hashes=[5], medium="GPU", group_idx=1),
        VBlockStored(block_hashes=[13, 14], parent_block_hash=12, token_ids=ids[1], block_size=BS, lora_id=None,
                     medium="GPU", lora_name=None),
        VBlockStored(block_hashes=[15], parent_block_hash=14, token_ids=ids[2][:BS], block_size=BS, lora_id=None,
                     medium="GPU", lora_name=None)])
    topic, seq, batch = decode_message([b"replica-1", (7).to_bytes(8, "big"), msgspec.msgpack.encode(v)])
    assert (topic, seq) == ("replica-1", 7) and batch.events[0].block_hashes == [11, 12]
    assert isinstance(batch.events[1], BlockRemoved) and batch.events[1].block_hashes == [5]
    assert (batch.events[0].group_idx, batch.events[0].kv_cache_spec_kind, batch.events[1].group_idx) == \
        (1, "full_attention", 1)
    stored = [ev for ev in batch.events if isinstance(ev, BlockStored)]
    assert [ev.token_ids.dtype for ev in stored] == [np.uint64] * 3
    assert [ev.token_ids.tolist() for ev in stored] == [ids[0], ids[1], ids[2][:BS]]
    again = decode_message(encode_message("r", 3, EventBatch(ts=1.0, events=batch.events)))
    assert [ev.token_ids.tolist() for ev in again[2].events if isinstance(ev, BlockStored)] == \
        [ids[0], ids[1], ids[2][:BS]]


def test_token_ids_the_fast_decoder_does_not_take_are_decoded_or_refused():
    """Ids beyond 32 bits go the slow way to the same values; an id that is no integer makes the message
    undecodable (the router drops it: the replica's next batch is a sequence gap, and its view resets)."""
    import msgspec

    from kvpool.events import decode_uint_arrays

    assert [a.tolist() for a in decode_uint_arrays([msgspec.msgpack.encode([1, 2**40, 3]),
                                                    msgspec.msgpack.encode([])])] == [[1, 2**40, 3], []]
    for bad in ([1, "x"], [1, 2.5], [1, 2**64 - 1], {"a": 1}):
        with pytest.raises(ValueError):
            decode_uint_arrays([msgspec.msgpack.encode(bad)])


def test_the_event_relay_follows_the_router_and_the_replay_returns_every_batch(tmp_path):
    """vLLM's own publisher, bound on ipc paths as an engine's is; the relay carries its batches to a router's
    address under that router's topic, moves when told, and the replay socket gives back every batch."""
    import asyncio

    import zmq
    from vllm.distributed.kv_events import BlockStored as VBlockStored, KVEventBatch, ZmqEventPublisher

    from actors.engine import EventRelay, read_replay

    source, replay = f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/replay"
    publisher = ZmqEventPublisher(0, endpoint=source, replay_endpoint=replay)
    relay = EventRelay(source, "r1")
    ctx = zmq.Context.instance()
    routers = []
    for prefix in ("secret-a/", "secret-b/"):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        routers.append((sub, f"tcp://127.0.0.1:{sub.bind_to_random_port('tcp://127.0.0.1')}", prefix))
    published = 0

    def publish_until_heard(sub) -> list[bytes]:
        """Publish a batch at a time until `sub` hears one (a new connection drops what is sent before it is up)."""
        nonlocal published
        for _ in range(100):
            publisher.publish(KVEventBatch(ts=0.0, events=[VBlockStored(
                block_hashes=[published], parent_block_hash=None, token_ids=list(range(BS)), block_size=BS,
                lora_id=None, medium="GPU", lora_name=None)]))
            published += 1
            if sub.poll(100):
                return sub.recv_multipart()
        raise AssertionError("the relay never delivered")

    try:
        (sub_a, address_a, prefix_a), (sub_b, address_b, prefix_b) = routers
        relay.retarget(address_a, prefix_a)
        topic, seq, batch = decode_message(publish_until_heard(sub_a))
        assert topic == "secret-a/r1" and batch.events[0].block_hashes == [seq]
        relay.retarget(address_b, prefix_b)  # the router moved, with a new secret
        topic, moved_at, _ = decode_message(publish_until_heard(sub_b))
        assert topic == "secret-b/r1"
        while sub_a.poll(100):  # the old address hears nothing the relay sent after it moved
            assert decode_message(sub_a.recv_multipart())[1] < moved_at
        replayed = [decode_message(m) for m in asyncio.run(read_replay(replay))]
        assert [seq for _, seq, _ in replayed] == list(range(published))
        # What the engine tells the router it has published (the relay's thread sees each batch).
        deadline = time.monotonic() + 10
        while relay.last_seq != published - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.last_seq == published - 1
        assert all(b.events[0].block_hashes == [seq] for _, seq, b in replayed)
    finally:
        relay.close()
        publisher.shutdown()
        for sub, _, _ in routers:
            sub.close(linger=0)


# --- the routing rule ------------------------------------------------------------------------------------------


def test_prefers_cached_replica():
    d = choose(10_000, {"A": 9_000, "B": 0}, {}, 64)
    assert d.replica == "A" and d.reason == "prefix" and d.predicted_cached_tokens == 9_000


def test_session_stays_unless_overloaded():
    loads = {"A": ReplicaLoad(queued_prefill_tokens=5_000, running=3)}
    assert choose(50_000, {"A": 48_000, "B": 0}, loads, 64).replica == "A"
    loads["A"].queued_prefill_tokens = 60_000
    d = choose(50_000, {"A": 48_000, "B": 0}, loads, 64)
    assert d.replica == "B" and d.reason == "load"
    # Each candidate's cost, as the response header carries it: uncached tokens + queue + running requests' price.
    assert d.costs == {"A": 2_000 + 60_000 + 3 * 64, "B": 50_000}
    assert costs_header(d.costs) == "A=62192, B=50000" and parse_costs_header(costs_header(d.costs)) == d.costs


def test_hot_system_prompt_does_not_pile_onto_one_replica():
    """Every session starts with the same 2K-token system prompt; sessions must spread over both replicas."""
    loads = {"A": ReplicaLoad(), "B": ReplicaLoad()}
    cached = {"A": 0, "B": 0}
    placed = []
    rng = random.Random(0)
    for _ in range(16):
        d = choose(3_000, dict(cached), loads, 64, rng=rng)
        placed.append(d.replica)
        loads[d.replica].queued_prefill_tokens += 3_000 - d.predicted_cached_tokens
        loads[d.replica].running += 1
        cached[d.replica] = 2_048  # the system prompt is now cached there
    assert placed.count("A") >= 6 and placed.count("B") >= 6


def test_equal_replicas_share_load():
    rng = random.Random(0)
    picks = [choose(100, {"A": 0, "B": 0, "C": 0}, {}, 64, rng=rng).replica for _ in range(300)]
    assert all(picks.count(r) > 60 for r in "ABC")
    d = choose(100, {"A": 0, "B": 0}, {"A": ReplicaLoad(running=2), "B": ReplicaLoad(running=1)}, 0, rng=rng)
    assert d.replica == "B" and d.reason == "balance"


def test_pool_makes_any_replica_nearly_as_good():
    # A holds 8K of the prompt locally but has a queue; the pool holds 8K too, so B loads it and wins.
    loads = {"A": ReplicaLoad(queued_prefill_tokens=3_000)}
    offer = PoolOffer(local_tokens=8_000)
    d = choose(10_000, {"A": 8_000, "B": 0}, loads, 64, {"A": offer, "B": offer}, pool_load_cost=0.05)
    assert d.replica == "B" and d.reason == "pool" and d.predicted_cached_tokens == 8_000 and d.fetch is None
    # Without the pool B would have to compute all 10K: A wins despite its queue.
    assert choose(10_000, {"A": 8_000, "B": 0}, loads, 64).replica == "A"
    # The pool extends a replica's own shorter hit.
    d = choose(10_000, {"A": 2_000}, {}, 64, {"A": PoolOffer(local_tokens=6_000)}, pool_load_cost=0.05)
    assert d.predicted_cached_tokens == 6_000 and d.costs["A"] == 4_000 + 200


def test_pool_on_another_node_is_fetched_first():
    # Only node n1's pool holds the prefix; B (on n2) must fetch it, A (on n1) loads it: A is cheaper.
    pool = {"A": PoolOffer(local_tokens=8_000), "B": PoolOffer(remote_tokens=8_000, remote_node="n1")}
    d = choose(10_000, {"A": 0, "B": 0}, {}, 64, pool, pool_load_cost=0.05, pool_fetch_cost=0.1)
    assert d.replica == "A" and d.fetch is None and d.costs["B"] - d.costs["A"] == 800
    # A is busy: B wins, and is told to fetch the part its own node lacks.
    pool["B"] = PoolOffer(local_tokens=1_000, remote_tokens=8_000, remote_node="n1")
    d = choose(10_000, {"A": 0, "B": 500}, {"A": ReplicaLoad(queued_prefill_tokens=5_000)}, 64, pool,
               pool_load_cost=0.05, pool_fetch_cost=0.1)
    assert d.replica == "B" and d.reason == "pool" and d.fetch == Fetch("n1", 1_000, 8_000)
    assert d.predicted_cached_tokens == 8_000 and d.costs["B"] == 2_000 + 375 + 700


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        choose(10, {}, {}, 64)


# --- load accounting -------------------------------------------------------------------------------------------


def test_load_moves_to_the_replica_that_serves():
    """Serve may send a request elsewhere than the router chose (the chosen replica full or its probe late): the
    charge follows the first chunk's replica, so queues stay true on both."""
    book = LoadBook()
    book.charge("r1", "A", prompt_tokens=1_000, predicted_cached_tokens=600)
    book.charge("r2", "A", prompt_tokens=500, predicted_cached_tokens=0)
    assert book.loads["A"] == ReplicaLoad(queued_prefill_tokens=900, running=2)
    assert book.started("r1", served_by="B") == {"A", "B"}
    assert book.loads["A"] == ReplicaLoad(queued_prefill_tokens=500, running=1)
    assert book.loads["B"] == ReplicaLoad(queued_prefill_tokens=0, running=1)
    assert book.finished("r1").replica == "B" and book.loads["B"].running == 0
    assert book.finished("r2").replica == "A" and book.loads["A"] == ReplicaLoad()
    assert book.finished("r2") is None and not book.inflight


def test_a_dropped_replica_leaves_no_negative_load():
    book = LoadBook()
    book.charge("r1", "A", prompt_tokens=100, predicted_cached_tokens=0)
    book.drop_replica("A")
    book.finished("r1")
    assert "A" not in book.loads and not book.inflight


def test_pool_view_applies_reports_in_sequence_and_counts_blocks_every_rank_holds():
    from actors.pool import report_ids  # the shard's side of the report: (layout, pool key) -> layout: id array

    view = PoolView()
    view.layouts = ["rank0", "rank1"]
    ka, kb, kc = pool_keys(list(range(3 * BS)), BS)
    a, b, c = pool_key_ids([ka, kb, kc]).tolist()
    assert view.update("n1", 0, report_ids([("rank0", ka), ("rank0", kb), ("rank1", ka)]), {})
    assert view.leading_hits("n1", [a, b]) == 1  # b is whole only once rank 1 holds it too
    assert not view.update("n1", 2, report_ids([("rank1", kb)]), {})  # a report was lost: refused, the shard sends all
    assert view.leading_hits("n1", [a, b]) == 1
    assert view.update("n1", 1, report_ids([("rank1", kb)]), {})
    assert view.leading_hits("n1", [a, b, c]) == 2 and view.blocks("n1") == 2
    assert view.update("n1", 2, {}, report_ids([("rank0", ka)]))
    assert view.leading_hits("n1", [a, b]) == 0  # a chain is usable from its first block only
    view.layouts = ["rank0"]
    assert view.leading_hits("n1", [b]) == 1
    view.layouts = ["rank0", "rank2"]  # a layout no shard has reported yet: nothing is whole
    assert view.leading_hits("n1", [b]) == 0 and view.blocks("n1") == 0


def test_block_table_matches_a_dict_of_owner_sets_under_random_changes():
    """BlockTable (the index's and the pool view's store) against the obvious model: random ids, more than 64 owner
    bits, adds, discards, clears, growth and rebuilds; every id's owners and every bit's leading run agree."""
    rng = random.Random(1)
    table, model = BlockTable(slots=1024), {}
    for step in range(2000):
        bit = rng.randrange(70)
        known = list(model)
        ids = [rng.randrange(1 << 64) | 1 for _ in range(rng.randrange(1, 40))] if rng.random() < 0.5 or not known \
            else [rng.choice(known) for _ in range(5)]
        action = rng.random()
        if action < 0.6:
            table.add(ids, bit)
            for i in ids:
                model[i] = model.get(i, 0) | 1 << bit
        elif action < 0.95:
            table.discard(ids, bit)
            for i in ids:
                if i in model:
                    model[i] &= ~(1 << bit)
        else:
            table.clear_bit(bit)
            for i in model:
                model[i] &= ~(1 << bit)
        query = known[:300] + [rng.randrange(1 << 64) | 1 for _ in range(10)]
        rows = table.owners(query)
        got = [sum(int(x) << 64 * w for w, x in enumerate(row)) for row in rows]
        assert got == [model.get(i, 0) for i in query], step
    assert table.slots > 1024  # it grew
    runs = BlockTable.leading_runs(rows)
    for bit in range(70):
        expected = next((n for n, v in enumerate(got) if not v >> bit & 1), len(got))
        assert runs.get(bit, 0) == expected, bit
    assert table.count([]) == sum(1 for v in model.values() if v)
    assert table.count([3, 5]) == sum(1 for v in model.values() if v >> 3 & 1 and v >> 5 & 1)


def test_block_table_churn_sweeps_tombstones_instead_of_rebuilding():
    """Blocks stored and evicted at the same rate (an engine's steady state) leave tombstones; they are swept as
    they come, so the table never stops for a whole rebuild and stays exact."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 2**63, size=400_000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    table = BlockTable()
    table.add(ids[:50_000], 0)
    slots, rebuilds = table.slots, table.rebuilds
    for start in range(0, 350_000, 1_000):  # each step: the oldest 1,000 blocks leave, 1,000 new ones arrive
        table.discard(ids[start:start + 1_000], 0)
        table.add(ids[start + 50_000:start + 51_000], 0)
    assert (table.slots, table.rebuilds) == (slots, rebuilds)
    assert table.owners(ids[350_000:]).all() and not table.owners(ids[:350_000]).any()
    assert table.count([]) == 50_000


def test_router_core_prices_the_pool_on_the_replicas_node_and_charges_its_choice():
    core = RouterCore(block_size=4, running_cost_tokens=0, pool_load_cost=0.05, pool_fetch_cost=0.1,
                      rng=random.Random(0))
    core.set_replicas(["a", "b"])
    core.node_of.update(a="n1", b="n2")
    core.pool.layouts = ["l"]
    keys = pool_key_ids(pool_keys(list(range(17)), 4)).tolist()
    core.pool.update("n2", 0, {"l": keys}, {})
    d = core.route("r1", block_hashes(list(range(17)), 4), 17, keys)
    # b's node holds the 16-token prefix: it loads it, where a would have to copy it from n2 first.
    assert (d.replica, d.reason, d.predicted_cached_tokens, d.fetch) == ("b", "pool", 16, None)
    assert core.book.loads["b"].running == 1 and core.book.loads["b"].queued_prefill_tokens == 1
    core.book.finished("r1")
    assert core.set_replicas(["a"]) == ["b"] and core.live == ["a"]
    d = core.route("r2", block_hashes(list(range(17)), 4), 17, keys)
    assert d.replica == "a" and d.fetch.source_node == "n2" and d.fetch.target_node == "n1"


def test_a_dead_replica_stays_dropped_when_a_late_replica_list_still_names_it():
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.set_replicas(["a", "b", "c"])
    for r, node in dict(a="n1", b="n2", c="n2").items():
        assert core.register(r, node)
    core.died("a")  # the router's watchdog saw its actor die
    # Serve's lists lag a death by seconds: one sent before Serve noticed still names "a"; so does a late
    # registration the replica sent before it died.
    assert core.set_replicas(["a", "b", "c"]) == [] and core.live == ["b", "c"]
    assert not core.register("a", "n1") and "a" not in core.node_of
    tokens = list(range(5000, 5000 + 2 * BS))
    assert core.ingest("a", 0, [stored(tokens, 0, 2)]) == "unknown" and "a" not in core.index.replicas()
    # A replica that only one list left out (lists from two ingresses crossing) is not dead: it comes back.
    assert core.set_replicas(["b"]) == ["c"]
    assert core.register("c", "n2") and core.set_replicas(["b", "c"]) == [] and core.live == ["b", "c"]


def test_event_batches_from_strangers_bad_events_and_gaps_never_leave_wrong_hits():
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.node_of["a"] = "n1"  # registered; Serve has not listed it yet
    tokens = list(range(1000, 1000 + 4 * BS))
    hashes = block_hashes(tokens, BS)
    # A topic that is no replica of the app creates nothing.
    assert core.ingest("stranger", 0, [stored(tokens, 0, 4)]) == "unknown"
    assert "stranger" not in core.index.replicas() and core.foreign_batches == 1
    assert core.ingest("a", 0, [stored(tokens, 0, 2, tag=1)]) is None
    assert core.index.match(hashes, ["a"]) == {"a": 2}
    # An event the index cannot apply (another block size) resets that replica's view and drops the rest of the
    # batch; the next batch applies as usual.
    bad = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=tokens[:16], block_size=16)
    assert core.ingest("a", 1, [bad, stored(tokens, 0, 4, tag=2)]) == "malformed"
    assert core.index.match(hashes, ["a"]) == {"a": 0}
    assert core.ingest("a", 2, [stored(tokens, 0, 4, tag=3)]) is None
    assert core.index.match(hashes, ["a"]) == {"a": 4}
    # A lost batch (3) may have held removals: the view resets before batch 4 applies.
    assert core.ingest("a", 4, [stored(tokens, 0, 1, tag=4)]) == "gap"
    assert core.index.match(hashes, ["a"]) == {"a": 1}
    assert core.event_counts["a"] == {"applied": 3, "malformed": 1, "resets": 1}
    # Serve's list without "a" does not drop a replica that registered and was never listed...
    assert core.set_replicas(["b"]) == [] and core.node_of == {"a": "n1"}
    # ...but once listed, leaving the list drops it, and its later events are a stranger's.
    core.set_replicas(["a", "b"])
    assert core.set_replicas(["b"]) == ["a"] and "a" not in core.node_of
    assert core.ingest("a", 5, [stored(tokens, 0, 4, tag=5)]) == "unknown"
    assert "a" not in core.index.replicas()


def replay_whole(core, replica, batches):
    """A replay arrives and applies at once (the router actor applies it piece by piece)."""
    assert core.end_replay(replica, batches)
    assert core.apply_replay(replica)


def test_a_router_that_joined_mid_stream_rebuilds_from_the_engines_replay():
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.node_of["a"] = "n1"
    tokens = list(range(3000, 3000 + 5 * BS))
    hashes = block_hashes(tokens, BS)
    head, middle, tail = stored(tokens, 0, 2), stored(tokens, 2, 2, parent=hash((0, 1))), \
        stored(tokens, 4, 1, parent=hash((0, 3)))
    # The router (re)started after batch 3 went out: batch 4 continues a chain it never saw, so nothing is named;
    # it also starts a chain of its own, which is.
    own = list(range(7000, 7000 + BS))
    assert core.ingest("a", 4, [stored(own, 0, 1, tag=7), middle]) is None
    assert core.index.match(hashes, ["a"]) == {"a": 0} and core.index.match(block_hashes(own, BS), ["a"]) == {"a": 1}
    # Awaiting a replay empties the view: the batches that wait for it may remove blocks.
    assert not core.view_complete("a")
    assert core.begin_replay("a", now=0) and not core.begin_replay("a", now=0)  # one at a time
    assert core.index.match(block_hashes(own, BS), ["a"]) == {"a": 0}
    # A batch that arrives while the replay is on its way waits for it.
    assert core.ingest("a", 5, [tail]) == "deferred" and core.index.match(hashes, ["a"]) == {"a": 0}
    # Batch 1 of the replay was lost: batch 0 (another prompt) may have been removed in it, so only the run
    # 2..4 rebuilds the view; then batch 5 applies, once (the replay already held batch 4).
    other = list(range(9000, 9000 + BS))
    replay_whole(core, "a", [(0, [stored(other, 0, 1, tag=9)]), (2, [head]), (3, []), (4, [stored(own, 0, 1, tag=7),
                                                                                         middle])])
    assert core.index.match(hashes, ["a"]) == {"a": 5} and core.index.match(block_hashes(own, BS), ["a"]) == {"a": 1}
    assert core.index.match(block_hashes(other, BS), ["a"]) == {"a": 0}
    assert core.event_counts["a"]["replays"] == 1 and not core.begin_replay("a", now=1)  # the view is whole
    assert core.view_complete("a")
    # A later gap makes it partial again; a replay that fails lets the waiting batches apply as they are.
    assert core.ingest("a", 7, []) == "gap" and core.begin_replay("a", now=2)
    assert core.ingest("a", 8, [head]) == "deferred"
    replay_whole(core, "a", None)
    assert core.index.match(hashes, ["a"]) == {"a": 2} and core.begin_replay("a", now=3)
    assert core.index.match(hashes, ["a"]) == {"a": 0}
    # A replay that never comes (its engine died) is given up, and its waiting batches apply.
    assert core.ingest("a", 9, [head]) == "deferred" and core.ingest("a", 10, [middle]) == "deferred"
    assert core.expire_replays(60, now=30) == [] and core.expire_replays(60, now=64) == ["a"]
    assert core.apply_replay("a") and core.index.match(hashes, ["a"]) == {"a": 4}
    # A replica whose first batch the router hears is the engine's first needs no replay.
    core.node_of["b"] = "n1"
    assert core.ingest("b", 0, [head]) is None and not core.begin_replay("b") and core.view_complete("b")


def test_batches_lost_before_the_engine_went_quiet_are_found_by_the_next_registration():
    """No later batch shows the gap when the engine goes idle after the loss: the engine's registration says what it
    had published by its previous one, and a view short of that is rebuilt from the replay."""
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.node_of["a"] = "n1"
    tokens = list(range(4000, 4000 + 4 * BS))
    head, tail = stored(tokens, 0, 2), stored(tokens, 2, 2, parent=hash((0, 1)))
    assert core.ingest("a", 0, [head]) is None and not core.begin_replay("a", published_before=0)
    # Batch 1 was published but never arrived, and the engine has been quiet since.
    assert core.begin_replay("a", now=0, published_before=1)
    assert core.event_counts["a"]["lost_tails"] == 1
    replay_whole(core, "a", [(0, [head]), (1, [tail])])
    assert core.index.match(block_hashes(tokens, BS), ["a"]) == {"a": 4}
    assert not core.begin_replay("a", now=1, published_before=1)


def engine_batches(n_batches: int, seed: int = 0) -> tuple[list[tuple[int, list]], list[list[int]]]:
    """An engine's KV event batches 0..n_batches-1, as its replay buffer holds them: prompts of 6 blocks stored in
    two chained events (the second one now and then in the next batch), some evicted whole or in part, now and then
    the whole cache cleared; and every prompt's token ids, to look the view up by."""
    rng = random.Random(seed)
    prompts, batches, tail = [], [], []
    for seq in range(n_batches):
        events, tail = tail, []
        roll = rng.random()
        if roll < 0.6 or not prompts:
            tag = len(prompts)
            tokens = [rng.randrange(50_000) for _ in range(6 * BS)]
            prompts.append(tokens)
            events.append(stored(tokens, 0, 3, tag=tag))
            second = stored(tokens, 3, 3, parent=hash((tag, 2)), tag=tag)
            (events if rng.random() < 0.5 else tail).append(second)
        elif roll < 0.97:
            tag = rng.randrange(len(prompts))
            events.append(BlockRemoved(block_hashes=[hash((tag, i)) for i in range(rng.randrange(6), 6)]))
        else:
            events.append(AllBlocksCleared())
        batches.append((seq, events))
    return batches, prompts


def view(core, replica, prompts) -> tuple:
    """What the router knows of `replica`: each prompt's cached leading blocks, its blocks, where its batches
    stand."""
    return ([core.index.match(block_hashes(p, BS), [replica])[replica] for p in prompts],
            core.index.num_blocks(replica), core.last_seq.get(replica), replica in core.complete)


@pytest.mark.parametrize("max_events", [1, 5, 16, 64])
def test_a_replay_applied_piece_by_piece_gives_the_view_applied_whole(max_events):
    batches, prompts = engine_batches(120)
    # Batch 3 was lost from the replay (only 4.. rebuilds the view), and batch 50 holds an event of another block
    # size (the view resets there and the rest of that batch is dropped).
    replay = batches[:3] + batches[4:]
    bad = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=list(range(16)), block_size=16)
    replay[49] = (replay[49][0], [bad] + replay[49][1])
    assert replay[49][0] == 50
    cores = []
    for pieces_of in (None, max_events):
        core = RouterCore(block_size=BS, running_cost_tokens=0)
        core.node_of["a"] = "n1"
        assert core.begin_replay("a") and core.end_replay("a", replay)
        pieces, applied = 0, 0
        while True:
            pieces += 1
            done = core.apply_replay("a", pieces_of)
            # A piece applies up to max_events block events, and at least one event.
            events = core.event_counts["a"]["applied"] + core.event_counts["a"]["malformed"] - applied
            assert 1 <= events <= (pieces_of or 10 ** 9)
            applied += events
            if done:
                break
        cores.append((core, pieces))
    (whole, one), (in_pieces, many) = cores
    assert one == 1 and many > 1 and "a" not in in_pieces.replaying
    assert view(in_pieces, "a", prompts) == view(whole, "a", prompts)
    assert in_pieces.event_counts["a"] == whole.event_counts["a"]
    assert whole.event_counts["a"]["malformed"] == 1 and "resets" not in whole.event_counts["a"]
    assert sum(view(whole, "a", prompts)[0]) > 0  # (some prompts are cached: the views compared are not empty)


def test_live_batches_that_arrive_between_the_pieces_of_a_replay_apply_after_it_none_lost():
    batches, prompts = engine_batches(60, seed=1)
    # What the router would know had it heard every batch as it came.
    reference = RouterCore(block_size=BS, running_cost_tokens=0)
    reference.node_of["a"] = "n1"
    for seq, events in batches:
        assert reference.ingest("a", seq, events) is None
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.node_of["a"] = "n1"
    for seq, events in batches[:10]:
        core.ingest("a", seq, events)
    assert core.ingest("a", 12, batches[12][1]) == "gap"  # batches 10 and 11 were lost
    assert core.begin_replay("a")
    assert core.ingest("a", 13, batches[13][1]) == "deferred"  # while the replay is on its way
    # The engine read its buffer when it had published batch 39; then the replay's pieces apply, and live batches
    # keep coming between them: 39 once more (late), then the engine's next ones, removals and stores.
    assert core.end_replay("a", batches[:40])
    live = iter(batches[39:])
    pieces = 0
    while not core.apply_replay("a", 8):
        pieces += 1
        assert not core.begin_replay("a")  # a registration in between asks for no second replay
        assert not core.view_complete("a")  # until the batches that waited for the replay are applied too
        nxt = next(live, None)
        if nxt is not None:
            assert core.ingest("a", *nxt) == "deferred"
    assert pieces > len(batches) - 39 and next(live, None) is None
    assert view(core, "a", prompts) == view(reference, "a", prompts)
    assert core.event_counts["a"]["resets"] == 1  # the gap at 12 only: no batch lost, none applied twice
    assert core.ingest("a", 60, []) is None and not core.begin_replay("a")


def test_no_route_counts_on_a_view_whose_replay_is_half_applied():
    """The replay rebuilds the view from the oldest buffered batch: between pieces it still holds blocks that a
    later batch removed. Routes must not count them (found by review: a phantom hit of 8 blocks)."""
    tokens = list(range(100, 100 + 8 * BS))
    batches = [(0, [stored(tokens, 0, 8)]), (1, [BlockRemoved(block_hashes=[hash((0, i)) for i in range(8)])])]
    batches += [(seq, [stored(list(range(seq * 1000, seq * 1000 + BS)), 0, 1, tag=seq)]) for seq in range(2, 40)]
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.set_replicas(["a"])
    core.register("a", "n1")
    assert core.begin_replay("a") and core.end_replay("a", batches)
    assert not core.apply_replay("a", 8)  # batch 0 applied: the 8 blocks are in the view, their removal not yet
    assert core.index.match(block_hashes(tokens, BS), ["a"])["a"] == 8
    assert core.route("r1", block_hashes(tokens, BS), len(tokens) + 1).predicted_cached_tokens == 0
    while not core.apply_replay("a", 8):
        pass
    assert core.route("r2", block_hashes(tokens, BS), len(tokens) + 1).predicted_cached_tokens == 0
    assert "a" in core.complete and core.index.num_blocks("a") == 38


def test_a_replica_dropped_while_its_replay_applies_keeps_no_blocks():
    batches, prompts = engine_batches(60, seed=2)
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.set_replicas(["a", "b"])
    core.register("a", "n1")
    assert core.begin_replay("a") and core.end_replay("a", batches)
    assert not core.apply_replay("a", 16) and core.index.num_blocks("a") > 0
    assert core.set_replicas(["b"]) == ["a"]  # Serve's list dropped it mid-replay
    assert core.apply_replay("a", 16)  # what applied the replay stops there
    assert core.index.num_blocks("a") == 0 and "a" not in core.index.replicas()
    # It comes back and a replay is awaited again: the first one's applier, one piece late, applies nothing.
    assert core.register("a", "n1") and core.begin_replay("a")
    assert core.apply_replay("a", 16) and core.index.num_blocks("a") == 0
    assert core.end_replay("a", batches) and not core.apply_replay("a", 16) and core.index.num_blocks("a") > 0
    core.died("a")  # its actor died mid-replay: dropped for good
    assert core.apply_replay("a", 16) and "a" not in core.index.replicas()
    assert core.ingest("a", 60, batches[0][1]) == "unknown" and "a" not in core.index.replicas()
    assert not core.end_replay("a", batches) and core.apply_replay("a")


def test_a_replay_that_stops_or_cannot_be_decoded_is_given_up_and_what_waited_for_it_applies():
    batches, prompts = engine_batches(40, seed=3)
    core = RouterCore(block_size=BS, running_cost_tokens=0)
    core.node_of["a"] = "n1"
    # A replay that keeps applying pieces is not given up, however long ago it was asked for...
    assert core.begin_replay("a", now=0)
    assert core.ingest("a", 38, batches[38][1]) == "deferred"
    assert core.end_replay("a", batches[:38], now=59) and not core.apply_replay("a", 16, now=100)
    assert core.expire_replays(60, now=150) == []
    # ...one whose applier stopped half way is: its view restarts from the batches that waited.
    assert core.expire_replays(60, now=161) == ["a"] and core.expire_replays(60, now=162) == []
    assert core.ingest("a", 39, batches[39][1]) == "deferred"
    assert core.apply_replay("a") and "a" not in core.replaying and core.last_seq["a"] == 39
    partial = RouterCore(block_size=BS, running_cost_tokens=0)
    partial.node_of["a"] = "n1"
    for seq, events in batches[38:]:
        partial.ingest("a", seq, events)
    assert view(core, "a", prompts) == view(partial, "a", prompts) and core.begin_replay("a", now=170)
    # A replay with a batch that cannot be decoded: given up there, as a failed one.

    def decode(events):
        if events == "garbage":
            raise ValueError("not msgpack")
        return events

    assert core.ingest("a", 40, []) == "deferred"
    assert core.end_replay("a", batches[:20] + [(20, "garbage")] + batches[21:40], decode=decode)
    assert core.apply_replay("a") and core.last_seq["a"] == 40 and "a" not in core.complete
    assert core.index.num_blocks("a") == 0 and core.begin_replay("a", now=180)
    assert core.end_replay("a", batches[:40], decode=decode) and core.apply_replay("a")
    whole = RouterCore(block_size=BS, running_cost_tokens=0)
    whole.node_of["a"] = "n1"
    for seq, events in batches:
        whole.ingest("a", seq, events)
    assert view(core, "a", prompts) == view(whole, "a", prompts)


def test_the_router_actor_answers_routes_between_the_pieces_of_a_long_replay():
    """Through the router actor itself, on an event loop of the test's (no Ray cluster): a route sent while an
    engine's replay is being decoded and applied is answered before the replay ends, and the replay indexes every
    block."""
    import asyncio
    import socket

    from actors.router import RouterActor
    from kvpool.config import KVPoolConfig

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    actor = RouterActor(KVPoolConfig(block_size=BS, router_port=port), "secret")
    n_blocks = 4096  # a replay of many pieces (actors.router.REPLAY_PIECE_EVENTS)
    tokens = list(range(10_000, 10_000 + n_blocks * BS))
    messages = [encode_message("a", seq, EventBatch(ts=0.0, events=[stored(
        tokens, first, 16, parent=hash((0, first - 1)) if first else None)]))
        for seq, first in enumerate(range(0, n_blocks, 16))]
    hashes = block_hashes(tokens, BS)

    async def replay_and_route():
        await actor.set_replicas(["a"])
        actor.core.register("a", "n1")
        assert actor.core.begin_replay("a")  # what `register` answers the engine: send your replay
        replaying = asyncio.ensure_future(actor.replayed("a", messages))
        await asyncio.sleep(0)  # the replay's first piece
        routed = await asyncio.ensure_future(actor.route("r1", hashes, len(tokens) + 1))
        assert not replaying.done() and 0 < actor.core.index.num_blocks("a") < n_blocks
        await replaying
        return routed

    try:
        decision = asyncio.run(replay_and_route())
    finally:
        actor._ctx.destroy(linger=0)
    assert decision.replica == "a" and decision.predicted_cached_tokens == 0  # a half-applied view counts nothing
    assert actor.core.index.match(hashes, ["a"]) == {"a": n_blocks} and "a" in actor.core.complete


def test_requests_whose_end_is_never_reported_expire_from_the_load():
    book = LoadBook()
    book.charge("r1", "a", 1000, 0)
    book.charge("r2", "a", 500, 100)
    book.inflight["r1"].charged_at -= 100  # r1's ingress died 100 s ago
    assert book.expire(max_age_s=60) == ["r1"]
    assert book.loads["a"] == ReplicaLoad(queued_prefill_tokens=400, running=1) and list(book.inflight) == ["r2"]


def test_a_node_that_leaves_takes_its_pool_out_of_the_view():
    core = RouterCore(block_size=4, running_cost_tokens=0)
    core.pool.layouts = ["l"]
    core.pool.update("n1", 0, {"l": [11]}, {})
    core.pool.update("n2", 0, {"l": [11]}, {})
    assert core.keep_nodes({"n1"}) == ["n2"]
    assert core.pool.nodes == ["n1"] and core.pool.leading_hits("n2", [11]) == 0
    assert core.pool.leading_hits("n1", [11]) == 1
    assert core.pool.update("n2", 0, {"l": [11]}, {})  # a node that comes back reports in full
    assert core.pool.leading_hits("n2", [11]) == 1
