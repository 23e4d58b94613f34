"""KVPoolConnector: vLLM's KV connector (V1) between an engine's paged KV cache and the shared pool (pool_store).

Loaded by vLLM through `kv_transfer_config(host_dir, disk_dir)` below (`kv_connector_module_path`).

Scheduler side (the engine-core process):
- get_num_new_matched_tokens: beyond the engine's own prefix-cache hit, how many further full prompt blocks the
  pool holds; vLLM allocates blocks for them and skips computing them.
- build_connector_meta: per step, which pool blocks to load into which engine blocks, and which blocks become full
  in this step and are missing from the pool (those are saved; a block already pooled is never sent again).

Worker side (each model-runner process): start_load_kv reads pool blocks into the paged cache before the forward
pass (in parallel reader threads; on CPU straight into the cache's memory, on GPU through pinned host memory); a
missing or corrupt block is reported through get_block_ids_with_load_errors, and vLLM recomputes it and the rest of
its chain. wait_for_save gathers the step's new full blocks (one copy, on GPU into pinned host memory) and a
background thread writes them, so the engine's next step does not wait for the pool.

Models with several KV cache groups (vLLM's hybrid memory allocator: sliding-window layers beside full-attention
ones, whose window blocks vLLM frees as the window moves) are served with the allocator on (SupportsHMA). A pool
block file holds the block of every group at that position, group after group, so a load restores every group or
none; a position where some group keeps no block (NULL_BLOCK, before the window) is not saved, and a load skips that
group's part. vLLM recovers a failed load of single blocks only with one group, and by recomputing from the failed
block with the blocks before it as they are, null ones included; so with several groups, or a sliding window, a
request's load runs between steps (async: the request waits for it unscheduled) and a failure makes vLLM compute it
from scratch.

What keeps pooled KV correct (each has a test in tests/test_pool_correctness.py):
- Preemption: a preempted request loses its blocks; when it is scheduled again vLLM asks for its pool hit again
  and it is planned again (a resumed request comes back among the cached requests, not the new ones).
- A failed load (a block evicted or corrupt between the check and the load): the step's forward pass computed on
  whatever the failed blocks held, so that step saves nothing, on any rank (the ranks agree on it: with tensor
  parallelism every rank's activations depend on every rank's KV). The scheduler side then plans those saves again
  from where the request is recomputed, takes the failed blocks out of vLLM's prefix cache (no other request may
  hit them before they are recomputed), and takes the failed tokens out of the request's cached-token count. This
  needs each step planned after the previous step's output: the engine runs with async_scheduling=False.
- A failed async load (several KV cache groups, or a sliding window): nothing was computed on it (the request
  waited); vLLM frees its blocks and computes it from scratch, and the connector claims no pool hit for it again.
  A failed read leaves zeros where it wrote, so the freed blocks hold no NaN from a damaged file.
- Tensor parallelism: each rank pools its own part of a block; the scheduler counts a block as pooled only where
  every rank holds it (EngineStores), and keeps every rank's copy in use. Pipeline parallelism is refused: its
  stages run one after another, so they cannot agree on a failed load before saving.
- Identity: a pooled block is only ever read by an engine whose model weights, vLLM version, device (on CPU: the
  attention instruction set, which decides the KV packing), attention backend and KV geometry are those that wrote
  it (layout_name); the CPU loads write into the cache's own memory.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.kv_cache_interface import (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec,
                                        UniformTypeKVCacheSpecs)

from kvpool.hashing import MEMO_BLOCKS, PoolKeyMemo, request_namespace
from kvpool.pool_store import EngineStores, PoolStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


# Layer types (HF configs' `layer_types`) whose KV the pool moves: full attention and sliding-window attention.
_POOLED_LAYER_TYPES = {"attention", "full_attention", "sliding_attention"}


def unpoolable_reason(model_config) -> str | None:
    """Why the pool cannot serve this model (vLLM's ModelConfig), or None. The connector moves the KV blocks of
    full-attention layers (dense, MoE and MLA models) and of sliding-window layers (Gemma 2/3, gpt-oss, Mistral),
    every KV cache group of vLLM's hybrid memory allocator at once. A state-space or linear-attention layer keeps a
    running state rather than KV blocks, a chunked local layer's blocks are no prefix of a longer prompt, and an
    encoder-decoder model's cross-attention KV belongs to its encoder input: such a model is served without the
    pool, by vLLM's own prefix caching and the router's prefix routing."""
    if model_config.is_attention_free or model_config.is_hybrid:
        return "it has state-space or linear-attention layers"
    if model_config.is_encoder_decoder:
        return "it is an encoder-decoder model (cross-attention)"
    layer_types = getattr(model_config.hf_text_config, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - _POOLED_LAYER_TYPES)
        if other:
            return f"it has {', '.join(other)} layers"
    if getattr(model_config, "attention_chunk_size", None):
        return "it has chunked local attention layers"
    return None


# vLLM's KV cache specs of the groups the connector moves, where a model has several groups.
_POOLED_GROUP_SPECS = (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec)


def kv_transfer_config(host_dir: str, disk_dir: str) -> dict[str, Any]:
    """The engine argument that plugs this connector into vLLM."""
    return {
        "kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.connector",
        "kv_role": "kv_both",
        # A block that cannot be loaded is recomputed, never an error for the request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"host_dir": host_dir, "disk_dir": disk_dir},
    }


# The block id vLLM gives a sliding-window group where it keeps no block (the positions before the window).
NULL_BLOCK = 0


@dataclass
class BlockTransfer:
    # Per block (one prompt position), its engine block id in each KV cache group: one pool file holds the block of
    # every group (NULL_BLOCK: a sliding-window group keeps no block there; a load skips that group's part).
    block_ids: list[tuple[int, ...]]
    keys: list[str]  # pool keys, one per block
    live: bool = False  # saves: the request asked for its prefix to be kept (written as a live session's)
    req_id: str | None = None  # loads: set where the load runs between steps (async, reported per request)


@dataclass
class KVPoolConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class _RequestState:
    request: "Request"  # vLLM's own: its cached-token count is corrected after a failed load
    keys: list[str]  # pool keys of the prompt's full blocks
    retain: bool = False  # the client marked the prompt for caching (Anthropic cache_control): RETAIN_ARG
    # Per KV cache group, the request's engine block ids by position. A sliding-window group's ids before the last
    # step's window may be stale (vLLM frees them without telling the connector); only the positions a step
    # computes are saved from, and those are live in that step.
    block_ids: list[list[int]] = field(default_factory=list)
    saved_upto: int = 0  # blocks before this index are handled (saved, or known to be pooled)
    load_from: int = 0  # blocks [load_from, load_from + load_n) come from the pool
    load_n: int = 0
    loading: bool = False  # an async load into its blocks is in flight (they must outlive an abort)
    load_failed: bool = False  # an async load failed: the request is recomputed from scratch, not loaded again


@dataclass
class _StepPlan:
    """What one step's metadata asked of a request, kept until the step's output says whether its loads worked."""
    load_from: int = 0
    load_block_ids: list[int] = field(default_factory=list)
    save_from: int | None = None  # the first block index whose save this step planned


# Block files of another format sit in other directories (pool_store's file layout).
POOL_FORMAT = 2
# SamplingParams.extra_args key by which the ingress asks for a request's prefix to be kept: its blocks are written
# as a live session's, which the pool evicts last (pool_store.eviction_order).
RETAIN_ARG = "kvpool_retain"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(model: str, revision: str | None) -> str:
    """The identity of a model's weights: for a local directory (or a hub model already in the local cache), its
    config and, per weight file, name, size, modification time and the bytes of its first and last MiB, so that new
    weights at the same path (a fine-tune, an update) never read the old weights' KV; otherwise the hub id and
    revision. The files are looked at again on every call (a process may make another engine after the weights
    changed); only the reading of their bytes is cached, by what the look saw (inode and change time included:
    a copy that keeps size and modification time still changes those)."""
    path = model
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(model, revision=revision, local_files_only=True)
        except Exception:
            return f"{model}@{revision}"
    files = []
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith(_WEIGHT_SUFFIXES):
            st = os.stat(os.path.join(path, name))
            # The modification time too: a fine-tune can leave a file's size and both ends as they were. (A copy of
            # the weights that does not keep mtimes then shares no pool with the original: slower, never wrong.)
            files.append((name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    return _fingerprint_files(path, tuple(files))


@functools.lru_cache(maxsize=8)
def _fingerprint_files(path: str, files: tuple[tuple[str, int, int, int, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, size, mtime_ns, _, _ in files:
        with open(os.path.join(path, name), "rb") as f:
            if name == "config.json":
                h.update(f.read())
                continue
            h.update(f"{name}:{size}:{mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def pool_identity(vllm_config: "VllmConfig") -> dict[str, Any]:
    """Everything that decides what the bytes of a pooled block mean. Two engines share blocks only where all of it
    is equal; a pool kept on disk across a model update or a vLLM upgrade is then simply not found."""
    import vllm
    from vllm.platforms import current_platform

    m, c, p = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if current_platform.is_cpu():
        # vLLM's CPU attention packs KV for the instruction set it picks per machine (AMX, AVX-512, NEON, ...).
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        device = _get_attn_isa(m.dtype, c.block_size, m.get_head_size(), c.cache_dtype)
    else:
        device = current_platform.get_device_name()
    ident = {
        "model": model_fingerprint(m.model, m.revision), "dtype": str(m.dtype), "kv_cache_dtype": str(c.cache_dtype),
        "quantization": str(m.quantization), "hf_overrides": repr(m.hf_overrides),
        "block_size": c.block_size, "kv_heads": m.get_num_kv_heads(p), "head_size": m.get_head_size(),
        "tp": p.tensor_parallel_size, "pp": p.pipeline_parallel_size,
        "vllm": vllm.__version__, "device": f"{current_platform.device_type}:{device}",
        # The backend decides the KV cache's memory layout; auto-selection follows from the fields above.
        "attention_backend": str(vllm_config.attention_config.backend or os.environ.get("VLLM_ATTENTION_BACKEND")),
        "format": POOL_FORMAT,
    }
    layer_types = getattr(m.hf_text_config, "layer_types", None) or ()
    if m.get_sliding_window() is not None or "sliding_attention" in layer_types:
        # With vLLM's hybrid memory allocator, a block file holds the sliding-window group's part and the full-
        # attention group's part in turn; without it, one group of every layer: the same bytes in another order.
        ident["hybrid_kv_cache"] = not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    return ident


def layout_name(vllm_config: "VllmConfig", rank: int) -> str:
    """The pool directory of one engine rank's blocks: a digest of pool_identity, and the rank."""
    ident = json.dumps(pool_identity(vllm_config), sort_keys=True)
    return f"{hashlib.sha1(ident.encode()).hexdigest()[:16]}-rank{rank}"


def contiguous_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """`t`'s elements in logical order, as views that are each contiguous in memory (never copies)."""
    if t.is_contiguous():
        return [t]
    return [p for i in range(t.shape[0]) for p in contiguous_pieces(t[i])]


def byte_view(piece: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, aliasing its memory: a load through it lands in the tensor itself."""
    arr = piece.view(-1).view(torch.uint8).numpy()
    assert arr.__array_interface__["data"][0] == piece.data_ptr(), "a KV byte view must alias the cache"
    return memoryview(arr)


class KVPoolConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.block_size = vllm_config.cache_config.block_size
        p = vllm_config.parallel_config
        if p.pipeline_parallel_size > 1:
            # Stages run one after another within a step, so they cannot agree on a failed load before saving.
            raise ValueError("the KV pool does not support pipeline parallelism yet: use tensor parallelism")
        if vllm_config.scheduler_config.async_scheduling:
            # With async scheduling a step is planned before the previous one reports a failed load, and could save
            # KV computed on top of it: the engine must run with async_scheduling=False (engine_args does).
            raise ValueError("the KV pool needs async_scheduling=False")
        groups = kv_cache_config.kv_cache_groups
        if len(groups) > 1:
            unpooled = [f"{type(g.kv_cache_spec).__name__}(block_size={g.kv_cache_spec.block_size})" for g in groups
                        if type(g.kv_cache_spec) not in _POOLED_GROUP_SPECS or not g.enable_kv_transfer
                        or g.kv_cache_spec.block_size != self.block_size]
            if unpooled:
                # unpoolable_reason keeps such models (state-space, linear or chunked attention) out of its way.
                raise ValueError(f"the KV pool cannot move the KV cache groups {', '.join(unpooled)}: "
                                 f"set pool_enabled=false")
        # vLLM recovers a failed load of some blocks (invalid_block_ids) only with one KV cache group, and by
        # recomputing from the first failed block on, which needs every block before it: a sliding-window group
        # holds null blocks there (its window before the failed block was never loaded, and the recomputed tokens
        # would attend to nothing; vllm-project/vllm#35223 proposed failing such requests for that reason). So
        # with several groups or a sliding window, a load runs between steps, for a whole request, and a failure
        # makes vLLM compute the request from scratch.
        specs = [s for g in groups for s in (g.kv_cache_spec.kv_cache_specs.values()
                                             if isinstance(g.kv_cache_spec, UniformTypeKVCacheSpecs)
                                             else [g.kv_cache_spec])]
        self._async_loads = len(groups) > 1 or any(isinstance(s, SlidingWindowSpec) for s in specs)
        self.world_size = p.tensor_parallel_size
        self.num_blocks = kv_cache_config.num_blocks
        if role == KVConnectorRole.SCHEDULER:
            self.stores = EngineStores(extra["host_dir"], extra["disk_dir"],
                                       [layout_name(vllm_config, r) for r in range(self.world_size)])
            self._reqs: dict[str, _RequestState] = {}
            self._async_pending: list[BlockTransfer] = []  # async loads for the next step's metadata
            # Plans of the step whose output has not come back yet (vLLM calls update_connector_output after each
            # step, before planning the next: async scheduling is refused above).
            self._step: dict[str, _StepPlan] = {}
            self._kv_cache_manager: "KVCacheManager | None" = None
            self._toucher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpool-touch")
            # Pool keys by vLLM's own block hash, where that hash is cryptographic (sha256 names the block's whole
            # prefix and extra keys: salt, LoRA): a session's next turn hashes only its new blocks. A collision of a
            # weaker hash would load another prefix's KV, so then every key is computed.
            algo = vllm_config.cache_config.prefix_caching_hash_algo
            self._key_memo = PoolKeyMemo(MEMO_BLOCKS) if algo.startswith("sha256") else None
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            self.store = PoolStore(extra["host_dir"], extra["disk_dir"], layout_name(vllm_config, rank))
            # Per KV cache group, (kv cache tensor, its block dimension) of each layer, by layer name.
            self._groups: list[list[tuple[torch.Tensor, int]]] = []
            self._load_errors: set[int] = set()
            self._step_load_failed = False  # on any rank, in this step
            self._views: dict[tuple[int, int], list[memoryview]] = {}  # (group, block id) -> its pieces' bytes (CPU)
            self._scratch = threading.local()  # per reader thread: the bytes of a group a load skips
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpool-save")
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpool-load")
            self._async_loads_running: dict[str, Future] = {}  # req id -> whether its whole load arrived

    # ================================ scheduler side ================================================================

    def _state(self, request: "Request") -> _RequestState:
        st = self._reqs.get(request.request_id)
        if st is None:
            namespace = request_namespace(getattr(request, "cache_salt", None),
                                          getattr(getattr(request, "lora_request", None), "lora_name", None))
            extra = getattr(request.sampling_params, "extra_args", None) or {}
            st = self._reqs[request.request_id] = _RequestState(request, self._pool_keys(request, namespace),
                                                                retain=bool(extra.get(RETAIN_ARG)))
            # The session is live: keep its pooled prefix ahead of idle ones, even where this engine's own cache
            # serves it (then nothing is loaded, so nothing else would tell the pool).
            self._toucher.submit(self.stores.touch, st.keys)
        return st

    def _pool_keys(self, request: "Request", namespace: bytes) -> list[str]:
        tokens = request.prompt_token_ids or []
        # vLLM hashes blocks of its hash block size: its hashes name ours only where there is one per block.
        vllm_hashes = request.block_hashes if self._key_memo is not None else None
        if vllm_hashes is not None and len(vllm_hashes) != request.num_tokens // self.block_size:
            vllm_hashes = None
        memo = self._key_memo if vllm_hashes is not None else PoolKeyMemo(0)
        return memo.keys(tokens, self.block_size, namespace, vllm_hashes)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        # Asked when a request is first scheduled, and again when it resumes after a preemption.
        st = self._state(request)
        if st.load_failed:
            return 0, False  # its (async) load failed: vLLM computes it from scratch
        first = num_computed_tokens // self.block_size
        # The engine must compute at least the prompt's last token: never claim the whole prompt.
        usable = (len(request.prompt_token_ids or []) - 1) // self.block_size
        hits = self.stores.leading_hits(st.keys[first:usable]) if first < usable else 0
        st.load_from, st.load_n = first, hits
        return hits * self.block_size, self._async_loads and hits > 0

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        st = self._state(request)
        if num_external_tokens == 0:
            st.load_n = 0
        elif self._async_loads:
            # The request waits (WAITING_FOR_REMOTE_KVS) until the load is reported, unscheduled: the load goes out
            # with the next step's metadata and runs beside it.
            span = slice(st.load_from, st.load_from + st.load_n)
            # Positions where every group keeps no block (before the window of a model whose every layer slides)
            # are not read: nothing would use them, and a damaged file there would fail the whole load.
            wanted = [(ids, key) for ids, key in zip(list(zip(*blocks.get_block_ids()))[span], st.keys[span])
                      if any(i != NULL_BLOCK for i in ids)]
            self._async_pending.append(BlockTransfer([ids for ids, _ in wanted], [key for _, key in wanted],
                                                     req_id=request.request_id))
            st.loading, st.load_n = True, 0

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVPoolConnectorMetadata(loads=self._async_pending)
        self._async_pending = []
        for new in scheduler_output.scheduled_new_reqs:  # (with vLLM's model runner V2, resumed ones too)
            if new.req_id in self._reqs:
                done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
                self._plan(meta, new.req_id, [list(ids) for ids in new.block_ids], done)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is None:
                block_ids = st.block_ids
            elif req_id in cached.resumed_req_ids:
                block_ids = [list(ids) for ids in new_ids]  # after a preemption: all of its blocks, newly allocated
            else:
                block_ids = [old + list(ids) for old, ids in zip(st.block_ids, new_ids)]
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._plan(meta, req_id, block_ids, done)
        return meta

    def _plan(self, meta: KVPoolConnectorMetadata, req_id: str, block_ids: list[list[int]], computed_after_step: int):
        """A scheduled request's transfers in this step: its pending pool load, then the prompt blocks that are full
        after the step and missing from the pool."""
        st = self._reqs[req_id]
        st.block_ids = block_ids
        plan = self._step.setdefault(req_id, _StepPlan())
        if st.load_n:
            span = slice(st.load_from, st.load_from + st.load_n)
            meta.loads.append(BlockTransfer(list(zip(*(ids[span] for ids in block_ids))), st.keys[span]))
            plan.load_from, plan.load_block_ids = st.load_from, block_ids[0][span]
            st.load_n = 0
        upto = min(computed_after_step // self.block_size, len(st.keys), min(map(len, block_ids)))
        if upto <= st.saved_upto:
            return  # (most steps: a decode step completes no prompt block)
        # Only the positions this step completed, per position the block of each group. A position that a
        # sliding-window group keeps no block for (the engine's own prefix cache served it) is not saved: its pool
        # file would lack that group.
        positions = {i: tuple(ids[i] for ids in block_ids) for i in range(st.saved_upto, upto)}
        idx = [i for i, p in positions.items() if NULL_BLOCK not in p and not self.stores.contains(st.keys[i])]
        if plan.save_from is None:
            plan.save_from = st.saved_upto
        st.saved_upto = upto
        if idx:
            meta.saves.append(BlockTransfer([positions[i] for i in idx], [st.keys[i] for i in idx], st.retain))

    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        assert kv_cache_manager.block_pool.null_block.block_id == NULL_BLOCK
        self._kv_cache_manager = kv_cache_manager

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        """After each step: if a load failed, no rank saved anything in that step (see wait_for_save), so every
        request of the step plans its saves again from where they began, or from where the request is recomputed;
        the failed blocks and those after them leave vLLM's prefix cache (with the recompute policy vLLM keeps them
        for the loader to recompute, but another request could hit them first, e.g. if the loader is preempted);
        and the failed tokens are no cache hit (vLLM counted them when it scheduled the load)."""
        step, self._step = self._step, {}
        for req_id in connector_output.finished_recving or ():
            st = self._reqs.get(req_id)
            if st is not None:
                st.loading = False
                # vLLM frees its blocks and asks again (get_num_new_matched_tokens): it is computed, not loaded.
                st.load_failed = req_id in connector_output.failed_recving
        failed = connector_output.invalid_block_ids
        if not failed:
            return
        tainted: set[int] = set()
        for req_id, plan in step.items():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            lost = [i for i, b in enumerate(plan.load_block_ids) if b in failed]
            if lost:
                first = plan.load_from + lost[0]
                st.saved_upto = min(st.saved_upto, first)
                tainted.update(st.block_ids[first:])
                stats = st.request.prefill_stats
                # Not yet reported (the first token is still to come), and counted at this admission (vLLM keeps
                # the first admission's figures for a request resumed after a preemption).
                if stats is not None and st.request.num_preemptions == 0:
                    n = min((len(plan.load_block_ids) - lost[0]) * self.block_size, stats.num_external_cached_tokens)
                    stats.num_external_cached_tokens -= n
                    stats.num_cached_tokens -= n
                    stats.num_computed_tokens += n
            if plan.save_from is not None:
                st.saved_upto = min(st.saved_upto, plan.save_from)
        if tainted and self._kv_cache_manager is not None:
            self._kv_cache_manager.evict_blocks(tainted)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        self._step.pop(request.request_id, None)
        # Saves copy the blocks during the step: vLLM may free them at once, unless an async load is still writing
        # them (a request aborted while it waits): then vLLM frees them once the load is reported.
        return st is not None and st.loading, None

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]):
        return self.request_finished(request, block_ids[0])

    # ================================ worker side ===================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._groups, self._views = [], {}  # (again, if vLLM allocates the cache anew)
        for group in self._kv_cache_config.kv_cache_groups:
            layers = []
            for name in sorted(group.layer_names):
                t = kv_caches[name]
                dims = [d for d, n in enumerate(t.shape) if n == self.num_blocks]
                if not dims:
                    raise ValueError(f"no block dimension of size {self.num_blocks} in KV cache {name} "
                                     f"{tuple(t.shape)}")
                layers.append((t, dims[0]))
            self._groups.append(layers)

    def _on_cpu(self) -> bool:
        return self._groups[0][0][0].device.type == "cpu"

    def _group_nbytes(self, group: int) -> list[int]:
        return [t.numel() // t.shape[d] * t.element_size() for t, d in self._groups[group]]

    def _block_pieces(self, group: int, block_id: int) -> list[torch.Tensor]:
        """One group's part of a block: its contiguous pieces in every layer of the group, in the pool's byte order
        (the order wait_for_save gathers them in): per layer, one piece per index of the dimensions before the
        block dimension."""
        return [t[idx + (block_id,)] for t, d in self._groups[group]
                for idx in itertools.product(*map(range, t.shape[:d]))]

    def _cpu_block_views(self, block_ids: tuple[int, ...]) -> list[memoryview]:
        """Byte views of one position's block in the CPU KV cache, group by group. Each aliases the cache's memory
        (asserted), so a load writes the cache itself, never a temporary copy; made once per block (loads are a hot
        path). A group that keeps no block there (NULL_BLOCK) reads into this thread's scratch bytes."""
        views = []
        for g, block_id in enumerate(block_ids):
            if block_id == NULL_BLOCK:
                views.append(self._skipped_group_view(g))
                continue
            v = self._views.get((g, block_id))
            if v is None:
                v = self._views[g, block_id] = [byte_view(c) for p in self._block_pieces(g, block_id)
                                                for c in contiguous_pieces(p)]
            views.extend(v)
        return views

    def _skipped_group_view(self, group: int) -> memoryview:
        scratch = getattr(self._scratch, "by_group", None)
        if scratch is None:
            scratch = self._scratch.by_group = {}
        if group not in scratch:
            scratch[group] = memoryview(bytearray(sum(self._group_nbytes(group))))
        return scratch[group]

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        failed = False
        sync_loads = [tr for tr in meta.loads if tr.req_id is None]
        for tr in meta.loads:
            if tr.req_id is not None:
                # Its request waits unscheduled; it is reported by get_transfer_results, whole or failed.
                self._async_loads_running[tr.req_id] = self._loader.submit(self._load_whole, tr)
        for tr in sync_loads:
            n = self._load_logged(tr)
            if n < len(tr.block_ids):
                # Those blocks are recomputed by the engine (kv_load_failure_policy=recompute).
                self._load_errors.update(b for (b,) in tr.block_ids[n:] if b != NULL_BLOCK)
                failed = True
        if sync_loads and self.world_size > 1:
            # Every rank has the same metadata, so all of them take part. With tensor parallelism a failed load on
            # one rank taints every rank's activations, hence every rank's new KV.
            from vllm.distributed.parallel_state import get_tp_group

            flag = torch.tensor([int(failed)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=get_tp_group().cpu_group)
            failed = bool(flag.item())
        self._step_load_failed = failed

    def _load_logged(self, tr: BlockTransfer) -> int:
        try:
            n = self._load(tr)
        except Exception:  # still a failed load (the other ranks wait for this rank's word)
            logger.exception("loading %d pool blocks failed", len(tr.block_ids))
            n = 0
        if n < len(tr.block_ids):
            logger.warning("pool blocks missing or corrupt: recomputing %d of %d", len(tr.block_ids) - n,
                           len(tr.block_ids))
        return n

    def _load_whole(self, tr: BlockTransfer) -> bool:
        return self._load_logged(tr) == len(tr.block_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        done = [r for r, f in self._async_loads_running.items() if f.done()]
        failed = {r for r in done if not self._async_loads_running[r].result()}
        for r in done:
            del self._async_loads_running[r]
        # A failed load is finished too: vLLM then frees its blocks and computes the request from scratch.
        return KVConnectorTransferResults(finished_recving=set(done), failed_recving=failed)

    def _load(self, tr: BlockTransfer) -> int:
        """Read the blocks of `tr` into the KV cache; returns how many leading blocks arrived."""
        if self._on_cpu():
            # Straight from the file into the cache's own memory: no staging copy.
            return self.store.read_blocks_into(tr.keys, lambda i: self._cpu_block_views(tr.block_ids[i]))
        # GPU: into pinned host memory, then one host-to-device copy per layer and block.
        sizes = [self._group_nbytes(g) for g in range(len(self._groups))]
        block_bytes = sum(map(sum, sizes))
        staging = torch.empty(len(tr.keys) * block_bytes, dtype=torch.uint8, pin_memory=True)
        n = self.store.read_blocks_into(
            tr.keys, lambda i: [memoryview(staging[i * block_bytes:(i + 1) * block_bytes].numpy())])
        device = self._groups[0][0][0].device
        for i in range(n):
            self._write_block(tr.block_ids[i], staging[i * block_bytes:(i + 1) * block_bytes], sizes)
        torch.cuda.current_stream(device).synchronize()  # the copies have landed before staging is released
        return n

    def _write_block(self, block_ids: tuple[int, ...], raw: torch.Tensor, sizes: list[list[int]]) -> None:
        off = 0
        for layers, group_sizes, block_id in zip(self._groups, sizes, block_ids):
            for (t, d), n in zip(layers, group_sizes):
                if block_id != NULL_BLOCK:
                    dst = t.select(d, block_id)
                    dst.copy_(raw[off:off + n].view(t.dtype).view(dst.shape), non_blocking=True)
                off += n

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # sync loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved whole-block after the forward pass, in wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        if not meta.saves:
            return
        if self._step_load_failed:
            # This step computed on top of blocks that did not load (in any request: blocks are shared through the
            # prefix cache). The scheduler side plans these saves again once the blocks are recomputed.
            logger.warning("a pool load failed in this step: %d blocks are not saved",
                           sum(len(tr.keys) for tr in meta.saves))
            return
        block_ids = [b for tr in meta.saves for b in tr.block_ids]
        keys = [k for tr in meta.saves for k in tr.keys]
        live = {k for tr in meta.saves if tr.live for k in tr.keys}
        # One gather per layer (a copy, so the engine may reuse the blocks at once), block dimension first, each
        # with its group's block ids.
        gathered, event = [], None
        for g, layers in enumerate(self._groups):
            ids = [position[g] for position in block_ids]
            assert NULL_BLOCK not in ids, "a saved position has a block in every group"
            for t, d in layers:
                gathered.append(self._gather(t, d, ids))
        if not self._on_cpu():
            event = torch.cuda.Event()
            event.record()
        self._writer.submit(self._write_blocks, keys, gathered, event, live)

    @staticmethod
    def _gather(t: torch.Tensor, d: int, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks of one layer, block dimension first (on GPU, into pinned host memory)."""
        g = t.index_select(d, torch.tensor(block_ids, device=t.device)).movedim(d, 0)
        if t.device.type != "cuda":
            return g.contiguous()
        host = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
        host.copy_(g, non_blocking=True)
        return host

    def _write_blocks(self, keys: list[str], gathered: list[torch.Tensor], event, live: set[str]) -> None:
        try:
            if event is not None:
                event.synchronize()  # the device-to-host copies have landed
            per_layer = [g.reshape(len(keys), -1).view(torch.uint8) for g in gathered]
            for i, key in enumerate(keys):
                # The block's piece of every layer, written as they are (the pool's byte order), never joined.
                if not self.store.put(key, [p[i].numpy() for p in per_layer], live=key in live):
                    return  # the tier is full: the rest would fail the same way; the pool shard makes room
        except Exception:
            logger.exception("saving %d blocks to the pool failed (they will be recomputed when needed)", len(keys))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if self.role == KVConnectorRole.SCHEDULER:
            self._toucher.shutdown(wait=False)
        else:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._writer.shutdown(wait=True)
