"""Pooled KV is never wrong: the connector under preemption, failed loads, several ranks, a changed identity and a
full disk, with real vLLM CPU engines (in-process, sharing one pool directory as replicas on one node do).

Every engine check compares greedy tokens and the logprobs of every generated token with a reference computed from
scratch (no prefix cache, no pool): one wrong KV value moves them.
"""

import random

import pytest

from conftest import close, in_process_llm
from kvpool.connector import kv_transfer_config

VOCAB = 390
BLOCK = 32


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def engine(model_dir, pool_dirs=None, prefix_caching=True, kv_bytes=16 << 20, max_model_len=4096, in_process=True,
           **extra):
    """A test's engine; `in_process` (conftest.in_process_llm) unless another engine lives beside it (a module's
    reference runs in its own processes)."""
    from vllm import LLM

    kw = dict(model=str(model_dir), block_size=BLOCK, kv_cache_memory_bytes=kv_bytes, enforce_eager=True,
              max_model_len=max_model_len, dtype="float32", enable_prefix_caching=prefix_caching,
              disable_log_stats=False, **extra)
    if pool_dirs:
        kw.update(kv_transfer_config=kv_transfer_config(*pool_dirs), async_scheduling=False)
    return in_process_llm(**kw) if in_process else LLM(**kw)


