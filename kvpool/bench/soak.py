"""`kvpool bench soak`: KV-Pool complete under a steady agent load for a long time, with the machine's memory sampled.

Deploys the app as `kvpool compare` does (same model and memory settings), then keeps `--sessions` agent sessions
running for `--duration` seconds: when one ends, a fresh one (another agent, sharing nothing) starts. Reports errors,
hit rate and TTFT per time window (stability), memory used on the machine and the RSS of each of the app's processes
(growth: which process grows, per hour and per 1,000 requests), as one JSON line. `--config kvpool-router` is the
same app with the pool off, a control. `--verify` checks every response against a no-cache reference once the app is
gone (kvpool.bench.verify).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np


# Process titles of the app's engine processes: vLLM's engine core ("VLLM::EngineCore") and the Serve replica that
# holds its client, the router and the pool shards ("ray::ServeReplica:...", "ray::RouterActor...", "ray::PoolShard...").
ENGINE_TITLES = ("VLLM::", "ray::ServeReplica", "ray::RouterActor", "ray::PoolShard")


async def _sample_memory(samples: list[tuple[float, int, dict[str, int]]], period_s: float) -> None:
    """The machine's used memory, and the RSS of each of the app's processes by title and pid, every period_s."""
    import psutil

    t0, me = time.perf_counter(), psutil.Process()
    while True:
        rss = {}
        for p in me.children(recursive=True):  # this run's Ray cluster, not another's on the machine
            try:
                title, used = " ".join(p.cmdline()), p.memory_info().rss
            except psutil.Error:  # gone meanwhile
                continue
            if title.startswith(ENGINE_TITLES):
                # By pid: Ray retitles a worker by the task it runs ("ray::RouterActor.route" while routing).
                rss[f"{title.split()[0].split('.')[0][:60]} {p.pid}"] = used
        samples.append((time.perf_counter() - t0, psutil.virtual_memory().used, rss))
        await asyncio.sleep(period_s)


def process_growth(samples: list[tuple[float, int, dict[str, int]]], requests: int) -> dict[str, dict]:
    """Each process's RSS after the first sixth of the run and at its end (MiB), and its growth in between per hour
    and per 1,000 requests (the run's request rate spread evenly): what grows, and whether with time or with work."""
    if len(samples) < 7:
        return {}
    (t1, _, first), (t2, _, last) = samples[len(samples) // 6], samples[-1]
    share = (t2 - t1) / samples[-1][0]
    out = {}
    for name in sorted(set(first) & set(last)):
        grew = (last[name] - first[name]) / 2**20
        out[name] = {"rss_mib_after_first_sixth": round(first[name] / 2**20), "rss_mib_end": round(last[name] / 2**20),
                     "growth_mib_per_hour": round(grew / (t2 - t1) * 3600, 1),
                     "growth_mib_per_1000_requests": round(grew / (requests * share) * 1000, 2) if requests else None}
    return out


def windows(records, wall_s: float, window_s: float) -> list[dict]:
    out = []
    for w0 in np.arange(0, wall_s, window_s):
        recs = [r for r in records if w0 <= r.sent_at < w0 + window_s]
        ok = [r for r in recs if r.error is None and r.latency_s is not None]
        prompt = sum(r.prompt_tokens for r in ok)
        out.append({"from_s": int(w0), "requests": len(ok), "errors": len(recs) - len(ok),
                    "hit_rate": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else None,
                    "ttft_p50_s": round(float(np.median([r.ttft_s for r in ok])), 3) if ok else None})
    return out


def run(args) -> dict:
    import httpx
    import ray
    from ray import serve

    from kvpool.bench.compare import _deploy, _wait_ready, scratch_dirs
    from kvpool.bench.replay import Bound, load_sessions, replay, summarize
    from kvpool.model import resolve_model
    from kvpool.prompt import PromptRenderer

    model_path = resolve_model(args.model)
    renderer = PromptRenderer.from_pretrained(model_path)
    # Enough sessions never to run out: copies beyond the trace's own are other agents, sharing nothing.
    sessions = load_sessions(Path(args.trace), args.sessions * 100, args.max_context, args.max_output, renderer,
                             args.turns, args.trace_format)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    samples: list[tuple[float, int]] = []
    pool_dirs = scratch_dirs(args)
    try:
        url = _deploy(args.config, args, model_path, pool_dirs)
        _wait_ready(url)

        async def soak():
            sampler = asyncio.create_task(_sample_memory(samples, 10))
            try:
                return await replay(url, sessions, args.duration, args.turns, args.think_scale, args.max_output,
                                    Bound(32, renderer), progress=not args.json, concurrency=args.sessions,
                                    verify=args.verify)
            finally:
                sampler.cancel()

        records, wall = asyncio.run(soak())
        pool = httpx.get(f"{url}/v1/kvpool/stats", timeout=30).json()["pool"]
        processes = process_growth(samples, len(records))
    finally:
        serve.shutdown()
        ray.shutdown()
        for d in pool_dirs:
            shutil.rmtree(d, ignore_errors=True)
    mem = np.array([m for _, m, _ in samples], dtype=np.float64) / 2**20
    settled = mem[len(mem) // 6:] if len(mem) > 6 else mem  # after start-up and the first sessions' growth
    hours = (samples[-1][0] - samples[len(mem) // 6][0]) / 3600 if len(samples) > 6 else 0
    result = {"bench": "soak", "config": args.config, "sessions_at_once": args.sessions, "duration_s": args.duration,
              "kv_cache_bytes_per_replica": args.kv_cache_bytes, **summarize(records, wall),
              "memory_used_mib": {"start": round(mem[0]), "after_first_sixth": round(settled[0]),
                                  "end": round(mem[-1]), "max": round(mem.max()),
                                  "growth_mib_per_hour_after_first_sixth":
                                      round((settled[-1] - settled[0]) / hours, 1) if hours else None},
              "pool_bytes": {node: {"host": p.get("host_bytes"), "disk": p.get("disk_bytes")}
                             for node, p in (pool or {}).items()},
              "processes": processes, "windows": windows(records, wall, args.window)}
    if args.verify:
        from kvpool.bench.verify import verify_runs

        result.update(verify_runs(model_path, {"soak": records}, args.max_model_len, args.verify_tolerance,
                                  args.kv_cache_bytes, progress=not args.json)["soak"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result
