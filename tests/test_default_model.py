"""The embedded default (SmolLM2-135M-Instruct from PyPI, converted locally) answers a real question."""

import openai
from ray import serve

from app.builder import build_app
from conftest import wait_ready
from kvpool.config import KVPoolConfig


def test_embedded_smollm2_knows_paris(ray_cluster):
    cfg = KVPoolConfig(num_replicas=1, max_model_len=2048, kv_cache_bytes=256 << 20, router_port=5592)
    serve.run(build_app(cfg), name="smol", route_prefix="/smol", blocking=False)
    try:
        wait_ready("http://127.0.0.1:8000/smol", cfg.model_name(), timeout=400)
        client = openai.OpenAI(base_url="http://127.0.0.1:8000/smol/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=32,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    finally:
        serve.delete("smol")
