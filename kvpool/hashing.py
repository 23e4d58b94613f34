"""How prefixes are named: the one place for the hashes that name KV blocks, and which is used for what.

| name           | computed by                          | from                           | names a block in           | a collision costs |
|----------------|--------------------------------------|--------------------------------|----------------------------|-------------------|
| routing hash   | `block_hashes` / `prefix_sums` here: | token ids (+ cache salt), any  | the prefix index (router), | a mis-route       |
|                | the ingress (a request's tokens),    | process, no seed               | the simulator              |                   |
|                | the router (an event's token ids)    |                                |                            |                   |
| pool key       | `pool_keys` here: the engine's       | token ids + namespace (cache   | the pool's files and the   | wrong output:     |
|                | connector (loads, saves), the        | salt, LoRA), any process       | shards' reports (router's  | so blake2b-128    |
|                | ingress (router's pool view, fetches)|                                | pool view, fetches)        |                   |
| pool-key id    | `pool_key_ids` here: the ingress,    | a pool key (its first 64 bits) | the router's pool view     | a mis-predicted   |
|                | the router (the shards' reports)     |                                |                            | pool hit: loads   |
|                |                                      |                                |                            | fail, recomputed  |
| vLLM's hash    | the engine (sha256 by default, seed  | token ids + extra keys, one    | KV events (a handle: the   | n/a               |
|                | random per process)                  | process only                   | index maps it to ours)     |                   |

The router does not reproduce vLLM's hash (its seed differs between processes unless PYTHONHASHSEED is pinned, and
its sha256 costs microseconds per block in Python). Both the ingress and the router hash *token ids* with the
routing hash: the ingress a request's tokens, the router the token ids every BlockStored event carries. Parity then
holds by construction, whatever vLLM's seed or hash algorithm (a silent failure in peers that rebuild the engine's
hash).

The routing hash of block i depends on every token of blocks 0..i (a prefix hash), in vectorised numpy:
    c_j = sum_k tokens[j, k] * M_k              content of block j (odd per-slot multipliers: order matters)
    h_i = S_(-1) + sum_(j<=i) mix(c_j + j * P)  running prefix sum (uint64, wrapping) of mixed terms
S_(-1) is the seed derived from the extra keys (cache salt), so tenants never share a chain. The terms are mixed
(splitmix64), so the sums are uniformly spread; 64 bits suffice where a collision costs a mis-route only. The hash
is the running sum itself, so a chain continues from any block's hash (`prefix_sums(..., seed=h_i, first_pos=i+1)`).

Pool keys are cryptographic because a wrong block would be wrong output: key_i = blake2b(key_(i-1) || tokens of
block i), so a key names a whole prefix. They cost ~1.5 us per block in Python (15 ms for a 100K-token prompt), so
`PoolKeyMemo` keeps the keys of recent blocks by a per-block identity that names the same prefix: an agent's next
turn repeats the last one's prefix, and only its new blocks are hashed.
"""

from __future__ import annotations

import array
import hashlib
from typing import Hashable, Sequence

import numpy as np

_U64 = np.uint64
_MIX_A = _U64(0xBF58476D1CE4E5B9)
_MIX_B = _U64(0x94D049BB133111EB)
_POS = _U64(0x9E3779B97F4A7C15)
_MAX_BLOCK = 4096
# Fixed per-slot multipliers (odd, from a fixed-seed generator) so the content hash depends on token order.
_SLOT = (np.random.default_rng(0x5EED).integers(0, 2**63, size=_MAX_BLOCK, dtype=np.uint64) << _U64(1)) | _U64(1)
# PoolKeyMemo's capacity per generation (two are kept): 256K blocks, 8M tokens at block size 32 (eighty 100K-token
# sessions), at ~150 bytes a block ~80 MB at most, in the ingress and in each engine's scheduler.
MEMO_BLOCKS = 1 << 18


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic is intended)."""
    x = x ^ (x >> _U64(30))
    x *= _MIX_A
    x ^= x >> _U64(27)
    x *= _MIX_B
    x ^= x >> _U64(31)
    return x


def chain_seed(extra_keys: Sequence[object] = ()) -> int:
    """The running-sum seed S_(-1) for a namespace (empty: the shared default namespace)."""
    if not extra_keys:
        return 0
    digest = hashlib.blake2b(repr(tuple(extra_keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a uint64 array, without a copy where they already are an integer array (token ids are never
    negative, so int64 and uint64 agree). Convert a list once per request and pass the array on."""
    if isinstance(tokens, np.ndarray):
        if tokens.dtype == np.uint64:
            return tokens
        if tokens.dtype.kind in "iu" and tokens.dtype.itemsize == 8:
            return tokens.view(np.uint64)
        return tokens.astype(np.uint64)
    # array('q') converts a list of ints ~1.5x faster than np.asarray.
    return np.frombuffer(array.array("q", tokens), dtype=np.uint64)


