"""What one node's pool holds, kept up to date from the file system's change notifications, and the shard's upkeep.

Engines write, load and touch block files directly (kvpool/pool_store.py); the node's shard must know every block's
tier, size and last use to keep the tiers within budget, and tell the router what arrived and left. Rescanning the
directories for that costs O(blocks) a pass (4 to 7 s at a million blocks on tmpfs here, kvpool bench pool-scale's
rescan_s), so the catalog lists them once and then follows inotify: a block renamed into place (written, copied,
demoted), used (its times set: IN_ATTRIB) or deleted is looked at again, by name. Upkeep is then O(changes):
each tier is an EvictionQueue, a pass over budget frees k blocks in O(k log n), and a report carries the blocks
whose presence changed. Where notifications are not to be had (no inotify, a queue overflow, a tier on a network
file system whose other writers the kernel never sees) a full rescan reconciles the catalog: at once on overflow,
and every RESYNC_S regardless.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import select
import shutil
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Iterable

import numpy as np

from kvpool.hashing import pool_key_ids
from kvpool.pool_store import NAMESPACE_PREFIX, SUFFIX, UNNAMESPACED_LAYOUT, BlockFile, EvictionQueue, PoolStore

logger = logging.getLogger(__name__)

TIERS = ("host", "disk")
# Reconcile with a full rescan this often even when notifications keep up (at a million blocks a rescan is the
# listing, 6-7.5 s here, and building the queues).
RESYNC_S = 600.0

# <sys/inotify.h>
IN_ATTRIB, IN_MOVED_TO = 0x4, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
ROOT_EVENTS = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
# A block arrives by rename (written, copied, demoted), is used by a utime() and leaves by unlink; its temporary
# file's events (IN_CREATE, IN_CLOSE_WRITE, ...) are not asked for. Writers never rewrite a block in place.
LAYOUT_EVENTS = IN_ATTRIB | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
# The follower drains the notifications at most this often, so that a burst is read in one go. The kernel queues
# 16,384 events per instance by default (2 a block written, 1 a block used): at the rates a node writes, a
# pass every 0.5 s could overflow it, a drain every 50 ms does not.
FOLLOW_S = 0.05
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded to len


class Inotify:
    """Linux inotify through libc: watches by directory, events read without blocking."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.close = weakref.finalize(self, os.close, self.fd)

    def watch(self, path: str | os.PathLike, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def read(self) -> list[tuple[int, int, bytes]]:
        """Every event queued so far: (watch, mask, file name)."""
        out = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(buf):
                wd, mask, _, n = _EVENT.unpack_from(buf, pos)
                pos += _EVENT.size
                out.append((wd, mask, buf[pos:pos + n].rstrip(b"\0")))
                pos += n



BlockId = tuple[str, str]  # (layout, pool key)
_SUFFIX = SUFFIX.encode()


def _block_id(f: BlockFile) -> BlockId:
    return f.layout, f.key


class PoolCatalog:
    """Every block file of one app's part of a node's pool (or, `namespaced`, of every app's), both tiers, every
    layout, with each tier's eviction order. Safe to use from several threads (one lock): a follower thread
    (start_following) keeps it current while the shard's loop trims it and reports it. Every change to a block file
    is an event that the catalog answers by looking at that file again, so whatever it did or missed meanwhile, it
    ends up with what is on disk."""

    def __init__(self, host_root: str | os.PathLike, disk_root: str | os.PathLike, namespaced: bool = False):
        """`namespaced`: the roots hold apps' namespaces (pool_store.pool_namespace), each holding layouts, and the
        catalog takes them all, a layout known as "<namespace>/<layout>"; else the roots hold layouts."""
        self.roots = {"host": Path(host_root), "disk": Path(disk_root)}
        self._depth = 2 if namespaced else 1  # how deep in a root the directories of blocks are
        self._root_dirs = {r.resolve() for r in self.roots.values()}  # (the host tier may live inside the disk's)
        self.tiers = {t: EvictionQueue() for t in TIERS}
        self.stores: dict[str, PoolStore] = {}  # layout -> its store (demotion, reads)
        self.changed: set[BlockId] = set()  # blocks whose presence on the node changed since the last report
        self.full_report = True  # the next report sends every block (first, or after a failed one)
        self.rescans = 0
        self.lock = threading.RLock()
        self._inotify: Inotify | None = None
        self._polling = False  # no notifications to be had: every refresh rescans
        self._watches: dict[int, tuple[str, str]] = {}  # wd -> (tier, its directory relative to the tier's root)
        self._synced_at = float("-inf")
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    # --- following the directories ---------------------------------------------------------------------------

    def start_following(self) -> None:
        """Keep the catalog current from a thread of its own (until close)."""
        with self.lock:
            if not self._polling and (self._follower is None or not self._follower.is_alive()):
                self._follower = threading.Thread(target=self._follow, name="kvpool-catalog", daemon=True)
                self._follower.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:
                logger.exception("pool catalog refresh failed")
            inotify = self._inotify
            if inotify is None:
                return  # nothing to follow: each upkeep pass rescans
            try:  # (a rescan may close the descriptor meanwhile: then this returns within a second)
                select.select([inotify.fd], [], [], 1.0)
            except (OSError, ValueError):
                pass
            self._stop.wait(FOLLOW_S)

    def refresh(self) -> None:
        """Bring the catalog up to date: the notifications since the last call, or a full rescan."""
        with self.lock:
            self._refresh()

    def _refresh(self) -> None:
        if self._inotify is None or time.monotonic() - self._synced_at > RESYNC_S:
            return self._rescan()
        last: dict[tuple[int, bytes], int] = {}  # (watch, file name) -> its last event's mask
        arrived: set[tuple[int, bytes]] = set()
        for wd, mask, name in self._inotify.read():
            if mask & IN_Q_OVERFLOW or (mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED) and wd in self._watches):
                return self._rescan()  # events lost, or a directory went: start over
            where = self._watches.get(wd)
            if where is None:
                continue
            tier, rel = where
            if self._level(rel) < self._depth:  # a tier's root or a namespace: a new directory in it
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    name = os.fsdecode(name)
                    if self._followed(tier, rel, name):
                        for f in self._list(tier, f"{rel}/{name}" if rel else name):
                            self._put(f)
            elif name.endswith(_SUFFIX):
                last[wd, name] = mask
                if mask & IN_MOVED_TO:
                    arrived.add((wd, name))
        now = time.time()
        for (wd, name), mask in last.items():
            tier, layout = self._watches[wd]
            block = (layout, name[:-len(_SUFFIX)].decode())
            queue = self.tiers[tier]
            if mask & IN_DELETE:
                self._remove(tier, block)
            elif mask & IN_ATTRIB and (wd, name) not in arrived and block in queue:
                # Only a use sets a block's times in place (writers set them before the rename): used now.
                f = queue.blocks[block]
                f.last_used, f.reused = now, True
                queue.put(block, f)
            else:  # arrived (or unknown): its size and times
                self._look(tier, block)

    def _rescan(self) -> None:
        """List both tiers anew (watching each directory before listing it, so nothing written meanwhile is
        missed) and take the listing whole; blocks whose presence differs from before are reported."""
        if self._inotify is not None:
            self._inotify.close()
        self._inotify, self._watches = None, {}
        if not self._polling:
            try:
                self._inotify = Inotify()
            except (OSError, AttributeError) as e:  # not Linux, or no instance left
                self._no_notifications(e)
        files: list[BlockFile] = []
        for tier, root in self.roots.items():
            root.mkdir(parents=True, exist_ok=True)
            files += self._list(tier, "")
        tiers = {t: EvictionQueue.of([f for f in files if f.tier == t], _block_id) for t in TIERS}
        was = self.tiers["host"].blocks.keys() | self.tiers["disk"].blocks.keys()
        self.tiers = tiers
        self.changed |= was ^ (tiers["host"].blocks.keys() | tiers["disk"].blocks.keys())
        self.rescans += 1
        self._synced_at = time.monotonic()

    def _no_notifications(self, e: Exception) -> None:
        logger.warning("no inotify for the pool's directories (%s): the shard rescans them every pass", e)
        if self._inotify is not None:
            self._inotify.close()
        self._inotify, self._polling = None, True

    def _level(self, rel: str) -> int:
        return rel.count("/") + 1 if rel else 0

    def _followed(self, tier: str, rel: str, name: str) -> bool:
        """Whether the directory `name` in `rel` is the catalog's: a layout, or (namespaced, in a root) an app's
        namespace; not the host tier where it lives inside the disk tier's root, nor anything else there."""
        if name.startswith(".") or (self.roots[tier] / rel / name).resolve() in self._root_dirs:
            return False
        return not (self._depth == 2 and rel == "") or name.startswith(NAMESPACE_PREFIX)

    def _list(self, tier: str, rel: str) -> list[BlockFile]:
        """Watch a directory of a tier (before listing it, so nothing written meanwhile is missed), then list the
        blocks in it, or in the directories in it."""
        d = self.roots[tier] / rel
        if not self._watch(d, tier, rel):
            return []
        if self._level(rel) == self._depth:
            return self.store(rel).scan(tier)
        try:
            names = sorted(c.name for c in d.iterdir() if c.is_dir())
        except FileNotFoundError:
            return []
        return [f for name in names if self._followed(tier, rel, name)
                for f in self._list(tier, f"{rel}/{name}" if rel else name)]

    def _watch(self, d: Path, tier: str, rel: str) -> bool:
        """Watch a directory of a tier: for new directories in it, or (a layout's) for its blocks; False if it is
        gone."""
        if self._inotify is None:
            return d.is_dir()
        try:
            mask = LAYOUT_EVENTS if self._level(rel) == self._depth else ROOT_EVENTS
            self._watches[self._inotify.watch(d, mask)] = (tier, rel)
        except FileNotFoundError:
            return False
        except OSError as e:  # no watch left (fs.inotify.max_user_watches), ...: fall back to rescanning
            self._no_notifications(e)
        return True

    def store(self, layout: str) -> PoolStore:
        """The store of a layout's blocks on this node (one per layout, kept)."""
        if layout not in self.stores:
            self.stores[layout] = PoolStore(self.roots["host"], self.roots["disk"], layout)
        return self.stores[layout]

    def _look(self, tier: str, block: BlockId) -> None:
        """Look at one block file again: it is there (with its times) or it is gone."""
        layout, key = block
        path = f"{self.roots[tier]}/{layout}/{key}{SUFFIX}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self._remove(tier, block)
        self._put(BlockFile(key, tier, path, st.st_size, st.st_mtime, st.st_atime > 0, layout))

    def _put(self, f: BlockFile) -> None:
        block = _block_id(f)
        if not self.held(block):
            self.changed.add(block)
        self.tiers[f.tier].put(block, f)

    def _remove(self, tier: str, block: BlockId) -> None:
        if self.tiers[tier].remove(block) is not None and not self.held(block):
            self.changed.add(block)

    def held(self, block: BlockId) -> bool:
        return block in self.tiers["host"].blocks or block in self.tiers["disk"].blocks

    # --- upkeep ----------------------------------------------------------------------------------------------

    def upkeep(self, host_budget: int, disk_budget: int, session_ttl_s: float) -> tuple[int, int]:
        """One pass of the shard's upkeep: catch up with the directories, then demote and evict to the budgets:
        the host tier's blocks over its budget go to disk (if the disk tier has a budget and can take them; else
        they are deleted), then the disk tier's over its own are deleted, each tier in eviction order. The files
        are moved outside the lock, so the follower keeps draining notifications meanwhile. Returns (demoted,
        evicted)."""
        now = time.time()
        with self.lock:
            self._refresh()
            leaving = self.tiers["host"].shed(host_budget, now, session_ttl_s)
        moved = [disk_budget > 0 and self.store(f.layout).demote(f) for f in leaving]
        gone = self._delete([f for f, ok in zip(leaving, moved) if not ok])
        with self.lock:
            for f, ok in zip(leaving, moved):
                if ok:  # counted against the disk budget in this pass; still on the node, nothing to report
                    f.tier, f.path = "disk", f"{self.roots['disk']}/{f.layout}/{f.key}{SUFFIX}"
                    self.tiers["disk"].put(_block_id(f), f)
            self._note_gone(gone)
            leaving = self.tiers["disk"].shed(disk_budget, now, session_ttl_s)
        gone_from_disk = self._delete(leaving)
        with self.lock:
            self._note_gone(gone_from_disk)
        return sum(moved), len(gone) + len(gone_from_disk)

    def _delete(self, files: list[BlockFile]) -> list[BlockFile]:
        """Delete block files; returns those deleted (one that cannot be is left, and found by the next rescan)."""
        gone = []
        for f in files:
            try:
                PoolStore.delete([f])
                gone.append(f)
            except OSError as e:
                logger.warning("pool block %s not deleted: %s", f.path, e)
        return gone

    def _note_gone(self, files: list[BlockFile]) -> None:
        for f in files:
            if not self.held(_block_id(f)):
                self.changed.add(_block_id(f))

    def take_report(self) -> tuple[bool, list[BlockId], list[BlockId]]:
        """What the router has not been told: (a full report?, blocks now on the node, blocks that left it). A
        full report lists every block; otherwise those whose presence changed since the last report."""
        with self.lock:
            if self.full_report:
                self.full_report = False
                self.changed = set()
                return True, list(self.tiers["host"].blocks.keys() | self.tiers["disk"].blocks.keys()), []
            changed, self.changed = self.changed, set()
            held = [self.held(b) for b in changed]
            return (False, [b for b, h in zip(changed, held) if h],
                    [b for b, h in zip(changed, held) if not h])

    def live_session_blocks(self, session_ttl_s: float) -> int:
        """Blocks reused within the session TTL (a pass over every block: for stats, not for upkeep)."""
        now = time.time()
        with self.lock:
            return sum(1 for q in self.tiers.values() for f in q.blocks.values()
                       if f.reused and now - f.last_used <= session_ttl_s)

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join()
        with self.lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None


