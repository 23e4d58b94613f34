"""The pool's storage: KV blocks as Arrow IPC files in two tiers, host memory (a tmpfs such as /dev/shm) and disk.

One file per block, named by the block's pool key (a blake2b chain hash of the tokens up to and including the block,
so a key names a whole prefix, never just a block's own tokens). A file holds one Arrow record batch with the
block's bytes (every layer of this engine rank) and, in the schema metadata, its key and an xxh3-64 checksum that
readers verify. Writers write to a temporary name and rename, so a reader never sees half a block; a missing, short
or corrupt file reads as a miss, which the engine turns into recomputation. Readers scatter a file's payload straight
into the destination (preadv; on CPU, the engine's KV cache), so a load moves the bytes once, and writers write a
block's pieces as they lie in the KV cache (pwritev), never joined first.

Every engine process on the node reads and writes the same directories, so a block computed by one replica is
loaded by another (migration on one node), and the files outlive the engines, the pool actor and the app
(persistence). The node's pool shard (actors/pool.py) keeps the tiers within their byte budgets and copies blocks
between nodes (read_raw / write_raw).

A file's times carry the eviction policy's state: mtime is its last use; atime is 0 until the block is used again
after it was written (by a load, or by a later request of the same session touching its prefix), so a block that
some session came back to is told apart from a one-off prompt's.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import re
import time
import urllib.parse
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import xxhash

SUFFIX = ".arrow"
TMP_SUFFIX = ".tmp"
# A temporary file older than this belongs to a writer that died (a write takes milliseconds): scan() removes it.
STALE_TMP_S = 300.0
# Reads and writes move a block this many bytes at a time, each chunk hashed while it is in cache (L2 is 2 MiB a
# core on the machine measured; see BENCHMARKS.md, pool transfer bandwidth).
CHUNK_BYTES = 512 << 10
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
Buffer = bytes | bytearray | memoryview | np.ndarray

logger = logging.getLogger(__name__)


class _Frame:
    """What a block file holds around its payload: an Arrow IPC file of one record batch (one large_binary value,
    the payload) whose schema metadata carries the block's key and xxh3-64 checksum, in the header and again in
    the footer. For one payload length and key length these bytes are the same in every file but for the key and
    checksum (fixed-width), so pyarrow writes them once, around a zero payload with marker values, and every
    block reuses them: the payload never passes through pyarrow (whose writer costs a copy), a writer can hash it
    chunk by chunk before the checksum is written, and a reader finds it at a known offset and checks the header
    by comparing bytes instead of parsing it (a file with any other frame is parsed: PoolStore.read_into)."""

    def __init__(self, payload_len: int, key_len: int):
        if payload_len <= 0:
            raise ValueError("a block has at least one byte")
        # Marker values: "~" and "^" are in no hex key or checksum and in none of the schema's names.
        self._key, self._sum = b"~" * key_len, b"^" * 16
        buf = pa.py_buffer(bytes(payload_len))
        offsets = pa.array([0, payload_len], pa.int64()).buffers()[1]
        arr = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, buf])
        schema = pa.schema([pa.field("kv", pa.large_binary())], metadata={"xxh3": self._sum, "key": self._key})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([arr], schema=schema))
        raw = sink.getvalue()
        data = pa.ipc.open_file(raw).get_batch(0).column(0).buffers()[2]
        self.offset, self.size = data.address - raw.address, raw.size  # where the payload starts; the file size
        raw = raw.to_pybytes()
        self.head, self.tail = raw[:self.offset], raw[self.offset + payload_len:]
        # Each value is in the header and again in the footer; a marker found anywhere else (a short key's run of
        # "~" matching a length byte) would be replaced too.
        if (self.head + self.tail).count(self._key) != 2 or (self.head + self.tail).count(self._sum) != 2:
            raise ValueError(f"no block frame for {key_len}-byte keys")
        self._sum_at = self.head.index(self._sum)

    def _filled(self, part: bytes, key: bytes, checksum: bytes) -> bytes:
        if b"~" in key or b"^" in key:
            raise ValueError(f"a pool key with a marker character: {key!r}")
        return part.replace(self._key, key).replace(self._sum, checksum)

    def fill(self, key: str, checksum: int) -> tuple[bytes, bytes]:
        """The head and tail of the file holding `key`'s block with this checksum."""
        k, c = key.encode(), f"{checksum:016x}".encode()
        return self._filled(self.head, k, c), self._filled(self.tail, k, c)

    def checksum(self, head: bytes, key: str) -> int | None:
        """The checksum recorded in a file's `head` if it is the head of `key`'s block, else None."""
        text = head[self._sum_at:self._sum_at + 16]
        if head != self._filled(self.head, key.encode(), text):
            return None
        try:
            return int(text, 16)
        except ValueError:
            return None


