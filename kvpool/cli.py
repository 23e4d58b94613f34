"""`kvpool`: benchmarks and tools. Each benchmark prints one JSON line."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
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
    router.add_argument("--sessions", type=int, default=0, help="0: as many as --blocks holds")
    router.add_argument("--prompt-tokens", type=int, default=100_000)
    router.add_argument("--block-size", type=int, default=32)
    router.add_argument("--blocks-per-event", type=int, default=16)
    router.add_argument("--decisions", type=int, default=500)

    transfer = bench.add_parser("transfer", help="pool write/read bandwidth vs memcpy (default: SmolLM2 KV blocks)")
    transfer.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    transfer.add_argument("--block-size", type=int, default=32)
    transfer.add_argument("--layers", type=int, default=30)
    transfer.add_argument("--kv-heads", type=int, default=3)
    transfer.add_argument("--head-dim", type=int, default=64)
    transfer.add_argument("--dtype-bytes", type=int, default=4, help="4: float32, the CPU default")
    transfer.add_argument("--dir", default="/dev/shm", help="where the host tier lives (a tmpfs)")

    args = parser.parse_args(argv)
    if args.bench == "single":
        from kvpool.bench.single import run
    elif args.bench == "router":
        from kvpool.bench.router import run
    else:
        from kvpool.bench.transfer import run
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
