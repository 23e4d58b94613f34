"""Block-chain hashing of token ids, shared by the ingress (for requests) and the router (for engine KV events).

vLLM names a KV block by a hash of (parent block hash, the block's token ids, extra keys). Its seed differs between
processes unless PYTHONHASHSEED is pinned, and its sha256 costs microseconds per block in Python, so the router does
not try to reproduce it. Instead both sides hash *token ids* with this one function: the ingress hashes a request's
tokens, and the router re-hashes the token ids that every BlockStored event carries. Parity then holds by
construction, whatever vLLM's seed or hash algorithm (a silent failure in peers that rebuild the engine's hash).

The hash of block i depends on every token of blocks 0..i (a prefix hash), computed in vectorised numpy:
    c_j = mix(sum_k tokens[j, k] * M_k)          content of block j
    S_i = S_(-1) + sum_(j<=i) mix(c_j + j * P)   running prefix sum (uint64, wrapping)
    h_i = mix(S_i)
S_(-1) is the seed derived from the extra keys (LoRA name, cache salt), so tenants never share a chain. 64-bit hashes
are used for routing only, where a collision costs a mis-route and never wrong output.
"""

from __future__ import annotations

import array
import hashlib
from typing import Sequence

import numpy as np

_U64 = np.uint64
_MIX_A = _U64(0xBF58476D1CE4E5B9)
_MIX_B = _U64(0x94D049BB133111EB)
_POS = _U64(0x9E3779B97F4A7C15)
_MAX_BLOCK = 4096
# Fixed per-slot multipliers (odd, from a fixed-seed generator) so the content hash depends on token order.
_SLOT = (np.random.default_rng(0x5EED).integers(0, 2**63, size=_MAX_BLOCK, dtype=np.uint64) << _U64(1)) | _U64(1)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _MIX_A
        x = x ^ (x >> _U64(27))
        x = x * _MIX_B
        return x ^ (x >> _U64(31))


def chain_seed(extra_keys: Sequence[object] = ()) -> int:
    """The running-sum seed S_(-1) for a namespace (empty: the shared default namespace)."""
    if not extra_keys:
        return 0
    digest = hashlib.blake2b(repr(tuple(extra_keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _as_u64(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(tokens, np.ndarray):
        return tokens.astype(np.uint64, copy=False)
    # array('q') converts a list of ints ~1.5x faster than np.asarray; token ids are never negative.
    return np.frombuffer(array.array("q", tokens), dtype=np.uint64)


def _block_terms(tokens: np.ndarray, block_size: int, first_pos: int) -> np.ndarray:
    """mix(c_j + j*P) for each full block of `tokens` (a 1-D array whose length is a multiple of block_size)."""
    blocks = tokens.reshape(-1, block_size)
    with np.errstate(over="ignore"):
        content = _mix((blocks * _SLOT[:block_size]).sum(axis=1, dtype=np.uint64))
        pos = np.arange(first_pos, first_pos + len(blocks), dtype=np.uint64) * _POS
        return _mix(content + pos)


def prefix_sums(tokens: Sequence[int] | np.ndarray, block_size: int, seed: int = 0, first_pos: int = 0) -> np.ndarray:
    """Running sums S_i for the full blocks of `tokens`, continuing a chain whose sum so far is `seed`
    and whose next block is number `first_pos`. Trailing tokens that do not fill a block are ignored."""
    if block_size > _MAX_BLOCK:
        raise ValueError(f"block_size {block_size} > {_MAX_BLOCK}")
    arr = _as_u64(tokens)
    n_full = len(arr) // block_size * block_size
    if n_full == 0:
        return np.empty(0, dtype=np.uint64)
    terms = _block_terms(arr[:n_full], block_size, first_pos)
    with np.errstate(over="ignore"):
        terms[0] += _U64(seed)
        return np.cumsum(terms, dtype=np.uint64)


def hashes_from_sums(sums: np.ndarray) -> np.ndarray:
    return _mix(sums)


def block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int, extra_keys: Sequence[object] = ()) -> np.ndarray:
    """The chain of block hashes (uint64) of a token sequence, one per full block."""
    return hashes_from_sums(prefix_sums(tokens, block_size, chain_seed(extra_keys)))
