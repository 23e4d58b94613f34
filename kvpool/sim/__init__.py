"""`kvpool simulate`: the project's routing and pool policies, and the peers', on a simulated cluster driven by
real agent traces at full length (kvpool.sim.cluster), timed by cost models (kvpool.sim.costs).

Every policy runs the same sessions on the same cluster for the same simulated time; the figures are those of the
real benchmarks (kvpool.bench.replay.summarize, over the requests finished in time) plus GPU-seconds per million
input tokens and the bytes each tier and link moved. With several node counts (`--nodes 2 4 8`) it also reports,
per policy, the fewest GPUs that hold TTFT p90 under `--slo-ttft-p90`.
"""

from __future__ import annotations

import gc
import itertools
import resource
import time
from pathlib import Path

from kvpool.sim.costs import HARDWARE, profile
from kvpool.sim.policies import POLICIES

GiB = 1 << 30


def _spec(args, nodes: int, kv_tokens: int | None, host_gib: float):
    from kvpool.sim.cluster import ClusterSpec

    costs = profile(args.hardware, args.model, args.tp, kv_tokens)
    gpus = args.gpus_per_node or (HARDWARE[args.hardware].gpus_per_node if args.hardware in HARDWARE else 2)
    return ClusterSpec(nodes=nodes, gpus_per_node=gpus, tp=args.tp, costs=costs, block_size=args.block_size,
                       host_bytes_per_node=int(host_gib * GiB),
                       disk_bytes_per_node=int(args.disk_gib_per_node * GiB), max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                       pool_period_s=args.pool_period)


def simulate_one(args, sessions, policy: str, nodes: int, kv_tokens: int | None,
                 host_gib: float) -> tuple[dict, list]:
    """One policy on one cluster: its figures, and its requests' records."""
    from kvpool.bench.replay import summarize
    from kvpool.sim.cluster import Cluster, Workload, gpu_seconds_per_million

    spec = _spec(args, nodes, kv_tokens, host_gib)
    workload = Workload(sessions, args.concurrency, args.duration, args.think_scale, args.ramp, args.max_output)
    t0 = time.process_time()
    cluster = Cluster(spec, policy, args.seed)
    out = run_without_cycle_collector(cluster, workload)
    figures = summarize(out.records, out.makespan_s)
    return {**figures, "sent": out.sent, "refused_too_long": out.refused,
            "max_model_len": cluster.max_model_len, "gpus": nodes * spec.gpus_per_node,
            "replicas": nodes * spec.replicas_per_node,
            "engine_kv_tokens_per_replica": spec.costs.kv_capacity_tokens,
            "host_tier_bytes_per_node": spec.host_bytes_per_node if policy in ("kvpool", "lmcache") else 0,
            "disk_tier_bytes_per_node": spec.disk_bytes_per_node if policy == "kvpool" else 0,
            "gpu_s_per_m_input_tokens": gpu_seconds_per_million(out, spec, out.makespan_s),
            "gpu_busy_share": round(out.busy_s / (out.makespan_s * nodes * spec.replicas_per_node), 3)
            if out.makespan_s else None,
            "bytes_moved": out.bytes, "engine_evicted_blocks": out.engine_evicted_blocks,
            "engine_preemptions": out.engine_preemptions,
            "route_reasons": out.decisions, "sim_cpu_s": round(time.process_time() - t0, 1)}, out.records


