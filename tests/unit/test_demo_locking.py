"""The per-data-dir preparation lock excludes a second holder until the first lets go."""

from __future__ import annotations

import threading
from pathlib import Path

from proxy.demo.locking import data_dir_lock


def test_second_holder_waits_for_the_first(tmp_path: Path) -> None:
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        with data_dir_lock(tmp_path, "models"):
            order.append("second")
            entered.set()

    with data_dir_lock(tmp_path, "models"):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.3)  # blocked while we hold it
        order.append("first done")
    waiter.join(timeout=10)
    assert order == ["first done", "second"]


def test_locks_for_different_things_do_not_block_each_other(tmp_path: Path) -> None:
    with data_dir_lock(tmp_path, "models"), data_dir_lock(tmp_path, "vllm-venv"):
        assert (tmp_path / ".models.lock").exists()
