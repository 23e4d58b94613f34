"""`kvpool compare`: the same agent replay against each configuration in turn, on one machine, in one run.

  no-cache        KV-Pool's app with vLLM prefix caching, prefix routing and the pool off: no reuse at all
  rayllm-default  Ray Serve LLM `build_openai_app`, Serve's default (power-of-two) routing
  rayllm-prefix   Ray Serve LLM with its PrefixCacheAffinityRouter
  kvpool-router   KV-Pool, exact prefix routing, pool off
  kvpool          KV-Pool complete (routing + shared pool)

Same model, replica count, KV memory per replica, sessions and trace for all. Each app is deployed, replayed, then
deleted before the next starts, so they never share a core. `--out X.json` also writes X-turns.png (every
configuration's turn curves) and X-summary.png (bars), see kvpool.bench.plots.

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

CONFIGS = ["no-cache", "rayllm-default", "rayllm-prefix", "kvpool-router", "kvpool"]
METRICS = ["input_tok_s", "output_tok_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_mean_s",
           "latency_p50_s", "latency_p90_s", "hit_rate", "bound_hit_rate", "errors", "requests", "wall_s"]
VERIFY_METRICS = ["verified", "mismatched", "logprob_max_abs_diff"]
LOWER_IS_BETTER = {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_mean_s", "latency_p50_s", "latency_p90_s",
                   "errors", "wall_s", "mismatched", "logprob_max_abs_diff"}


def _deploy(name: str, args, model_path: str, pool_root: str):
    from ray import serve

    from actors.engine import engine_env
    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    cfg = KVPoolConfig(model=model_path, served_model_name="model", num_replicas=args.replicas,
                       max_model_len=args.max_model_len, kv_cache_bytes=args.kv_cache_bytes, block_size=32,
                       enable_prefix_caching=name != "no-cache", prefix_routing=name.startswith("kvpool"),
                       pool_enabled=name == "kvpool", router_port=args.router_port,
                       pool_host_dir=f"{pool_root}/host", pool_disk_dir=f"{pool_root}/disk")
    if name.startswith("rayllm"):
        from ray.serve.llm import LLMConfig, build_openai_app

        deployment = {"num_replicas": args.replicas, "max_ongoing_requests": cfg.max_ongoing_requests}
        if name == "rayllm-prefix":
            deployment["request_router_config"] = {
                "request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter"}
        llm = LLMConfig(
            model_loading_config={"model_id": "model", "model_source": model_path},
            accelerator_config={"kind": "cpu"},
            engine_kwargs=dict(block_size=32, kv_cache_memory_bytes=args.kv_cache_bytes, enforce_eager=True,
                               max_model_len=args.max_model_len, dtype=cfg.resolved_dtype(),
                               enable_prefix_caching=True, enable_prompt_tokens_details=True,
                               max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens),
            deployment_config=deployment,
            runtime_env={"env_vars": engine_env(cfg)},
        )
        app = build_openai_app({"llm_configs": [llm]})
    else:
        app = build_app(cfg)
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://127.0.0.1:{args.http_port}/{name}"


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
    peers = [results[p] for p in ("rayllm-default", "rayllm-prefix") if p in results]
    lines = ["| metric | " + " | ".join(results) + " | kvpool vs no-cache | kvpool vs best peer |",
             "|---" * (len(results) + 3) + "|"]
    verified = any("verified" in r for r in results.values())
    for m in METRICS + VERIFY_METRICS if verified else METRICS:
        row = [str(results[c].get(m)) for c in results]
        ours = results.get("kvpool", {}).get(m)
        vs_base = vs_peer = ""
        if isinstance(ours, (int, float)) and ours:
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

    from kvpool.bench.replay import Bound, load_sessions, replay, summarize
    from kvpool.model import resolve_model
    from kvpool.prompt import PromptRenderer

    model_path = resolve_model(args.model)
    renderer = PromptRenderer.from_pretrained(model_path)
    sessions = load_sessions(Path(args.trace), args.sessions, args.max_context, args.max_output, args.turns,
                             args.trace_format, vocab_size=len(renderer.tokenizer))
    configs = args.configs or CONFIGS
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    results: dict[str, dict] = {}
    records: dict[str, list] = {}  # per configuration, for the plots and the --out file
    pool_root = tempfile.mkdtemp(prefix="kvpool-compare-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        for name in configs:
            url = _deploy(name, args, model_path, f"{pool_root}/{name}")
            try:
                startup = _wait_ready(url)
                records[name], wall = asyncio.run(replay(url, sessions, args.duration, args.turns, args.think_scale,
                                                         args.max_output, Bound(32, renderer),
                                                         progress=not args.json, verify=args.verify))
                results[name] = {"startup_s": round(startup, 1), **summarize(records[name], wall)}
            except Exception as e:  # one configuration failing must not lose the others' numbers
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            finally:
                serve.delete(name)
                time.sleep(5)  # let the engines' processes exit before the next configuration starts
    finally:
        shutil.rmtree(pool_root, ignore_errors=True)
        serve.shutdown()
        ray.shutdown()
    if args.verify:
        from kvpool.bench.verify import verify_runs

        replayed = {name: recs for name, recs in records.items() if "error" not in results[name]}
        for name, summary in verify_runs(model_path, replayed, args.max_model_len, args.verify_tolerance,
                                         args.kv_cache_bytes, progress=not args.json).items():
            results[name].update(summary)
    out = {"bench": "compare", "model": args.model or "SmolLM2-135M-Instruct", "replicas": args.replicas,
           "kv_cache_bytes_per_replica": args.kv_cache_bytes, "sessions": args.sessions, "duration_s": args.duration,
           "max_context": args.max_context, "trace": args.trace,
           "trace_format": args.trace_format or detect_format(Path(args.trace)), "results": results}
    if args.out:
        from kvpool.bench.plots import plot_summaries, plot_turns

        path = Path(args.out)
        per_config = {name: [asdict(r) for r in recs] for name, recs in records.items()}
        path.write_text(json.dumps({**out, "records": per_config}, indent=1))
        plot_turns(records, path)
        plot_summaries(results, path)
    if not args.json:
        print(table(results))
    return out
