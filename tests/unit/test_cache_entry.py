from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.entry import (
    CacheEntry,
    EntryDecodeError,
    EntryMeta,
    decode_entry,
    decode_meta,
    encode_entry,
    expires_for,
    is_expired,
    refresh_early,
)

metas = st.builds(
    EntryMeta,
    key=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    context=st.none() | st.text(max_size=8),
    endpoint=st.sampled_from(["chat", "completions"]),
    engine=st.text(max_size=8),
    version=st.text(max_size=8),
    partition=st.text(max_size=20),
    scope=st.sampled_from(["global", "tier", "tenant", "user"]),
    created_at=st.floats(0, 2e9),
    ttl=st.floats(0, 1e7),
    compute_seconds=st.floats(0, 100),
    query_text=st.none() | st.text(max_size=30),
)


@given(metas, st.binary(max_size=200), st.none() | st.integers(1, 16))
def test_round_trip(meta: EntryMeta, response: bytes, dim: int | None) -> None:
    vector = None if dim is None else np.linspace(-1, 1, dim, dtype=np.float32)
    blob = encode_entry(CacheEntry(meta, response, vector))
    back = decode_entry(blob)
    assert back.meta == meta and back.response == response
    assert decode_meta(blob) == meta
    if vector is None:
        assert back.embedding is None
    else:
        assert back.embedding is not None
        np.testing.assert_allclose(back.embedding, vector, atol=1e-3)
        assert decode_entry(blob, with_embedding=False).embedding is None


def _meta(**overrides: object) -> EntryMeta:
    fields: dict[str, object] = {
        "key": "a" * 64,
        "context": None,
        "endpoint": "chat",
        "engine": "e",
        "version": "v",
        "partition": "p",
        "scope": "global",
        "created_at": 1000.0,
        "ttl": 100.0,
        "compute_seconds": 2.0,
        "query_text": None,
    }
    fields.update(overrides)
    return EntryMeta(**fields)  # type: ignore[arg-type]


def test_truncated_or_foreign_blobs_are_rejected() -> None:
    blob = encode_entry(CacheEntry(_meta(), b'{"x": 1}', np.ones(8, dtype=np.float32)))
    for broken in (blob[:3], blob[:10], blob[:-1], b"garbage" + blob, b""):
        with pytest.raises(EntryDecodeError):
            decode_entry(broken)


def test_expiry() -> None:
    meta = _meta()
    assert not is_expired(meta, 1099.9)
    assert is_expired(meta, 1100.0)


@given(metas, st.none() | st.floats(0, 1e8), st.floats(0, 3e9))
def test_a_readers_ttl_only_shortens_an_entrys_life(
    meta: EntryMeta, max_age: float | None, now: float
) -> None:
    expiry = expires_for(meta, max_age)
    assert expiry <= meta.expires_at
    if max_age is None or max_age >= meta.ttl:
        assert expiry == meta.expires_at
    else:
        assert expiry == meta.created_at + max_age
    if is_expired(meta, now):
        assert is_expired(meta, now, max_age)


def test_a_shorter_reader_ttl_expires_a_long_lived_entry() -> None:
    meta = _meta()  # created at 1000 with a TTL of 100
    assert not is_expired(meta, 1050.0)
    assert is_expired(meta, 1050.0, max_age=30.0)
    assert not is_expired(meta, 1050.0, max_age=3600.0)
    assert refresh_early(meta, 1029.9, beta=1.0, uniform=1e-9, max_age=30.0)


@given(st.floats(1000, 1100), st.floats(1000, 1100), st.floats(1e-9, 1.0))
def test_xfetch_is_monotone_in_time(t1: float, t2: float, uniform: float) -> None:
    meta = _meta()
    early, late = sorted((t1, t2))
    if refresh_early(meta, early, beta=1.0, uniform=uniform):
        assert refresh_early(meta, late, beta=1.0, uniform=uniform)


def test_xfetch_probability_rises_towards_expiry() -> None:
    meta = _meta()  # expires at 1100, took 2 s to compute
    rng = np.random.default_rng(0)
    draws = rng.uniform(1e-12, 1.0, 4000)

    def rate(now: float) -> float:
        return float(np.mean([refresh_early(meta, now, beta=1.0, uniform=u) for u in draws]))

    far, near, nearer = rate(1050.0), rate(1097.0), rate(1099.5)
    assert far == 0.0
    assert 0.0 < near < nearer < 1.0
    assert not refresh_early(meta, 1099.9, beta=0.0, uniform=1e-9)


@given(metas)
def test_the_header_holds_every_field_in_order(meta: EntryMeta) -> None:
    """encode_entry writes the fields out by name: a field added to EntryMeta must be added
    there too (and the header's bytes stay those of a dict of every field, in order)."""
    import dataclasses

    import orjson

    from proxy.cache.entry import _header

    names = [f.name for f in dataclasses.fields(EntryMeta)]
    assert list(_header(meta)) == names
    expected = orjson.dumps({name: getattr(meta, name) for name in names})
    assert expected in encode_entry(CacheEntry(meta, b"{}"))
