"""A stable identifier for the weights an engine serves.

``version: auto`` derives it from what vLLM reports (``/v1/models``: ``root`` and
``max_model_len``) plus a digest of the model folder's config and weights where the proxy can read
it. A redeploy with other weights (even at the same path) gets another version, so the cache,
which keys on it, never serves one model's answers for another.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

# Hashing whole weight files would take seconds per GB at start-up; the safetensors header (names,
# dtypes, shapes, offsets) plus a slice of the data from each end tells any redeploy apart.
_SAMPLE_BYTES = 1 << 20


def derive_version(
    *,
    model: str,
    root: str | None,
    max_model_len: int | None,
    folder_digest: str | None,
    extra: str | None = None,
) -> str:
    parts = [model, root or "", str(max_model_len or ""), folder_digest or ""]
    if extra is not None:  # (absent, the versions of earlier releases stand)
        parts.append(extra)
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{model}@{digest[:12]}"


def next_version(current: str | None, reported: Iterable[str | None]) -> str | None:
    """The version an engine serves, from what its healthy replicas report (None: not known).

    The current version stands while any healthy replica still serves it: during a rolling
    redeploy the redeployed replicas wait, out of rotation, until the last old one goes. Then,
    when the replicas that reported agree on one version, it is the engine's; while they disagree
    (or none reported) nothing changes.
    """
    known = {v for v in reported if v is not None}
    if current in known or len(known) != 1:
        return current
    return known.pop()


def folder_digest(folder: Path) -> str | None:
    """Digest of a model folder's config, tokenizer config and weights; None if unreadable."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    names = ["config.json", "generation_config.json", "tokenizer_config.json"]
    names += ["model.safetensors.index.json"]
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\x00" + path.read_bytes() + b"\x00")
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        h.update(f"{path.name}\x00{size}\x00".encode())
        with path.open("rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                f.seek(size - _SAMPLE_BYTES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def model_card(models_response: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The /v1/models entry for ``model``."""
    data = models_response.get("data")
    if not isinstance(data, list):
        return None
    for card in data:
        if isinstance(card, dict) and card.get("id") == model:
            return card
    return None


async def resolve_version(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    *,
    model_dir: Path | None,
    timeout_s: float = 5.0,
    headers: dict[str, str] | None = None,
    extra: str | None = None,
) -> str:
    """Ask one replica what it serves and derive the version; raises if it cannot tell."""
    async with session.get(
        url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers
    ) as resp:
        resp.raise_for_status()
        payload = await resp.json()
    if not isinstance(payload, dict):
        # (a URL that reaches some other service): a ValueError, which every caller handles as
        # "cannot tell", not an AttributeError that would end the health poller
        raise ValueError(f"{url}/v1/models answered no models list")
    card = model_card(payload, model)
    if card is None:
        served = [c.get("id") for c in payload.get("data", []) if isinstance(c, dict)]
        raise LookupError(f"{url} does not serve {model!r} (it serves {served})")
    root = card.get("root")
    folder = model_dir
    if folder is None and isinstance(root, str):
        folder = Path(root)
    # Reading the weights' header and edges is blocking file I/O: keep it off the event loop.
    digest = await asyncio.to_thread(folder_digest, folder) if folder is not None else None
    max_len = card.get("max_model_len")
    return derive_version(
        model=model,
        root=root if isinstance(root, str) else None,
        max_model_len=max_len if isinstance(max_len, int) else None,
        folder_digest=digest,
        extra=extra,
    )
