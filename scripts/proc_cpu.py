"""CPU time of a process and its live descendants, from /proc (for the benchmarks).

A Frugal proxy may run helpers in child processes (the disk cache's writer): their CPU is the
proxy's cost too, so the benchmarks count the whole tree.
"""

from __future__ import annotations

import os
from pathlib import Path


def _own(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended while we looked
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) and of its live descendants."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += _own(current)
            pending += _children(current)
        except OSError:
            continue  # a descendant that exited meanwhile
    return total
