"""`kvpool`: benchmarks and tools. Each benchmark prints one JSON line."""

from __future__ import annotations

import argparse
import json
import re
import os
from pathlib import Path

from kvpool.bench.compare import CONFIGS, SMOKE_CONFIGS
from kvpool.bench.verify import LOGPROB_TOLERANCE
from kvpool.sim.costs import HARDWARE, MODELS
from kvpool.sim.policies import POLICIES as SIM_POLICIES
from kvpool.traces import FORMATS


def main(argv: list[str] | None = None) -> None:
    # stdout carries the result line only; vLLM (the --verify reference, Ray Serve LLM's driver side) logs to stderr.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    parser = argparse.ArgumentParser(prog="kvpool")
    sub = parser.add_subparsers(dest="cmd", required=True)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

    single = bench.add_parser("single", help="start-up time, then one request's TTFT and tokens/s")
    single.add_argument("--prompt-tokens", type=int, default=1024)
    single.add_argument("--max-tokens", type=int, default=64)
    single.add_argument("--timeout", type=float, default=600)
    single.add_argument("overrides", nargs="*", help="KVPoolConfig overrides, key=value")

    router = bench.add_parser("router", help="routing decision latency and KV-event ingest rate, no engines")
    router.add_argument("--blocks", type=int, default=1_000_000, help="blocks to index")
    router.add_argument("--replicas", type=int, default=8)
    router.add_argument("--nodes", type=int, default=2, help="nodes the replicas (and their pools) are spread over")
    router.add_argument("--sessions", type=int, default=0, help="0: as many as --blocks holds")
    router.add_argument("--prompt-tokens", type=int, default=100_000)
    router.add_argument("--block-size", type=int, default=32)
    router.add_argument("--blocks-per-event", type=int, default=16)
    router.add_argument("--decisions", type=int, default=500)
    router.add_argument("--churn-sessions", type=int, default=160,
                        help="sessions evicted and replaced, one at a time, after the decisions")

    transfer = bench.add_parser("transfer", help="pool write/read bandwidth vs memcpy (default: SmolLM2 KV blocks)")
    transfer.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    transfer.add_argument("--block-size", type=int, default=32)
    transfer.add_argument("--layers", type=int, default=30)
    transfer.add_argument("--kv-heads", type=int, default=3)
    transfer.add_argument("--head-dim", type=int, default=64)
    transfer.add_argument("--dtype-bytes", type=int, default=4, help="4: float32, the CPU default")
    transfer.add_argument("--dir", default="/dev/shm", help="where the host tier lives (a tmpfs)")
    transfer.add_argument("--repeats", type=int, default=5, help="rounds per batch size; the median is reported")

    scale = bench.add_parser("pool-scale", help="a pool shard's upkeep at a million blocks; the scheduler's lookup")
    scale.add_argument("--blocks", type=int, default=1_000_000)
    scale.add_argument("--block-bytes", type=int, default=1_474_560, help="default: a SmolLM2 float32 block")
    scale.add_argument("--writes-per-s", type=float, default=5000, help="new block files the engines write")
    scale.add_argument("--touches-per-s", type=float, default=5000, help="block files the engines load or touch")
    scale.add_argument("--seconds", type=float, default=30)
    scale.add_argument("--period", type=float, default=0.5, help="the shard's upkeep period")
    scale.add_argument("--lookups", type=int, default=200_000, help="blocks looked up, in chains of 64")
    scale.add_argument("--dir", default="/dev/shm", help="where the host tier lives (a tmpfs)")
    scale.add_argument("--seed", type=int, default=0)

    default_trace = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "claude-code"
    prompt = bench.add_parser("prompt", help="tokenizing agent turns whole vs reusing the previous turn's tokens")
    prompt.add_argument("--trace", default=str(default_trace), help="chat-message sessions (not token-id traces)")
    prompt.add_argument("--sessions", type=int, default=16)
    prompt.add_argument("--turns", type=int, default=0, help="0: every turn")
    prompt.add_argument("--max-context", type=int, default=100_000, help="tokens: sessions are scaled to fit")
    prompt.add_argument("--model", default="", help="whose tokenizer; default: the embedded model")

    def replay_args(p: argparse.ArgumentParser, duration: float = 0) -> None:
        p.add_argument("--trace", default=str(default_trace),
                       help="a trace file or folder: Claude Code transcripts, aiperf dataset.jsonl, Mooncake .jsonl,"
                            " SWE-agent .traj")
        p.add_argument("--trace-format", choices=FORMATS,
                       help="default: from the path's file or folder name, else claude-code")
        p.add_argument("--sessions", type=int, default=16,
                       help="sessions run at once (mooncake: the clients its requests are dealt to)")
        p.add_argument("--duration", type=float, default=duration,
                       help="seconds until the run stops (0: none, every turn of every session is served)")
        p.add_argument("--turns", type=int, default=0, help="at most this many turns per session (0: all)")
        p.add_argument("--max-context", type=int, default=7000, help="tokens; sessions are scaled to fit")
        p.add_argument("--max-output", type=int, default=64, help="cap on each turn's output tokens")
        p.add_argument("--think-scale", type=float, default=0.1, help="times the trace's think time")
        p.add_argument("--out", default="", help="write the results as JSON here, and X-*.png plots beside X.json")
        p.add_argument("--verify", action="store_true",
                       help="check every response's output tokens and logprobs against a no-cache reference")
        p.add_argument("--verify-tolerance", type=float, default=LOGPROB_TOLERANCE,
                       help="largest absolute logprob difference that still matches (the default is for float32)")

    replay = bench.add_parser("replay", help="replay agent sessions against an OpenAI endpoint (closed loop)")
    replay_args(replay)
    replay.add_argument("--url", default="http://127.0.0.1:8000")
    replay.add_argument("--tokenizer", default="",
                        help="the served model's directory: its tokens fit chat traces to --max-context, and it gives "
                             "the cache bound, the token-id prompts' vocabulary and the --verify reference; default: "
                             "the embedded model")
    replay.add_argument("--block-size", type=int, default=32)

    def deploy_args(p: argparse.ArgumentParser) -> None:
        """For the benchmarks that start the apps themselves, on a local Ray cluster."""
        p.add_argument("--model", default="", help="HF directory; default: the embedded SmolLM2")
        p.add_argument("--replicas", type=int, default=2)
        p.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="KV memory per replica")
        p.add_argument("--max-model-len", type=int, default=8192)
        p.add_argument("--max-num-batched-tokens", type=int, default=0,
                       help="tokens an engine schedules per step, every configuration alike (0: KV-Pool's default)")
        p.add_argument("--router-port", type=int, default=5601)
        p.add_argument("--http-port", type=int, default=8000)
        p.add_argument("--json", action="store_true", help="no progress bar; print the result as one JSON line last")
        p.add_argument("--pool-host-bytes", type=int, default=0,
                       help="KV-Pool's host tier, on /dev/shm (compare: the +host peers get it as engine KV, the "
                            "offloading peers as host memory); 0: as much as all replicas' engine KV")
        p.add_argument("--pool-disk-bytes", type=int, default=0, help="KV-Pool's disk tier (0: none)")
        p.add_argument("--pool-disk-dir", default="",
                       help="where the disk tier lives, on a real disk; default: <KVPOOL_CACHE_DIR>/bench-disk")

    overhead = bench.add_parser("overhead", help="where time to first token goes, per stage: cold, cached and "
                                                 "pool-loaded prompts, KV-Pool against Ray Serve LLM")
    deploy_args(overhead)
    overhead.set_defaults(kv_cache_bytes=0, replicas=1)
    overhead.add_argument("--prompts", type=int, default=5, help="prompts, each sent cold, cached and pool-loaded")
    overhead.add_argument("--prompt-words", type=int, default=2000, help="words per prompt (about as many tokens)")
    overhead.add_argument("--max-tokens", type=int, default=8)

    overload = bench.add_parser("overload", help="more requests at once than the server admits, memory sampled")
    overload.add_argument("--url", default="http://127.0.0.1:8000")
    overload.add_argument("--requests", type=int, default=1000)
    overload.add_argument("--concurrency", type=int, default=500, help="connections at once")
    overload.add_argument("--max-tokens", type=int, default=16)
    overload.add_argument("--timeout", type=float, default=600, help="seconds, per request")

    soak = bench.add_parser("soak", help="KV-Pool under steady agent load for --duration, memory sampled")
    replay_args(soak, duration=600)
    deploy_args(soak)
    soak.add_argument("--window", type=float, default=300, help="seconds per stability window")
    soak.add_argument("--config", default="kvpool", choices=["kvpool", "kvpool-router"],
                      help="kvpool-router: the same app with the pool off (a control)")

    compare = sub.add_parser("compare", help="the same replay against no caching, the peers and KV-Pool")
    replay_args(compare)
    deploy_args(compare)
    compare.add_argument("--configs", nargs="*", choices=CONFIGS, help="a subset, in this order")
    compare.add_argument("--chaos", default="", metavar="{kill,add}-replica@T",
                         help="kill one engine replica (or add one) T seconds into each configuration's run")
    compare.add_argument("--smoke", action="store_true",
                         help="4 sessions, 3 turns, short contexts, --verify, and (unless --configs) only "
                              "no-cache, the prefix-routing peer and KV-Pool: for CI")

    sim = sub.add_parser("simulate", help="routing and pool policies on a simulated cluster, from a trace")
    sim.add_argument("--trace", default=str(default_trace.parent / "kv-cache-tester"))
    sim.add_argument("--trace-format", choices=FORMATS, help="default: from the path")
    sim.add_argument("--trace-sessions", type=int, default=10_000, help="read at most this many sessions")
    sim.add_argument("--policies", nargs="*", choices=SIM_POLICIES, help="a subset, in this order (default: all)")
    sim.add_argument("--hardware", default="h200", choices=["cpu", *HARDWARE])
    sim.add_argument("--model", default="llama-3.1-8b", choices=list(MODELS),
                     help="the KV footprint and compute of this model (cpu: smollm2-135m)")
    sim.add_argument("--tp", type=int, default=1, help="GPUs per engine replica")
    sim.add_argument("--nodes", type=int, nargs="+", default=[8],
                     help="node count; several: a sweep, with the GPUs each policy needs for --slo-ttft-p90")
    sim.add_argument("--gpus-per-node", type=int, default=0, help="default: the hardware's (8; cpu: 2 replicas)")
    sim.add_argument("--kv-tokens", type=int, nargs="+",
                     help="engine KV per replica in tokens (default: what HBM leaves); several: a sweep")
    sim.add_argument("--host-gib-per-node", type=float, nargs="+", default=[1024],
                     help="pool host tier per node (KV-Pool: shared by the node; lmcache: split per replica); "
                          "several: a sweep")
    sim.add_argument("--disk-gib-per-node", type=float, default=0, help="KV-Pool's disk tier per node")
    sim.add_argument("--block-size", type=int, default=64, help="tokens per block (the trace's: kv-cache-tester 64)")
    sim.add_argument("--max-model-len", type=int, default=0,
                     help="longer requests are refused, as vLLM does (0: as long as a replica's KV holds)")
    sim.add_argument("--max-num-seqs", type=int, default=256)
    sim.add_argument("--max-num-batched-tokens", type=int, default=8192)
    sim.add_argument("--concurrency", type=int, default=1024, help="sessions held live at once")
    sim.add_argument("--duration", type=float, default=3600,
                     help="simulated seconds (0: a fixed workload, every session once to its end)")
    sim.add_argument("--max-context", type=int, default=0,
                     help="0: full length; else the sessions a replay with this --max-context sends (to predict one)")
    sim.add_argument("--turns", type=int, default=0, help="with --max-context: at most this many turns per session")
    sim.add_argument("--think-scale", type=float, default=1.0)
    sim.add_argument("--ramp", type=float, default=60, help="seconds over which the first sessions start")
    sim.add_argument("--max-output", type=int, default=0, help="cap output tokens (0: the trace's)")
    sim.add_argument("--slo-ttft-p90", type=float, default=2.0)
    sim.add_argument("--pool-period", type=float, default=10.0,
                     help="simulated seconds between pool shard passes (the real shard: 0.5 s; each pass sorts a tier)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true", help="only the JSON line")
    sim.add_argument("--out", default="", help="also write the result here, with PNG plots beside it")

    args = parser.parse_args(argv)
    if args.cmd == "simulate":
        from kvpool import sim as simulator

        result = simulator.run(args)
        if not args.json:
            print(simulator.table(result))
        print(json.dumps(result))
        return
    if hasattr(args, "pool_host_bytes"):  # the benchmarks that deploy apps
        args.pool_host_bytes = args.pool_host_bytes or args.kv_cache_bytes * args.replicas
        if not args.pool_disk_dir:
            from kvpool.model import cache_dir

            args.pool_disk_dir = str(cache_dir() / "bench-disk")
    if args.cmd == "compare":
        from kvpool.bench.compare import run as compare_run

        if args.smoke:
            args.sessions, args.turns, args.max_context, args.max_output, args.duration = 4, 3, 1500, 8, 0
            args.verify = True
            args.configs = args.configs or SMOKE_CONFIGS
        if args.chaos and not re.fullmatch(r"(kill|add)-replica@\d+(\.\d+)?", args.chaos):
            parser.error("--chaos takes kill-replica@SECONDS or add-replica@SECONDS")
        result = compare_run(args)
        if args.json:
            print(json.dumps(result))
        return
    if args.bench == "single":
        from kvpool.bench.single import run
    elif args.bench == "router":
        from kvpool.bench.router import run
    elif args.bench == "prompt":
        from kvpool.bench.prompt import run
    elif args.bench == "replay":
        from kvpool.bench.replay import run
    elif args.bench == "soak":
        from kvpool.bench.soak import run
    elif args.bench == "overhead":
        from kvpool.bench.overhead import run
    elif args.bench == "overload":
        from kvpool.bench.overload import run
    elif args.bench == "pool-scale":
        from kvpool.bench.pool_scale import run
    else:
        from kvpool.bench.transfer import run
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