def run_without_cycle_collector(cluster, workload):
    """Run a simulation with Python's cycle collector paused. A run makes no reference cycles (the trace's reader
    does: they are collected first), so reference counting frees everything, while the collector would walk the
    pool's millions of block records over and over (20% of a 300 s scale run's time, measured)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return cluster.run(workload)
    finally:
        if was_enabled:
            gc.enable()


def run(args) -> dict:
    from kvpool.sim.workload import load

    sessions = load(Path(args.trace), args.trace_format, args.trace_sessions, args.block_size, args.max_context,
                    args.max_output, args.turns)
    policies = args.policies or POLICIES
    # Every combination of the swept values; the first is the one the table shows.
    grid = list(itertools.product(args.nodes, args.kv_tokens or [None], args.host_gib_per_node))
    results: dict[str, dict] = {}
    records: dict[str, list] = {}
    sweep: list[dict] = []
    for policy in policies:
        for nodes, kv_tokens, host_gib in grid:
            r, recs = simulate_one(args, sessions, policy, nodes, kv_tokens, host_gib)
            if (nodes, kv_tokens, host_gib) == grid[0]:
                results[policy], records[policy] = r, recs
            sweep.append({"policy": policy, "gpus": r["gpus"], "engine_kv_tokens_per_replica":
                          r["engine_kv_tokens_per_replica"], "host_gib_per_node": host_gib,
                          **{k: r[k] for k in ("ttft_p90_s", "hit_rate", "bound_hit_rate", "input_tok_s",
                                               "requests")}})
    out = {"sim": "cluster", "trace": args.trace, "trace_sessions": len(sessions), "hardware": args.hardware,
           "model": args.model, "tp": args.tp, "nodes": args.nodes[0], "concurrency": args.concurrency,
           "duration_s": args.duration, "policies": results,
           "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2)}
    if len(grid) > 1:
        out["sweep"] = sweep
    if len(args.nodes) > 1:  # the headline: the fewest GPUs that hold the SLO, at the first KV and host sizes
        out["slo_ttft_p90_s"] = args.slo_ttft_p90
        out["gpus_needed"] = {p: min((r["gpus"] for r in _node_sweep(sweep, p)
                                      if r["ttft_p90_s"] <= args.slo_ttft_p90), default=None) for p in policies}
    if args.out:
        _write(out, records, Path(args.out))
    return out


def _node_sweep(sweep: list[dict], policy: str) -> list[dict]:
    """A policy's rows at its first row's KV and host sizes, by GPU count."""
    rows = [r for r in sweep if r["policy"] == policy]
    same = [r for r in rows if (r["engine_kv_tokens_per_replica"], r["host_gib_per_node"]) ==
            (rows[0]["engine_kv_tokens_per_replica"], rows[0]["host_gib_per_node"])]
    return sorted(same, key=lambda r: r["gpus"])


def _write(out: dict, records: dict[str, list], path: Path) -> None:
    """The JSON result, and beside it PNGs: per-turn hit rate and TTFT, summary bars, and TTFT p90 against GPUs
    when there is a sweep."""
    import json

    from kvpool.bench.plots import _png_path, _save, plot_summaries, plot_turns, plt

    path.write_text(json.dumps(out, indent=1))
    plot_turns(records, path)
    plot_summaries(out["policies"], path)
    if "gpus_needed" in out:
        fig, ax = plt.subplots(figsize=(7, 4))
        for policy in out["policies"]:
            rows = _node_sweep(out["sweep"], policy)
            ax.plot([r["gpus"] for r in rows], [r["ttft_p90_s"] for r in rows], marker="o", label=policy)
        ax.axhline(out["slo_ttft_p90_s"], color="k", ls="--", label="SLO")
        ax.set(xlabel="GPUs", ylabel="TTFT p90 (s)", yscale="log")
        ax.legend(fontsize="small")
        _save(fig, _png_path(path, "gpus"))


def table(out: dict) -> str:
    res = out["policies"]
    rows = ["hit_rate", "bound_hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_p50_s", "input_tok_s",
            "output_tok_s", "requests", "sent", "gpu_s_per_m_input_tokens", "gpu_busy_share",
            "engine_kv_tokens_per_replica", "host_tier_bytes_per_node", "disk_tier_bytes_per_node", "sim_cpu_s"]
    lines = ["| metric | " + " | ".join(res) + " |", "|---" * (len(res) + 1) + "|"]
    for m in rows:
        lines.append(f"| {m} | " + " | ".join(str(r.get(m, "")) for r in res.values()) + " |")
    for kind in ("pool_host_to_engine", "pool_disk_to_engine", "pool_writes", "node_links"):
        lines.append(f"| GB {kind} | " + " | ".join(f"{r['bytes_moved'][kind] / 1e9:.1f}" for r in res.values())
                     + " |")
    if "gpus_needed" in out:
        lines.append(f"| GPUs for TTFT p90 <= {out['slo_ttft_p90_s']} s | "
                     + " | ".join(str(out["gpus_needed"].get(p)) for p in res) + " |")
    return "\n".join(lines)
