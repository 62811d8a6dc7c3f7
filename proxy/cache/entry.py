"""A stored cache entry, its compact binary encoding, and expiry (with XFetch early refresh).

Encoding: ``MAGIC | u32 len | header (orjson) | u32 len | response JSON | embedding (float16)``.
The header comes first so scans (invalidation, index rebuild) can read metadata without parsing
the response; the response is kept as the JSON bytes the engine sent, so a hit is served without
re-serialising; the embedding is stored as float16 (half the bytes, cosine error ~1e-3, far below
any useful threshold margin).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import orjson

MAGIC: Final = b"FCE1"
_U32 = struct.Struct(">I")


class EntryDecodeError(ValueError):
    """A stored blob that is not a cache entry of this format (corrupt or foreign)."""


@dataclass(frozen=True, slots=True)
class EntryMeta:
    key: str
    context: str | None
    endpoint: str
    engine: str
    version: str
    partition: str
    scope: str
    created_at: float
    ttl: float
    # How long the engine took to produce the answer: XFetch's delta.
    compute_seconds: float
    query_text: str | None

    @property
    def expires_at(self) -> float:
        return self.created_at + self.ttl

    @property
    def label(self) -> int:
        return key_label(self.key)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    meta: EntryMeta
    response: bytes
    embedding: np.ndarray | None = None


def key_label(key: str) -> int:
    """64-bit id of an exact key for the ANN index (first 8 bytes of the sha256 hex digest)."""
    return int(key[:16], 16)


_META_FIELDS: Final = tuple(f.name for f in fields(EntryMeta))


def _header(meta: EntryMeta) -> dict[str, object]:
    """Every field of ``meta`` by name, in their order (a unit test holds this to the class).
    Written out: a comprehension over ``_META_FIELDS`` with getattr cost twice as much, on every
    entry stored. (Every field is a str/float/None: no deep copy, which asdict would make.)"""
    return {
        "key": meta.key,
        "context": meta.context,
        "endpoint": meta.endpoint,
        "engine": meta.engine,
        "version": meta.version,
        "partition": meta.partition,
        "scope": meta.scope,
        "created_at": meta.created_at,
        "ttl": meta.ttl,
        "compute_seconds": meta.compute_seconds,
        "query_text": meta.query_text,
    }


def encode_entry(entry: CacheEntry) -> bytes:
    meta = entry.meta
    header = _header(meta)
    vector = b""
    if entry.embedding is not None:
        header["dim"] = int(entry.embedding.shape[0])
        vector = np.ascontiguousarray(entry.embedding, dtype="<f2").tobytes()
    head = orjson.dumps(header)
    return b"".join(
        (MAGIC, _U32.pack(len(head)), head, _U32.pack(len(entry.response)), entry.response, vector)
    )


def _split(blob: bytes) -> tuple[dict[str, object], int]:
    if blob[:4] != MAGIC or len(blob) < 8:
        raise EntryDecodeError("not a cache entry")
    (head_len,) = _U32.unpack_from(blob, 4)
    end = 8 + head_len
    if end > len(blob):
        raise EntryDecodeError("truncated header")
    try:
        header = orjson.loads(blob[8:end])
    except orjson.JSONDecodeError as exc:
        raise EntryDecodeError("bad header") from exc
    if not isinstance(header, dict):
        raise EntryDecodeError("bad header")
    return header, end


def _meta(header: dict[str, object]) -> EntryMeta:
    fields = {k: v for k, v in header.items() if k != "dim"}
    try:
        return EntryMeta(**fields)  # type: ignore[arg-type]
    except TypeError as exc:
        raise EntryDecodeError("bad header fields") from exc


def decode_meta(blob: bytes) -> EntryMeta:
    header, _ = _split(blob)
    return _meta(header)


def decode_entry(blob: bytes, *, with_embedding: bool = True) -> CacheEntry:
    header, offset = _split(blob)
    if offset + 4 > len(blob):
        raise EntryDecodeError("truncated response")
    (resp_len,) = _U32.unpack_from(blob, offset)
    start = offset + 4
    response = blob[start : start + resp_len]
    if len(response) != resp_len:
        raise EntryDecodeError("truncated response")
    embedding: np.ndarray | None = None
    dim = header.get("dim")
    if isinstance(dim, int):
        raw = blob[start + resp_len :]
        if len(raw) != 2 * dim:
            raise EntryDecodeError("truncated embedding")
        if with_embedding:
            embedding = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    return CacheEntry(_meta(header), response, embedding)


def expires_for(meta: EntryMeta, max_age: float | None = None) -> float:
    """When the entry expires for a reader whose own TTL is ``max_age``: an entry is as old for
    every reader, and one written under a longer TTL (another tier sharing its scope) must not
    outlive the reader's."""
    if max_age is None:
        return meta.expires_at
    return min(meta.expires_at, meta.created_at + max_age)


def is_expired(meta: EntryMeta, now: float, max_age: float | None = None) -> bool:
    return now >= expires_for(meta, max_age)


def refresh_early(
    meta: EntryMeta, now: float, *, beta: float, uniform: float, max_age: float | None = None
) -> bool:
    """XFetch (Vattani et al.): treat a live entry as expired with probability rising as expiry
    nears, scaled by how long it took to compute, so one request refreshes a hot entry before it
    expires for everyone at once. ``uniform`` is a random number in (0, 1]."""
    if beta <= 0 or meta.compute_seconds <= 0:
        return False
    expiry = expires_for(meta, max_age)
    return now - meta.compute_seconds * beta * math.log(max(uniform, 1e-300)) >= expiry
