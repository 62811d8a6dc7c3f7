"""The disk store under an operator's faults: a corrupt or truncated database at start-up."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from proxy.cache.store import DiskStore
from tests.unit.test_cache_store import big_entry, entry


def _filled(folder: Path, n: int = 300) -> Path:
    """A store of ``n`` entries (some in value files), closed; returns its database file."""
    store = DiskStore(folder)
    for i in range(n):
        store.put_sync(big_entry(i, size=40_000) if i % 50 == 0 else entry(i))
    store.close_sync()
    return folder / "cache.db"


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


def _truncated(db: Path) -> None:
    with db.open("r+b") as file:
        file.truncate(db.stat().st_size // 3)


def _scribbled(db: Path) -> None:
    with db.open("r+b") as file:
        file.seek(8 * 4096)
        file.write(os.urandom(16 * 4096))


@pytest.mark.parametrize("damage", [_garbage, _truncated, _scribbled])
async def test_a_damaged_database_is_set_aside_and_the_store_starts_empty(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    db = _filled(folder)
    assert callable(damage)
    damage(db)
    with caplog.at_level(logging.ERROR, logger="proxy.cache.store"):
        store = DiskStore(folder)
    quarantined = [r for r in caplog.records if r.getMessage() == "cache.disk.corrupt_store"]
    assert len(quarantined) == 1
    record = quarantined[0]
    assert record.__dict__["file"] == str(db)
    moved = Path(record.__dict__["moved_to"])
    assert moved.parent == folder and (moved / "cache.db").exists()  # kept for a post-mortem
    assert await store.count() == 0
    await store.put(entry(1))  # and it takes writes
    await store.flush()
    assert await store.get(entry(1).meta.key) is not None
    await store.close()
    reopened = DiskStore(folder)  # the fresh store is sound: no second quarantine
    assert await reopened.count() == 1
    await reopened.close()
    assert len([p for p in folder.iterdir() if p.is_dir() and p.name.startswith("corrupt-")]) == 1
