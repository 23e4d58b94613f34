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

    args = parser.parse_args(argv)
    if args.bench == "single":
        from kvpool.bench.single import run

        print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
