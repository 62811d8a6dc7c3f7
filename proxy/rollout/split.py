"""Which version answers a conversation: a pure, sticky traffic split.

A conversation goes to the canary when the hash of (engine name, conversation prefix) falls below
the canary's share. Every later turn of a conversation starts with the same prefix, so it keeps
its version; every proxy replica computes the same answer with no shared state; and raising the
share only moves conversations from stable to canary (never back), since the buckets are fixed.
"""

from __future__ import annotations

import hashlib

_SCALE = float(2**64)


def split_bucket(engine: str, conversation: bytes) -> float:
    """A uniform number in [0, 1) fixed by the engine name and the conversation prefix."""
    digest = hashlib.blake2b(
        conversation, digest_size=8, person=b"frugal-canary", key=engine.encode()[:64]
    ).digest()
    return int.from_bytes(digest, "big") / _SCALE


def goes_to_canary(engine: str, conversation: bytes, share: float) -> bool:
    """True when this conversation is in the canary's share of the engine's traffic."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return split_bucket(engine, conversation) < share
