import pytest
from pydantic import ValidationError

from app.builder import engine_deployment_options
from kvpool.config import KVPoolConfig


def test_defaults_in_one_place():
    cfg = KVPoolConfig()
    assert cfg.num_replicas == 2 and cfg.block_size == 32 and cfg.enable_prefix_caching
    assert cfg.model_name() == "SmolLM2-135M-Instruct"


def test_serve_run_style_string_args_are_coerced():
    # `serve run app:deployment num_replicas=3 ...` passes strings; the builder validates them into the model.
    cfg = KVPoolConfig.model_validate({"num_replicas": "3", "kv_cache_bytes": "1000000", "enforce_eager": "false"})
    assert cfg.num_replicas == 3 and cfg.kv_cache_bytes == 1_000_000 and cfg.enforce_eager is False


@pytest.mark.parametrize("bad", [{"num_replicas": 0}, {"block_size": 48}, {"block_size": 16, "device": "cpu"},
                                 {"no_such_key": 1}, {"kv_cache_bytes": -1}, {"device": "tpu"},
                                 {"pipeline_parallel_size": 2}])  # with the pool, which PP stages cannot keep right
def test_bad_config_is_refused(bad):
    with pytest.raises(ValidationError):
        KVPoolConfig.model_validate(bad)


def test_served_name_from_path():
    assert KVPoolConfig(model="/models/Qwen3-8B/").model_name() == "Qwen3-8B"
    assert KVPoolConfig(model="x", served_model_name="y").model_name() == "y"


def test_deployment_options_cpu_and_tensor_parallel_gpu():
    cpu = engine_deployment_options(KVPoolConfig(device="cpu", num_replicas=3))
    assert cpu["num_replicas"] == 3 and "placement_group_bundles" not in cpu
    assert cpu["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"]
    gpu1 = engine_deployment_options(KVPoolConfig(device="cuda"))
    assert gpu1["ray_actor_options"]["num_gpus"] == 1
    tp4 = engine_deployment_options(KVPoolConfig(device="cuda", tensor_parallel_size=4, block_size=16))
    assert tp4["placement_group_bundles"][1:] == [{"GPU": 1}] * 4
    assert tp4["placement_group_strategy"] == "STRICT_PACK"


def test_replicas_spread_over_nodes():
    assert engine_deployment_options(KVPoolConfig(device="cpu", max_replicas_per_node=1))["max_replicas_per_node"] == 1
    with pytest.raises(ValidationError):  # a TP group is a placement group: Serve refuses both
        KVPoolConfig(device="cuda", tensor_parallel_size=2, max_replicas_per_node=1, block_size=16)


def test_pool_dirs_expand_node_variables(monkeypatch):
    monkeypatch.setenv("KVPOOL_NODE", "n2")
    cfg = KVPoolConfig(pool_host_dir="/tmp/p/$KVPOOL_NODE/host", pool_disk_dir="/tmp/p/${KVPOOL_NODE}/disk")
    assert (cfg.pool_host_dir_resolved(), cfg.pool_disk_dir_resolved()) == ("/tmp/p/n2/host", "/tmp/p/n2/disk")
