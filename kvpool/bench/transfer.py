"""`kvpool bench transfer`: pool write and read bandwidth against a plain memcpy of the same bytes.

Writes go through PoolStore.put (Arrow IPC file, xxh3 checksum, atomic rename) into the host tier; reads through
PoolStore.read_blocks_into (reader threads: one preadv per block straight into the destination, split into one
piece per layer and K/V as a CPU KV cache is, then the checksum verified), as a load into the KV cache does.
memcpy copies the same bytes between two preallocated buffers on one thread. Each figure is the median of
`--repeats` rounds.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import uuid

import numpy as np

from kvpool.pool_store import PoolStore


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes  # K and V


def run(args) -> dict:
    per_token = kv_bytes_per_token(args.layers, args.kv_heads, args.head_dim, args.dtype_bytes)
    block_bytes = per_token * args.block_size
    root = tempfile.mkdtemp(prefix="kvpool-bench-", dir=args.dir)
    store = PoolStore(f"{root}/host", f"{root}/disk", "bench")
    rng = np.random.default_rng(0)
    result: dict = {"bench": "transfer", "block_bytes": block_bytes, "kv_bytes_per_token": per_token}
    try:
        for n in args.batches:
            blocks = [rng.integers(0, 255, size=block_bytes, dtype=np.uint8) for _ in range(n)]
            dst = np.empty(block_bytes * n, dtype=np.uint8)
            dst.fill(1)  # touch every page first, so memcpy is not charged for page faults
            pieces = 2 * args.layers  # K and V of every layer: a block is that many pieces in a CPU KV cache
            step = block_bytes // pieces

            def place(i: int) -> list[memoryview]:
                return [memoryview(dst[i * block_bytes + j * step:i * block_bytes + (j + 1) * step])
                        for j in range(pieces)]

            write_s, read_s, memcpy_s = [], [], []
            for _ in range(args.repeats):
                keys = [uuid.uuid4().hex for _ in range(n)]  # new blocks: a write of a pooled block is skipped
                t = time.perf_counter()
                for k, b in zip(keys, blocks):
                    store.put(k, b)
                write_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                if store.read_blocks_into(keys, place) != n:
                    raise RuntimeError("blocks did not read back")
                read_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                for i, b in enumerate(blocks):
                    dst[i * block_bytes:(i + 1) * block_bytes] = b
                memcpy_s.append(time.perf_counter() - t)
                store.delete(store.scan())  # keep the tmpfs from filling up
            total = block_bytes * n / 1e9
            result[f"blocks_{n}"] = {name: round(total / statistics.median(times), 2) for name, times in
                                     (("write_gbps", write_s), ("read_gbps", read_s), ("memcpy_gbps", memcpy_s))}
        last = result[f"blocks_{args.batches[-1]}"]
        result.update(last)
        result["read_vs_memcpy"] = round(last["read_gbps"] / last["memcpy_gbps"], 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result