def prefix_sums(tokens: Sequence[int] | np.ndarray, block_size: int, seed: int = 0, first_pos: int = 0) -> np.ndarray:
    """Routing hashes of the full blocks of `tokens`, continuing a chain whose last hash so far is `seed` and whose
    next block is number `first_pos`. Trailing tokens that do not fill a block are ignored."""
    arr = token_array(tokens)
    n = len(arr) // block_size
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    terms = block_terms(arr[: n * block_size], block_size, np.arange(first_pos, first_pos + n, dtype=np.uint64))
    with np.errstate(over="ignore"):  # wrapping sums are intended
        terms[0] += _U64(seed)
    return np.cumsum(terms, dtype=np.uint64)


def block_terms(tokens: np.ndarray, block_size: int, positions: np.ndarray) -> np.ndarray:
    """The mixed terms mix(c_j + j * P) of whole blocks (`tokens`: uint64, a multiple of `block_size` long; block j
    at chain position `positions[j]`); a chain's hashes are their running sum from its seed. Blocks of many chains
    can be hashed in one call (the router hashes a batch of events so), each chain summed on its own."""
    if block_size > _MAX_BLOCK:
        raise ValueError(f"block_size {block_size} > {_MAX_BLOCK}")
    # einsum sums the products without a temporary as large as the prompt (page faults cost more than the math).
    terms = np.einsum("ij,j->i", tokens.reshape(-1, block_size), _SLOT[:block_size])
    with np.errstate(over="ignore"):
        terms += positions * _POS
        return _mix(terms)


def block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int, extra_keys: Sequence[object] = ()) -> np.ndarray:
    """The chain of routing hashes (uint64) of a token sequence, one per full block."""
    return prefix_sums(tokens, block_size, chain_seed(extra_keys))


def request_namespace(cache_salt: str | None = None, lora_name: str | None = None) -> bytes:
    """The pool-key namespace of a request: the same for the connector (in the engine) and the ingress."""
    return repr((cache_salt, lora_name)).encode()


def _key_root(namespace: bytes) -> bytes:
    return hashlib.blake2b(namespace, digest_size=16).digest()


def pool_keys(tokens: Sequence[int] | np.ndarray, block_size: int, namespace: bytes = b"") -> list[str]:
    """Hex pool keys of the full blocks of `tokens`: key_i = blake2b(key_(i-1) || tokens of block i as int64),
    key_(-1) = blake2b(namespace). `namespace` (cache salt, LoRA) starts the chain so tenants never share keys."""
    return PoolKeyMemo(0).keys(tokens, block_size, namespace, None)


def pool_key_ids(keys: Sequence[str]) -> np.ndarray:
    """The pool-key ids (uint64: each hex pool key's first 64 bits) of `keys`, in one pass: the router's pool view
    names blocks by these, so a prompt's 3K keys cross to it as one array and are looked up as one."""
    if not keys:
        return np.empty(0, dtype=np.uint64)
    raw = np.frombuffer(bytes.fromhex("".join(keys)), dtype=">u8")
    if len(raw) != 2 * len(keys):
        raise ValueError("pool keys must be 32 hex digits")
    return raw[::2].astype(np.uint64)


class PoolKeyMemo:
    """Pool keys of recently seen blocks, by an identity of each block that names its whole prefix and namespace
    (the routing hash at the ingress, vLLM's sha256 block hash in the engine). Bounded: two generations of up to
    `capacity` entries each; a hit moves an entry to the current one, and when that is full the older is dropped
    (LRU within a factor of two, at a dict lookup per block).

    Where a wrong key would load wrong KV (the engine), the identity must be collision-resistant; where a key only
    predicts (the ingress: the router's view of the pool, which blocks to fetch), a 64-bit hash is enough."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._new: dict[Hashable, bytes] = {}
        self._old: dict[Hashable, bytes] = {}
        self.hits = self.misses = 0

    def keys(self, tokens: Sequence[int] | np.ndarray, block_size: int, namespace: bytes,
             identities: Sequence[Hashable] | None) -> list[str]:
        """The pool keys of the full blocks of `tokens`; `identities[i]` names block i (None: compute them all)."""
        arr = token_array(tokens)
        n = len(arr) // block_size
        memoize = identities is not None and self.capacity > 0
        if not memoize:
            keys: list[str | None] = [None] * n
        elif len(identities) < n:
            raise ValueError(f"{len(identities)} block identities for {n} blocks")
        else:
            identities = identities[:n]
            keys = list(map(self._new.get, identities))  # one C-level pass: a warm prompt ends here
        missing = [i for i, k in enumerate(keys) if k is None]
        self.hits += n - len(missing)
        if not missing:
            return keys
        data = memoryview(arr[: n * block_size]).cast("B")
        step = block_size * 8
        blake2b = hashlib.blake2b
        for i in missing:
            ident = identities[i] if memoize else None
            key = self._old.get(ident) if memoize else None
            if key is None:
                prev = bytes.fromhex(keys[i - 1]) if i else _key_root(namespace)
                key = blake2b(prev + data[i * step:(i + 1) * step], digest_size=16).hexdigest()
                self.misses += 1
            else:
                self.hits += 1
            keys[i] = key
            if memoize:
                if len(self._new) >= self.capacity:
                    self._old, self._new = self._new, {}
                self._new[ident] = key
        return keys
