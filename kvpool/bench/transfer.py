"""`kvpool bench transfer`: pool write and read bandwidth against a plain memcpy of the same bytes.

Writes go through PoolStore.put (Arrow IPC file, xxh3 checksum, atomic rename) into the host tier; reads through
PoolStore.read_blocks (reader threads: one read() per block into a reused buffer, checksum verified, copied into
the destination, as a load into the KV cache does). memcpy copies the same bytes between two preallocated buffers
on one thread.
"""

from __future__ import annotations

import shutil
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
            keys = [uuid.uuid4().hex for _ in range(n)]
            t = time.perf_counter()
            for k, b in zip(keys, blocks):
                store.put(k, b)
            write_s = time.perf_counter() - t
            t = time.perf_counter()

            def place(i: int, data: memoryview) -> None:
                dst[i * block_bytes:(i + 1) * block_bytes] = np.frombuffer(data, dtype=np.uint8)

            if store.read_blocks(keys, place) != n:
                raise RuntimeError("blocks did not read back")
            read_s = time.perf_counter() - t
            t = time.perf_counter()
            for i, b in enumerate(blocks):
                dst[i * block_bytes:(i + 1) * block_bytes] = b
            memcpy_s = time.perf_counter() - t
            total = block_bytes * n / 1e9
            result[f"blocks_{n}"] = {"write_gbps": round(total / write_s, 2), "read_gbps": round(total / read_s, 2),
                                     "memcpy_gbps": round(total / memcpy_s, 2)}
        last = result[f"blocks_{args.batches[-1]}"]
        result.update(last)
        result["read_vs_memcpy"] = round(last["read_gbps"] / last["memcpy_gbps"], 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result
