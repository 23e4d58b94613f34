"""`kvpool bench overhead`: where a request's time to its first token goes, per stage, on KV-Pool and on Ray Serve
LLM (PrefixCacheAffinityRouter) for the same prompts.

For each of `--prompts` fresh chat prompts (`--prompt-words` random words), three requests, one at a time,
streamed, greedy:
  cold         the prompt's first request: everything computed
  cached       the same prompt again at once: its blocks are in the engine's KV (a prefix-cache hit)
  pool_loaded  the same prompt after other prompts (twice the engine's KV) have pushed it out of the engine's
               KV: KV-Pool loads it from the pool; the peer, which has no pool, recomputes it
Each configuration has the same model, one replica and the same engine KV (`--kv-cache-bytes`, default: room for
about four prompts, or one `--max-model-len` request if more); KV-Pool's host tier holds at least a prompt and its
fillers, so a pool-loaded prompt is all in the pool (`below_engine_hit` counts requests with fewer cached tokens
than the same prompt's engine hit: 0 for KV-Pool, every one for the peer, which recomputes). KV-Pool's stages are
its Server-Timing header (app/engine_client.py STAGES); `unaccounted` is the client's TTFT less their sum (Serve's
HTTP proxy both ways, writing the first chunk, the client). The peer's path cannot be split: its TTFT is measured
the same way. Every cached and pool-loaded answer is checked against the same configuration's cold one (same
output tokens: `mismatched` must be 0), and KV-Pool's cold answers against the peer's.
"""

from __future__ import annotations

import json
import random
import shutil
import time

import httpx
import numpy as np

from kvpool.bench.transfer import kv_bytes_per_token

KINDS = ("cold", "cached", "pool_loaded")
CONFIGS = ("kvpool", "rayllm-prefix")


def ask(url: str, text: str, max_tokens: int) -> dict:
    """One streamed, greedy chat request: its TTFT, cached tokens, output token ids and Server-Timing (ms)."""
    body = {"model": "model", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
            "return_tokens_as_token_ids": True}
    out: dict = {"output_ids": []}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        timing = r.headers.get("server-timing")
        out["stages_ms"] = {k: float(v) for k, v in (i.split(";dur=") for i in timing.split(", "))} if timing \
            else None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if choice["delta"].get("content") and "ttft_ms" not in out:
                    out["ttft_ms"] = (time.perf_counter() - t0) * 1e3
                for entry in (choice.get("logprobs") or {}).get("content") or []:
                    out["output_ids"].append(int(entry["token"].removeprefix("token_id:")))
            if chunk.get("usage"):
                out["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                out["cached_tokens"] = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out.setdefault("ttft_ms", (time.perf_counter() - t0) * 1e3)
    return out


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(n))


VOCABULARY = ("the agent reads a file runs the tests edits code and writes a patch while the build waits on the "
              "linter for types errors warnings paths lines functions classes modules imports").split()


def probe(url: str, args, seed: int) -> dict[str, list[dict]]:
    """The three kinds of request for each prompt; fillers push a prompt out of the engine's KV between its cached
    and pool-loaded requests."""
    rng = random.Random(seed)
    per_kind: dict[str, list[dict]] = {k: [] for k in KINDS}
    for _ in range(args.prompts):
        text = words(rng, args.prompt_words)
        per_kind["cold"].append(ask(url, text, args.max_tokens))
        per_kind["cached"].append(ask(url, text, args.max_tokens))
        for _ in range(args.fillers):
            ask(url, words(rng, args.prompt_words), 1)
        per_kind["pool_loaded"].append(ask(url, text, args.max_tokens))
    return per_kind


