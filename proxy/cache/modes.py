"""Cache modes as a type: whether a request may read from and/or write to the cache.

A tier's policy gives the base mode; a request's ``Cache-Control`` header can only narrow it
(``no-cache``: do not answer from the cache but store the fresh answer; ``no-store``: do not store
this answer, a cached one is fine). A client can never widen its tier's mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from proxy.cache.keys import is_cacheable_request


class CacheMode(StrEnum):
    ON = "on"
    OFF = "off"
    READ_ONLY = "read-only"
    WRITE_ONLY = "write-only"

    def __init__(self, value: str) -> None:
        # Plain attributes, set once per member: a request asks them several times.
        self.read = value in ("on", "read-only")
        self.write = value in ("on", "write-only")

    @classmethod
    def from_flags(cls, *, read: bool, write: bool) -> CacheMode:
        if read and write:
            return cls.ON
        if read:
            return cls.READ_ONLY
        if write:
            return cls.WRITE_ONLY
        return cls.OFF

    def narrow(self, other: CacheMode) -> CacheMode:
        """Both modes at once: read only if both read, write only if both write."""
        return CacheMode.from_flags(read=self.read and other.read, write=self.write and other.write)

    def with_cache_control(self, header: str | None) -> CacheMode:
        """This mode narrowed by a request's ``Cache-Control`` header."""
        return self.narrow(mode_from_cache_control(header))


def mode_from_cache_control(header: str | None) -> CacheMode:
    """``no-cache`` → write-only, ``no-store`` → read-only, both → off, neither → on."""
    if not header:
        return CacheMode.ON
    directives = {d.strip().split("=", 1)[0].strip().lower() for d in header.split(",")}
    return CacheMode.from_flags(
        read="no-cache" not in directives, write="no-store" not in directives
    )


def request_mode(
    tier_mode: CacheMode,
    *,
    cache_control: str | None,
    body: Mapping[str, Any],
    allow_sampled: bool,
) -> CacheMode:
    """The mode for one request: the tier's, narrowed by ``Cache-Control``, and off for sampled
    requests (temperature > 0 without a seed) unless the tier allows caching them."""
    if not is_cacheable_request(body, allow_sampled=allow_sampled):
        return CacheMode.OFF
    if not cache_control:
        return tier_mode  # (narrowed by ON: itself; most requests send no such header)
    return tier_mode.with_cache_control(cache_control)
