"""The cluster simulator: it runs the project's own routing and pool code on modelled engines, driven by real
kv-cache-tester conversations."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvpool import hashing
from kvpool.bench.replay import summarize
from kvpool.pool_store import BlockFile, eviction_order
from kvpool.sim.cluster import BlockNamer, Cluster, ClusterSpec, NodePool, Workload
from kvpool.sim.costs import profile
from kvpool.sim.engine import EngineListener, SimEngine, SimRequest
from kvpool.sim.policies import POLICIES
from kvpool.sim.workload import load

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "kv-cache-tester"
GiB = 1 << 30


@pytest.fixture(scope="module")
def sessions():
    return load(TRACE, "kv-cache-tester", 24, 64)


def small_spec(host_bytes: int = 0, kv_tokens: int = 400_000) -> ClusterSpec:
    # 2 nodes x 2 H200s, engine KV cut so that 12 long sessions do not fit it: the pool has work to do.
    return ClusterSpec(nodes=2, gpus_per_node=2, tp=1, costs=profile("h200", "llama-3.1-8b", 1, kv_tokens),
                       host_bytes_per_node=host_bytes)


def run(policy: str, sessions, spec: ClusterSpec, duration: float = 600) -> tuple[Cluster, dict]:
    cluster = Cluster(spec, policy, seed=1)
    out = cluster.run(Workload(sessions, concurrency=12, duration_s=duration, ramp_s=10))
    return cluster, summarize(out.records, duration)


def test_block_names_are_the_ingress_hashes_of_the_blocks_tokens():
    namer = BlockNamer(64)
    keys = [7, 1, 2, 3, 1 << 40]
    chain = namer.chain(keys)
    tokens = np.repeat(np.array(keys, dtype=np.uint64), 64)
    assert chain == hashing.block_hashes(tokens, 64).tolist()
    # A longer prompt extends the chain; a different block in the middle forks it.
    assert namer.chain(keys + [9]) == chain + hashing.block_hashes(np.append(tokens, [9] * 64), 64).tolist()[5:]
    forked = namer.chain(keys[:2] + [5] + keys[3:])
    assert forked[:2] == chain[:2] and not set(forked[2:]) & set(chain)


def test_every_policy_serves_the_trace_within_its_bound(sessions):
    spec = small_spec(host_bytes=64 * GiB)
    results = {p: run(p, sessions, spec)[1] for p in POLICIES}
    for name, r in results.items():
        assert r["requests"] > 50, (name, r)
        assert r["hit_rate"] <= r["bound_hit_rate"] + 1e-9, (name, r)
    assert results["no-cache"]["hit_rate"] == 0
    # With a host tier that holds the working set, KV-Pool serves nearly all that any cache could.
    assert results["kvpool"]["hit_rate"] >= 0.95 * results["kvpool"]["bound_hit_rate"], results["kvpool"]
    for peer in ("no-cache", "p2c", "rayllm-prefix", "session-sticky", "kv-overlap", "lmcache", "kvpool-router"):
        assert results["kvpool"]["hit_rate"] > results[peer]["hit_rate"], (peer, results[peer], results["kvpool"])


def test_the_router_predicts_what_the_modelled_engines_hold(sessions):
    """The index is fed only the engines' KV events, as in the real router: its predictions are what the
    engines then have cached (exact unless a block is evicted between routing and admission)."""
    cluster = Cluster(small_spec(), "kvpool-router", seed=1)
    predicted, actual = {}, {}
    route = cluster.policy.route

    def spy(req):
        replica, d = route(req)
        predicted[req.rid] = d.predicted_cached_tokens
        return replica, d

    cluster.policy.route = spy
    finished = cluster.finished

    def on_finished(engine, req):
        actual[req.rid] = req.cached_tokens
        finished(engine, req)

    cluster.finished = on_finished
    cluster.run(Workload(sessions, concurrency=12, duration_s=600, ramp_s=10))
    assert len(actual) > 50
    exact = sum(predicted[r] == actual[r] for r in actual) / len(actual)
    assert exact >= 0.9, exact
    assert sum(actual.values()) > 0


def test_engines_account_for_every_block(sessions):
    cluster, _ = run("kvpool", sessions, small_spec(host_bytes=8 * GiB), duration=300)
    for e in cluster.engines.values():
        running = sum(r.blocks_held for r in e.running)
        assert e.held == running
        assert e.held + len(e.refs) + len(e.free) <= e.capacity
        assert set(e.refs).isdisjoint(e.free)
        # The router's index holds exactly the engine's cached blocks.
        assert cluster.core.index.num_blocks(e.name) == len(e.refs) + len(e.free)


def test_a_simulation_makes_no_reference_cycles(sessions):
    """`kvpool simulate` pauses the cycle collector while a cluster runs: what a run creates must be freed by
    reference counting alone (every policy: each has its own structures)."""
    import gc

    for policy in POLICIES:
        cluster = Cluster(small_spec(host_bytes=8 * GiB), policy, seed=1)
        gc.collect()
        gc.disable()
        try:
            out = cluster.run(Workload(sessions, concurrency=12, duration_s=120, ramp_s=10))
            cycles = gc.collect()
        finally:
            gc.enable()
        assert out.records and cycles == 0, (policy, cycles)


def test_the_pool_keeps_its_budgets_in_the_shards_eviction_order():
    pool = NodePool(host_bytes=4 * 100, disk_bytes=2 * 100, block_bytes=100, session_ttl_s=600)
    pool.put([1, 2, 3], now=0.0)
    pool.touch([1], now=5.0)  # a session came back to block 1
    pool.put([4, 5, 6, 7], now=10.0)
    before = list(pool.files.values())
    order = [f.key for f in eviction_order([BlockFile(f.key, f.tier, None, f.size, f.last_used, f.reused)
                                            for f in before], 20.0, 600)]
    pool.maintain(now=20.0)
    held = {t: sorted(f.key for f in pool.files.values() if f.tier == t) for t in ("host", "disk")}
    # 7 blocks, 4 fit the host tier, 2 the disk: the first 3 in eviction order leave the host, the first 1 the pool.
    assert held["host"] == sorted(order[3:]) and held["disk"] == sorted(order[1:3])
    assert 1 in held["host"]  # reused within the TTL: the last to go
    seq, added, removed = pool.report()
    assert seq == 0 and set(added["sim"]) == set(pool.files) and removed == {"sim": []}


def test_simulate_prints_one_json_line_with_every_policy():
    proc = subprocess.run([sys.executable, "-m", "kvpool.cli", "simulate", "--trace", str(TRACE), "--json",
                           "--trace-sessions", "8", "--concurrency", "8", "--duration", "120", "--nodes", "1", "2",
                           "--policies", "p2c", "kvpool", "--slo-ttft-p90", "1000"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out["policies"]) == ["p2c", "kvpool"]
    for r in out["policies"].values():
        assert 0 <= r["hit_rate"] <= r["bound_hit_rate"] <= 1 and r["requests"] > 0
        # No --max-model-len: the longest request admitted is what an engine's whole 64-token blocks hold.
        assert r["max_model_len"] % 64 == 0 and 0 <= r["engine_kv_tokens_per_replica"] - r["max_model_len"] < 64, r
    assert [(r["policy"], r["gpus"]) for r in out["sweep"]] == [("p2c", 8), ("p2c", 16), ("kvpool", 8), ("kvpool", 16)]
    assert out["gpus_needed"]["kvpool"] == 8  # a lax SLO: the smallest cluster holds it


def test_an_engine_out_of_blocks_preempts_its_newest_request_as_vllm_does():
    """Blocks are allocated as tokens are scheduled (vLLM v1): two prompts that fit are admitted together, and when
    their answers outgrow the KV the newer one gives its blocks back, waits, and is computed again; its full
    prompt blocks stayed cached, and its first token is not sent twice."""
    class Listener(EngineListener):
        firsts, done = [], []

        def first_token(self, engine, req):
            self.firsts.append(req.rid)

        def finished(self, engine, req):
            self.done.append(req.rid)

    listener = Listener()
    engine = SimEngine("r0", "n0", profile("cpu", "smollm2-135m", kv_tokens=40), 4, listener,
                       max_num_batched_tokens=64)  # 10 blocks of 4 tokens
    old, new = (SimRequest(f"q{i}", "s", 0, [100 * i + j for j in range(3)], 16, 12, 0.0) for i in range(2))
    for req in (old, new):
        engine.submit(req, 0.0)
    admitted_together = False
    while engine.next_event_s() is not None:
        engine.advance()
        admitted_together |= len(engine.running) == 2
        assert engine.held == sum(r.blocks_held for r in engine.running)
        assert engine.held + len(engine.refs) + len(engine.free) <= engine.capacity
    assert admitted_together  # each 16-token prompt fits on its own: its answer's blocks are not reserved up front
    assert engine.preemptions == new.preemptions == 1 and old.preemptions == 0
    assert listener.done == ["q0", "q1"] and listener.firsts == ["q0", "q1"]
    assert new.first_token_at < old.finished_at < new.finished_at  # it had answered before it was preempted
    assert new.cached_tokens == 0  # reported as its first admission found it (vLLM's num_cached_tokens)


def test_an_arrival_that_cuts_a_macro_step_short_gets_the_blocks_of_the_steps_not_run():
    """A long answer decodes as one macro-step with blocks for all of it; a request arriving mid-way cuts it at
    the next step, and the blocks of the steps not run are free for it (vLLM allocates step by step)."""
    engine = SimEngine("r0", "n0", profile("cpu", "smollm2-135m", kv_tokens=40), 4, EngineListener(),
                       max_num_batched_tokens=64)  # 10 blocks of 4 tokens
    long = SimRequest("long", "s", 0, [], 4, 30, 0.0)
    engine.submit(long, 0.0)
    engine.advance()  # its prefill
    engine.advance()  # its answer's decode, one macro-step
    assert engine._plan.steps > 20 and long.blocks_held >= 8
    short = SimRequest("short", "s", 0, [7], 8, 1, 0.0)
    engine.submit(short, engine._plan.start + 1.5 * engine._plan.step_s)
    while engine.next_event_s() is not None:
        engine.advance()
    assert short.finished_at < long.finished_at and engine.preemptions == 0


def test_waiting_requests_are_admitted_only_within_the_steps_token_budget():
    """As in vLLM, running requests are scheduled first and a waiting one is admitted only with budget left: it
    does not take blocks for a chunk it cannot run, nor get preempted before it ever ran."""
    engine = SimEngine("r0", "n0", profile("cpu", "smollm2-135m", kv_tokens=400), 4, EngineListener(),
                       max_num_batched_tokens=64)
    first = SimRequest("first", "s", 0, list(range(1, 50)), 200, 10, 0.0)  # 4 steps of prefill; both fit
    second = SimRequest("second", "s", 0, list(range(1001, 1016)), 64, 4, 0.0)
    engine.submit(first, 0.0)
    engine.submit(second, 0.0)
    engine.advance()
    assert [r.rid for r in engine.running] == ["first"] and second.blocks_held == 0
    while engine.next_event_s() is not None:
        engine.advance()
        # Once admitted, it computes in that very step.
        assert second not in engine.running or second.prefill_left == 0 or \
            any(r is second for r, _ in engine._plan.prefills)
    assert engine.preemptions == 0 and second.finished_at is not None


def test_without_prefix_caching_identical_prompts_hold_blocks_of_their_own():
    """With prefix caching off (the no-cache peer) nothing is shared: two identical prompts running together each
    hold every block of their KV, and none stay cached after them."""
    engine = SimEngine("r0", "n0", profile("cpu", "smollm2-135m", kv_tokens=400), 4, EngineListener(),
                       max_num_batched_tokens=64, prefix_caching=False)
    twins = [SimRequest(f"t{i}", "s", 0, list(range(1, 8)), 32, 8, 0.0) for i in range(2)]
    for req in twins:
        engine.submit(req, 0.0)
    both_prefilled = False
    while engine.next_event_s() is not None:
        engine.advance()
        if len(engine.running) == 2 and all(r.prefill_left == 0 for r in twins):
            both_prefilled = True
            assert engine.held == sum(r.blocks_held for r in twins) >= 2 * 32 // 4
            assert not engine.refs
    assert both_prefilled and engine.cached_blocks() == 0


def test_the_longest_request_admitted_fits_an_engines_whole_blocks():
    """Engine KV that is not a whole number of blocks (the GPU profiles' HBM arithmetic) holds only its whole
    blocks: a request refused as too long must never be one that an engine then cannot fit."""
    cluster = Cluster(small_spec(kv_tokens=400_010), "kvpool", seed=1)
    for e in cluster.engines.values():
        assert -(-cluster.max_model_len // e.block_size) <= e.capacity
    assert cluster.max_model_len > 400_010 - cluster.block_size


def test_a_request_preempted_while_decoding_computes_its_prompt_and_answer_again():
    """vLLM recomputes a preempted request's every token, its answer so far included, then samples on from there:
    the resumed request's prefill covers prompt + generated tokens (less the prompt blocks still cached), and it
    still generates exactly max_tokens."""
    bs = 4
    engine = SimEngine("r0", "n0", profile("cpu", "smollm2-135m", kv_tokens=40), bs, EngineListener(),
                       max_num_batched_tokens=64)  # 10 blocks of 4 tokens: the two answers outgrow them
    old, new = (SimRequest(f"q{i}", "s", 0, [100 * i + j for j in range(3)], 16, 12, 0.0) for i in range(2))
    for req in (old, new):
        engine.submit(req, 0.0)
    generated = None
    resumed = False
    while engine.next_event_s() is not None:
        was_decoding = new in engine.running and new.prefill_left == 0
        was_prefilling = new in engine.running and new.prefill_left > 0
        engine.advance()
        if generated is None and new.preemptions:
            assert was_decoding
            generated = new.max_tokens - new.decode_left
            assert new.prefill_left == new.prompt_tokens + generated
        elif generated is not None and not resumed and was_prefilling and new.prefill_left == 0:
            resumed = True  # its recompute is done: it holds KV for prompt + answer so far, and sampled one more
            assert len(new.refs) + new.blocks_held >= -(-(new.prompt_tokens + generated) // bs)
            assert new.decode_left == new.max_tokens - generated - 1
    assert generated > 0 and resumed
    assert new.decode_left == 0 and new.finished_at is not None
