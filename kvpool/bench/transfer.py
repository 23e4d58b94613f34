"""`kvpool bench transfer`: pool write and read bandwidth against a plain memcpy of the same bytes, and what bounds
them.

Writes go through PoolStore.put (a block given as its pieces, one per layer and K/V, as the connector saves it from
a CPU KV cache; xxh3 checksum; temporary file, then rename) into the host tier; reads through
PoolStore.read_blocks_into (reader threads, each block read into its pieces of the destination and verified), as
a load into the KV cache does. memcpy copies the same bytes between two preallocated buffers on one thread.

The bounds are the parts of that work measured alone, in the same rounds: the kernel's copy into new files (page
allocation included) and into files that exist (without it), the kernel's copy out of the files into the
destination, and the checksum. Each round runs every measurement once; a figure is the median over `--repeats`
rounds, and each ratio to memcpy is the median of the rounds' own ratios, so a machine whose speed drifts (a VM's
neighbours) moves both sides of a ratio together.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import xxhash

from kvpool.pool_store import PoolStore


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes  # K and V


def _seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args) -> dict:
    per_token = kv_bytes_per_token(args.layers, args.kv_heads, args.head_dim, args.dtype_bytes)
    block_bytes = per_token * args.block_size
    root = tempfile.mkdtemp(prefix="kvpool-bench-", dir=args.dir)
    store = PoolStore(f"{root}/host", f"{root}/disk", "bench")
    raw_dir = f"{root}/raw"
    os.makedirs(raw_dir)
    threads = ThreadPoolExecutor(max(2, os.cpu_count() or 2))  # as many as PoolStore's readers
    rng = np.random.default_rng(0)
    pieces = 2 * args.layers  # K and V of every layer: a block is that many pieces in a CPU KV cache
    step = block_bytes // pieces
    result: dict = {"bench": "transfer", "block_bytes": block_bytes, "kv_bytes_per_token": per_token,
                    "pieces_per_block": pieces}
    try:
        for n in args.batches:
            blocks = [rng.integers(0, 255, size=block_bytes, dtype=np.uint8) for _ in range(n)]
            block_pieces = [[b[j * step:(j + 1) * step] for j in range(pieces)] for b in blocks]
            dst = np.empty(block_bytes * n, dtype=np.uint8)
            dst.fill(1)  # touch every page first, so memcpy is not charged for page faults
            views = [[memoryview(dst[i * block_bytes + j * step:i * block_bytes + (j + 1) * step])
                      for j in range(pieces)] for i in range(n)]
            raw = [f"{raw_dir}/{i}" for i in range(n)]

            def copy_in(i: int, flags: int) -> None:
                fd = os.open(raw[i], os.O_WRONLY | flags, 0o644)
                os.ftruncate(fd, block_bytes)  # as put sizes its files (large folios where the tmpfs has them)
                moved = os.pwritev(fd, block_pieces[i], 0)
                os.close(fd)
                if moved != block_bytes:
                    raise RuntimeError("short write")

            def copy_out(i: int) -> None:
                fd = os.open(raw[i], os.O_RDONLY)
                moved = os.preadv(fd, views[i], 0)
                os.close(fd)
                if moved != block_bytes:
                    raise RuntimeError("short read")

            def memcpy() -> None:
                for i, b in enumerate(blocks):
                    dst[i * block_bytes:(i + 1) * block_bytes] = b

            def read(keys: list[str]) -> None:
                if store.read_blocks_into(keys, views.__getitem__) != n:
                    raise RuntimeError("blocks did not read back")

            def same_bytes() -> None:  # outside the timings: what was read is what was written, byte for byte
                for i, b in enumerate(blocks):
                    if not np.array_equal(dst[i * block_bytes:(i + 1) * block_bytes], b):
                        raise RuntimeError(f"block {i} read back different bytes")

            def unlink_raw() -> None:
                for p in raw:
                    if os.path.exists(p):
                        os.unlink(p)

            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                keys = [uuid.uuid4().hex for _ in range(n)]  # new blocks: a write of a pooled block is skipped
                unlink_raw()
                rnd = {
                    "write": _seconds(lambda: [store.put(k, p) for k, p in zip(keys, block_pieces)]),
                    "read": _seconds(lambda: read(keys)),
                }
                same_bytes()
                rnd |= {
                    "memcpy": _seconds(memcpy),
                    "copy_in_new": _seconds(lambda: [copy_in(i, os.O_CREAT) for i in range(n)]),
                    "copy_in_existing": _seconds(lambda: [copy_in(i, 0) for i in range(n)]),
                    "copy_out": _seconds(lambda: list(threads.map(copy_out, range(n)))),
                    "checksum": _seconds(lambda: [xxhash.xxh3_64_intdigest(b) for b in blocks]),
                }
                for name, s in rnd.items():
                    times.setdefault(name, []).append(s)
                store.delete(store.scan())  # keep the tmpfs from filling up
            total = block_bytes * n / 1e9
            out = {f"{name}_gbps": round(total / statistics.median(s), 2) for name, s in times.items()}
            for name in times:
                if name != "memcpy":
                    out[f"{name}_vs_memcpy"] = round(statistics.median(
                        m / s for m, s in zip(times["memcpy"], times[name])), 3)
            result[f"blocks_{n}"] = out
        result["read_back_verified"] = True  # every round's read equalled the blocks written, byte for byte
        last = result[f"blocks_{args.batches[-1]}"]
        result.update({k: last[k] for k in ("write_gbps", "read_gbps", "memcpy_gbps", "write_vs_memcpy",
                                            "read_vs_memcpy")})
    finally:
        threads.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return result
