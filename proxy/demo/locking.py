"""One preparer at a time per data directory (a developer's `frugal up` and a test run may
overlap; both would write the same scratch files)."""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def data_dir_lock(data_dir: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `<data_dir>/.<what>.lock`, waiting (and saying so) if taken.

    The lock is released by the OS if the holder dies, so a crash never leaves it stuck.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / f".{what}.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {what} in {data_dir}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
