"""Cost models of the simulator: what a step of an engine, a pool load and a node-to-node copy take.

An engine step schedules decode tokens first and fills the rest of its token budget with chunked prefill, as
vLLM's scheduler does. A step reads the weights once and each decoding sequence's KV once (memory), and computes
2 * params FLOPs per token plus attention for the prefill tokens (compute); it takes the longer of the two:

    step_s = overhead_s + max(weights_s + kv_read_s_per_token * (context tokens of the D decodes),
                              compute_s_per_token * (D + P) + attention_s_per_token_ctx * P * mean context)

From hardware (GPU profiles): compute at `mfu` of the dense BF16 peak, memory at `mbu` of HBM bandwidth; attention
is 4 * layers * attention width FLOPs per token per context token. Tensor parallelism divides both by TP at
`tp_efficiency`. The CPU profile is calibrated instead on this machine's measurements (BENCHMARKS.md).

Sources (the README's table lists them): NVIDIA H100/H200/H20 datasheets (BF16 dense TFLOPS, HBM capacity and
bandwidth), PCIe Gen5 x16 (64 GB/s raw; ~50 GB/s host-to-device measured in practice), NVMe Gen4 drives (~7 GB/s
sequential read each), 400 Gb/s InfiniBand per GPU; models' configs (layers, KV heads, head size) on their hubs.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Model:
    name: str
    params: float  # weights, count
    layers: int
    attention_width: int  # query heads x head size
    kv_bytes_per_token: int  # K and V of every layer, at the KV cache dtype
    weight_bytes: float


# KV bytes per token = 2 (K, V) x layers x KV heads x head size x 2 bytes (bf16).
MODELS = {
    "llama-3.1-8b": Model("llama-3.1-8b", 8.03e9, 32, 32 * 128, 2 * 32 * 8 * 128 * 2, 16.1 * GB),
    "qwen2.5-coder-32b": Model("qwen2.5-coder-32b", 32.8e9, 64, 40 * 128, 2 * 64 * 8 * 128 * 2, 65.5 * GB),
    "llama-3-70b": Model("llama-3-70b", 70.6e9, 80, 64 * 128, 2 * 80 * 8 * 128 * 2, 141 * GB),
    # The embedded model as this machine runs it: float32 KV (30 layers x 3 KV heads x 64 x K,V x 4 bytes).
    "smollm2-135m": Model("smollm2-135m", 0.135e9, 30, 9 * 64, 46_080, 0.54 * GB),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    gpus_per_node: int
    bf16_flops: float  # dense, per GPU
    hbm_bytes: float  # per GPU
    hbm_bytes_per_s: float  # per GPU
    host_to_gpu_bytes_per_s: float  # pool host tier -> engine KV, per GPU (PCIe)
    disk_bytes_per_s: float  # pool disk tier read, per node
    link_bytes_per_s: float  # another node's pool -> this node, per copy
    link_latency_s: float
    mfu: float = 0.5
    mbu: float = 0.7
    tp_efficiency: float = 0.85
    step_overhead_s: float = 0.003
    gpu_memory_utilization: float = 0.9


HARDWARE = {
    "h100": Hardware("h100", 8, 989e12, 80 * GB, 3.35e12, 50 * GB, 14 * GB, 50 * GB, 20e-6),
    "h200": Hardware("h200", 8, 989e12, 141 * GB, 4.8e12, 50 * GB, 14 * GB, 50 * GB, 20e-6),
    "h20": Hardware("h20", 8, 148e12, 96 * GB, 4.0e12, 50 * GB, 14 * GB, 50 * GB, 20e-6),
}


@dataclass(frozen=True)
class StepCosts:
    """Seconds per unit of work for one engine replica, and its memory."""
    overhead_s: float
    weights_s: float  # reading the weights once
    kv_read_s_per_token: float  # reading one token's KV
    compute_s_per_token: float
    attention_s_per_token_ctx: float  # per prefill token, per token of context it attends to
    load_bytes_per_s: float  # pool host tier -> this replica's KV
    disk_bytes_per_s: float  # pool disk tier -> host
    link_bytes_per_s: float  # another node's pool -> this node's
    link_latency_s: float
    kv_capacity_tokens: int  # this replica's engine KV
    kv_bytes_per_token: int

    def step_s(self, decodes: int, decode_ctx: int, prefill: int, prefill_ctx: float) -> float:
        memory = self.weights_s + self.kv_read_s_per_token * decode_ctx
        compute = self.compute_s_per_token * (decodes + prefill) + self.attention_s_per_token_ctx * prefill * prefill_ctx
        return self.overhead_s + max(memory, compute)


def gpu_costs(hw: Hardware, model: Model, tp: int, kv_tokens: int | None = None) -> StepCosts:
    """A TP-`tp` replica of `model` on `hw` GPUs; `kv_tokens` overrides the engine KV the HBM leaves."""
    speed = tp * (hw.tp_efficiency if tp > 1 else 1.0)
    flops, bw = hw.bf16_flops * hw.mfu * speed, hw.hbm_bytes_per_s * hw.mbu * speed
    free = hw.hbm_bytes * hw.gpu_memory_utilization * tp - model.weight_bytes
    if kv_tokens is None and free <= 0:
        raise ValueError(f"{model.name} does not fit {tp} x {hw.name}")
    return StepCosts(
        overhead_s=hw.step_overhead_s, weights_s=model.weight_bytes / bw,
        kv_read_s_per_token=model.kv_bytes_per_token / bw, compute_s_per_token=2 * model.params / flops,
        attention_s_per_token_ctx=4 * model.layers * model.attention_width / flops,
        load_bytes_per_s=hw.host_to_gpu_bytes_per_s * tp, disk_bytes_per_s=hw.disk_bytes_per_s,
        link_bytes_per_s=hw.link_bytes_per_s, link_latency_s=hw.link_latency_s,
        kv_capacity_tokens=kv_tokens if kv_tokens is not None else int(free // model.kv_bytes_per_token),
        kv_bytes_per_token=model.kv_bytes_per_token,
    )


# A replay runs both engines beside the app's ingress, router, pool shard and the client on the same 2 cores;
# `bench single` measures one engine on an idle machine. Fitted on the no-cache run of the verified compare
# (BENCHMARKS.md, 2026-11-29: the same 94 requests took 424.7 s; at bench-single speeds the model takes 251.5 s),
# the only configuration whose time is compute alone; every other configuration is then a prediction.
CPU_REPLAY_SLOWDOWN = 424.7 / 251.5


def cpu_costs(kv_tokens: int) -> StepCosts:
    """SmolLM2-135M (float32) on one core of this 2-core machine, one replica per core. Measured (BENCHMARKS.md,
    2026-11-28, `kvpool bench single`): prefill of a 1,024-token prompt at 450 tokens/s, decode at 13.6 tokens/s
    per request, pool reads at 3.4 GB/s from /dev/shm; a decode step of one sequence is the weights' read (0.54 GB
    in float32); the attention term makes a 4K-token prefill ~20% slower per token than a 1K one. Engine steps
    then run CPU_REPLAY_SLOWDOWN slower, as they do in a replay."""
    slow = CPU_REPLAY_SLOWDOWN
    step_1 = 1 / 13.6
    per_token = 1 / 450
    return StepCosts(
        overhead_s=0.005 * slow, weights_s=(step_1 - 0.005) * slow, kv_read_s_per_token=0.0,
        compute_s_per_token=per_token * 0.95 * slow, attention_s_per_token_ctx=per_token * 0.05 / 512 * slow,
        load_bytes_per_s=3.4 * GB, disk_bytes_per_s=1.5 * GB, link_bytes_per_s=1.0 * GB, link_latency_s=1e-4,
        kv_capacity_tokens=kv_tokens, kv_bytes_per_token=MODELS["smollm2-135m"].kv_bytes_per_token,
    )


def profile(hardware: str, model: str, tp: int = 1, kv_tokens: int | None = None) -> StepCosts:
    if hardware == "cpu":
        if kv_tokens is None:
            raise ValueError("the cpu profile needs the engine KV size (--kv-tokens)")
        return cpu_costs(kv_tokens)
    return gpu_costs(HARDWARE[hardware], MODELS[model], tp, kv_tokens)
