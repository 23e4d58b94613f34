"""KVPoolConnector: vLLM's KV connector (V1) between an engine's paged KV cache and the shared pool (pool_store).

Loaded by vLLM through `kv_transfer_config(host_dir, disk_dir)` below (`kv_connector_module_path`).

Scheduler side (the engine-core process):
- get_num_new_matched_tokens: beyond the engine's own prefix-cache hit, how many further full prompt blocks the
  pool holds; vLLM allocates blocks for them and skips computing them.
- build_connector_meta: per step, which pool blocks to load into which engine blocks, and which blocks become full
  in this step and are missing from the pool (those are saved; a block already pooled is never sent again).

Worker side (each model-runner process): start_load_kv reads pool blocks into the paged cache before the forward
pass (in parallel reader threads; on CPU straight into the cache's memory, on GPU through pinned host memory); a
missing or corrupt block is reported through
get_block_ids_with_load_errors, and vLLM recomputes it and the rest of its chain.
wait_for_save gathers the step's new full blocks (one copy, on GPU into pinned host memory) and a background thread
writes them, so the engine's next step does not wait for the pool.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvpool.pool_store import PoolStore, pool_keys, request_namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


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


@dataclass
class BlockTransfer:
    block_ids: list[int]  # engine block ids
    keys: list[str]  # pool keys, one per block id


@dataclass
class KVPoolConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class _RequestState:
    keys: list[str]  # pool keys of the prompt's full blocks
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # blocks before this index are handled (saved, or known to be pooled)
    load_from: int = 0  # blocks [load_from, load_from + load_n) come from the pool
    load_n: int = 0


def layout_name(vllm_config: "VllmConfig", rank: int) -> str:
    """What the bytes of a block mean: blocks are only shared between engines with the same layout."""
    m, c, p = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    ident = f"{m.model}|{m.dtype}|{c.cache_dtype}|{c.block_size}|tp{p.tensor_parallel_size}|pp{p.pipeline_parallel_size}"
    ident += "|format2"  # the block file format (pool_store): files of another format sit in other directories
    return f"{hashlib.sha1(ident.encode()).hexdigest()[:16]}-rank{rank}"


class KVPoolConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.block_size = vllm_config.cache_config.block_size
        rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            rank = get_pp_group().rank_in_group * vllm_config.parallel_config.tensor_parallel_size \
                + get_tensor_model_parallel_rank()
        self.store = PoolStore(extra["host_dir"], extra["disk_dir"], layout_name(vllm_config, rank))
        self.num_blocks = kv_cache_config.num_blocks
        # scheduler side
        self._reqs: dict[str, _RequestState] = {}
        self._toucher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpool-touch")
        # worker side
        self._layers: list[tuple[torch.Tensor, int]] = []  # (kv cache tensor, its block dimension)
        self._load_errors: set[int] = set()
        self._views: dict[int, list[memoryview]] = {}  # block id -> its pieces' bytes (CPU)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpool-save")

    # ================================ scheduler side ================================================================

    def _state(self, request: "Request") -> _RequestState:
        st = self._reqs.get(request.request_id)
        if st is None:
            namespace = request_namespace(getattr(request, "cache_salt", None),
                                          getattr(getattr(request, "lora_request", None), "lora_name", None))
            st = self._reqs[request.request_id] = _RequestState(
                pool_keys(request.prompt_token_ids or [], self.block_size, namespace))
            # The session is live: keep its pooled prefix ahead of idle ones, even where this engine's own cache
            # serves it (then nothing is loaded, so nothing else would tell the pool).
            self._toucher.submit(self.store.touch, st.keys)
        return st

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        first = num_computed_tokens // self.block_size
        # The engine must compute at least the prompt's last token: never claim the whole prompt.
        usable = (len(request.prompt_token_ids or []) - 1) // self.block_size
        hits = self.store.leading_hits(st.keys[first:usable]) if first < usable else 0
        st.load_from, st.load_n = first, hits
        return hits * self.block_size, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        st = self._state(request)
        if num_external_tokens == 0:
            st.load_n = 0

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVPoolConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if st.load_n:
                span = slice(st.load_from, st.load_from + st.load_n)
                meta.loads.append(BlockTransfer(st.block_ids[span], st.keys[span]))
                st.load_n = 0
            self._plan_save(meta, st, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    st.block_ids = list(new_ids[0])  # after preemption: the full list
                else:
                    st.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._plan_save(meta, st, done)
        return meta

    def _plan_save(self, meta: KVPoolConnectorMetadata, st: _RequestState, computed_after_step: int) -> None:
        """Save the prompt blocks that are full after this step and missing from the pool."""
        upto = min(computed_after_step // self.block_size, len(st.keys), len(st.block_ids))
        if upto <= st.saved_upto:
            return
        idx = [i for i in range(st.saved_upto, upto) if not self.store.contains(st.keys[i])]
        st.saved_upto = upto
        if idx:
            meta.saves.append(BlockTransfer([st.block_ids[i] for i in idx], [st.keys[i] for i in idx]))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None  # saves copy the blocks during the step: vLLM may free them at once

    # ================================ worker side ===================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        for name in sorted(kv_caches):
            t = kv_caches[name]
            dims = [d for d, n in enumerate(t.shape) if n == self.num_blocks]
            if not dims:
                raise ValueError(f"no block dimension of size {self.num_blocks} in KV cache {name} {tuple(t.shape)}")
            self._layers.append((t, dims[0]))

    def _block_nbytes(self) -> list[int]:
        return [t.numel() // t.shape[d] * t.element_size() for t, d in self._layers]

    def _block_pieces(self, block_id: int) -> list[torch.Tensor]:
        """One block's contiguous pieces in every layer, in the pool's byte order (the order wait_for_save
        gathers them in): per layer, one piece per index of the dimensions before the block dimension."""
        return [t[idx + (block_id,)] for t, d in self._layers for idx in itertools.product(*map(range, t.shape[:d]))]

    def _cpu_block_views(self, block_id: int) -> list[memoryview]:
        """Byte views of a block's pieces in the CPU KV cache, made once per block (loads are a hot path)."""
        views = self._views.get(block_id)
        if views is None:
            views = self._views[block_id] = [memoryview(p.reshape(-1).view(torch.uint8).numpy())
                                             for p in self._block_pieces(block_id)]
        return views

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        for tr in meta.loads:
            n = self._load(tr)
            if n < len(tr.block_ids):
                # Those blocks are recomputed by the engine (kv_load_failure_policy=recompute).
                self._load_errors.update(tr.block_ids[n:])
                logger.warning("pool blocks missing or corrupt: recomputing %d of %d", len(tr.block_ids) - n,
                               len(tr.block_ids))

    def _load(self, tr: BlockTransfer) -> int:
        """Read the blocks of `tr` into the KV cache; returns how many leading blocks arrived."""
        if self._layers[0][0].device.type == "cpu":
            # Straight from the file into the cache's own memory: no staging copy.
            return self.store.read_blocks_into(tr.keys, lambda i: self._cpu_block_views(tr.block_ids[i]))
        # GPU: into pinned host memory, then one host-to-device copy per layer and block.
        sizes = self._block_nbytes()
        block_bytes = sum(sizes)
        staging = torch.empty(len(tr.keys) * block_bytes, dtype=torch.uint8, pin_memory=True)
        n = self.store.read_blocks_into(
            tr.keys, lambda i: [memoryview(staging[i * block_bytes:(i + 1) * block_bytes].numpy())])
        for i in range(n):
            self._write_block(tr.block_ids[i], staging[i * block_bytes:(i + 1) * block_bytes], sizes)
        torch.cuda.current_stream().synchronize()  # the copies have landed before staging is released
        return n

    def _write_block(self, block_id: int, raw: torch.Tensor, sizes: list[int]) -> None:
        off = 0
        for (t, d), n in zip(self._layers, sizes):
            dst = t.select(d, block_id)
            dst.copy_(raw[off:off + n].view(t.dtype).view(dst.shape), non_blocking=True)
            off += n

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved whole-block after the forward pass, in wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        if not meta.saves:
            return
        block_ids = [b for tr in meta.saves for b in tr.block_ids]
        keys = [k for tr in meta.saves for k in tr.keys]
        # One gather per layer (a copy, so the engine may reuse the blocks at once), block dimension first.
        gathered, event = [], None
        for t, d in self._layers:
            idx = torch.tensor(block_ids, device=t.device)
            g = t.index_select(d, idx).movedim(d, 0)
            if t.device.type == "cuda":
                host = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
                host.copy_(g, non_blocking=True)
                g = host
            gathered.append(g.contiguous() if t.device.type != "cuda" else g)
        if self._layers and self._layers[0][0].device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._writer.submit(self._write_blocks, keys, gathered, event)

    def _write_blocks(self, keys: list[str], gathered: list[torch.Tensor], event) -> None:
        try:
            if event is not None:
                event.synchronize()  # the device-to-host copies have landed
            per_layer = [g.reshape(len(keys), -1).view(torch.uint8) for g in gathered]
            for i, key in enumerate(keys):
                blob = torch.cat([p[i] for p in per_layer]).numpy()
                self.store.put(key, blob)
        except Exception:
            logger.exception("saving %d blocks to the pool failed (they will be recomputed when needed)", len(keys))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        self._writer.shutdown(wait=True)
        self._toucher.shutdown(wait=False)
