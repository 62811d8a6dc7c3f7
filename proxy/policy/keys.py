"""API keys: generated once, stored only as ``sha256:<hex>``, compared in constant time.

Keys are long random secrets (not passwords), so a plain SHA-256 is enough: there is nothing to
brute-force, and a fast hash keeps the per-request lookup cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

KEY_PREFIX = "sk-frugal-"
HASH_PREFIX = "sha256:"


def hash_key(raw: str) -> str:
    # A header's bytes that are not UTF-8 arrive as surrogates (aiohttp decodes them with
    # surrogateescape): hashed as the bytes that were sent, they match no issued (ASCII) key.
    return HASH_PREFIX + hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


def generate_key() -> str:
    """A new API key: 256 bits from the OS generator, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def verify_key(raw: str, hashes: Iterable[str]) -> bool:
    """Whether ``raw`` hashes to one of ``hashes``; all are compared, each in constant time."""
    candidate = hash_key(raw).encode("ascii")
    found = False
    for stored in hashes:
        # No early exit: the time taken does not depend on which (if any) hash matched.
        found |= hmac.compare_digest(candidate, stored.encode("ascii", "replace"))
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The key from an ``Authorization: Bearer <key>`` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
