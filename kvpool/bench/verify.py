"""Differential output verification: every greedy response of a benchmark run, checked against a reference computed
with no cache at all.

The benchmarks' requests (with `--verify`) are greedy and ask for each output token's id and logprob (GREEDY, and
`return_tokens_as_token_ids`). The reference is vLLM's offline engine (`vllm.LLM`) on the same model, dtype (as
KV-Pool resolves it), block size and max_model_len (the servers', where known), with prefix caching off and no KV
connector, computing one request at a time (no batching), each distinct (prompt token ids, max_tokens) once. It
starts only after the servers under test are done, so it never competes with them for the cores.

A response matches when its output token ids equal the reference's and each token's logprob is within
LOGPROB_TOLERANCE (absolute) of the reference's, compared up to the first token that differs (after it, greedy
decoding continues from another text, and nothing is comparable).

The tolerance, 1e-3, is for float32 on CPU, where batching and cache hits move logprobs very little. Measured on this
project's 2-core machines (largest difference on matching tokens, every configuration of `kvpool compare`): the test
model (`--smoke`) 4.8e-7, one float32 ulp; SmolLM2-135M (6 sessions x 4 turns, 2000-token contexts) 1.5e-5 to
1.9e-5 for no-cache, Ray Serve LLM (default routing) and KV-Pool alike, with no token differing. 1e-3 is 50 times
that noise floor; KV that is not the prompt's (another prefix's, a torn block) changes the distribution itself.
GPUs in bf16 batch with far more noise (and flip near-tied greedy tokens): pass a larger `--verify-tolerance` there
and read mismatches against no-cache's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from tqdm import tqdm

if TYPE_CHECKING:
    from kvpool.bench.replay import Record  # replay imports this module for GREEDY

LOGPROB_TOLERANCE = 1e-3
MISMATCHES_SHOWN = 5

# The sampling the verified requests and the reference both use. The penalties are said explicitly (their neutral
# values) because vLLM's OpenAI server (Ray Serve LLM's too) fills fields a request leaves unset from the model's
# generation_config.json, and KV-Pool does not: a penalty there would change greedy outputs on one side only.
GREEDY = {"temperature": 0, "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}

Key = tuple[tuple[int, ...], int]  # a request as the reference computes it: (prompt token ids, max_tokens)


@dataclass
class Answer:
    token_ids: list[int]
    logprobs: list[float]  # the sampled token's, per position


def _checkable(r: Record) -> bool:
    return r.error is None and r.latency_s is not None and r.prompt_ids is not None


def _key(r: Record) -> Key:
    return tuple(r.prompt_ids), r.max_tokens


def verify_runs(model_path: str, runs: dict[str, list[Record]], max_model_len: int | None, tolerance: float,
                kv_cache_bytes: int = 1 << 30, progress: bool = True) -> dict[str, dict]:
    """Each run's `check` against one reference for all. `max_model_len`: the servers' (None when unknown: the
    longest request's); `kv_cache_bytes` must hold one sequence that long (a replica's KV memory of the run does)."""
    answers = reference_answers(model_path, runs.values(), max_model_len, kv_cache_bytes, progress)
    return {name: check(records, answers, tolerance) for name, records in runs.items()}


def reference_answers(model_path: str, runs: Iterable[list[Record]], max_model_len: int | None,
                      kv_cache_bytes: int, progress: bool) -> dict[Key, Answer]:
    """The no-cache answer to every distinct request of these runs."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvpool.config import KVPoolConfig

    keys = list(dict.fromkeys(_key(r) for records in runs for r in records if _checkable(r)))
    if not keys:
        return {}
    max_model_len = max_model_len or max(len(ids) + max_tokens for ids, max_tokens in keys)
    cfg = KVPoolConfig(model=model_path, num_replicas=1)
    os.environ.update(cfg.engine_env())  # as a replica's engine, with the whole machine to itself
    llm = LLM(model=model_path, dtype=cfg.resolved_dtype(), block_size=cfg.block_size, enforce_eager=True,
              max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes, enable_prefix_caching=False)
    answers = {}
    for ids, max_tokens in tqdm(keys, desc="reference", unit="request", disable=not progress):
        params = SamplingParams(**GREEDY, max_tokens=max_tokens, logprobs=0)
        out = llm.generate(TokensPrompt(prompt_token_ids=list(ids)), params, use_tqdm=False)[0].outputs[0]
        answers[ids, max_tokens] = Answer(list(out.token_ids),
                                          [step[t].logprob for t, step in zip(out.token_ids, out.logprobs)])
    llm.llm_engine.engine_core.shutdown()
    return answers


def first_difference(expected: Answer, token_ids: list[int], logprobs: list[float],
                     tolerance: float = LOGPROB_TOLERANCE) -> dict | None:
    """Where a response first departs from the reference (None: it matches)."""
    for i, (want, got) in enumerate(zip(expected.token_ids, token_ids)):
        if want != got:
            return {"position": i, "expected_token": want, "got_token": got}
        if abs(expected.logprobs[i] - logprobs[i]) > tolerance:
            return {"position": i, "token": want, "expected_logprob": expected.logprobs[i], "got_logprob": logprobs[i]}
    if len(expected.token_ids) != len(token_ids):  # one stopped early (EOS) where the other went on
        i = min(len(expected.token_ids), len(token_ids))
        return {"position": i, "expected_token": expected.token_ids[i] if i < len(expected.token_ids) else None,
                "got_token": token_ids[i] if i < len(token_ids) else None}
    return None


def check(records: list[Record], answers: dict[Key, Answer], tolerance: float = LOGPROB_TOLERANCE) -> dict:
    """A run's verification summary: `verified` responses checked, `mismatched` of them, the first mismatches, and
    the largest logprob difference seen on matching tokens (the noise floor of this server on this machine)."""
    checked = [r for r in records if _checkable(r)]
    mismatches, spread = [], 0.0
    for r in checked:
        expected = answers[_key(r)]
        diff = first_difference(expected, r.output_ids, r.logprobs, tolerance)
        if diff:
            mismatches.append({"session": r.session, "turn": r.turn, "cached_tokens": r.cached_tokens,
                               "route_reason": r.route_reason, **diff})
        same = diff["position"] if diff else len(expected.token_ids)
        spread = max([spread, *(abs(a - b) for a, b in zip(expected.logprobs[:same], r.logprobs[:same]))])
    return {"verified": len(checked), "mismatched": len(mismatches), "logprob_tolerance": tolerance,
            "logprob_max_abs_diff": float(f"{spread:.3g}"), "mismatches": mismatches[:MISMATCHES_SHOWN]}
