"""The deployment files users start from: validated against Ray's own schemas, and their app args against ours."""

from pathlib import Path

import pytest
import yaml

from kvpool.config import KVPoolConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_files_follow_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(config))  # what `ray up` does first: fill in defaults, check ray-schema.json
    assert any("install.sh" in c for c in config["setup_commands"])
    assert any("serve deploy serve_config.yaml" in c for c in config["head_start_ray_commands"])
    if config["provider"]["type"] != "local":
        gpu = config["available_node_types"]["gpu_worker"]
        assert gpu["min_workers"] >= 1 and gpu["max_workers"] >= gpu["min_workers"]


def test_serve_config_is_a_valid_deploy_config_with_our_args():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "app:deployment"
    cfg = KVPoolConfig.model_validate({**app.args, "device": "cuda"})
    assert cfg.tensor_parallel_size == 2 and cfg.uses_placement_group()
