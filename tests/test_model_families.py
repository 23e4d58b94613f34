"""Model families beyond dense full attention: a sliding-window model through the pool's connector (real vLLM CPU
engines, in-process) and through the real app (Serve, router, HTTP), and which families the pool serves.

The connector supports vLLM's hybrid memory allocator: a sliding-window model keeps its sliding-window layers' memory
bounded by the window, and a pool block holds every KV cache group's part (a load restores all of them or none).
State-space and linear-attention models are served without the pool (kvpool.connector.unpoolable_reason).
"""

import random

import httpx
import pytest

from conftest import TEST_BLOCK, wait_ready
from test_pool_correctness import (BLOCK, close, differences, engine, generate, pool_file, preempted_differences,
                                   scratch_reference, tokens, wait_pooled)
from tiny_model import build_tiny_model

WINDOW = 64


@pytest.fixture(scope="module")
def sliding_model_dir():
    from kvpool.model import cache_dir

    return build_tiny_model(cache_dir() / "test-models" / f"tiny-llama-sliding-{WINDOW}", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def sliding_reference(sliding_model_dir):
    yield from scratch_reference(sliding_model_dir)


@pytest.fixture(scope="module")
def all_sliding_model_dir():
    from kvpool.model import cache_dir

    return build_tiny_model(cache_dir() / "test-models" / f"tiny-llama-all-sliding-{WINDOW}", sliding_window=WINDOW,
                            all_sliding=True)


@pytest.fixture(scope="module")
def all_sliding_reference(all_sliding_model_dir):
    yield from scratch_reference(all_sliding_model_dir)


@pytest.mark.parametrize("layers", ["alternating", "all_sliding"])
def test_a_sliding_window_prefix_from_the_pool_equals_computing_it(layers, pool_dirs, request):
    """Engine A computes a prefix many windows long with vLLM's hybrid memory allocator on (the pool does not turn
    it off). A corrupt block in the last window: engine B computes the request from scratch, answers correctly,
    counts nothing as cached, and saves correct KV. Engine C loads the whole prefix from the pool and answers as if
    it had computed it. Layers alternating sliding and full (gpt-oss): two KV cache groups, a pool block holds both.
    Every layer sliding (Mistral 7B v0.1): one group, null blocks before the window; there vLLM's recovery of single
    failed blocks, which recomputes from the failed block with the blocks before it as they are, gave wrong logprobs
    (the window before it was null, never loaded), so the connector loads such models whole or not at all too."""
    from kvpool.hashing import pool_keys, request_namespace

    model_dir = request.getfixturevalue("sliding_model_dir" if layers == "alternating" else "all_sliding_model_dir")
    reference = request.getfixturevalue("sliding_reference" if layers == "alternating" else "all_sliding_reference")
    prefix, suffix, more = tokens(60, 16 * BLOCK), tokens(61, 50), tokens(62, 40)
    keys = pool_keys(prefix, BLOCK, request_namespace())
    a = engine(model_dir, pool_dirs)
    hybrid = not a.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    generate(a, [prefix], max_tokens=1)
    wait_pooled(pool_dirs, keys[:15])
    close(a)
    assert hybrid, "the pool turned vLLM's hybrid memory allocator off"
    # Block 14 is in the window of the prompt's next token: every layer reads it. With every layer sliding, block 3
    # is before every window the requests below need: never read, so its damage must not fail a load.
    for victim in (keys[14], keys[3]) if layers == "all_sliding" else (keys[14],):
        bad = bytearray(pool_file(pool_dirs, victim).read_bytes())
        bad[len(bad) // 4: 3 * len(bad) // 4] = random.Random(1).randbytes(3 * len(bad) // 4 - len(bad) // 4)
        pool_file(pool_dirs, victim).write_bytes(bytes(bad))

    b = engine(model_dir, pool_dirs)
    got_b = generate(b, [prefix + suffix])
    wait_pooled(pool_dirs, keys[14:15])  # computed again and saved again
    close(b)
    assert differences(got_b, reference([prefix + suffix])) == []
    assert got_b[0][0] == 0, "tokens of a failed load were counted as cached"

    c = engine(model_dir, pool_dirs)
    got_c = generate(c, [prefix + suffix + more])
    close(c)
    assert differences(got_c, reference([prefix + suffix + more])) == []
    assert got_c[0][0] >= 16 * BLOCK, "the pooled prefix was not loaded"


def test_the_pool_identity_of_a_sliding_window_model_names_its_group_layout(sliding_model_dir):
    """With vLLM's hybrid memory allocator off, the same model's block holds the same bytes in another order (one
    group of every layer): its blocks go to another directory."""
    from vllm.engine.arg_utils import EngineArgs

    from kvpool.connector import layout_name

    def config(**kw):
        return EngineArgs(model=str(sliding_model_dir), dtype="float32", block_size=BLOCK, max_model_len=1024,
                          enforce_eager=True, **kw).create_engine_config()

    assert layout_name(config(), 0) != layout_name(config(disable_hybrid_kv_cache_manager=True), 0)


def test_preempted_sliding_window_requests_with_pool_hits_are_correct(sliding_model_dir, pool_dirs,
                                                                     sliding_reference):
    """As test_pool_correctness's preemption test, with the sliding-window model: a request preempted after its
    pool load is loaded again when it resumes."""
    assert preempted_differences(sliding_model_dir, pool_dirs, sliding_reference, seed=70) == []


@pytest.fixture(scope="module")
def sliding_app(ray_cluster, sliding_model_dir, tmp_path_factory):
    from ray import serve

    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    cfg = KVPoolConfig(model=str(sliding_model_dir), served_model_name="sliding", num_replicas=1, max_model_len=4096,
                       kv_cache_bytes=16 << 20, block_size=TEST_BLOCK, router_port=5594,
                       pool_host_dir=str(tmp_path_factory.mktemp("s-host")),
                       pool_disk_dir=str(tmp_path_factory.mktemp("s-disk")))
    assert cfg.pool_enabled
    serve.run(build_app(cfg), name="sliding", route_prefix="/sliding", blocking=False)
    url = "http://127.0.0.1:8000/sliding"
    wait_ready(url, "sliding")
    yield url
    serve.delete("sliding")


def test_a_sliding_window_model_is_served_with_the_pool_and_vllms_own_prefix_cache(sliding_app):
    stats = httpx.get(f"{sliding_app}/v1/kvpool/stats", timeout=30).json()
    assert stats["pool"] is not None and stats["pool_off"] is None, stats
    words = "the quick brown fox jumps over a lazy dog while agents read files run tests".split()
    rng = random.Random(17)
    prompt = " ".join(rng.choice(words) for _ in range(500))  # many windows long

    def complete() -> dict:
        r = httpx.post(f"{sliding_app}/v1/completions", timeout=120,
                       json={"model": "sliding", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                             "logprobs": 1})
        assert r.status_code == 200, r.text
        return r.json()

    cold, warm = complete(), complete()
    assert cold["usage"]["prompt_tokens"] > 4 * WINDOW
    assert (cold["usage"]["prompt_tokens_details"] or {}).get("cached_tokens", 0) == 0
    # vLLM's hybrid prefix cache serves the repeat (every layer group's blocks are cached)...
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= cold["usage"]["prompt_tokens"] - 2 * TEST_BLOCK
    # ...and gives what the cold request computed from scratch.
    (c,), (w,) = cold["choices"], warm["choices"]
    assert w["text"] == c["text"]
    assert max(abs(a - b) for a, b in zip(w["logprobs"]["token_logprobs"], c["logprobs"]["token_logprobs"])) < 1e-3


FAMILIES = {  # a config.json of each family (no weights: vLLM's ModelConfig reads the config only)
    "dense full attention (Llama)": (dict(model_type="llama", architectures=["LlamaForCausalLM"]), None),
    "MoE (Mixtral)": (dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                           num_experts_per_tok=2), None),
    "MLA (DeepSeek V3)": (dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], kv_lora_rank=32,
                               q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), None),
    "sliding window (Gemma 3)": (dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                                      num_hidden_layers=6, sliding_window=64), None),
    "sliding window + MoE (gpt-oss)": (dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], head_dim=16,
                                            num_local_experts=4, sliding_window=64), None),
    "sliding window, every layer (Mistral v0.1)": (dict(model_type="mistral", architectures=["MistralForCausalLM"],
                                                        sliding_window=4096), None),
    "chunked local attention (Llama 4)": (dict(model_type="llama4_text", architectures=["Llama4ForCausalLM"],
                                               head_dim=16, attention_chunk_size=128, num_local_experts=4),
                                          "chunked"),
    "hybrid linear attention (Qwen3-Next)": (dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"],
                                                  head_dim=16, num_hidden_layers=4), "linear-attention"),
    "hybrid SSM (Jamba)": (dict(model_type="jamba", architectures=["JambaForCausalLM"], num_hidden_layers=4),
                           "state-space"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pool_serves_the_families_its_connector_moves_and_steps_aside_for_the_others(family, tmp_path):
    import json

    from vllm.config import ModelConfig

    from kvpool.connector import unpoolable_reason

    config, refused_for = FAMILIES[family]
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps({**shape, **config}))
    reason = unpoolable_reason(ModelConfig(model=str(tmp_path), tokenizer=str(tmp_path), skip_tokenizer_init=True,
                                           dtype="float32"))
    assert (reason is None) if refused_for is None else (refused_for in reason), reason
