"""The shared KV pool with real vLLM CPU engines: migration between engines, persistence, corruption, budgets.

Each "replica" here is an in-process vLLM engine with the KVPoolConnector, sharing one pool directory, as engine
replicas on one node do. Correctness is checked on greedy tokens *and* on the logprobs of every generated token,
which move if even one loaded KV value is wrong.
"""

import os
import time
from pathlib import Path

import pytest
import ray

from kvpool.config import KVPoolConfig
from kvpool.hashing import pool_keys, request_namespace
from kvpool.pool_store import PoolStore

from test_pool_correctness import close, differences, engine, scratch_reference, tokens
from test_pool_correctness import generate as generate_all


def generate(llm, prompt):
    """Greedy: (cached tokens, token ids, each token's logprob)."""
    return generate_all(llm, [prompt])[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    yield from scratch_reference(tiny_model_dir)


def wait_saved(pool_dirs, n_blocks, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(1 for _ in Path(pool_dirs[0]).rglob("*.arrow")) >= n_blocks:
            return
        time.sleep(0.1)
    raise TimeoutError("blocks not saved")


def test_prefix_computed_on_a_is_loaded_by_b(tiny_model_dir, pool_dirs, reference):
    prefix, suffix = tokens(1, 1000), tokens(2, 90)
    a = engine(tiny_model_dir, pool_dirs)
    generate(a, prefix)
    wait_saved(pool_dirs, 1000 // 32 - 1)
    close(a)
    b = engine(tiny_model_dir, pool_dirs)  # never saw the prefix
    cached, toks, lps = generate(b, prefix + suffix)
    close(b)
    assert cached >= (1000 // 32 - 1) * 32, "B did not load the prefix from the pool"
    assert differences([(cached, toks, lps)], reference([prefix + suffix])) == []


def test_pool_shard_restart_and_disk_tier(tiny_model_dir, pool_dirs, reference, ray_cluster):
    from actors.pool import PoolShard

    host, disk = pool_dirs
    # No host budget: every block is demoted to the disk tier.
    cfg = KVPoolConfig(pool_host_dir=host, pool_disk_dir=disk, pool_host_bytes=0, pool_disk_bytes=1 << 30)
    pool = ray.remote(PoolShard).options(max_restarts=-1, num_cpus=0).remote(cfg, "", 0.1)
    ray.get(pool.start.remote())
    prompt = tokens(3, 700)
    pool_dirs = cfg.pool_dirs("")  # the namespace of the shard's app
    a = engine(tiny_model_dir, pool_dirs)
    generate(a, prompt)
    close(a)
    deadline = time.time() + 20
    while ray.get(pool.stats.remote())["blocks"]["disk"] < 700 // 32 - 1:
        assert time.time() < deadline, ray.get(pool.stats.remote())
        time.sleep(0.2)
    ray.kill(pool, no_restart=False)  # Ray restarts it; it finds the blocks in the directories
    deadline = time.time() + 30
    while True:
        try:
            st = ray.get(pool.stats.remote(), timeout=5)
            break
        except ray.exceptions.RayError:
            assert time.time() < deadline
            time.sleep(0.5)
    assert st["blocks"]["host"] == 0 and st["blocks"]["disk"] >= 700 // 32 - 1
    b = engine(tiny_model_dir, pool_dirs)
    cached, toks, lps = generate(b, prompt + [5, 6, 7])
    close(b)
    assert cached >= (700 // 32 - 1) * 32
    assert differences([(cached, toks, lps)], reference([prompt + [5, 6, 7]])) == []
    ray.kill(pool, no_restart=True)


def test_corrupt_block_is_recomputed(tiny_model_dir, pool_dirs, reference):
    prompt = tokens(4, 640)
    a = engine(tiny_model_dir, pool_dirs)
    generate(a, prompt)
    wait_saved(pool_dirs, 19)
    close(a)
    files = sorted(Path(pool_dirs[0]).rglob("*.arrow"))
    victim = files[len(files) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip bits inside the KV payload
    victim.write_bytes(bytes(raw))
    b = engine(tiny_model_dir, pool_dirs)
    cached, toks, lps = generate(b, prompt + [9, 9])
    close(b)
    assert differences([(cached, toks, lps)], reference([prompt + [9, 9]])) == []


def test_pool_stays_within_budget(tiny_model_dir, pool_dirs, ray_cluster):
    from actors.pool import PoolShard

    host, disk = pool_dirs
    block_bytes = 32 * 1024  # tiny model, float32: 1 KiB per token
    cfg = KVPoolConfig(pool_host_dir=host, pool_disk_dir=disk, pool_host_bytes=20 * block_bytes,
                       pool_disk_bytes=40 * block_bytes)
    keeper = PoolShard(cfg)
    a = engine(tiny_model_dir, cfg.pool_dirs(""))
    for i in range(8):  # 8 distinct prompts x 15 blocks = 120 blocks, twice the whole budget
        generate(a, tokens(100 + i, 500))
        time.sleep(0.2)
        st = keeper.maintain()
        assert st["host_bytes"] <= cfg.pool_host_bytes and st["disk_bytes"] <= cfg.pool_disk_bytes
    close(a)
    time.sleep(0.5)
    st = keeper.maintain()
    assert st["host_bytes"] <= cfg.pool_host_bytes and st["disk_bytes"] <= cfg.pool_disk_bytes
    assert st["demoted"] > 0 and st["evicted"] > 0


def test_live_sessions_outlast_one_off_prompts(tiny_model_dir, pool_dirs, ray_cluster):
    """A session that comes back (even when the engine's own cache serves it, so nothing is loaded from the pool)
    keeps its pooled blocks; a stream of one-off prompts is evicted first, though it is more recent."""
    from actors.pool import PoolShard

    host, disk = pool_dirs
    block_bytes = 32 * 1024
    cfg = KVPoolConfig(pool_host_dir=host, pool_disk_dir=disk, pool_host_bytes=40 * block_bytes,
                       pool_disk_bytes=0)
    keeper = PoolShard(cfg)
    session = tokens(200, 500)  # 15 blocks
    host, disk = pool_dirs = cfg.pool_dirs("")
    a = engine(tiny_model_dir, pool_dirs)
    generate(a, session)
    wait_saved(pool_dirs, 15)
    generate(a, session + tokens(201, 40))  # the next turn: the engine's own cache serves it
    for i in range(6):  # 6 one-off prompts x 15 blocks, more than the whole budget
        generate(a, tokens(300 + i, 500))
        time.sleep(0.3)
        keeper.maintain()
    close(a)
    time.sleep(0.5)
    st = keeper.maintain()
    assert st["host_bytes"] <= cfg.pool_host_bytes and st["evicted"] > 0 and st["live_session_blocks"] >= 15
    store = PoolStore(host, disk, next(p.name for p in Path(host).iterdir()))
    assert store.leading_hits(pool_keys(session, 32, request_namespace())) == 15, "the live session's blocks were evicted"


def test_eviction_order():
    from kvpool.pool_store import BlockFile, eviction_order

    now = 1000.0
    f = lambda key, used, reused: BlockFile(key, "host", Path(key), 1, used, reused)  # noqa: E731
    files = [f("live-old", 900, True), f("oneoff-new", 990, False), f("idle", 100, True), f("live-new", 980, True)]
    assert [x.key for x in eviction_order(files, now, session_ttl_s=600)] == \
        ["idle", "oneoff-new", "live-old", "live-new"]


def test_a_tier_over_budget_sheds_the_head_of_the_eviction_order():
    """to_move_out finds the first blocks of eviction_order without ordering the rest: the same blocks, in the
    same order, ties (blocks last used at the same time) included, whatever their sizes."""
    import random

    from kvpool.pool_store import BlockFile, eviction_order, to_move_out

    rng = random.Random(3)
    files = [BlockFile(f"k{i}", "host", Path(f"k{i}"), rng.choice([100, 150, 400]), float(rng.randrange(50)),
                       rng.random() < 0.5) for i in range(2000)]
    total, now = sum(f.size for f in files), 60.0
    whole = eviction_order(files, now, session_ttl_s=30)
    for excess in (1, 99, 5_000, total // 2, total - 1):  # within the idle blocks, and reaching the live ones
        out, size = [], total
        for f in whole:
            if size <= total - excess:
                break
            size -= f.size
            out.append(f.key)
        assert [f.key for f in to_move_out(files, total - excess, now, 30)] == out
    assert to_move_out(files, total, now, 30) == []


def test_store_round_trip_and_keys(tmp_path):
    store = PoolStore(tmp_path / "h", tmp_path / "d", "layout")
    store.put("ab" * 16, b"\x01\x02\x03\x04" * 100)
    assert bytes(store.get("ab" * 16)) == b"\x01\x02\x03\x04" * 100
    assert store.get("cd" * 16) is None
    # Scattered into pieces (as into a KV cache's layers), in order.
    payload = bytes(range(256)) * 4
    store.put("ef" * 16, payload)
    pieces = [bytearray(100), bytearray(900), bytearray(24)]
    assert store.read_into("ef" * 16, [memoryview(p) for p in pieces]) and b"".join(pieces) == payload
    assert not store.read_into("ef" * 16, [memoryview(bytearray(1000))])  # another layout's size
    path = store.find("ef" * 16)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    assert store.get("ef" * 16) is None  # corrupt
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    assert store.get("ef" * 16) is None  # short
    k1, k2 = pool_keys(list(range(64)), 32), pool_keys(list(range(64)), 32, b"tenant")
    assert len(k1) == 2 and k1[0] != k2[0]
    assert pool_keys(list(range(64)) + [1], 32) == k1
    assert pool_keys([0] + list(range(1, 64)), 32)[1] == k1[1]
    assert pool_keys([99] + list(range(1, 64)), 32)[1] != k1[1]  # a key names the whole prefix


def test_block_file_is_the_arrow_file_pyarrow_writes(tmp_path):
    """put writes a block's pieces around a frame made once per size (kvpool/pool_store.py, _Frame): the file must
    be exactly the Arrow IPC file pyarrow's own writer makes of the joined bytes, for any split of the pieces, and
    read back through any split of the destination (pieces larger than a chunk, more pieces than one preadv takes)."""
    import numpy as np
    import pyarrow as pa
    import xxhash

    from kvpool.pool_store import CHUNK_BYTES, IOV_MAX

    store = PoolStore(tmp_path / "h", tmp_path / "d", "layout")
    rng = np.random.default_rng(7)
    for n, splits in ((1, 1), (1000, 7), (3 * CHUNK_BYTES + 5, 4), (IOV_MAX * 3 + 1, IOV_MAX * 3 + 1)):
        data = rng.integers(0, 256, size=n, dtype=np.uint8)
        key = rng.bytes(32).hex()
        assert store.put(key, np.array_split(data, splits))
        buf = pa.py_buffer(data)
        values = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), 1, [None, pa.array([0, n], pa.int64()).buffers()[1], buf])
        schema = pa.schema([pa.field("kv", pa.large_binary())],
                           metadata={"xxh3": f"{xxhash.xxh3_64_intdigest(buf):016x}", "key": key})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([values], schema=schema))
        assert store.find(key).read_bytes() == sink.getvalue().to_pybytes(), n
        for parts in (1, 3, splits):
            out = [bytearray(len(p)) for p in np.array_split(data, parts)]
            assert store.read_into(key, [memoryview(o) for o in out]) and b"".join(out) == data.tobytes()


def test_block_file_header_is_checked(tmp_path):
    """A file that is not the one put writes for this key and size loads only if Arrow parses it as a sound block
    of this key (the footer holds the key and checksum again): another key's file, or a checksum that disagrees
    with the payload, is a miss and is removed, so a good copy can take its place."""
    import xxhash

    store = PoolStore(tmp_path / "h", tmp_path / "d", "layout")
    payload = bytes(range(256)) * 40
    a, b = "a1" * 16, "b2" * 16
    out = memoryview(bytearray(len(payload)))
    store.put(a, payload)
    store.put(b, payload)
    store.find(a).write_bytes(store.find(b).read_bytes())  # b's block under a's name: same payload, other key
    assert not store.read_into(a, [out]) and store.find(a) is None
    checksum = f"{xxhash.xxh3_64_intdigest(payload):016x}".encode()
    good = store.find(b).read_bytes()
    head, foot = good.index(checksum), good.rindex(checksum)
    other = b"0" if checksum[:1] != b"0" else b"1"

    def damaged(*edits: tuple[int, bytes]) -> bool:
        """Whether b still loads (with the right bytes) from its file with these bytes replaced."""
        store.put(b, payload)
        raw = bytearray(good)
        for at, digit in edits:
            raw[at:at + 1] = digit
        store.find(b).write_bytes(bytes(raw))
        out[:] = bytes(len(payload))
        return store.read_into(b, [out]) and bytes(out) == payload

    assert damaged((head, b"g"))  # the header's copy unreadable: parsed, and the footer's copy is sound
    assert not damaged((head, other)) and store.find(b) is None  # the header's checksum disagrees: removed
    assert not damaged((head, b"g"), (foot, b"g")) and store.find(b) is None  # no sound copy: removed
    assert not damaged((len(good) // 2, b"\x00" if good[len(good) // 2] else b"\x01")) and store.find(b) is None
    store.put(b, payload)
    assert store.read_into(b, [out]) and bytes(out) == payload


def test_a_failed_read_leaves_zeros_where_it_wrote(tmp_path):
    """A block is read straight into the KV cache and verified after. When it fails, the cache memory it was read into
    goes back to vLLM's free blocks and may next hold a prompt's last, part-filled block, whose empty slots an
    attention kernel still multiplies by zero: a corrupt file's NaN there turned a recomputed answer wrong (the
    sliding-window model's failed load). So a failed read leaves zeros, never the file's bytes."""
    import numpy as np

    store = PoolStore(tmp_path / "h", tmp_path / "d", "layout")
    nan = np.full(1024, np.nan, dtype=np.float32)
    key = "c3" * 16
    store.put(key, nan.tobytes())
    raw = bytearray(store.find(key).read_bytes())
    raw[len(raw) // 2] ^= 1  # inside the payload: the checksum disagrees
    store.find(key).write_bytes(bytes(raw))
    pieces = [np.ones(512, dtype=np.float32), np.ones(512, dtype=np.float32)]
    assert not store.read_into(key, [memoryview(p) for p in pieces])
    assert all(not p.any() for p in pieces)


def test_block_files_this_process_would_not_write_are_parsed(tmp_path):
    """The fast path knows only the frame this pyarrow writes for this key and size; anything else is parsed as
    Arrow: a sound block in another layout of the file (another pyarrow's, here an extra metadata entry) loads, a
    sound block of another size is a miss and is kept, and a block that cannot be framed is not written."""
    import numpy as np
    import pyarrow as pa
    import xxhash

    from kvpool.pool_store import CHUNK_BYTES

    store = PoolStore(tmp_path / "h", tmp_path / "d", "layout")
    data = np.random.default_rng(3).random(CHUNK_BYTES // 2, dtype=np.float32)  # 2 chunks' bytes: split
    key = "c3" * 16
    buf = pa.py_buffer(data)
    values = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 1, [None, pa.array([0, buf.size], pa.int64()).buffers()[1], buf])
    schema = pa.schema([pa.field("kv", pa.large_binary())],
                       metadata={"xxh3": f"{xxhash.xxh3_64_intdigest(buf):016x}", "key": key, "writer": "other"})
    with pa.OSFile(str(store.tiers["host"] / f"{key}.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch([values], schema=schema))
    out = np.zeros_like(data)
    assert store.read_into(key, [memoryview(out)]) and np.array_equal(out, data)  # float32 items, not bytes
    assert store.put("d4" * 16, b"\x05")
    assert not store.read_into("d4" * 16, [memoryview(bytearray(7))]) and store.contains("d4" * 16)
    assert not store.put("e5" * 16, b"") and not store.put("~", b"x") and not store.contains("~")
    assert store.put("f6" * 16, data) and store.read_into("f6" * 16, [memoryview(out)])


def test_empty_block_files_do_not_keep_a_tier_over_budget():
    """Zero-byte files (a write cut short) come first in the order like any other; the blocks that must leave are
    still all found."""
    from kvpool.pool_store import BlockFile, to_move_out

    files = [BlockFile("empty1", "host", Path("a"), 0, 1.0), BlockFile("empty2", "host", Path("b"), 0, 2.0)] + \
        [BlockFile(f"k{i}", "host", Path(f"k{i}"), 100, 10.0 + i) for i in range(100)]
    total = sum(f.size for f in files)
    assert [f.key for f in to_move_out(files, total - 1, 200.0, 30)] == ["empty1", "empty2", "k0"]


def test_the_eviction_queue_keeps_its_order_as_blocks_are_used_and_leave():
    """EvictionQueue, updated block by block (arrivals, uses, removals), drains in the order its definition gives:
    idle blocks (not reused, or not used within the TTL) before live ones, least recently used first in each,
    equals in the order they were last put."""
    import random

    from kvpool.pool_store import BlockFile, EvictionQueue

    rng = random.Random(11)
    for _ in range(20):
        q, now, last_put, ttl = EvictionQueue(), 0.0, {}, 30.0
        for step in range(rng.randrange(50, 400)):
            now += rng.choice([0.0, 0.5, 2.0])  # ties included
            key = f"k{rng.randrange(60)}"
            op = rng.random()
            if op < 0.2:
                q.remove(key)
                last_put.pop(key, None)
            else:
                f = BlockFile(key, "host", None, rng.choice([0, 100, 300]), now, reused=op > 0.6 and key in q)
                q.put(key, f)
                last_put[key] = (step, f)
        assert len(q) == len(last_put) and q.bytes == sum(f.size for _, f in last_put.values())
        now += rng.choice([0.0, 10.0, 60.0])

        def live(f):
            return f.reused and now - f.last_used <= ttl

        spec = sorted(last_put.values(), key=lambda sf: (live(sf[1]), sf[1].last_used, sf[0]))
        budget = rng.randrange(0, q.bytes + 1)
        shed, size = [], q.bytes
        for _, f in spec:
            if size <= budget:
                break
            shed.append(f.key)
            size -= f.size
        assert [f.key for f in q.shed(budget, now, ttl)] == shed and q.bytes == size <= budget
        rest = [f.key for f in iter(lambda: q.pop(now, ttl), None)]
        assert rest == [f.key for _, f in spec][len(shed):]


def _listing(host, disk) -> dict:
    """Every block file, found the slow way: (tier, layout, key) -> (size, reused)."""
    return {(f.tier, layout.name, f.key): (f.size, f.reused) for layout in Path(host).iterdir()
            for f in PoolStore(host, disk, layout.name).scan()}


def _catalogued(catalog) -> dict:
    return {(t, layout, key): (f.size, f.reused) for t, q in catalog.tiers.items()
            for (layout, key), f in q.blocks.items()}


def test_the_pool_catalog_follows_the_directories_without_rescanning(tmp_path):
    """The shard's catalog, after one listing, learns every block written, copied, used, deleted, demoted and
    evicted from inotify alone, and reports only what arrived or left."""
    from kvpool.pool_catalog import PoolCatalog

    host, disk = tmp_path / "host", tmp_path / "disk"
    catalog = PoolCatalog(host, disk)
    catalog.refresh()
    assert catalog.take_report() == (True, [], [])
    ranks = [PoolStore(host, disk, f"rank{r}") for r in range(2)]  # a layout directory each, created after
    keys = [f"{i:032x}" for i in range(12)]
    for store in ranks:
        for key in keys:
            assert store.put(key, bytes(range(256)) * 4)
    catalog.refresh()
    assert _catalogued(catalog) == _listing(host, disk) and len(catalog.tiers["host"]) == 24
    full, present, gone = catalog.take_report()
    assert not full and sorted(present) == sorted((s.layout, k) for s in ranks for k in keys) and gone == []

    ranks[0].touch(keys[:3])  # a session came back
    Path(ranks[1].find(keys[5])).unlink()  # gone behind the catalog's back
    assert ranks[1].write_raw("f" * 32, Path(ranks[0].find(keys[0])).read_bytes())  # copied from another node
    catalog.refresh()
    assert _catalogued(catalog) == _listing(host, disk)
    assert all(catalog.tiers["host"].blocks["rank0", k].reused for k in keys[:3])
    assert catalog.take_report() == (False, [("rank1", "f" * 32)], [("rank1", keys[5])])

    size = catalog.tiers["host"].blocks["rank0", keys[0]].size
    demoted, evicted = catalog.upkeep(host_budget=10 * size, disk_budget=6 * size, session_ttl_s=600)
    assert (demoted, evicted) == (14, 8)  # 24 blocks: 10 stay on the host, 6 fit the disk, 8 go
    catalog.refresh()  # the notifications of its own moves change nothing
    assert _catalogued(catalog) == _listing(host, disk)
    assert catalog.tiers["host"].bytes <= 10 * size and catalog.tiers["disk"].bytes <= 6 * size
    assert all(("host", "rank0", k) in _catalogued(catalog) for k in keys[:3]), "a live session's blocks left"
    full, present, gone = catalog.take_report()
    assert not full and present == [] and len(gone) == 8
    assert catalog.rescans == 1
    fresh = PoolCatalog(host, disk)
    fresh.refresh()
    assert _catalogued(fresh) == _catalogued(catalog)
    fresh.close()
    catalog.close()


def test_the_pool_catalog_rescans_when_notifications_are_lost(tmp_path):
    """More changes between two refreshes than the kernel queues (an overflow) cost a rescan, never a block."""
    from kvpool.pool_catalog import PoolCatalog

    host, disk = tmp_path / "host", tmp_path / "disk"
    store = PoolStore(host, disk, "layout")
    catalog = PoolCatalog(host, disk)
    catalog.refresh()
    catalog.take_report()
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    keys = [f"{i:032x}" for i in range(queued // 2 + 100)]  # 2 events a block written
    for key in keys:
        assert store.put(key, b"x")
    catalog.refresh()
    assert catalog.rescans == 2 and len(catalog.tiers["host"]) == len(keys)
    assert _catalogued(catalog) == _listing(host, disk)
    full, present, gone = catalog.take_report()
    assert not full and sorted(k for _, k in present) == keys and gone == []
    catalog.close()


def test_a_host_tier_inside_the_disk_tier_is_followed_as_a_tier(tmp_path):
    """Without /dev/shm the host tier defaults to a directory inside the disk tier's (KVPoolConfig): the catalog
    must follow it as a tier, not take it for one of the disk tier's layouts."""
    from kvpool.pool_catalog import PoolCatalog

    disk = tmp_path / "pool"
    host = disk / "host"
    catalog = PoolCatalog(host, disk)
    catalog.refresh()
    store = PoolStore(host, disk, "layout")  # a layout that appears after the first listing
    assert store.put("ab" * 16, b"x" * 100)
    catalog.refresh()
    assert _catalogued(catalog) == _listing(host, disk) and list(catalog.stores) == ["layout"]
    assert catalog.rescans == 1
    catalog.close()


def test_apps_on_one_node_keep_their_blocks_apart_within_one_budget(tmp_path):
    """Two apps share a node's pool roots: each app's catalog holds and reports its own blocks only; one shard keeps
    both namespaces within the smallest budget either declared, in one eviction order (the idle app's blocks leave
    before the busy one's), following a namespace that appears later; when it ends the other takes over, and the
    app gone no longer sets the budget."""
    from kvpool.pool_catalog import NodeKeeping, PoolCatalog
    from kvpool.pool_store import pool_namespace

    host, disk = tmp_path / "host", tmp_path / "disk"
    dirs = {app: (host / pool_namespace(app), disk / pool_namespace(app)) for app in ("a", "b", "c")}
    stores = {app: PoolStore(*d, "0123456789abcdef-rank0") for app, d in dirs.items()}
    keys = {app: [f"{app}{i:031x}" for i in range(12)] for app in dirs}
    for key in keys["a"]:  # app a's session went idle a while ago; b's is busy
        assert stores["a"].put(key, b"a" * 1024)
        os.utime(stores["a"].find(key), (0, time.time() - 100))
    for key in keys["b"]:
        assert stores["b"].put(key, b"b" * 1024)
    size = Path(stores["a"].find(keys["a"][0])).stat().st_size
    apps = {app: PoolCatalog(*dirs[app]) for app in ("a", "b")}
    for app, catalog in apps.items():
        catalog.refresh()
        full, present, gone = catalog.take_report()
        assert full and sorted(present) == [("0123456789abcdef-rank0", k) for k in keys[app]] and gone == []

    keeping_a = NodeKeeping(host, disk, pool_namespace("a"), 16 * size, 0)
    keeping_b = NodeKeeping(host, disk, pool_namespace("b"), 40 * size, 0)
    assert keeping_a.keep() and not keeping_b.keep()
    assert keeping_a.budgets() == keeping_b.budgets() == (16 * size, 0)
    node = PoolCatalog(host, disk, namespaced=True)
    node.refresh()
    assert len(node.tiers["host"]) == 24
    assert node.upkeep(*keeping_a.budgets(), session_ttl_s=600) == (0, 8)
    for catalog in apps.values():
        catalog.refresh()
    full, present, gone = apps["a"].take_report()
    assert not full and present == [] and sorted(gone) == [("0123456789abcdef-rank0", k) for k in keys["a"][:8]]
    assert apps["b"].take_report() == (False, [], []) and len(apps["b"].tiers["host"]) == 12

    for key in keys["c"]:  # a third app, after the keeper's listing: followed, and kept within the same budget
        assert stores["c"].put(key, b"c" * 1024)
    assert node.upkeep(*keeping_a.budgets(), session_ttl_s=600) == (0, 12)
    assert node.tiers["host"].bytes <= 16 * size and node.rescans == 1

    keeping_a.close()
    assert keeping_b.keep() and keeping_b.budgets() == (40 * size, 0)
    for catalog in (node, *apps.values()):
        catalog.close()
    keeping_b.close()


def test_blocks_written_before_namespaces_move_into_the_keepers(tmp_path):
    """A pool persisted before apps had namespaces (layouts directly in the tier roots) is not left unkept: the
    first shard to keep the node moves it into its own namespace, where its engines find it."""
    from kvpool.pool_catalog import NodeKeeping, PoolCatalog
    from kvpool.pool_store import pool_namespace

    host, disk = tmp_path / "host", tmp_path / "disk"
    old = PoolStore(host, disk, "0123456789abcdef-rank0")
    assert old.put("ab" * 16, b"x" * 1024)
    keeping = NodeKeeping(host, disk, pool_namespace("default"), 1 << 20, 1 << 20)
    assert keeping.keep()
    ns = pool_namespace("default")
    assert not (host / "0123456789abcdef-rank0").exists()
    assert PoolStore(host / ns, disk / ns, "0123456789abcdef-rank0").leading_hits(["ab" * 16]) == 1
    node = PoolCatalog(host, disk, namespaced=True)
    node.refresh()
    assert list(node.tiers["host"].blocks) == [(f"{ns}/0123456789abcdef-rank0", "ab" * 16)]
    node.close()
    keeping.close()


def test_a_nodes_apps_keep_one_budget_when_the_keeping_shard_dies(pool_dirs, ray_cluster):
    """The shards of two apps on one node (Ray actors): the first keeps both apps' blocks within the smaller budget;
    killed, the other takes over within a few passes, and keeps its own budget, the dead app's no longer counting."""
    from actors.pool import PoolShard

    host, disk = pool_dirs
    cfgs = {app: KVPoolConfig(pool_host_dir=host, pool_disk_dir=disk, pool_host_bytes=n << 20, pool_disk_bytes=0)
            for app, n in (("a", 10), ("b", 30))}
    stores = {app: PoolStore(*cfg.pool_dirs(app), "0123456789abcdef-rank0") for app, cfg in cfgs.items()}
    shards = {}
    for app in ("a", "b"):  # one after the other: a keeps the node
        shards[app] = ray.remote(PoolShard).options(num_cpus=0, max_restarts=0).remote(cfgs[app], app, 0.1)
        ray.get(shards[app].start.remote())
    block = b"k" * ((1 << 20) - 4096)  # with its frame, under 1 MiB: 10 fit a's budget

    def until(condition, what: str, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while True:
            st = {app: ray.get(s.stats.remote()) for app, s in shards.items()}
            if condition(st):
                return st
            assert time.time() < deadline, (what, st)
            time.sleep(0.1)

    for i in range(20):
        for app, store in stores.items():
            assert store.put(f"{app}{i:031x}", block)
    st = until(lambda st: sum(s["host_bytes"] for s in st.values()) <= 10 << 20, "both apps within a's budget")
    assert st["a"]["keeps_node"] and not st["b"]["keeps_node"] and st["b"]["host_budget_bytes"] == 10 << 20
    assert st["a"]["blocks"]["host"] + st["b"]["blocks"]["host"] == 10

    ray.kill(shards.pop("a"), no_restart=True)
    until(lambda st: st["b"]["keeps_node"] and st["b"]["host_budget_bytes"] == 30 << 20, "b keeps the node")
    for i in range(20, 60):
        assert stores["b"].put(f"b{i:031x}", block)
    until(lambda st: st["b"]["blocks"]["host"] == 30, "b's blocks trimmed to its own budget")
    ray.kill(shards["b"], no_restart=True)


def test_apps_sharing_a_host_tier_but_not_its_disk_tier_are_told(tmp_path, caplog):
    """The node's keeper keeps one disk root: an app whose disk tier is elsewhere would keep it unkept."""
    import logging

    from kvpool.pool_catalog import NodeKeeping

    a = NodeKeeping(tmp_path / "host", tmp_path / "disk-a", "app-a", 1 << 20, 1 << 20)
    b = NodeKeeping(tmp_path / "host", tmp_path / "disk-b", "app-b", 1 << 20, 1 << 20)
    with caplog.at_level(logging.ERROR, logger="kvpool.pool_catalog"):
        assert a.keep() and a.budgets() == (1 << 20, 1 << 20)
    assert any("must share its disk tier" in r.message and "app-b" in r.message for r in caplog.records)
    a.close()
    b.close()