@functools.lru_cache(maxsize=64)
def _frame(payload_len: int, key_len: int) -> _Frame:
    return _Frame(payload_len, key_len)


def _as_bytes(v: memoryview) -> memoryview:
    """`v` as a flat view of bytes, so slices and lengths count bytes, not items."""
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def _byte_views(data: Buffer | Sequence[Buffer]) -> list[memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        data = [data]
    return [_as_bytes(memoryview(d)) for d in data]


def _chunks(views: Sequence[memoryview]) -> list[tuple[list[memoryview], int]]:
    """`views` in runs of about CHUNK_BYTES (a larger view split), at most IOV_MAX views a run, each with its
    size in bytes. (A hot path: a block is tens of views.)"""
    runs: list[tuple[list[memoryview], int]] = []
    run: list[memoryview] = []
    size = 0
    for v in views:
        n = v.nbytes
        if n > CHUNK_BYTES:
            if run:
                runs.append((run, size))
                run, size = [], 0
            b = _as_bytes(v)
            runs.extend(([b[i:i + CHUNK_BYTES]], min(CHUNK_BYTES, n - i)) for i in range(0, n, CHUNK_BYTES))
            continue
        run.append(v)
        size += n
        if size >= CHUNK_BYTES or len(run) == IOV_MAX:
            runs.append((run, size))
            run, size = [], 0
    if run:
        runs.append((run, size))
    return runs


def _moved(n: int, expected: int) -> int:
    """`n`, the bytes a read or write moved, if it was all `expected`; a short transfer is an error."""
    if n != expected:
        raise OSError(f"short transfer: {n} of {expected} bytes")
    return n


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _verified(raw: bytes, key: str) -> pa.Buffer | None:
    """The payload of a block file's bytes if they are a whole, sound block of `key`, parsed as Arrow."""
    try:
        reader = pa.ipc.open_file(pa.py_buffer(raw))
        meta, data = reader.schema.metadata, reader.get_batch(0).column(0).buffers()[2]
        sound = meta[b"key"] == key.encode() and int(meta[b"xxh3"], 16) == xxhash.xxh3_64_intdigest(data)
    except (pa.ArrowException, KeyError, ValueError, IndexError, TypeError):
        return None
    return data if sound else None


@dataclass(slots=True)
class BlockFile:
    key: str
    tier: str  # "host" or "disk"
    path: str | os.PathLike | None
    size: int
    last_used: float
    reused: bool = False  # used again after it was written
    layout: str = ""


class EvictionQueue:
    """One tier's blocks in eviction order, kept as blocks arrive, are used again and leave, so that freeing k
    blocks costs O(k log n), not a pass over all n (a shard's tier holds up to millions; kvpool bench pool-scale).

    The order: blocks of idle sessions and one-off prompts first (not reused, or last used more than the session TTL
    ago), then blocks of live sessions (reused within it); least recently used first within each, ties in the order
    the blocks were put. Two heaps keyed (last_used, put order), one for blocks never reused and one for reused
    ones: the next to leave is the older head of the two where the reused head is idle, else the reused head. An
    entry whose block was put again (used) or removed since is stale: skipped when it surfaces, and the heaps are
    rebuilt when stale entries outnumber live ones (so a heap stays within twice its blocks)."""

    def __init__(self) -> None:
        self.blocks: dict[Hashable, BlockFile] = {}
        self.bytes = 0
        self._heaps: tuple[list, list] = ([], [])  # not reused, reused: (last_used, seq, id, block)
        self._entry: dict[Hashable, tuple] = {}  # id -> its live heap entry
        self._seq = itertools.count()

    @classmethod
    def of(cls, files: Iterable[BlockFile], block_id: Callable[[BlockFile], Hashable] | None = None) -> "EvictionQueue":
        """A queue of `files` (equals in their order), each known by block_id(file) (default: its position)."""
        q = cls()
        for i, f in enumerate(files):
            bid = block_id(f) if block_id else i
            q.blocks[bid] = f
            q.bytes += f.size
            q._entry[bid] = e = (f.last_used, next(q._seq), bid, f)
            q._heaps[f.reused].append(e)
        for h in q._heaps:
            heapq.heapify(h)
        return q

    def __len__(self) -> int:
        return len(self.blocks)

    def __contains__(self, block_id: Hashable) -> bool:
        return block_id in self.blocks

    def put(self, block_id: Hashable, f: BlockFile) -> None:
        """A block arrived, or was used (its last_used and reused are as of now)."""
        old = self.blocks.get(block_id)
        self.bytes += f.size - (old.size if old is not None else 0)
        self.blocks[block_id] = f
        self._entry[block_id] = e = (f.last_used, next(self._seq), block_id, f)
        heapq.heappush(self._heaps[f.reused], e)
        self._bound()

    def remove(self, block_id: Hashable) -> BlockFile | None:
        f = self.blocks.pop(block_id, None)
        if f is not None:
            self.bytes -= f.size
            del self._entry[block_id]
            self._bound()
        return f

    def _bound(self) -> None:
        if len(self._heaps[0]) + len(self._heaps[1]) > 2 * len(self.blocks) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        self._heaps = ([], [])
        for e in self._entry.values():
            self._heaps[e[3].reused].append(e)
        for h in self._heaps:
            heapq.heapify(h)

    def _head(self, reused: bool) -> tuple | None:
        h = self._heaps[reused]
        while h and self._entry.get(h[0][2]) is not h[0]:
            heapq.heappop(h)
        return h[0] if h else None

    def pop(self, now: float, session_ttl_s: float) -> BlockFile | None:
        """Remove and return the block that leaves first (None: the tier is empty)."""
        fresh, reused = self._head(False), self._head(True)
        idle = [e for e in (fresh, reused if reused and now - reused[0] > session_ttl_s else None) if e]
        e = min(idle) if idle else reused
        if e is None:
            return None
        heapq.heappop(self._heaps[e[3].reused])
        self.remove(e[2])
        return e[3]

    def shed(self, budget: int, now: float, session_ttl_s: float) -> list[BlockFile]:
        """Remove and return, in eviction order, the blocks that must leave for the tier to fit `budget` bytes."""
        out: list[BlockFile] = []
        while self.bytes > budget and (f := self.pop(now, session_ttl_s)) is not None:
            out.append(f)
        return out


def eviction_order(files: Sequence[BlockFile], now: float, session_ttl_s: float,
                   first: int | None = None) -> list[BlockFile]:
    """EvictionQueue's order of `files` (`first`: only that many, the rest left unordered)."""
    q = EvictionQueue.of(files)
    n = len(files) if first is None else min(first, len(files))
    return [q.pop(now, session_ttl_s) for _ in range(n)]


def to_move_out(files: Sequence[BlockFile], budget: int, now: float, session_ttl_s: float) -> list[BlockFile]:
    """The blocks of one tier that must leave it (in eviction order) for it to fit `budget` bytes."""
    return EvictionQueue.of(files).shed(budget, now, session_ttl_s)


# Each app keeps its blocks in a namespace of its own in each tier, <tier root>/app-<name>/<layout>/, so that one app's
# blocks are never another's cache hits; the shards of a node keep all namespaces within one budget (pool_catalog).
NAMESPACE_PREFIX = "app-"
# A layout directory directly in a tier root was written before namespaces (the form of connector.layout_name).
UNNAMESPACED_LAYOUT = re.compile(r"[0-9a-f]{16}-rank[0-9]+")


def pool_namespace(app_name: str) -> str:
    """The directory of an app's blocks in each tier root."""
    return NAMESPACE_PREFIX + urllib.parse.quote(app_name or "default", safe="")


class PoolStore:
    def __init__(self, host_dir: str | Path, disk_dir: str | Path, layout: str):
        """`layout` names what the bytes mean (model, dtype, block size, rank): blocks of different layouts never
        mix, each layout has its own subdirectory."""
        self.layout = layout
        self.tiers = {"host": Path(host_dir) / layout, "disk": Path(disk_dir) / layout}
        self._readers: ThreadPoolExecutor | None = None
        self._dir_fds: list[int] | None = None
        for d in self.tiers.values():
            d.mkdir(parents=True, exist_ok=True)

    def _path(self, tier: str, key: str) -> Path:
        return self.tiers[tier] / f"{key}{SUFFIX}"

    def find(self, key: str) -> Path | None:
        for tier in ("host", "disk"):
            p = self._path(tier, key)
            if p.exists():
                return p
        return None

    def _tier_fds(self) -> list[int]:
        """Each tier's directory, open: a block is looked up by name relative to it (below)."""
        if self._dir_fds is None:
            self._dir_fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in self.tiers.values()]
            weakref.finalize(self, _close_all, self._dir_fds)
        return self._dir_fds

    def contains(self, key: str) -> bool:
        return self.leading_hits([key]) == 1

    def leading_hits(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first, the pool holds (in either tier)."""
        # The scheduler asks this of every block of a waiting prompt at each scheduling attempt: one access() by
        # name relative to a tier's open directory (no path to walk, nothing to return), and the loop does nothing
        # else: within 0.1 us of the syscall alone (kvpool bench pool-scale, lookup_us_per_block vs access_us).
        host, disk = self._tier_fds()
        access, exists, n = os.access, os.F_OK, 0
        for key in keys:
            name = key + SUFFIX
            if not (access(name, exists, dir_fd=host) or access(name, exists, dir_fd=disk)):
                break
            n += 1
        return n

    def _tmp(self, target: Path) -> Path:
        return target.with_name(f".{target.stem}.{uuid.uuid4().hex}{TMP_SUFFIX}")

    def put(self, key: str, data: Buffer | Sequence[Buffer], live: bool = False) -> bool:
        """Write a block to the host tier (atomically; an existing block is left as it is). `data`: the block's
        bytes, whole or as its pieces in order (a KV cache's layers), written without joining them. False if it
        could not be written (a full tier): nothing is left behind, and the block is recomputed when needed.
        `live`: the block belongs to a live session from the start (a client asked for the prefix to be kept)."""
        target = self._path("host", key)
        if target.exists():
            return True
        tmp = self._tmp(target)
        try:
            chunks = _chunks(_byte_views(data))
            frame = _frame(sum(size for _, size in chunks), len(key.encode()))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                # At its full size from the start, so a tmpfs mounted huge=within_size backs it with large pages.
                os.ftruncate(fd, frame.size)
                # Payload first, a chunk at a time: each chunk is hashed, then copied by the kernel while it is
                # still in cache; the frame, which holds the checksum, goes in last.
                h, pos = xxhash.xxh3_64(), frame.offset
                for chunk, size in chunks:
                    for v in chunk:
                        h.update(v)
                    pos += _moved(os.pwritev(fd, chunk, pos), size)
                head, tail = frame.fill(key, h.intdigest())
                _moved(os.pwrite(fd, head, 0), len(head))
                _moved(os.pwrite(fd, tail, pos), len(tail))
            finally:
                os.close(fd)
            now = time.time()
            os.utime(tmp, (now if live else 0, now))  # atime 0: not reused yet
            os.replace(tmp, target)
            return True
        except (OSError, ValueError, TypeError) as e:  # a full tier; a block this store cannot frame
            tmp.unlink(missing_ok=True)
            logger.warning("pool block %s not written: %s", key, e)
            return False

    def touch(self, keys: Sequence[str]) -> int:
        """Mark the pooled blocks among `keys` as used now (a session came back to them); returns how many.
        Deepest first, so a chain's prefix is the most recent and LRU eviction trims chains from their tails."""
        n, now = 0, time.time()
        for key in reversed(keys):
            path = self.find(key)
            try:
                if path is not None:
                    os.utime(path, (now, now))
                    n += 1
            except FileNotFoundError:
                pass
        return n

    def read_raw(self, key: str) -> bytes | None:
        """A block's whole file (Arrow IPC with its checksum), to copy to another node's pool."""
        path = self.find(key)
        try:
            return path.read_bytes() if path else None
        except FileNotFoundError:
            return None

    def write_raw(self, key: str, data: bytes) -> bool:
        """Store a file read by read_raw on another node (atomically). Its checksum is verified when it is loaded.
        False if it could not be written (a full tier); nothing is left behind."""
        target = self._path("host", key)
        if target.exists():
            return True
        tmp = self._tmp(target)
        try:
            tmp.write_bytes(data)
            now = time.time()
            os.utime(tmp, (now, now))  # fetched for a request that is about to load it: in use
            os.replace(tmp, target)
            return True
        except OSError as e:
            tmp.unlink(missing_ok=True)
            logger.warning("pool block %s not copied: %s", key, e)
            return False

    def _open(self, key: str) -> tuple[int, Path] | None:
        for tier in ("host", "disk"):
            path = self._path(tier, key)
            try:
                return os.open(path, os.O_RDONLY), path
            except FileNotFoundError:
                continue
        return None

    def read_into(self, key: str, dst: Sequence[memoryview]) -> bool:
        """Read a block straight into `dst` (the destination's contiguous pieces, in order: on CPU the KV cache's
        own memory), with no staging copy, a chunk at a time, each chunk hashed while it is still in cache; then
        its checksum verified. False if the block is missing, of another size, or corrupt (then removed); `dst`
        then holds zeros: the engine recomputes over them, or frees the block, and a freed block's bytes must not
        be NaN (an attention kernel multiplies a part-filled block's empty slots by zero)."""
        ok = False
        try:
            ok = self._read_into(key, dst)
            return ok
        finally:  # an unexpected exception too: the caller counts the block as failed
            if not ok:
                for v in dst:
                    np.frombuffer(_as_bytes(v), dtype=np.uint8)[:] = 0

    def _read_into(self, key: str, dst: Sequence[memoryview]) -> bool:
        opened = self._open(key)
        if opened is None:
            return False
        fd, path = opened
        try:
            try:
                chunks = _chunks(dst)
                frame = _frame(sum(size for _, size in chunks), len(key.encode()))
                head = os.pread(fd, frame.offset, 0) if os.fstat(fd).st_size == frame.size else b""
                expected = frame.checksum(head, key)
                if expected is not None:
                    h, pos = xxhash.xxh3_64(), frame.offset
                    for chunk, size in chunks:
                        pos += _moved(os.preadv(fd, chunk, pos), size)
                        for v in chunk:
                            h.update(v)
            finally:
                os.close(fd)
            if expected is None:
                # Not the file this process writes for this key and size: another pyarrow's layout, a block of
                # another size, or damage. Rare: parsed as Arrow, whole.
                return self._read_parsed(path, key, dst)
            if h.intdigest() != expected:
                return self._corrupt(path, key)
            os.utime(path)  # a load is a use
            return True
        except (OSError, pa.ArrowException, KeyError, ValueError, IndexError):
            return False

    def _read_parsed(self, path: Path, key: str, dst: Sequence[memoryview]) -> bool:
        payload = _verified(path.read_bytes(), key)
        if payload is None:
            return self._corrupt(path, key)
        if payload.size != sum(v.nbytes for v in dst):
            return False  # a sound block of another size (another layout's): kept
        src, pos = _as_bytes(memoryview(payload)), 0
        for v in dst:
            piece = _as_bytes(v)
            piece[:] = src[pos:pos + piece.nbytes]
            pos += piece.nbytes
        os.utime(path)
        return True

    @staticmethod
    def _corrupt(path: Path, key: str) -> bool:
        # Never served again, and a correct copy can take its place (writers skip existing keys).
        path.unlink(missing_ok=True)
        logger.warning("pool block %s is corrupt: removed", key)
        return False

    def get(self, key: str) -> bytes | None:
        """A block's verified bytes, parsed as Arrow (tools and tests; engines use read_blocks_into)."""
        path = self.find(key)
        try:
            payload = _verified(path.read_bytes(), key) if path else None
        except OSError:
            return None
        return payload.to_pybytes() if payload is not None else None

    def read_blocks_into(self, keys: Sequence[str], dst: Callable[[int], Sequence[memoryview]]) -> int:
        """Read `keys` in parallel reader threads, block i into dst(i) (file reads and hashing release the GIL).
        Returns how many leading blocks were read; the rest are missing or corrupt."""
        if self._readers is None:
            self._readers = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="kvpool-read")
        ok = list(self._readers.map(lambda ik: self.read_into(ik[1], dst(ik[0])), enumerate(keys)))
        return ok.index(False) if False in ok else len(ok)

    # --- for the pool actor: listing, demotion, eviction ---------------------------------------------------------

    def scan(self, *tiers: str) -> list[BlockFile]:
        """The block files of these tiers (default: both). Temporary files of writers that died are removed on the
        way."""
        files, now = [], time.time()
        for tier in tiers or self.tiers:
            d = self.tiers[tier]
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.name.endswith(TMP_SUFFIX):
                            if now - e.stat().st_mtime > STALE_TMP_S:
                                os.unlink(e.path)
                            continue
                        if not e.name.endswith(SUFFIX):
                            continue
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    files.append(BlockFile(e.name[: -len(SUFFIX)], tier, e.path, st.st_size, st.st_mtime,
                                           st.st_atime > 0, self.layout))
        return files

    def demote(self, f: BlockFile) -> bool:
        """Host -> disk (copy, then rename into place, then drop the host copy). False if the block is gone or the
        disk tier cannot take it (full, unwritable): nothing is left behind, the host copy stays."""
        target = self._path("disk", f.key)
        tmp = self._tmp(target)
        try:
            with open(f.path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.utime(tmp, (f.last_used if f.reused else 0, f.last_used))
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        _unlink(f.path)
        return True

    @staticmethod
    def delete(files: Iterable[BlockFile]) -> None:
        for f in files:
            _unlink(f.path)


class EngineStores:
    """The pool as an engine's scheduler sees it: one store per engine rank (tensor/pipeline parallel), each rank
    saving and loading only its own part of every block. A block counts as pooled only where every rank holds it,
    since a load that some rank cannot make is a failed load."""

    def __init__(self, host_dir: str | Path, disk_dir: str | Path, layouts: Sequence[str]):
        self.ranks = [PoolStore(host_dir, disk_dir, layout) for layout in layouts]

    def contains(self, key: str) -> bool:
        return all(s.contains(key) for s in self.ranks)

    def leading_hits(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first, every rank holds."""
        return min(s.leading_hits(keys) for s in self.ranks)

    def touch(self, keys: Sequence[str]) -> None:
        for s in self.ranks:
            s.touch(keys)
