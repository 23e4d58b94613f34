"""What one node's pool holds, kept up to date from the file system's change notifications, and the shard's upkeep.

Engines write, load and touch block files directly (kvpool/pool_store.py); the node's shard must know every block's
tier, size and last use to keep the tiers within budget, and tell the router what arrived and left. Rescanning the
directories for that costs O(blocks) a pass (2.4 us a file on tmpfs: 2.4 s a pass at a million blocks), so the
catalog scans once and then follows inotify: a block renamed into place (written, copied, demoted), used (its times
set: IN_ATTRIB), rewritten in place or deleted is looked at again, by name. Upkeep is then O(changes): each tier is an
EvictionQueue, a pass over budget frees k blocks in O(k log n), and a report carries the blocks whose presence
changed. Where notifications are not to be had (no inotify, a queue overflow, a tier on a network file system whose
other writers the kernel never sees) a full rescan reconciles the catalog: at once on overflow, and every
RESYNC_S regardless.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Iterable

import numpy as np

from kvpool.hashing import pool_key_ids
from kvpool.pool_store import SUFFIX, BlockFile, EvictionQueue, PoolStore

logger = logging.getLogger(__name__)

TIERS = ("host", "disk")
# Reconcile with a full rescan this often even when notifications keep up (0.4% of a core at a million blocks).
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


class PoolCatalog:
    """Every block file of one node's pool, both tiers, every layout, with each tier's eviction order. Safe to use
    from several threads (one lock): a follower thread (start_following) keeps it current while the shard's loop
    trims it and reports it."""

    def __init__(self, host_root: str | os.PathLike, disk_root: str | os.PathLike):
        self.roots = {"host": Path(host_root), "disk": Path(disk_root)}
        self.tiers = {t: EvictionQueue() for t in TIERS}
        self.stores: dict[str, PoolStore] = {}  # layout -> its store (demotion, reads)
        self.changed: set[BlockId] = set()  # blocks whose presence on the node changed since the last report
        self.full_report = True  # the next report sends every block (first, or after a failed one)
        self.rescans = 0
        self._inotify: Inotify | None = None
        self._watches: dict[int, tuple[str, str | None]] = {}  # wd -> (tier, layout; None for the tier's root)
        self._synced_at = float("-inf")
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    # --- following the directories ---------------------------------------------------------------------------

    def start_following(self) -> None:
        """Keep the catalog current from a thread of its own (until close)."""
        if self._follower is None:
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
            try:
                select.select([inotify.fd], [], [], RESYNC_S / 10)
            except (OSError, ValueError):  # closed meanwhile by a rescan
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
            if where[1] is None:  # a tier's root: a new layout's directory
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    self._follow_layout(where[0], os.fsdecode(name))
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
        if self._inotify is not None:
            self._inotify.close()
        self._inotify, self._watches = None, {}
        try:
            self._inotify = Inotify()
        except (OSError, AttributeError) as e:  # not Linux: every pass rescans
            logger.warning("no inotify (%s): the pool shard rescans its directories every pass", e)
        held = {t: set(q.blocks) for t, q in self.tiers.items()}
        self.tiers = {t: EvictionQueue() for t in TIERS}
        for tier, root in self.roots.items():
            root.mkdir(parents=True, exist_ok=True)
            if self._inotify is not None:
                self._watches[self._inotify.watch(root, ROOT_EVENTS)] = (tier, None)
            for d in sorted(root.iterdir()):
                if d.is_dir():
                    self._follow_layout(tier, d.name, note=False)
        self.rescans += 1
        self._synced_at = time.monotonic()
        was = held["host"] | held["disk"]
        now = self.tiers["host"].blocks.keys() | self.tiers["disk"].blocks.keys()
        self.changed |= was ^ now

    def _follow_layout(self, tier: str, layout: str, note: bool = True) -> None:
        """Watch a layout's directory (before listing it: nothing written meanwhile is missed) and add its blocks,
        oldest use first (the queue's order of equals)."""
        d = self.roots[tier] / layout
        if layout not in self.stores:
            self.stores[layout] = PoolStore(self.roots["host"], self.roots["disk"], layout)
        if self._inotify is not None:
            try:
                self._watches[self._inotify.watch(d, LAYOUT_EVENTS)] = (tier, layout)
            except OSError:  # gone already
                return
        store = self.stores[layout]
        for f in sorted((f for f in store.scan() if f.tier == tier), key=lambda f: f.last_used):
            self._put(f, note)

    def _look(self, tier: str, block: BlockId) -> None:
        """Look at one block file again: it is there (with its times) or it is gone."""
        layout, key = block
        path = f"{self.roots[tier]}/{layout}/{key}{SUFFIX}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self._remove(tier, block)
        self._put(BlockFile(key, tier, path, st.st_size, st.st_mtime, st.st_atime > 0, layout))

    def _remove(self, tier: str, block: BlockId) -> None:
        if self.tiers[tier].remove(block) is not None and not self.held(block):
            self.changed.add(block)

    def _put(self, f: BlockFile, note: bool = True) -> None:
        block = (f.layout, f.key)
        if note and not self.held(block):
            self.changed.add(block)
        self.tiers[f.tier].put(block, f)

    def held(self, block: BlockId) -> bool:
        return block in self.tiers["host"].blocks or block in self.tiers["disk"].blocks

    # --- upkeep ----------------------------------------------------------------------------------------------

    def upkeep(self, host_budget: int, disk_budget: int, session_ttl_s: float) -> tuple[int, int]:
        """One pass of the shard's upkeep: catch up with the directories, then demote and evict to the budgets.
        Returns (demoted, evicted)."""
        with self.lock:
            self._refresh()
            return self._shrink(host_budget, disk_budget, session_ttl_s)

    def _shrink(self, host_budget: int, disk_budget: int, session_ttl_s: float) -> tuple[int, int]:
        """Demote and evict to the budgets: the host tier's blocks over its budget go to disk (if the disk tier has
        a budget and can take them; else deleted), then the disk tier's over its own are deleted, each tier in
        eviction order. Returns (demoted, evicted)."""
        demoted = evicted = 0
        now = time.time()
        for f in self.tiers["host"].shed(host_budget, now, session_ttl_s):
            block = (f.layout, f.key)
            if disk_budget > 0 and self.stores[f.layout].demote(f):
                f.tier, f.path = "disk", os.path.join(self.roots["disk"], f.layout, f.key + SUFFIX)
                self.tiers["disk"].put(block, f)  # counted against the disk budget in the same pass
                demoted += 1
            else:  # no disk tier, or it cannot take the block (full): the host tier must shrink all the same
                PoolStore.delete([f])
                evicted += 1
                if block not in self.tiers["disk"]:
                    self.changed.add(block)
        for f in self.tiers["disk"].shed(disk_budget, now, session_ttl_s):
            PoolStore.delete([f])
            evicted += 1
            if (f.layout, f.key) not in self.tiers["host"]:
                self.changed.add((f.layout, f.key))
        return demoted, evicted

    def take_report(self) -> tuple[bool, list[BlockId], list[BlockId]]:
        """What the router has not been told: (a full report?, blocks now on the node, blocks that left it). A
        full report lists every block; otherwise those whose presence changed since the last report."""
        if self.full_report:
            self.full_report = False
            self.changed = set()
            return True, list(self.tiers["host"].blocks.keys() | self.tiers["disk"].blocks.keys()), []
        changed, self.changed = self.changed, set()
        present = [b for b in changed if self.held(b)]
        return False, present, [b for b in changed if not self.held(b)]

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


def report_ids(blocks: Iterable[BlockId]) -> dict[str, np.ndarray]:
    """Blocks as the router takes them (PoolView.update): layout -> an array of pool-key ids."""
    keys: dict[str, list[str]] = {}
    for layout, key in blocks:
        keys.setdefault(layout, []).append(key)
    return {layout: pool_key_ids(k) for layout, k in keys.items()}
