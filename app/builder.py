"""Wires the Serve application: engine replicas behind an OpenAI ingress, all from one KVPoolConfig.

No `from __future__ import annotations` here: Ray Serve reads the builder's parameter annotation as a class to
validate `serve run` arguments into a KVPoolConfig.
"""

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from actors.engine import EngineReplica
from app.ingress import OpenAIIngress
from app.request_router import PrefixRequestRouter
from kvpool.config import KVPoolConfig


def engine_deployment_options(cfg: KVPoolConfig) -> dict[str, Any]:
    """Serve options for the engine deployment: replica count, resources, placement, backpressure."""
    opts: dict[str, Any] = dict(
        name="EngineReplica",
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        # Bounded: past it the ingress's call fails at once with BackPressureError, answered as 429.
        max_queued_requests=cfg.max_queued_requests,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=5,
    )
    if cfg.prefix_routing:
        opts["request_router_config"] = RequestRouterConfig(request_router_class=PrefixRequestRouter)
    actor: dict[str, Any] = {"num_cpus": cfg.replica_num_cpus, "runtime_env": {"env_vars": cfg.engine_env()}}
    world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if cfg.uses_placement_group():
        # One bundle for the replica, one GPU bundle per engine worker, all on one node.
        opts["placement_group_bundles"] = [{"CPU": cfg.replica_num_cpus}] + [{"GPU": 1}] * world
        opts["placement_group_strategy"] = "STRICT_PACK"
    elif cfg.resolved_device() == "cuda":
        actor["num_gpus"] = 1
    if cfg.max_replicas_per_node:
        opts["max_replicas_per_node"] = cfg.max_replicas_per_node
    opts["ray_actor_options"] = actor
    return opts


def build_app(args: KVPoolConfig) -> Application:
    cfg = args if isinstance(args, KVPoolConfig) else KVPoolConfig.model_validate(args or {})
    engine = serve.deployment(EngineReplica).options(**engine_deployment_options(cfg)).bind(cfg)
    # The ingress holds each request until it ends (streams included): its own bound is the engines' slots plus
    # their queue; past it Serve's proxy answers 429 with Retry-After.
    return OpenAIIngress.options(
        # It renders and tokenizes with vLLM's code, so it gets the engines' environment (offline hub, threads).
        ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": cfg.engine_env()}},
        max_ongoing_requests=cfg.num_replicas * cfg.max_ongoing_requests + cfg.max_queued_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=cfg.retry_after_s),
    ).bind(engine, cfg)