def generate(llm, prompts, max_tokens=8):
    """Greedy outputs of `prompts`, all submitted at once: [(cached tokens, token ids, logprobs)]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True),
                        use_tqdm=False)
    return [(o.num_cached_tokens, list(o.outputs[0].token_ids),
             [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outs]


def preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


LOGPROB_TOL = 1e-3  # fp32 on CPU: batching moves a logprob by ~1e-5; wrong KV moves it by far more


def differences(got, want) -> list[str]:
    """Where outputs differ from the reference: tokens exactly, logprobs within LOGPROB_TOL."""
    bad = []
    for i, ((_, toks, lps), (_, rtoks, rlps)) in enumerate(zip(got, want)):
        if toks != rtoks:
            pos = next(j for j, (a, b) in enumerate(zip(toks + [None], rtoks + [None])) if a != b)
            bad.append(f"request {i}: tokens differ from position {pos}")
        elif max(abs(a - b) for a, b in zip(lps, rlps)) > LOGPROB_TOL:
            bad.append(f"request {i}: logprobs differ by {max(abs(a - b) for a, b in zip(lps, rlps)):.2e}")
    return bad


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    yield from scratch_reference(tiny_model_dir)


def scratch_reference(model_dir):
    """A fixture's body: the model's outputs computed from scratch (no prefix cache, no pool), one prompt at a time,
    kept by prompt."""
    llm = engine(model_dir, prefix_caching=False, in_process=False)
    cache = {}

    def compute(prompts, max_tokens=8):
        for p in prompts:
            if (tuple(p), max_tokens) not in cache:
                cache[(tuple(p), max_tokens)] = generate(llm, [p], max_tokens)[0]
        return [cache[(tuple(p), max_tokens)] for p in prompts]

    yield compute
    close(llm)


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "engine-cache-only"])
def test_preempted_requests_with_pool_hits_are_correct(tiny_model_dir, pool_dirs, reference, pool):
    """A shared prefix and 12 distinct suffixes, each sent alone first (so the pool holds them all), then all 12 at
    once in a KV cache far smaller than they need: vLLM preempts, and a resumed request's pool hits are claimed
    again, so they must be loaded again. Without the pool (vLLM's own prefix cache only) the same run is the
    control that the tolerance holds batching noise."""
    assert preempted_differences(tiny_model_dir, pool_dirs if pool else None, reference, seed=10) == []


def preempted_differences(model_dir, pool_dirs, reference, seed: int) -> list[str]:
    """The preemption check's run: how the 12 outputs differ from `reference`."""
    prefix = tokens(seed, 18 * BLOCK)
    prompts = [prefix + tokens(seed * 10 + i, 150) for i in range(12)]
    llm = engine(model_dir, pool_dirs, kv_bytes=64 * BLOCK * 1024, max_model_len=1024)
    for p in prompts:
        generate(llm, [p], max_tokens=1)
    got = generate(llm, prompts, max_tokens=200)
    n_preempted = preemptions(llm)
    close(llm)
    assert n_preempted > 0, "the test did not force a preemption"
    return differences(got, reference(prompts, max_tokens=200))


def pool_file(pool_dirs, key):
    from pathlib import Path

    return next(Path(pool_dirs[0]).rglob(f"{key}.arrow"), None)


def wait_pooled(pool_dirs, keys, timeout=30):
    """Until every key has a block file (saves are written by a background thread)."""
    import time

    deadline = time.time() + timeout
    while any(pool_file(pool_dirs, k) is None for k in keys):
        assert time.time() < deadline, "blocks not saved"
        time.sleep(0.1)


def test_failed_load_saves_nothing_wrong(tiny_model_dir, pool_dirs, reference):
    """A block that fails to load (here: corrupt) in the step where the request also computes its new blocks: those
    blocks were computed on top of the failed ones and must not be saved; the failed tokens are no cache hit; the
    corrupt file goes; and once a correct copy of the block is back, the next request loads correct KV all along."""
    from kvpool.hashing import pool_keys, request_namespace

    prefix, suffix, more = tokens(20, 20 * BLOCK), tokens(21, 100), tokens(22, 40)
    keys = pool_keys(prefix + suffix, BLOCK, request_namespace())
    a = engine(tiny_model_dir, pool_dirs)
    generate(a, [prefix], max_tokens=1)
    wait_pooled(pool_dirs, keys[:20])
    close(a)
    victim = pool_file(pool_dirs, keys[10])
    good = victim.read_bytes()
    bad = bytearray(good)  # the middle of the file is KV payload: make that garbage (the checksum fails)
    bad[len(bad) // 4: 3 * len(bad) // 4] = random.Random(0).randbytes(3 * len(bad) // 4 - len(bad) // 4)
    victim.write_bytes(bytes(bad))

    b = engine(tiny_model_dir, pool_dirs)  # its own cache is empty: it claims all 20 pooled blocks
    got_b = generate(b, [prefix + suffix])
    wait_pooled(pool_dirs, keys[20:23])  # the suffix's blocks, saved once computed on correct KV
    close(b)
    assert differences(got_b, reference([prefix + suffix])) == []

    victim.write_bytes(good)  # a correct copy is back (as when another engine computes the block again)
    c = engine(tiny_model_dir, pool_dirs)
    got_c = generate(c, [prefix + suffix + more])
    close(c)
    assert differences(got_c, reference([prefix + suffix + more])) == [], "wrong KV was saved after a failed load"
    assert got_c[0][0] >= 23 * BLOCK
    assert got_b[0][0] == 10 * BLOCK, "tokens of a failed load were counted as cached"


def test_block_counts_as_pooled_only_where_every_rank_holds_it(tmp_path):
    from kvpool.pool_store import EngineStores

    stores = EngineStores(tmp_path / "h", tmp_path / "d", ["layout-rank0", "layout-rank1"])
    keys = [f"{i:032x}" for i in range(5)]
    for k in keys:
        stores.ranks[0].put(k, b"rank0" * 10)
    for k in keys[:3]:
        stores.ranks[1].put(k, b"rank1" * 10)
    assert stores.leading_hits(keys) == 3
    assert stores.contains(keys[2]) and not stores.contains(keys[3])


def test_cpu_loads_write_into_the_cache_itself():
    """A KV cache whose blocks are not contiguous (a permuted layout): every byte view aliases the cache, so bytes
    read into the views land in the cache, never in a temporary copy."""
    import torch

    from kvpool.connector import byte_view, contiguous_pieces

    cache = torch.zeros(4, 6, 2, 8).permute(1, 0, 2, 3)  # (blocks=6, 4, 2, 8), block dimension not outermost
    block = cache[3]
    assert not block.is_contiguous()
    views = [byte_view(p) for p in contiguous_pieces(block)]
    assert sum(v.nbytes for v in views) == block.numel() * 4
    payload = torch.arange(block.numel(), dtype=torch.float32)
    raw = payload.view(torch.uint8).numpy().tobytes()
    off = 0
    for v in views:
        v[:] = raw[off:off + v.nbytes]
        off += v.nbytes
    assert torch.equal(cache[3].reshape(-1), payload), "the bytes did not land in the cache"
    assert cache[2].abs().sum() == 0


def test_new_weights_at_the_same_path_never_load_old_kv(tiny_model_dir, tmp_path, pool_dirs):
    """A model updated in place (same path, same shapes, new weights) finds none of the old weights' pooled KV."""
    import shutil

    from tiny_model import build_tiny_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    prompt, more = tokens(30, 12 * BLOCK), tokens(31, 40)
    a = engine(model, pool_dirs)
    generate(a, [prompt], max_tokens=1)
    close(a)
    assert pool_file_count(pool_dirs) >= 12
    updated = build_tiny_model(tmp_path / "updated", seed=1)
    shutil.copy(updated / "model.safetensors", model / "model.safetensors")
    b = engine(model, pool_dirs)
    got = generate(b, [prompt + more])
    close(b)
    ref = engine(model, prefix_caching=False)
    want = generate(ref, [prompt + more])
    close(ref)
    assert got[0][0] == 0, "KV of the old weights was loaded"
    assert differences(got, want) == []


def pool_file_count(pool_dirs) -> int:
    from pathlib import Path

    return sum(1 for d in pool_dirs for _ in Path(d).rglob("*.arrow"))


def test_pool_identity_names_what_the_bytes_mean(tiny_model_dir, monkeypatch):
    """Another vLLM version, KV cache dtype or rank reads other directories (a pool on disk outlives upgrades)."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from kvpool.connector import layout_name

    def config(**kw):
        return EngineArgs(model=str(tiny_model_dir), dtype="float32", block_size=BLOCK, max_model_len=1024,
                          enforce_eager=True, **kw).create_engine_config()

    base = layout_name(config(), 0)
    assert layout_name(config(), 0) == base
    assert layout_name(config(), 1) != base
    # bfloat16, not fp8: vLLM's CPU backend refuses fp8 KV without AVX-512, and this must run on any CPU
    assert layout_name(config(kv_cache_dtype="bfloat16"), 0) != base
    monkeypatch.setattr(vllm, "__version__", "0.0.1")
    assert layout_name(config(), 0) != base


@pytest.fixture
def small_tiers(tmp_path):
    """Host and disk tiers on size-limited file systems (tmpfs mounts): writes fail with ENOSPC when they fill."""
    import subprocess

    dirs = [tmp_path / "host", tmp_path / "disk"]
    mounted = []
    try:
        for d, size in zip(dirs, ("256k", "128k")):
            d.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                              capture_output=True).returncode:
                pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
            mounted.append(d)
        yield [str(d) for d in dirs]
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_tiers_keep_serving_and_leave_no_temporary_files(tiny_model_dir, small_tiers, reference, ray_cluster):
    from pathlib import Path

    from actors.pool import PoolShard
    from kvpool.config import KVPoolConfig

    host, disk = small_tiers
    block_bytes = BLOCK * 1024  # tiny model, float32: 1 KiB per token
    # The budgets exceed what the file systems hold: the tiers fill before the shard would make room.
    cfg = KVPoolConfig(pool_host_dir=host, pool_disk_dir=disk, pool_host_bytes=4 * block_bytes,
                       pool_disk_bytes=64 * block_bytes)
    shard = PoolShard(cfg)
    llm = engine(tiny_model_dir, cfg.pool_dirs(""))  # the namespace of the shard's app
    for i in range(6):  # 6 prompts x 9 blocks, several times what both tiers hold
        prompt = tokens(400 + i, 300)
        got = generate(llm, [prompt])
        assert differences(got, reference([prompt])) == []
        st = shard.maintain()
        assert st["host_bytes"] <= cfg.pool_host_bytes
    close(llm)
    st = shard.maintain()
    assert st["evicted"] > 0
    assert [p for d in small_tiers for p in Path(d).rglob("*.tmp")] == []
