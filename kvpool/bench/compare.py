"""`kvpool compare`: the same agent replay against each configuration in turn, on one machine, in one run.

  no-cache            KV-Pool's app with vLLM prefix caching, prefix routing and the pool off: no reuse at all
  rayllm-default      Ray Serve LLM `build_openai_app`, Serve's default (power-of-two) routing
  rayllm-prefix       Ray Serve LLM with its PrefixCacheAffinityRouter
  rayllm-prefix+host  the same with KV-Pool's host tier added to each replica's engine KV (equal total bytes)
  kvpool-router       KV-Pool, exact prefix routing, pool off
  kvpool              KV-Pool complete (routing + shared pool)
  rayllm-offload      Ray Serve LLM + vLLM's own CPU-offloading connector, host bytes = KV-Pool's host tier (CUDA)
  rayllm-lmcache      Ray Serve LLM + LMCache through kv_transfer_config, the same host bytes (CUDA, lmcache)

Same model, replica count, block size, dtype, scheduler limits, sessions and trace for all. Memory, printed per
configuration in the table: every configuration has `--kv-cache-bytes` of engine KV per replica (equal engine KV,
a GPU's situation), except the `+host` ones, which have that plus KV-Pool's host tier per replica (equal total
bytes). KV-Pool's host tier (`--pool-host-bytes`, default: as much as all replicas' engine KV) lives on /dev/shm;
its disk tier (`--pool-disk-bytes`, default none) on a real disk (`--pool-disk-dir`), listed apart. A configuration
this machine cannot run is listed as skipped with the reason.

The workload is fixed: by default every configuration serves every turn of every session to the end, and the
table compares the time to finish it (makespan_s), input tokens/s over it and percentiles over the same requests.
With `--duration`, runs stop at a deadline and only the requests that every configuration completed count (the
matched subset; the result says how many). `--chaos kill-replica@T` kills one engine replica T seconds into every
configuration's run (Serve restarts it), `--chaos add-replica@T` adds one (Serve's external scaling API); either
reports TTFT p90 and hit rate over the minute after it.

Each app is deployed, replayed, then deleted before the next starts, so they never share a core. `--out X.json` also
writes X-turns.png (every configuration's turn curves) and X-summary.png (bars), see kvpool.bench.plots.

`--verify` (on with `--smoke`): every configuration's responses are checked against one no-cache reference computed
after the last configuration (kvpool.bench.verify): `verified` responses, `mismatched` ones (output tokens differ,
or a logprob by more than `logprob_tolerance`), the first mismatches with their cached tokens and route reason, and
`logprob_max_abs_diff`, the largest logprob difference on matching tokens: no-cache's and the Ray Serve LLM
configurations' state the noise floor of batching on this machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from kvpool.traces import detect_format

CONFIGS = ["no-cache", "rayllm-default", "rayllm-prefix", "rayllm-prefix+host", "kvpool-router", "kvpool",
           "rayllm-offload", "rayllm-lmcache"]
METRICS = ["input_tok_s", "output_tok_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_mean_s",
           "latency_p50_s", "latency_p90_s", "hit_rate", "bound_hit_rate", "errors", "requests", "makespan_s"]
MEMORY = ["engine_kv_bytes_per_replica", "host_tier_bytes", "disk_tier_bytes"]
VERIFY_METRICS = ["verified", "mismatched", "logprob_max_abs_diff"]
LOWER_IS_BETTER = {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_mean_s", "latency_p50_s", "latency_p90_s",
                   "errors", "makespan_s", "mismatched", "logprob_max_abs_diff"}
# What `--smoke` deploys: each deployment costs minutes on 2 cores, so the baseline, the strongest peer and KV-Pool,
# and one configuration this machine may skip (on a CPU it is listed with the reason).
SMOKE_CONFIGS = ["no-cache", "rayllm-prefix", "kvpool", "rayllm-offload"]
PEERS = ("rayllm-default", "rayllm-prefix", "rayllm-prefix+host", "rayllm-offload", "rayllm-lmcache")
CHAOS_WINDOW_S = 60.0


def memory(name: str, args) -> dict[str, int]:
    """The KV bytes a configuration has: engine KV per replica, host tier and disk tier (for the whole app)."""
    engine = args.kv_cache_bytes + (args.pool_host_bytes // args.replicas if name.endswith("+host") else 0)
    host = args.pool_host_bytes if name in ("kvpool", "rayllm-offload", "rayllm-lmcache") else 0
    disk = args.pool_disk_bytes if name == "kvpool" else 0
    return {"engine_kv_bytes_per_replica": engine, "host_tier_bytes": host, "disk_tier_bytes": disk}


def skip_reason(name: str) -> str | None:
    """Why this machine cannot run a configuration (None: it can)."""
    import importlib.util

    import torch

    if name in ("rayllm-offload", "rayllm-lmcache") and not torch.cuda.is_available():
        return "needs CUDA: the connector offloads GPU KV to host memory"
    if name == "rayllm-lmcache" and importlib.util.find_spec("lmcache") is None:
        return "lmcache is not installed (pip install lmcache)"
    return None


def scratch_dirs(args) -> tuple[str, str]:
    """Fresh pool directories for one benchmark run: the host tier on /dev/shm, the disk tier on a real disk. A run
    never starts from an earlier run's pool."""
    Path(args.pool_disk_dir).mkdir(parents=True, exist_ok=True)
    host = tempfile.mkdtemp(prefix="kvpool-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    return host, tempfile.mkdtemp(prefix="kvpool-bench-", dir=args.pool_disk_dir)


def _deploy(name: str, args, model_path: str, pool_dirs: tuple[str, str], scalable: bool = False):
    """Deploy one configuration as Serve app `name`; returns its URL. `scalable`: with Serve's external scaling
    API on, so that replicas can be added while it runs (add_one_engine_replica)."""
    from ray import serve

    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    mem = memory(name, args)
    cfg = KVPoolConfig(model=model_path, served_model_name="model", num_replicas=args.replicas,
                       max_model_len=args.max_model_len, kv_cache_bytes=mem["engine_kv_bytes_per_replica"],
                       block_size=32, enable_prefix_caching=name != "no-cache", prefix_routing=name.startswith("kvpool"),
                       pool_enabled=name == "kvpool", router_port=args.router_port,
                       pool_host_dir=f"{pool_dirs[0]}/{name}", pool_disk_dir=f"{pool_dirs[1]}/{name}",
                       pool_host_bytes=mem["host_tier_bytes"], pool_disk_bytes=mem["disk_tier_bytes"],
                       **({"max_num_batched_tokens": args.max_num_batched_tokens}
                          if args.max_num_batched_tokens else {}))
    if name.startswith("rayllm"):
        from ray.serve.llm import LLMConfig, build_openai_app

        deployment = {"num_replicas": args.replicas, "max_ongoing_requests": cfg.max_ongoing_requests}
        if "prefix" in name:
            deployment["request_router_config"] = {
                "request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter"}
        engine_kwargs = dict(block_size=32, kv_cache_memory_bytes=cfg.kv_cache_bytes, enforce_eager=True,
                             max_model_len=args.max_model_len, dtype=cfg.resolved_dtype(),
                             enable_prefix_caching=True, enable_prompt_tokens_details=True,
                             max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
        env = cfg.engine_env()
        if name == "rayllm-offload":
            engine_kwargs["kv_transfer_config"] = {
                "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"cpu_bytes_to_use": mem["host_tier_bytes"] // args.replicas}}
        elif name == "rayllm-lmcache":
            engine_kwargs["kv_transfer_config"] = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
            env["LMCACHE_LOCAL_CPU"] = "True"
            env["LMCACHE_MAX_LOCAL_CPU_SIZE"] = str(mem["host_tier_bytes"] / args.replicas / (1 << 30))  # GiB
        llm = LLMConfig(
            model_loading_config={"model_id": "model", "model_source": model_path},
            accelerator_config={"kind": "cpu"} if cfg.resolved_device() == "cpu" else {},
            engine_kwargs=engine_kwargs,
            deployment_config=deployment,
            runtime_env={"env_vars": env},
        )
        app = build_openai_app({"llm_configs": [llm]})
    else:
        app = build_app(cfg)
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False,
              external_scaler_enabled=scalable)
    return f"http://127.0.0.1:{args.http_port}/{name}"


def matched_subset(runs: dict[str, list]) -> dict[str, list]:
    """Per configuration, its completed records of the requests (session, turn) that every configuration completed."""
    def done(records: list) -> dict:
        return {(r.session, r.turn): r for r in records if r.error is None and r.latency_s is not None}

    completed = {name: done(records) for name, records in runs.items()}
    keys = set.intersection(*(set(c) for c in completed.values()))
    return {name: [c[k] for k in sorted(keys)] for name, c in completed.items()}


def engine_replicas(app_name: str) -> tuple[str, list[str]]:
    """A Serve application's engine deployment and its replicas (running, starting or stopping) by actor name
    (SERVE_REPLICA::app#deployment#id): the deployment that is not the ingress, whichever builder made the app
    (KV-Pool's ingress is OpenAIIngress, Ray Serve LLM's OpenAiIngress)."""
    import ray

    # Named actors from the cluster's control store (Ray's state API would need the dashboard, which is off).
    prefix = f"SERVE_REPLICA::{app_name}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and a["name"].startswith(prefix) and "ingress" not in a["name"].lower())
    if not names:
        raise RuntimeError(f"no engine replica of {app_name}")
    deployment = names[0].split("#")[1]
    return deployment, [n for n in names if n.split("#")[1] == deployment]


def kill_one_engine_replica(app_name: str) -> str:
    """Kill one engine replica of a Serve application (Serve starts a new one); returns its actor name."""
    import ray

    name = engine_replicas(app_name)[1][0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    return name


def add_one_engine_replica(app_name: str) -> str:
    """Scale the engine deployment of a Serve application up by one replica, through Serve's external scaling API
    (what the dashboard's scale endpoint calls; the app was deployed with it enabled), without touching the running
    replicas; returns the deployment and its new replica count."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    deployment, names = engine_replicas(app_name)
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=deployment, app_name=app_name),
                                                         len(names) + 1))
    return f"{deployment}: {len(names) + 1} replicas"


def engine_replica_states(app_name: str) -> dict[str, int]:
    """Serve's count of the engine deployment's replicas by state (RUNNING, STARTING, ...): what a chaos event
    left, as Serve sees it."""
    from ray import serve

    states = serve.status().applications[app_name].deployments[engine_replicas(app_name)[0]].replica_states
    return {str(getattr(state, "value", state)): n for state, n in states.items()}


CHAOS = {"kill-replica": kill_one_engine_replica, "add-replica": add_one_engine_replica}


def _wait_ready(url: str, timeout: float = 600) -> float:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            if r.status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready")


def table(results: dict[str, dict]) -> str:
    base = results.get("no-cache")
    peers = [results[p] for p in PEERS if p in results]
    lines = ["| metric | " + " | ".join(results) + " | kvpool vs no-cache | kvpool vs best peer |",
             "|---" * (len(results) + 3) + "|"]
    verified = any("verified" in r for r in results.values())
    for m in MEMORY + METRICS + (VERIFY_METRICS if verified else []) + ["skipped"]:
        row = [str(results[c].get(m, "")) for c in results]
        if m == "skipped":
            if any(row):
                lines.append("| skipped | " + " | ".join(row) + " | | |")
            continue
        ours = results.get("kvpool", {}).get(m)
        vs_base = vs_peer = ""
        if m not in MEMORY and isinstance(ours, (int, float)) and ours:
            if base and isinstance(base.get(m), (int, float)) and base[m]:
                vs_base = f"{ours / base[m]:.2f}x"
            vals = [p[m] for p in peers if isinstance(p.get(m), (int, float)) and p[m]]
            if vals:
                best = min(vals) if m in LOWER_IS_BETTER else max(vals)
                vs_peer = f"{ours / best:.2f}x"
        lines.append(f"| {m} | " + " | ".join(row) + f" | {vs_base} | {vs_peer} |")
    return "\n".join(lines)


def run(args) -> dict:
    import asyncio
    from dataclasses import asdict

    import ray
    from ray import serve

    from kvpool.bench.replay import Bound, ingress_figures, load_sessions, replay, summarize
    from kvpool.config import KVPoolConfig
    from kvpool.model import resolve_model
    from kvpool.prompt import PromptRenderer

    model_path = resolve_model(args.model)
    renderer = PromptRenderer.from_pretrained(model_path)
    sessions = load_sessions(Path(args.trace), args.sessions, args.max_context, args.max_output, renderer,
                             args.turns, args.trace_format)
    configs = args.configs or CONFIGS
    chaos, chaos_at = args.chaos.split("@") if args.chaos else (None, None)
    chaos_at = float(chaos_at) if chaos_at else None
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    results: dict[str, dict] = {}
    records: dict[str, list] = {}  # per configuration, for the plots and the --out file
    pool_dirs = scratch_dirs(args)

    async def replay_with_chaos(name: str, url: str):
        run = asyncio.create_task(replay(url, sessions, args.duration, args.turns, args.think_scale,
                                         args.max_output, Bound(32, renderer), progress=not args.json,
                                         verify=args.verify))
        happened = False
        if chaos_at is not None:
            done, _ = await asyncio.wait([run], timeout=chaos_at)
            happened = not done
            results[name]["chaos_event"] = f"none: the run ended before {chaos_at:g} s" if done else \
                await asyncio.get_running_loop().run_in_executor(None, CHAOS[chaos], name)
        return *(await run), happened

    try:
        for name in configs:
            results[name] = memory(name, args)
            if reason := skip_reason(name):
                results[name]["skipped"] = reason
                continue
            url = _deploy(name, args, model_path, pool_dirs, scalable=chaos == "add-replica")
            try:
                startup = _wait_ready(url)
                records[name], makespan, chaos_happened = asyncio.run(replay_with_chaos(name, url))
                results[name].update(startup_s=round(startup, 1), **summarize(records[name], makespan))
                results[name].update(ingress_figures(url))
                if chaos_at is not None:
                    results[name]["engine_replicas_at_end"] = engine_replica_states(name)
                if chaos_happened:
                    after = [r for r in records[name] if chaos_at <= r.sent_at < chaos_at + CHAOS_WINDOW_S]
                    window = summarize(after, CHAOS_WINDOW_S)
                    results[name]["after_chaos"] = {k: window[k] for k in ("requests", "errors", "ttft_p90_s",
                                                                            "hit_rate")}
            except Exception as e:  # one configuration failing must not lose the others' numbers
                results[name]["error"] = f"{type(e).__name__}: {e}"
            finally:
                serve.delete(name)
                time.sleep(5)  # let the engines' processes exit before the next configuration starts
    finally:
        for d in pool_dirs:
            shutil.rmtree(d, ignore_errors=True)
        serve.shutdown()
        ray.shutdown()
    replayed = {name: recs for name, recs in records.items() if "error" not in results[name]}
    matched = None
    if args.duration and replayed:
        # Runs that stopped at a deadline served different work: compare over what every configuration completed.
        subsets = matched_subset(replayed)
        matched = len(next(iter(subsets.values())))
        for name, subset in subsets.items():
            makespan = max((r.sent_at + r.latency_s for r in subset), default=0.0)
            results[name].update(summarize(subset, makespan) if subset else {"requests": 0})
    if args.verify:
        from kvpool.bench.verify import verify_runs

        for name, summary in verify_runs(model_path, replayed, args.max_model_len, args.verify_tolerance,
                                         args.kv_cache_bytes, progress=not args.json).items():
            results[name].update(summary)
    out = {"bench": "compare", "model": args.model or "SmolLM2-135M-Instruct", "replicas": args.replicas,
           "kv_cache_bytes_per_replica": args.kv_cache_bytes, "pool_host_bytes": args.pool_host_bytes,
           "pool_disk_bytes": args.pool_disk_bytes, "sessions": args.sessions, "turns": args.turns or "all",
           "duration_s": args.duration or None, "matched_subset_requests": matched, "chaos": args.chaos,
           "max_context": args.max_context, "trace": args.trace, "max_num_batched_tokens":
               args.max_num_batched_tokens or KVPoolConfig.model_fields["max_num_batched_tokens"].default,
           "trace_format": args.trace_format or detect_format(Path(args.trace)), "results": results}
    if args.out:
        from kvpool.bench.plots import plot_summaries, plot_turns

        path = Path(args.out)
        per_config = {name: [asdict(r) for r in recs] for name, recs in records.items()}
        path.write_text(json.dumps({**out, "records": per_config}, indent=1))
        plot_turns(records, path)
        plot_summaries(results, path)
    if not args.json:
        if matched is not None:
            print(f"Runs stopped at {args.duration:g} s: figures over the {matched} requests every configuration "
                  "completed (the matched subset).")
        print(table(results))
    return out
