from __future__ import annotations

import pytest

from proxy.cache.modes import CacheMode, mode_from_cache_control


@pytest.mark.parametrize(
    "mode,read,write",
    [
        (CacheMode.ON, True, True),
        (CacheMode.OFF, False, False),
        (CacheMode.READ_ONLY, True, False),
        (CacheMode.WRITE_ONLY, False, True),
    ],
)
def test_predicates(mode: CacheMode, read: bool, write: bool) -> None:
    assert (mode.read, mode.write) == (read, write)
    assert CacheMode.from_flags(read=read, write=write) is mode


@pytest.mark.parametrize(
    "header,expected",
    [
        (None, CacheMode.ON),
        ("", CacheMode.ON),
        ("no-cache", CacheMode.WRITE_ONLY),
        ("no-store", CacheMode.READ_ONLY),
        ("no-cache, no-store", CacheMode.OFF),
        ("No-Store , max-age=0", CacheMode.READ_ONLY),
        ("max-age=60", CacheMode.ON),
    ],
)
def test_cache_control(header: str | None, expected: CacheMode) -> None:
    assert mode_from_cache_control(header) is expected


@pytest.mark.parametrize("tier", list(CacheMode))
@pytest.mark.parametrize("header", [None, "no-cache", "no-store", "no-cache, no-store"])
def test_a_request_can_only_narrow_its_tier(tier: CacheMode, header: str | None) -> None:
    effective = tier.with_cache_control(header)
    assert effective.read <= tier.read
    assert effective.write <= tier.write
