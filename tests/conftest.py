"""Shared fixtures: heavy things (Ray, engines) start once per test session and are shared."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402

TEST_BLOCK = 32
TINY_KV_BYTES = 24 << 20
TINY_KV_BYTES_PER_TOKEN = 1024


def in_process_llm(**kwargs):
    """A vLLM `LLM` for a test that drives an engine in its own process. On CPU its engine core and worker run in
    this process: the engine starts in 1-3 s instead of ~20 (vLLM otherwise spawns two processes that import torch
    and vLLM again); the scheduler, the model runner and the pool's connector are the same code either way (the
    worker's threads are this process's: no OpenMP binding). vLLM reads the setting only while it makes the
    engine, so Ray's workers and the processes tests start later keep vLLM's default. One at a time, each closed
    with `close`: vLLM's parallel state is the process's, and closing an engine tears it down."""
    import gc

    import torch
    from vllm import LLM, envs
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return LLM(**kwargs)
    assert not model_parallel_is_initialized(), "another in-process engine is still up: close it first"
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_DIST_IDENT")}
    set_num_threads = torch.set_num_threads
    # The CPU worker points its kernels' other references at its C++ fallbacks by scanning every loaded module, and
    # raises on a value whose vars() is no dict (llvmlite's library wrapper, loaded here by numba for the router's
    # event decoder): such modules are out of sys.modules while the engine is made.
    hidden = {name: m for name, m in list(sys.modules.items()) if _breaks_vllm_kernel_scan(m)}
    for name in hidden:
        del sys.modules[name]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return LLM(**kwargs)
    finally:
        sys.modules.update(hidden)
        for k, v in saved.items():  # (the CPU worker sets VLLM_DIST_IDENT for its own process)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # What a CPU worker and the engine core do to a process they own, undone for this one: torch's thread
        # count pinned (set_num_threads replaced), vLLM's settings cached as they were while it started, and every
        # object frozen out of the garbage collector (an engine dropped without close would never be freed).
        torch.set_num_threads = set_num_threads
        envs.disable_envs_cache()
        gc.unfreeze()


def _breaks_vllm_kernel_scan(module) -> bool:
    """Whether vllm.triton_utils.dispatcher._rebind_kernels raises on this module's namespace."""
    for value in list((getattr(module, "__dict__", None) or {}).values()):
        try:
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")
        except Exception:
            return True
    return False


def close(llm) -> None:
    """Shut an engine down now (not when the garbage collector gets to it)."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from kvpool.model import cache_dir

    return build_tiny_model(cache_dir() / "test-models" / "tiny-llama-tools")


@pytest.fixture
def pool_dirs(tmp_path):
    """A pool's host and disk tier directories, fresh for each test."""
    return str(tmp_path / "host"), str(tmp_path / "disk")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    # Logical CPUs: engines reserve fractions; the real cores are shared by time-slicing.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    yield
    serve.shutdown()
    ray.shutdown()


def wait_ready(url: str, model: str, timeout: float = 240, headers: dict[str, str] | None = None) -> None:
    """Until a real completion succeeds (the ingress answers /health before the engines are up)."""
    deadline = time.time() + timeout
    body = {"model": model, "prompt": "hi", "max_tokens": 1}
    while time.time() < deadline:
        try:
            if httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture(scope="session")
def tiny_app(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The KV-Pool app with 2 engine replicas of the tiny model; yields (base_url, config)."""
    from ray import serve

    from app.builder import build_app
    from kvpool.config import KVPoolConfig

    # 24 MiB of KV per replica = 24K tokens of the tiny model (fp32: 1 KiB/token), small enough to evict in tests.
    cfg = KVPoolConfig(model=str(tiny_model_dir), served_model_name="tiny", num_replicas=2, max_model_len=4096,
                       kv_cache_bytes=TINY_KV_BYTES, block_size=TEST_BLOCK, max_tokens_default=32,
                       router_port=5591, tool_call_parser="hermes",
                       pool_host_dir=str(tmp_path_factory.mktemp("pool-host")),
                       pool_disk_dir=str(tmp_path_factory.mktemp("pool-disk")))
    serve.run(build_app(cfg), name="tiny", route_prefix="/tiny", blocking=False)
    url = "http://127.0.0.1:8000/tiny"
    wait_ready(url, "tiny")
    yield url, cfg
    serve.delete("tiny")
