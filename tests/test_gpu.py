"""The connector's GPU path (pinned host staging, event-synchronised saves, tensor parallelism), with the same
differential check as on CPU: outputs from pooled KV equal outputs computed from scratch. Runs only where CUDA is
present (scripts/gpu-check.sh); on CPU machines every test here is skipped. tests/test_pool_correctness.py and
tests/test_pool.py run on the GPU too, since their engines take whatever device the machine has.
"""

import pytest
import torch

from test_pool_correctness import BLOCK, close, differences, engine, generate, pool_file_count, tokens, wait_pooled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("tp", [1, 2])
def test_prefix_computed_on_a_is_loaded_by_b_on_gpu(tiny_model_dir, pool_dirs, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    from kvpool.hashing import pool_keys, request_namespace

    prefix, suffix = tokens(50, 24 * BLOCK), tokens(51, 90)
    a = engine(tiny_model_dir, pool_dirs, tensor_parallel_size=tp)
    generate(a, [prefix], max_tokens=1)
    wait_pooled(pool_dirs, pool_keys(prefix, BLOCK, request_namespace())[:24])
    close(a)
    assert pool_file_count(pool_dirs) >= 24 * tp, "not every rank saved its part of the blocks"
    b = engine(tiny_model_dir, pool_dirs, tensor_parallel_size=tp)
    got = generate(b, [prefix + suffix])
    close(b)
    ref = engine(tiny_model_dir, prefix_caching=False, tensor_parallel_size=tp)
    want = generate(ref, [prefix + suffix])
    close(ref)
    assert got[0][0] >= 24 * BLOCK
    assert differences(got, want) == []
