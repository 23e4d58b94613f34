"""`kvpool bench single`: start-up time of `serve run app:deployment`, then one request's TTFT and decode speed.

Starts the app as a user would (a `serve run` subprocess), waits for the first successful completion, then streams
requests with a fresh random prompt (a cold prefill) and the same prompt again (a prefix-cache hit).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx


def _stream(url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    total = time.perf_counter() - t0
    n_out = usage["completion_tokens"]
    return {"ttft_s": round(ttft or total, 4), "total_s": round(total, 3),
            "decode_tok_s": round((n_out - 1) / max(total - (ttft or total), 1e-9), 1),
            "prefill_tok_s": round(len(prompt) / (ttft or total), 1),
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def run(args) -> dict:
    url = "http://127.0.0.1:8000"  # `serve run`'s default HTTP address
    cmd = [os.path.join(os.path.dirname(sys.executable), "serve"), "run", "app:deployment", *args.overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        model = None
        while time.perf_counter() - t0 < args.timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
            try:
                model = model or httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
                r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1},
                               timeout=60)
                if r.status_code == 200:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("app did not answer in time")
        startup = time.perf_counter() - t0
        rng = random.Random(0)
        prompt = [rng.randrange(100, 20000) for _ in range(args.prompt_tokens)]
        cold = _stream(url, model, prompt, args.max_tokens)
        warm = _stream(url, model, prompt, args.max_tokens)
        return {"bench": "single", "model": model, "startup_s": round(startup, 1), "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens, "cold": cold, "cached": warm}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
