"""The embedded (disk) cache under an operator's faults, through the proxy: a disk that fills,
a writer process that dies, a second proxy on the same folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.cache.disk_writer import ProcessWriter
from proxy.cache.store import DiskStore
from tests.integration.conftest import StartFake, StartProxy
from tests.integration.test_cache_pipeline import GREEDY, cached_proxy, post_until
from tests.unit.test_cache_disk_faults import _Disk


def ask(n: int) -> dict[str, object]:
    return {**GREEDY, "messages": [{"role": "user", "content": f"question {n}"}]}


async def test_a_full_disk_costs_the_cache_not_the_answers_and_shows_in_metrics(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk = _Disk(monkeypatch)  # (the thread writer: a writer process would not see the patch)
    _, proxy = await cached_proxy(
        start_fake, start_proxy, tmp_path, cache={"disk_writer": "thread"}
    )
    store = proxy.services.cache.store if proxy.services.cache is not None else None
    assert isinstance(store, DiskStore)
    for n in range(3):
        await post_until(proxy, ask(n), "miss")
    await proxy.services.cache.drain()
    await store.flush()  # (a queued answer is served until its write fails)
    await post_until(proxy, ask(0), "miss")  # its store was dropped: not served
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'frugal_cache_errors_total{backend="disk",op="write"}' in metrics
    disk.free()
    await post_until(proxy, ask(7), "miss")
    await post_until(proxy, ask(7), "hit-exact")  # stored again once the disk has room


async def test_a_killed_writer_process_costs_no_answer_and_shows_in_metrics(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)  # (the process writer)
    assert proxy.services.cache is not None
    store = proxy.services.cache.store
    assert isinstance(store, DiskStore) and isinstance(store._batches, ProcessWriter)
    child = store._batches._process
    assert child is not None  # started with the app
    child.kill()  # SIGKILL, as the OOM killer would
    await child.wait()
    for n in range(5):  # each answered; the first store finds the child gone
        await post_until(proxy, ask(n), "miss")
    for n in range(5):  # and every one was stored all the same
        await post_until(proxy, ask(n), "hit-exact")
    # (A hit may come from the write queue: wait until the batches were written, and so until
    # a write has found the child gone, on a host fast enough to answer first.)
    await store.flush()
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'frugal_cache_errors_total{backend="disk",op="writer"} 1.0' in metrics


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_a_cache_folder_removed_while_running_is_counted_not_silent(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    writer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite goes on writing to a database whose folder was deleted (the open files outlive
    their names), so every later answer would be stored nowhere a restart finds it."""
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"disk_writer": writer})
    assert proxy.services.cache is not None
    store = proxy.services.cache.store
    assert isinstance(store, DiskStore)
    await post_until(proxy, ask(0), "miss")
    await post_until(proxy, ask(0), "hit-exact")
    shutil.rmtree(tmp_path / "cache")
    await post_until(proxy, ask(1), "miss")  # answered all the same
    await proxy.services.cache.drain()
    await store.flush()
    metrics = await (await proxy.client.get("/metrics")).text()
    # (before: nothing in the metrics or the log; the answer "stored" into a deleted file)
    assert 'frugal_cache_errors_total{backend="disk",op="write"}' in metrics
    assert any(r.getMessage() == "cache.disk.write_failed" for r in caplog.records)