class NodeKeeping:
    """Which shard keeps a node's pool, and within what budget. Every app on a node has a shard and a namespace in
    the same tier roots; if each evicted its own namespace against a budget of its own, a node would hold the sum
    of its apps' budgets and the apps would not share its memory by use. So one shard, whichever holds the host
    root's lock file, keeps every namespace (a namespaced PoolCatalog: one eviction order over all apps' blocks)
    within one budget: per tier, the smallest that a live app declared. Each shard declares its budgets in a file it
    holds a shared lock on while it lives. The locks are flock()s: the kernel drops them when a shard's process
    ends, and the next pass of another shard on the node takes over."""

    def __init__(self, host_root: str | os.PathLike, disk_root: str | os.PathLike, namespace: str,
                 host_budget: int, disk_budget: int):
        self.roots = {"host": Path(host_root), "disk": Path(disk_root)}
        self.namespace = namespace
        self.own_budgets = host_budget, disk_budget
        for root in self.roots.values():
            root.mkdir(parents=True, exist_ok=True)
        self._apps = self.roots["host"] / ".apps"
        self._apps.mkdir(exist_ok=True)
        self._declared = os.open(self._apps / f"{namespace}.json", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._declared, fcntl.LOCK_SH)
        os.ftruncate(self._declared, 0)
        os.pwrite(self._declared, json.dumps({"host_bytes": host_budget, "disk_bytes": disk_budget,
                                              "disk_dir": str(self.roots["disk"].resolve())}).encode(), 0)
        self._warned: set[str] = set()
        self._lock: int | None = None
        self._fds = [self._declared]  # closed, and so the locks let go, by close() or when the object goes
        self.close = weakref.finalize(self, _close_all, self._fds)

    def keep(self) -> bool:
        """Whether this shard keeps the node's pool: it does if no live shard did. Taking over, it first moves
        into its namespace the layouts written before namespaces (directly in a tier root)."""
        if self._lock is None:
            fd = os.open(self.roots["host"] / ".keeper.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._lock = fd
            self._fds.append(fd)
            self._adopt_unnamespaced()
        return True

    def _adopt_unnamespaced(self) -> None:
        for root in self.roots.values():
            for d in root.iterdir():
                if not (d.is_dir() and UNNAMESPACED_LAYOUT.fullmatch(d.name)):
                    continue
                to = root / self.namespace / d.name
                if to.exists():  # this app wrote the layout anew since: the older blocks go
                    shutil.rmtree(d, ignore_errors=True)
                    logger.info("pool layout %s, written before namespaces, deleted (%s has it)", d, to)
                else:
                    to.parent.mkdir(exist_ok=True)
                    os.rename(d, to)
                    logger.info("pool layout %s, written before namespaces, moved to %s", d, to)

    def _check_disk_dir(self, namespace: str, disk_dir: str | None) -> None:
        """The keeper keeps the disk tier under its own disk root: an app whose disk tier is elsewhere keeps its
        disk blocks there unkept (and its host blocks are demoted into this root, where it does not look)."""
        if disk_dir and disk_dir != str(self.roots["disk"].resolve()) and namespace not in self._warned:
            self._warned.add(namespace)
            logger.error("apps sharing the pool's host tier %s must share its disk tier: %s has %s, %s has %s",
                         self.roots["host"], self.namespace, self.roots["disk"], namespace, disk_dir)

    def budgets(self) -> tuple[int, int]:
        """The node's budgets (host, disk): per tier, the smallest a live app declared."""
        host, disk = [self.own_budgets[0]], [self.own_budgets[1]]
        for path in self._apps.glob("*.json"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                continue  # no shard holds it: its app is gone from the node
            except BlockingIOError:
                try:
                    declared = json.loads(os.pread(fd, 4096, 0))
                    host.append(int(declared["host_bytes"]))
                    disk.append(int(declared["disk_bytes"]))
                    self._check_disk_dir(path.stem, declared.get("disk_dir"))
                except (ValueError, KeyError, TypeError):
                    pass  # being written
            finally:
                os.close(fd)
        return min(host), min(disk)



def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def report_ids(blocks: Iterable[BlockId]) -> dict[str, np.ndarray]:
    """Blocks as the router takes them (PoolView.update): layout -> an array of pool-key ids."""
    keys: dict[str, list[str]] = {}
    for layout, key in blocks:
        keys.setdefault(layout, []).append(key)
    return {layout: pool_key_ids(k) for layout, k in keys.items()}
