"""`kvpool bench pool-scale`: the upkeep of a node's pool shard at a million blocks, and the scheduler's lookup.

A host tier of `--blocks` block files (sparse: they have their logical size and no pages, so a million of them fit
this machine), at its byte budget. A writer process plays the engines for `--seconds`: it writes new blocks the way
PoolStore.put does (a temporary file, its times, a rename into place) and uses existing ones the way a load or a
session's touch does (utime), at fixed rates. The shard's code runs as the actor runs it (kvpool.pool_catalog:
the catalog's follower thread, and every `--period` an upkeep pass, which evicts to the budget, and a report):

- maintenance_core_share: the CPU time of the follower thread and of the passes and reports, over the wall time;
- report_bytes: the pool-key ids a report sends, per pass (mean), and the first, full report's;
- lookup_us_per_block: the scheduler's EngineStores.leading_hits over chains of host-tier blocks, per block;
  access_us: the access() syscall it makes per block, alone (the floor); lookup_miss_us: a block in neither tier;
- rescan_s: what the shard did before, a full listing of the directories (PoolStore.scan), once, for comparison.

Checked: the catalog equals a fresh listing at the end, and the tier is within its budget.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import tempfile
import time
import uuid

from kvpool.pool_catalog import PoolCatalog, report_ids
from kvpool.pool_store import SUFFIX, TMP_SUFFIX, EngineStores, PoolStore

LAYOUT = "bench"


def _key(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _write(d: str, key: str, size: int, now: float) -> None:
    """A block written as PoolStore.put writes one (no payload: the file is sparse)."""
    tmp = os.path.join(d, f".{key}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, size)
    os.close(fd)
    os.utime(tmp, (0, now))
    os.replace(tmp, os.path.join(d, key + SUFFIX))


def _engines(d: str, keys: list[str], size: int, writes_per_s: float, touches_per_s: float, seconds: float,
             seed: int, done) -> None:
    """The writer process: writes and uses blocks at the given rates, in 10 ms steps."""
    rng = random.Random(seed)
    start = time.monotonic()
    writes = touches = 0
    while (t := time.monotonic() - start) < seconds:
        while writes < t * writes_per_s:
            key = _key(rng)
            _write(d, key, size, time.time())
            keys.append(key)
            writes += 1
        while touches < t * touches_per_s:
            try:
                os.utime(os.path.join(d, rng.choice(keys) + SUFFIX))
            except FileNotFoundError:  # evicted
                pass
            touches += 1
        time.sleep(0.01)
    done.put((writes, touches))


def _thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def run(args) -> dict:
    root = tempfile.mkdtemp(prefix="kvpool-pool-scale-", dir=args.dir)
    host, disk = f"{root}/host", f"{root}/disk"
    d = os.path.join(host, LAYOUT)
    os.makedirs(d)
    rng = random.Random(args.seed)
    budget = args.blocks * args.block_bytes
    out: dict = {"bench": "pool-scale", "blocks": args.blocks, "block_bytes": args.block_bytes,
                 "writes_per_s": args.writes_per_s, "touches_per_s": args.touches_per_s, "seconds": args.seconds,
                 "period_s": args.period}
    try:
        t = time.perf_counter()
        keys = [_key(rng) for _ in range(args.blocks)]
        now = time.time()
        for i, key in enumerate(keys):  # last used over the past hour; a third reused (sessions)
            _write(d, key, args.block_bytes, now - 3600 + 3600 * i / args.blocks)
            if i % 3 == 0:
                os.utime(os.path.join(d, key + SUFFIX))
        out["populate_s"] = round(time.perf_counter() - t, 1)

        t = time.perf_counter()
        PoolStore(host, disk, LAYOUT).scan()
        out["rescan_s"] = round(time.perf_counter() - t, 2)

        catalog = PoolCatalog(host, disk)
        t = time.perf_counter()
        catalog.refresh()
        out["catalog_build_s"] = round(time.perf_counter() - t, 2)
        full, added, _ = catalog.take_report()
        assert full and len(added) == args.blocks, (full, len(added))
        out["first_report_bytes"] = sum(a.nbytes for a in report_ids(added).values())

        catalog.start_following()
        follower = catalog._follower.native_id
        ctx = mp.get_context("spawn")
        done = ctx.Queue()
        writer = ctx.Process(target=_engines, args=(d, keys[-50_000:], args.block_bytes, args.writes_per_s,
                                                    args.touches_per_s, args.seconds, args.seed + 1, done))
        writer.start()
        cpu0, follow0, wall0 = time.thread_time(), _thread_cpu_s(follower), time.perf_counter()
        reports, passes, evicted = [], 0, 0
        while writer.is_alive():
            evicted += catalog.upkeep(budget, 0, session_ttl_s=600)[1]
            _, added, removed = catalog.take_report()
            reports.append(sum(a.nbytes for a in report_ids(added).values()) +
                           sum(a.nbytes for a in report_ids(removed).values()))
            passes += 1
            time.sleep(args.period)
        wall = time.perf_counter() - wall0
        busy = time.thread_time() - cpu0 + _thread_cpu_s(follower) - follow0
        writes, touches = done.get()
        writer.join()
        out.update(maintenance_core_share=round(busy / wall, 4), passes=passes, report_bytes=round(sum(reports) /
                   max(1, len(reports))), blocks_written=writes, blocks_touched=touches, evicted=evicted,
                   rescans=catalog.rescans)

        # Checked: the catalog, followed from notifications only (no rescan), is what a listing finds; the tier fits.
        catalog.refresh()
        listed = {(f.key, f.size) for f in PoolStore(host, disk, LAYOUT).scan()}
        out["catalog_matches_scan"] = catalog.rescans == 1 and \
            listed == {(f.key, f.size) for f in catalog.tiers["host"].blocks.values()}
        catalog.upkeep(budget, 0, session_ttl_s=600)
        out["within_budget"] = catalog.tiers["host"].bytes <= budget
        catalog.close()

        # The scheduler's lookup: chains of 64 host-tier blocks, as a waiting prompt asks at each attempt.
        stores = EngineStores(host, disk, [LAYOUT])
        held = [k for _, k in catalog.tiers["host"].blocks]
        chains = [rng.sample(held, 64) for _ in range(args.lookups // 64)]
        t = time.perf_counter()
        hits = sum(stores.leading_hits(c) for c in chains)
        out["lookup_us_per_block"] = round((time.perf_counter() - t) / (64 * len(chains)) * 1e6, 2)
        assert hits == 64 * len(chains), "a block the catalog holds is not in the tier"
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        t = time.perf_counter()
        for c in chains:
            for key in c:
                os.access(key + SUFFIX, os.F_OK, dir_fd=fd)
        out["access_us"] = round((time.perf_counter() - t) / (64 * len(chains)) * 1e6, 2)  # the syscall alone
        os.close(fd)
        misses = [_key(rng) for _ in range(10_000)]
        t = time.perf_counter()
        assert sum(stores.leading_hits([k]) for k in misses) == 0
        out["lookup_miss_us"] = round((time.perf_counter() - t) / len(misses) * 1e6, 2)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
