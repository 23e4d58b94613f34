"""`kvpool bench overload`: more requests at once than the server admits, against a running app (`--url`).

Sends `--requests` completions over `--concurrency` connections at once (bounded in count and, by `--timeout`, in
time), with the machine's memory sampled, then checks the server still answers. Reports the status codes (admitted
requests are 200; past the bounded queues, 429 with Retry-After), how many 429s carried Retry-After, latency of the
admitted ones, and memory before, at peak and after, as one JSON line.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np


async def _overload(url: str, n: int, concurrency: int, max_tokens: int, timeout: float) -> dict:
    import httpx
    import psutil

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        memory = [psutil.virtual_memory().used]
        codes: Counter = Counter()
        retry_after, latencies = 0, []

        async def sample() -> None:
            while True:
                memory.append(psutil.virtual_memory().used)
                await asyncio.sleep(0.5)

        async def one(i: int) -> None:
            nonlocal retry_after
            body = {"model": model, "prompt": f"overload request {i}: " + "tool output line\n" * 40,
                    "max_tokens": max_tokens, "temperature": 0}
            t = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/completions", json=body)
            except httpx.HTTPError as e:
                codes[type(e).__name__] += 1
                return
            codes[r.status_code] += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t)
            elif r.status_code in (429, 503) and r.headers.get("retry-after"):
                retry_after += 1

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        sampler.cancel()
        await asyncio.sleep(5)
        after = psutil.virtual_memory().used
        ok = (await client.post(f"{url}/v1/completions", json={"model": model, "prompt": "after", "max_tokens": 2}))
    lat = np.array(latencies) if latencies else np.array([np.nan])
    mib = 2**20
    return {"requests": n, "concurrency": concurrency, "wall_s": round(wall, 1),
            "status": {str(k): v for k, v in sorted(codes.items(), key=str)},
            "rejected_with_retry_after": retry_after,
            "admitted_latency_p50_s": round(float(np.median(lat)), 2), "admitted_latency_max_s": round(float(lat.max()), 2),
            "memory_used_mib": {"before": round(memory[0] / mib), "peak": round(max(memory) / mib),
                                "after": round(after / mib)},
            "serves_after": ok.status_code == 200}


def run(args) -> dict:
    return {"bench": "overload", "url": args.url,
            **asyncio.run(_overload(args.url.rstrip("/"), args.requests, args.concurrency, args.max_tokens,
                                    args.timeout))}
