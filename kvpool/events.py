"""vLLM's KV cache events on the wire, decoded without importing vLLM.

A publisher sends multipart ZMQ messages `[topic, seq (8-byte big-endian), msgpack(EventBatch)]`; an EventBatch is
`[ts, [event, ...], data_parallel_rank]` and each event a map tagged by `type` (vllm/distributed/kv_events.py).
Only the fields the index needs are declared; unknown fields are skipped, so newer vLLM versions still decode.
"""

from __future__ import annotations

from typing import Union

import msgspec

BlockHash = Union[int, bytes]


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    # One entry per block: LoRA name, multimodal ids, cache salt, ... (the salt only on a chain's first block).
    extra_keys: list[list | None] | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[BlockHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# Device-resident blocks: vLLM labels its own cache "GPU" even on CPU; other media are offload tiers.
DEVICE_MEDIA = (None, "GPU")

_decoder = msgspec.msgpack.Decoder(EventBatch)
_encoder = msgspec.msgpack.Encoder()


def decode_message(frames: list[bytes]) -> tuple[str, int, EventBatch]:
    """A ZMQ multipart message -> (topic, sequence number, batch)."""
    topic, seq, payload = frames
    return topic.decode(), int.from_bytes(seq, "big"), _decoder.decode(payload)


def encode_message(topic: str, seq: int, batch: EventBatch) -> list[bytes]:
    """The inverse of decode_message (used by benchmarks and tests to play an engine)."""
    return [topic.encode(), seq.to_bytes(8, "big"), _encoder.encode(batch)]
