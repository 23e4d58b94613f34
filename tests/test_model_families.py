"""Model families beyond dense full attention, through the real app (Serve, router, HTTP) with the pool configured.

The pool's connector moves one group of full-attention layers. A model with sliding-window layers needs vLLM's hybrid
KV cache manager, which vLLM turns off for such a connector (and then runs the model with full-attention memory, or
refuses a hybrid SSM model at startup), so the app serves it without the pool (kvpool.connector.unpoolable_reason).
"""

import random

import httpx
import pytest

from conftest import TEST_BLOCK, wait_ready
from tiny_model import build_tiny_model

WINDOW = 64


@pytest.fixture(scope="module")
def sliding_app(ray_cluster, tmp_path_factory):
    from ray import serve

    from app.builder import build_app
    from kvpool.config import KVPoolConfig
    from kvpool.model import cache_dir

    model = build_tiny_model(cache_dir() / "test-models" / f"tiny-llama-sliding-{WINDOW}", sliding_window=WINDOW)
    cfg = KVPoolConfig(model=str(model), served_model_name="sliding", num_replicas=1, max_model_len=4096,
                       kv_cache_bytes=16 << 20, block_size=TEST_BLOCK, router_port=5594,
                       pool_host_dir=str(tmp_path_factory.mktemp("s-host")),
                       pool_disk_dir=str(tmp_path_factory.mktemp("s-disk")))
    assert cfg.pool_enabled
    serve.run(build_app(cfg), name="sliding", route_prefix="/sliding", blocking=False)
    url = "http://127.0.0.1:8000/sliding"
    wait_ready(url, "sliding")
    yield url
    serve.delete("sliding")


def test_a_sliding_window_model_starts_with_the_pool_on_and_keeps_vllms_own_prefix_cache(sliding_app):
    stats = httpx.get(f"{sliding_app}/v1/kvpool/stats", timeout=30).json()
    assert stats["pool"] is None and "sliding_attention" in stats["pool_off"], stats
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
                                      num_hidden_layers=6, sliding_window=64), "sliding_attention"),
    "sliding window + MoE (gpt-oss)": (dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], head_dim=16,
                                            num_local_experts=4, sliding_window=64), "sliding_attention"),
    "sliding window, every layer (Mistral v0.1)": (dict(model_type="mistral", architectures=["MistralForCausalLM"],
                                                        sliding_window=4096), "sliding-window"),
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