def summary(per_kind: dict[str, list[dict]]) -> dict:
    """Medians per kind: TTFT, cached tokens, each stage and what the stages leave unaccounted; mismatches
    against the same prompt's cold answer."""
    out = {}
    for kind, recs in per_kind.items():
        s = {"requests": len(recs), "ttft_p50_ms": round(float(np.median([r["ttft_ms"] for r in recs])), 2),
             "cached_tokens_p50": int(np.median([r["cached_tokens"] for r in recs])),
             "prompt_tokens_p50": int(np.median([r["prompt_tokens"] for r in recs]))}
        timed = [r for r in recs if r["stages_ms"]]
        if timed:
            stages = dict.fromkeys(k for r in timed for k in r["stages_ms"])  # in the order requests went through
            s["stages_p50_ms"] = {k: round(float(np.median([r["stages_ms"].get(k, 0.0) for r in timed])), 3)
                                  for k in stages}
            s["unaccounted_p50_ms"] = round(float(np.median([r["ttft_ms"] - sum(r["stages_ms"].values())
                                                             for r in timed])), 3)
        if kind != "cold":
            s["mismatched"] = sum(r["output_ids"] != c["output_ids"] for r, c in zip(recs, per_kind["cold"]))
            s["below_engine_hit"] = sum(r["cached_tokens"] < c["cached_tokens"]
                                        for r, c in zip(recs, per_kind["cached"]))
        out[kind] = s
    return out


def run(args) -> dict:
    import ray
    from ray import serve
    from transformers import AutoConfig

    from kvpool.bench.compare import _deploy, _wait_ready, scratch_dirs
    from kvpool.config import KVPoolConfig
    from kvpool.model import resolve_model

    model_path = resolve_model(args.model)
    hf = AutoConfig.from_pretrained(model_path)
    dtype_bytes = 4 if KVPoolConfig(model=model_path).resolved_dtype() == "float32" else 2
    per_token = kv_bytes_per_token(hf.num_hidden_layers, hf.num_key_value_heads,
                                   getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                                   dtype_bytes)
    if args.replicas != 1:  # fillers sent to another replica would not push the prompt out of its own
        raise SystemExit("kvpool bench overhead runs one replica per configuration")
    prompt_bytes = (args.prompt_words + 128) * per_token  # a word is about a token; the chat template adds ~100
    # Room for about four prompts unless told (and for one request of max_model_len: vLLM refuses less); fillers
    # twice the engine's KV, so a prompt is surely pushed out; a host tier that keeps a prompt and all its fillers
    # (the pool evicts least recently used blocks: earlier prompts').
    args.kv_cache_bytes = args.kv_cache_bytes or max(4 * prompt_bytes, (args.max_model_len + 64) * per_token)
    args.fillers = -(-2 * args.kv_cache_bytes // prompt_bytes)
    args.pool_host_bytes = max(args.pool_host_bytes, (args.fillers + 2) * prompt_bytes)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    pool_dirs = scratch_dirs(args)
    results: dict[str, dict] = {}
    answers: dict[str, dict[str, list[dict]]] = {}
    try:
        for name in CONFIGS:
            url = _deploy(name, args, model_path, pool_dirs)
            try:
                _wait_ready(url)
                ask(url, "warm up the engine and the path", 2)
                answers[name] = probe(url, args, seed=1)
                results[name] = summary(answers[name])
            finally:
                serve.delete(name)
                time.sleep(5)  # the engine's processes exit before the next configuration starts
    finally:
        serve.shutdown()
        ray.shutdown()
        for d in pool_dirs:
            shutil.rmtree(d, ignore_errors=True)
    ours, peer = results["kvpool"], results["rayllm-prefix"]
    return {"bench": "overhead", "model": args.model or "SmolLM2-135M-Instruct", "prompts": args.prompts,
            "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
            "kv_cache_bytes_per_replica": args.kv_cache_bytes, "pool_host_bytes": args.pool_host_bytes,
            "fillers": args.fillers, "results": results,
            "kvpool_vs_peer_ttft_p50": {k: round(ours[k]["ttft_p50_ms"] / peer[k]["ttft_p50_ms"], 3) for k in KINDS},
            "cold_mismatched_vs_peer": sum(a["output_ids"] != b["output_ids"] for a, b in
                                           zip(answers["kvpool"]["cold"], answers["rayllm-prefix"]["cold"]))}
