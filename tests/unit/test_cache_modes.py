from __future__ import annotations

import pytest

from proxy.cache.keys import Scope
from proxy.cache.modes import CacheMode, mode_from_cache_control, request_mode
from proxy.policy.schema import Cache as CacheSettings


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


def test_request_mode_turns_sampled_requests_off_unless_allowed() -> None:
    sampled = {"temperature": 0.8}
    greedy = {"temperature": 0}
    assert (
        request_mode(CacheMode.ON, cache_control=None, body=sampled, allow_sampled=False)
        is CacheMode.OFF
    )
    assert (
        request_mode(CacheMode.ON, cache_control=None, body=sampled, allow_sampled=True)
        is CacheMode.ON
    )
    assert (
        request_mode(CacheMode.ON, cache_control="no-store", body=greedy, allow_sampled=False)
        is CacheMode.READ_ONLY
    )
    assert (
        request_mode(CacheMode.OFF, cache_control=None, body=greedy, allow_sampled=True)
        is CacheMode.OFF
    )


@pytest.mark.parametrize("mode", ["on", "off", "read_only", "write_only"])
@pytest.mark.parametrize("scope", ["global", "tier", "tenant", "user"])
def test_tier_cache_settings_as_the_cache_types(mode: str, scope: str) -> None:
    settings = CacheSettings.model_validate({"mode": mode, "scope": scope})
    assert settings.tier_mode.read is settings.reads
    assert settings.tier_mode.write is settings.writes
    assert settings.scope_kind is Scope(scope)
    assert settings.tier_mode is settings.tier_mode  # made once per policy
