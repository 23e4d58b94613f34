"""vLLM's KV cache events on the wire, decoded without importing vLLM.

A publisher sends multipart ZMQ messages `[topic, seq (8-byte big-endian), msgpack(EventBatch)]`; an EventBatch is
`[ts, [event, ...], data_parallel_rank]` and each event a map tagged by `type` (vllm/distributed/kv_events.py).
Only the fields the index needs are declared; unknown fields are skipped, so newer vLLM versions still decode.

Token ids are most of a message's bytes (32 a block), and decoding them as Python ints (~2 us a block) and turning
those into an array (~1.4 us) was most of the router's ingest: they are left as msgpack bytes by the decoder and
decoded into one array per message by a compiled loop (numba, which vLLM depends on) instead.
"""

from __future__ import annotations

import functools
from typing import Union

import msgspec
import numpy as np

BlockHash = Union[int, bytes]


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int] | np.ndarray  # decoded by decode_message: a uint64 array
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    # One entry per block: LoRA name, multimodal ids, cache salt, ... (the salt only on a chain's first block).
    extra_keys: list[list | None] | None = None
    # With vLLM's hybrid memory allocator, each KV cache group reports its own blocks (under the same hashes).
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None  # the group's kind: FULL_ATTENTION_KINDS, "sliding_window", ...


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# Device-resident blocks: vLLM labels its own cache "GPU" even on CPU; other media are offload tiers.
DEVICE_MEDIA = (None, "GPU")
# KV cache group kinds (vLLM's KVCacheSpecKind) that keep every block of a prefix while it is cached.
FULL_ATTENTION_KINDS = ("full_attention", "mla_attention", "sink_full_attention")

class _BlockStoredOnTheWire(BlockStored, tag="BlockStored"):
    token_ids: msgspec.Raw  # their msgpack bytes, until decode_message decodes them into an array


class _EventBatchOnTheWire(EventBatch, array_like=True, omit_defaults=True):
    events: list[Union[_BlockStoredOnTheWire, BlockRemoved, AllBlocksCleared]]


_decoder = msgspec.msgpack.Decoder(_EventBatchOnTheWire)


def _encode_array(obj):
    if isinstance(obj, np.ndarray):  # token ids as decode_message gives them
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_array)


def decode_message(frames: list[bytes]) -> tuple[str, int, EventBatch]:
    """A ZMQ multipart message -> (topic, sequence number, batch); each BlockStored's token ids a uint64 array."""
    topic, seq, payload = frames
    batch = _decoder.decode(payload)
    stored = [ev for ev in batch.events if isinstance(ev, BlockStored)]
    if stored:
        for ev, tokens in zip(stored, decode_uint_arrays([ev.token_ids for ev in stored])):
            ev.token_ids = tokens
    return topic.decode(), int.from_bytes(seq, "big"), batch


def decode_uint_arrays(raws: list[msgspec.Raw]) -> list[np.ndarray]:
    """msgpack arrays of non-negative integers below 2**32 (token ids) -> uint64 arrays, views of one. Anything
    else (negative ids, other types) is decoded by msgspec, and a value that is no integer raises ValueError."""
    buf = np.frombuffer(raws[0] if len(raws) == 1 else b"".join(raws), dtype=np.uint8)
    out, ends = np.empty(len(buf), dtype=np.uint64), np.empty(len(raws), dtype=np.int64)
    n = _compiled_decoder()(buf, out, ends)
    if n >= 0:
        if len(raws) == 1:
            return [out[:n]]
        bounds = ends.tolist()
        return [out[a:b] for a, b in zip([0] + bounds[:-1], bounds)]
    try:
        return [np.array(msgspec.msgpack.decode(raw, type=list[int]), dtype=np.int64).view(np.uint64)
                for raw in raws]
    except (msgspec.DecodeError, OverflowError) as e:
        raise ValueError(f"token ids that are not 64-bit integers: {e}") from None


def _decode_uint_arrays(buf, out, ends):
    """Decode back-to-back msgpack arrays of unsigned ints below 2**32 from `buf` into `out`; the end of each
    array's values in `out` goes into `ends`. Returns the number of values, or -1 where the bytes are anything
    else or hold another number of arrays (the caller then decodes them the slow way)."""
    i, k, n_arrays = 0, 0, 0
    while i < len(buf):
        b = buf[i]
        if 0x90 <= b <= 0x9F:
            count, i = b & 0x0F, i + 1
        elif b == 0xDC and i + 2 < len(buf):
            count, i = (np.int64(buf[i + 1]) << 8) | buf[i + 2], i + 3
        elif b == 0xDD and i + 4 < len(buf):
            count = (np.int64(buf[i + 1]) << 24) | (np.int64(buf[i + 2]) << 16) | (np.int64(buf[i + 3]) << 8) \
                | buf[i + 4]
            i += 5
        else:
            return -1
        if n_arrays == len(ends):
            return -1
        for _ in range(count):
            if i >= len(buf):
                return -1
            b = buf[i]
            if b < 0x80:
                out[k], i = b, i + 1
            elif b == 0xCC and i + 1 < len(buf):
                out[k], i = buf[i + 1], i + 2
            elif b == 0xCD and i + 2 < len(buf):
                out[k], i = (np.uint64(buf[i + 1]) << 8) | buf[i + 2], i + 3
            elif b == 0xCE and i + 4 < len(buf):
                out[k] = (np.uint64(buf[i + 1]) << 24) | (np.uint64(buf[i + 2]) << 16) \
                    | (np.uint64(buf[i + 3]) << 8) | buf[i + 4]
                i += 5
            else:
                return -1
            k += 1
        ends[n_arrays] = k
        n_arrays += 1
    return k if n_arrays == len(ends) else -1


@functools.cache
def _compiled_decoder():
    """_decode_uint_arrays compiled (once per process, ~1 s; from numba's cache beside this file after that)."""
    import numba
    from numba import types

    message = types.Array(types.uint8, 1, "C", readonly=True)
    signature = types.int64(message, types.uint64[::1], types.int64[::1])
    return numba.njit(signature, cache=True, nogil=True)(_decode_uint_arrays)


def warm_up() -> None:
    """Compile the token-id decoder now (the router does, before its first message arrives)."""
    _compiled_decoder()


def encode_message(topic: str, seq: int, batch: EventBatch) -> list[bytes]:
    """The inverse of decode_message (used by benchmarks and tests to play an engine)."""
    return [topic.encode(), seq.to_bytes(8, "big"), _encoder.encode(batch)]
