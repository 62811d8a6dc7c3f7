"""ResponseCache: exact and semantic lookups, partitions, modes, expiry, invalidation, restarts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.cache.entry import CacheEntry, EntryMeta
from proxy.cache.index import SemanticIndex
from proxy.cache.keys import CacheKeys, Endpoint, Partition, Scope, make_keys
from proxy.cache.modes import CacheMode
from proxy.cache.service import (
    CacheConfig,
    CacheHit,
    CosineVerifier,
    InvalidationFilter,
    LookupTally,
    Refusal,
    ResponseCache,
    SemanticCandidate,
    Verdict,
    follow_as_sse,
)
from proxy.cache.singleflight import Follower, Leader, SingleFlight
from proxy.cache.store import CacheBackendError, DiskStore, EntryAdded, Resync
from proxy.cache.stream_codec import assemble, normalise_response, replay, wants_usage
from proxy.sse import parse_all

DIM = 8
GLOBAL = Partition(Scope.GLOBAL)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def body(question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        **extra,
    }


def keys_for(
    question: str,
    *,
    partition: Partition = GLOBAL,
    engine: str = "large",
    version: str = "v1",
    **extra: Any,
) -> CacheKeys:
    return make_keys(
        Endpoint.CHAT, body(question, **extra), engine=engine, version=version, partition=partition
    )


def answer(text: str, reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "large",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def vec(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


class Recorder:
    def __init__(self) -> None:
        self.lookups: list[str] = []
        self.stores: list[str] = []
        self.errors: list[str] = []
        self.refusals: list[str] = []

    def on_lookup(self, outcome: str, seconds: float) -> None:
        self.lookups.append(outcome)

    def on_store(self, outcome: str) -> None:
        self.stores.append(outcome)

    def on_backend_error(self, operation: str, error: BaseException) -> None:
        self.errors.append(operation)

    def on_semantic_refusal(self, reason: str) -> None:
        self.refusals.append(reason)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cache(tmp_path: Path, clock: Clock) -> AsyncIterator[ResponseCache]:
    from proxy.cache.index import SemanticIndex

    rc = ResponseCache(
        DiskStore(tmp_path / "cache"),
        index=SemanticIndex(DIM),
        verifier=CosineVerifier(0.9),
        observer=Recorder(),
        clock=clock,
        uniform=lambda: 1.0,  # XFetch never fires unless a test says so
    )
    await rc.start()
    await rc.ready()
    yield rc
    await rc.aclose()


async def test_exact_hit_after_store(cache: ResponseCache) -> None:
    keys = keys_for("What is 2+2?")
    assert await cache.lookup(keys) is None
    assert await cache.store_response(keys, answer("4"), compute_seconds=0.5)
    hit = await cache.lookup(keys)
    assert hit is not None and hit.kind == "exact" and hit.similarity == 1.0
    assert hit.json()["choices"][0]["message"]["content"] == "4"
    assert hit.json()["usage"] == answer("4")["usage"]
    assert cache.observer.lookups == ["miss", "exact"]  # type: ignore[attr-defined]


async def test_raw_bytes_are_stored_verbatim(cache: ResponseCache) -> None:
    keys = keys_for("bytes?")
    raw = orjson.dumps(answer("yes"))
    assert await cache.store_response(keys, raw)
    hit = await cache.lookup(keys)
    assert hit is not None and hit.response == raw


async def test_only_the_producing_engine_version_is_served(cache: ResponseCache) -> None:
    await cache.store_response(keys_for("q"), answer("a"), embedding=vec(1))
    assert await cache.lookup(keys_for("q", version="v2"), embedding=vec(1)) is None
    assert await cache.lookup(keys_for("q", engine="small"), embedding=vec(1)) is None


async def test_bad_answers_are_not_stored(cache: ResponseCache) -> None:
    keys = keys_for("q")
    assert not await cache.store_response(keys, answer("cut", reason="abort"))
    assert not await cache.store_response(keys, answer("a"), status=500)
    assert not await cache.store_response(keys, b"not json")
    assert await cache.lookup(keys) is None
    assert cache.observer.stores == ["rejected"] * 3  # type: ignore[attr-defined]


async def test_modes(cache: ResponseCache) -> None:
    keys = keys_for("q")
    assert not await cache.store_response(keys, answer("a"), mode=CacheMode.READ_ONLY)
    assert await cache.store_response(keys, answer("a"), mode=CacheMode.WRITE_ONLY)
    assert await cache.lookup(keys, mode=CacheMode.WRITE_ONLY) is None
    assert await cache.lookup(keys, mode=CacheMode.OFF) is None
    assert await cache.lookup(keys, mode=CacheMode.READ_ONLY) is not None


async def test_semantic_hit_for_a_paraphrase(cache: ResponseCache) -> None:
    await cache.store_response(
        keys_for("capital of France?"), answer("Paris"), embedding=vec(1, 0.1)
    )
    hit = await cache.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12))
    assert hit is not None and hit.kind == "semantic" and hit.similarity > 0.99
    assert hit.meta.query_text == "capital of France?"
    # too far: the verifier (cosine 0.9 here) refuses
    assert await cache.lookup(keys_for("capital of Spain?"), embedding=vec(1, 1)) is None
    # same question text but another system prompt: another context, no semantic hit
    other = make_keys(
        Endpoint.CHAT,
        {
            **body("France's capital?"),
            "messages": [{"role": "user", "content": "France's capital?"}],
        },
        engine="large",
        version="v1",
        partition=GLOBAL,
    )
    assert await cache.lookup(other, embedding=vec(1, 0.12)) is None
    # other sampling fields: other context
    assert (
        await cache.lookup(keys_for("France's capital?", max_tokens=5), embedding=vec(1, 0.12))
        is None
    )


class PickSecond:
    cheap = False

    def __init__(self, *, prepared: bool = False) -> None:
        self.seen: list[tuple[str, list[SemanticCandidate]]] = []
        self.threads: list[int] = []
        self.prepared = prepared

    def ready(self, query: str, candidates: Sequence[SemanticCandidate]) -> bool:
        return self.prepared

    def reads_whole(self, text: str, *, count: bool = True) -> bool:
        return True

    def select(
        self, query: str, candidates: Sequence[SemanticCandidate], *, cutoff: float | None = None
    ) -> Verdict | None:
        self.seen.append((query, list(candidates)))
        self.threads.append(threading.get_ident())
        return Verdict(1, 0.77) if len(candidates) > 1 else None


async def test_a_custom_verifier_decides_off_the_event_loop(
    cache: ResponseCache, clock: Clock
) -> None:
    picker = PickSecond()
    cache.verifier = picker
    await cache.store_response(keys_for("a"), answer("A"), embedding=vec(1, 0.0))
    clock.now += 10
    await cache.store_response(keys_for("b"), answer("B"), embedding=vec(1, 0.3))
    hit = await cache.lookup(keys_for("c"), embedding=vec(1, 0.01))
    assert hit is not None and hit.score == 0.77
    query, shown = picker.seen[0]
    assert query == "c"
    assert [c.text for c in shown] == ["a", "b"]  # best cosine first
    assert shown[0].age_seconds == 10
    assert hit.meta.query_text == "b"
    assert picker.threads[0] != threading.get_ident()


class RefuseAll:
    """A verifier that refuses every candidate, saying why."""

    cheap = True

    def ready(self, query: str, candidates: Sequence[SemanticCandidate]) -> bool:
        return True

    def reads_whole(self, text: str, *, count: bool = True) -> bool:
        return True

    def select(
        self, query: str, candidates: Sequence[SemanticCandidate], *, cutoff: float | None = None
    ) -> Refusal | None:
        return Refusal("veto_order") if candidates else None


async def test_a_refusal_is_a_miss_and_its_reason_reaches_the_observer(
    cache: ResponseCache,
) -> None:
    recorder = cache.observer
    assert isinstance(recorder, Recorder)
    await cache.store_response(keys_for("a"), answer("A"), embedding=vec(1, 0.0))
    cache.verifier = RefuseAll()
    assert await cache.lookup(keys_for("c"), embedding=vec(1, 0.01)) is None
    assert recorder.refusals == ["veto_order"]
    # no candidate near enough: nothing was refused, nothing is counted
    assert await cache.lookup(keys_for("d"), embedding=vec(0.0, 1)) is None
    assert recorder.refusals == ["veto_order"]


class ShortWindow(CosineVerifier):
    """A cosine verifier whose model reads only texts of up to 10 characters whole."""

    def reads_whole(self, text: str, *, count: bool = True) -> bool:
        return len(text) <= 10


async def test_a_question_the_model_cannot_read_whole_is_matched_exactly_only(
    cache: ResponseCache,
) -> None:
    cache.verifier = ShortWindow(threshold=0.9)
    long_a, long_b = "context ... what then?", "context ... why not?"
    assert not cache.semantic_fits(long_a) and cache.semantic_fits("short")
    assert cache.exact_only_reason(long_a) == "past_window"
    assert cache.exact_only_reason("x" * (cache.config.semantic_max_chars + 1)) == "too_long"
    assert cache.exact_only_reason("short") is None
    # stored with an embedding, but not indexed: it could never be a candidate
    await cache.store_response(keys_for(long_a), answer("A"), embedding=vec(1, 0.0))
    assert len(cache.index) == 0
    # the same vector (its window read alike) finds nothing by meaning...
    assert await cache.lookup(keys_for(long_b), embedding=vec(1, 0.0)) is None
    # ...and a long query is not looked up by meaning either, even against a short entry
    await cache.store_response(keys_for("short"), answer("S"), embedding=vec(1, 0.0))
    assert len(cache.index) == 1
    assert await cache.lookup(keys_for(long_b), embedding=vec(1, 0.0)) is None
    hit = await cache.lookup(keys_for(long_a), embedding=vec(1, 0.0))
    assert hit is not None and hit.kind == "exact"
    # a rebuild from the store leaves it out too
    assert await cache.rebuild_index() == 1


@pytest.mark.parametrize("text", ["   \n\t ", "\u0000\u0000\u0000", "👍", "???", "!!! 🎉 ..."])
async def test_a_question_without_a_letter_or_digit_is_matched_exactly_only(
    cache: ResponseCache, text: str
) -> None:
    # Such texts give a model of meaning nothing to read: "   " and "\0\0\0" tokenize to no
    # word piece at all, "👍" and "👎" to the same unknown one, and each pair embeds alike.
    assert cache.exact_only_reason(text) == "no_words" and not cache.semantic_fits(text)
    await cache.store_response(keys_for(text), answer("A"), embedding=vec(1, 0.0))
    assert len(cache.index) == 0  # stored, but never a candidate
    assert await cache.lookup(keys_for(text + " "), embedding=vec(1, 0.0)) is None
    hit = await cache.lookup(keys_for(text), embedding=vec(1, 0.0))
    assert hit is not None and hit.kind == "exact"
    # one letter or digit anywhere is something to read
    for readable in (text + "a", "7" + text, "ß", "日本"):
        assert cache.exact_only_reason(readable) is None


class FollowedDiskStore(DiskStore):
    """A disk store that also streams entries "another replica" stored, as the Redis store does."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.added: asyncio.Queue[EntryAdded] = asyncio.Queue()

    async def follow(self) -> AsyncIterator[EntryAdded | Resync]:
        yield Resync()
        while True:
            yield await self.added.get()


async def test_another_replicas_entry_past_the_window_is_not_indexed(
    tmp_path: Path,
) -> None:
    # (the real clock: the store's own expiry checks read it, and the entries cross stores here)
    from proxy.cache.index import SemanticIndex

    store = FollowedDiskStore(tmp_path / "shared")  # one store, as replicas share Redis
    follower = ResponseCache(store, index=SemanticIndex(DIM), verifier=ShortWindow(0.9))
    async with follower:
        await follower.ready()  # resynced from the empty store
        # "Another replica" (an older version, reading every text whole) stores two questions.
        other = ResponseCache(DiskStore(tmp_path / "shared"), index=SemanticIndex(DIM))
        texts = ("context ... what then?", "short")
        async with other:
            for text, x in zip(texts, (0.0, 1.0), strict=True):
                await other.store_response(keys_for(text), answer(text), embedding=vec(1, x))
            await other.drain()
            entries = [await other.store.get(keys_for(t).exact) for t in texts]
        for entry in entries:
            assert entry is not None and entry.embedding is not None
            store.added.put_nowait(EntryAdded(entry))
        for _ in range(200):  # until the follower has taken both (it indexes each as it takes it)
            if store.added.empty():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        context = keys_for("short").context
        assert context is not None
        # "short" only: the cut-off one is never a candidate
        assert follower.index.labels(context) == {entries[1].meta.label}  # type: ignore[union-attr]
        assert await follower.lookup(keys_for("context ... why?"), embedding=vec(1, 0.0)) is None


async def test_a_verifier_with_its_inputs_prepared_decides_on_the_event_loop(
    cache: ResponseCache, clock: Clock
) -> None:
    picker = PickSecond(prepared=True)
    cache.verifier = picker
    await cache.store_response(keys_for("a"), answer("A"), embedding=vec(1, 0.0))
    await cache.store_response(keys_for("b"), answer("B"), embedding=vec(1, 0.3))
    hit = await cache.lookup(keys_for("c"), embedding=vec(1, 0.01))
    assert hit is not None and hit.meta.query_text == "b"
    assert picker.threads == [threading.get_ident()]


async def test_ttl_and_xfetch(cache: ResponseCache, clock: Clock) -> None:
    keys = keys_for("q")
    await cache.store_response(keys, answer("a"), compute_seconds=2.0, ttl=100)
    clock.now += 99
    assert await cache.lookup(keys) is not None  # uniform=1.0: no early refresh
    cache._uniform = lambda: 1e-6  # an unlucky draw near expiry: this request refreshes
    assert await cache.lookup(keys) is None
    assert cache.observer.lookups[-1] == "refresh"  # type: ignore[attr-defined]
    cache._uniform = lambda: 1.0
    clock.now += 2
    assert await cache.lookup(keys) is None  # expired for everyone


async def test_an_early_refresh_is_not_undone_by_the_semantic_path(
    cache: ResponseCache, clock: Clock
) -> None:
    keys = keys_for("capital of France?")
    await cache.store_response(
        keys, answer("Paris"), embedding=vec(1, 0.1), compute_seconds=2.0, ttl=100
    )
    clock.now += 99  # close to expiry
    cache._uniform = lambda: 1e-6  # this request is the one that refreshes
    # the entry is this request's own: not served as a paraphrase of itself either
    assert await cache.lookup(keys, embedding=vec(1, 0.1)) is None
    assert await cache.lookup(keys, embedding=vec(1, 0.1), exact=False) is None
    # a paraphrase may still be served it (it is not the one refreshing)
    hit = await cache.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12))
    assert hit is not None and hit.kind == "semantic"


async def test_a_reader_with_a_shorter_ttl_is_not_served_older_entries(
    cache: ResponseCache, clock: Clock
) -> None:
    # one tier stores with a week's TTL; another, sharing the scope, reads with an hour's
    keys = keys_for("capital of France?")
    await cache.store_response(keys, answer("Paris"), embedding=vec(1, 0.1), ttl=7 * 86400)
    clock.now += 2 * 3600
    assert await cache.lookup(keys, max_age=3600) is None
    paraphrase = keys_for("France's capital?")
    assert await cache.lookup(paraphrase, embedding=vec(1, 0.12), max_age=3600) is None
    assert await cache.lookup(keys, max_age=7 * 86400) is not None
    hit = await cache.lookup(paraphrase, embedding=vec(1, 0.12), max_age=3 * 3600)
    assert hit is not None and hit.kind == "semantic"


async def test_invalidation(cache: ResponseCache, clock: Clock) -> None:
    tenant = Partition(Scope.TENANT, ("acme",))
    await cache.store_response(keys_for("old"), answer("a"), embedding=vec(1))
    clock.now += 1000
    await cache.store_response(keys_for("new"), answer("b"), embedding=vec(0, 1))
    await cache.store_response(keys_for("v2", version="v2"), answer("c"))
    await cache.store_response(keys_for("t", partition=tenant), answer("d"))
    assert await cache.invalidate(InvalidationFilter(older_than_seconds=500)) == 1
    assert await cache.lookup(keys_for("old")) is None
    assert await cache.lookup(keys_for("old again"), embedding=vec(1)) is None
    assert await cache.invalidate(InvalidationFilter(scope=Scope.TENANT)) == 1
    assert await cache.lookup(keys_for("t", partition=tenant)) is None
    assert await cache.purge_versions({("large", "v2")}) == 1
    assert await cache.lookup(keys_for("new")) is None
    assert await cache.lookup(keys_for("v2", version="v2")) is not None
    assert len(cache.index) == 0


async def test_a_rebuild_says_how_far_it_has_come(
    cache: ResponseCache, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(5):
        await cache.store_response(keys_for(f"question {i}"), answer("a"), embedding=vec(1, i))
    await cache.drain()
    cache.progress_every_s, cache.progress_rows = 0.0, 2
    with caplog.at_level("INFO", logger="proxy.cache.service"):
        assert await cache.rebuild_index() == 5
    said = [(r.getMessage(), getattr(r, "scanned", None)) for r in caplog.records]
    assert said[:3] == [
        ("cache.index.rebuilding", 2),
        ("cache.index.rebuilding", 4),
        ("cache.index.building", 5),
    ]
    assert said[-1][0] == "cache.index.rebuilt"


async def test_semantic_hits_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    from proxy.cache.index import SemanticIndex

    first = ResponseCache(DiskStore(tmp_path / "c"), index=SemanticIndex(DIM), clock=clock)
    await first.start()
    await first.ready()
    first.store_in_background(
        keys_for("capital of France?"), answer("Paris"), embedding=vec(1, 0.1)
    )
    await first.aclose()  # drains the background store

    second = ResponseCache(
        DiskStore(tmp_path / "c"),
        index=SemanticIndex(DIM),
        verifier=CosineVerifier(0.9),
        clock=clock,
    )
    await second.start()
    await second.ready()
    hit = await second.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12))
    assert hit is not None and hit.kind == "semantic"
    stats = await second.stats()
    assert stats.index_entries == 1 and stats.stored_entries == 1
    await second.aclose()


class BrokenStore:
    """A store whose backend is gone."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self) -> None:
        self.calls += 1
        raise ConnectionError("backend down")

    async def get(self, key: str) -> CacheEntry | None:
        self._fail()
        return None

    async def get_many(self, keys: Collection[str]) -> dict[str, CacheEntry]:
        self._fail()
        return {}

    async def put(self, entry: CacheEntry) -> None:
        self._fail()

    async def delete(self, keys: Collection[str]) -> int:
        self._fail()
        return 0

    async def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        self._fail()
        yield  # type: ignore[misc]

    async def delete_where(self, predicate: Callable[[EntryMeta], bool]) -> list[EntryMeta]:
        self._fail()
        return []

    async def count(self) -> int:
        self._fail()
        return 0

    async def close(self) -> None:
        pass


async def test_backend_failures_are_misses_not_errors() -> None:
    recorder = Recorder()
    cache = ResponseCache(BrokenStore(), observer=recorder)
    await cache.start()
    await cache.ready()
    keys = keys_for("q")
    assert await cache.lookup(keys) is None
    assert not await cache.store_response(keys, answer("a"))
    await cache.store_in_background(keys, answer("a"))
    stats = await cache.stats()
    assert stats.backend_errors >= 4 and stats.stored_entries is None
    assert recorder.stores == ["failed", "failed"]
    # a failed put is reported once, as a failed store; other operations as backend errors
    assert "get" in recorder.errors and "put" not in recorder.errors
    await cache.aclose()


async def test_admin_operations_fail_clearly_when_the_backend_is_down() -> None:
    from proxy.errors import ServiceUnavailable

    cache = ResponseCache(BrokenStore())
    await cache.start()
    await cache.ready()
    # (before: the store's ConnectionError escaped, a 500 "unexpected error" at the endpoint)
    with pytest.raises(ServiceUnavailable, match="cache store is unavailable: ConnectionError"):
        await cache.invalidate(InvalidationFilter(engine="large"))
    rows = [{"prompt": "q", "answer": "a"}]
    # (before: 0 stored, reported as a successful import)
    with pytest.raises(ServiceUnavailable, match="unavailable: rows\\[0\\]") as err:
        await cache.import_rows(rows, engine="large", version="v1", partition=GLOBAL)
    assert err.value.status == 503 and err.value.code == "cache_unavailable"
    assert (await cache.stats()).backend_errors >= 2
    await cache.aclose()


async def test_an_import_waits_for_a_full_disk_queue_instead_of_dropping_rows(
    tmp_path: Path,
) -> None:
    cache = ResponseCache(DiskStore(tmp_path / "cache", max_pending=2))
    await cache.start()
    await cache.ready()
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    # (without waiting: StoreBusy from the third row on, a 503 for a healthy disk)
    assert await cache.import_rows(rows, engine="large", version="v1", partition=GLOBAL) == 10
    assert await cache.store.count() == 10
    await cache.aclose()


async def test_a_failed_put_is_one_cache_error_on_metrics() -> None:
    from proxy.app import _CacheMetrics
    from proxy.observability.metrics import Metrics

    metrics = Metrics()
    cache = ResponseCache(BrokenStore(), observer=_CacheMetrics(metrics, "disk"))
    assert not await cache.store_response(keys_for("q"), answer("a"))
    assert await cache.lookup(keys_for("q")) is None
    errors = {"backend": "disk", "op": "put"}
    assert metrics.registry.get_sample_value("frugal_cache_errors_total", errors) == 1
    errors["op"] = "get"
    assert metrics.registry.get_sample_value("frugal_cache_errors_total", errors) == 1
    assert (await cache.stats()).stores["failed"] == 1


async def test_a_request_looking_up_twice_is_counted_once(cache: ResponseCache) -> None:
    """The pipeline's lookups: the exact key before routing, then by meaning after."""
    recorder = cache.observer
    assert isinstance(recorder, Recorder)

    async def request(question: str, vector: np.ndarray) -> CacheHit | None:
        tally = LookupTally()
        keys = keys_for(question)
        hit = await cache.lookup(keys, semantic=False, tally=tally)
        if hit is None:
            hit = await cache.lookup(keys, embedding=vector, exact=False, tally=tally)
        cache.count_lookups(tally)
        cache.count_lookups(tally)  # (once, however often it is asked)
        return hit

    assert await request("capital of France?", vec(1, 0.1)) is None
    await cache.store_response(keys_for("capital of France?"), answer("Paris"), embedding=vec(1))
    assert await request("largest river in Brazil?", vec(0, 1)) is None
    assert await request("capital of Spain?", vec(0, 0, 1)) is None
    semantic = await request("France's capital?", vec(1, 0.12))
    assert semantic is not None and semantic.kind == "semantic"
    exact = await request("capital of France?", vec(1, 0.1))
    assert exact is not None and exact.kind == "exact"
    assert recorder.lookups == ["miss", "miss", "miss", "semantic", "exact"]
    assert (await cache.stats()).lookups == {
        "exact": 1,
        "semantic": 1,
        "miss": 3,
        "refresh": 0,
        "bypass": 0,
    }


async def test_a_request_that_refreshes_early_is_counted_as_a_refresh(
    cache: ResponseCache, clock: Clock
) -> None:
    keys = keys_for("capital of France?")
    await cache.store_response(keys, answer("Paris"), embedding=vec(1), compute_seconds=2, ttl=100)
    clock.now += 99
    cache._uniform = lambda: 1e-6  # this request refreshes the entry
    tally = LookupTally()
    assert await cache.lookup(keys, semantic=False, tally=tally) is None
    assert await cache.lookup(keys, embedding=vec(1), exact=False, tally=tally) is None
    cache.count_lookups(tally)
    assert cache.observer.lookups == ["refresh"]  # type: ignore[attr-defined]


async def test_import_jsonl(cache: ResponseCache, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}", "answer": f"answer {i}"} for i in range(5)]
    rows.append(
        {
            "prompt": "x",
            "answer": "y",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )
    pairs.write_text("\n".join(orjson.dumps(r).decode() for r in rows) + "\n")

    def encode(texts: list[str]) -> np.ndarray:
        return np.stack([vec(1, len(t)) for t in texts])

    stored = await cache.import_jsonl(
        pairs,
        engine="large",
        version="v1",
        partition=GLOBAL,
        template={"temperature": 0},
        encode=encode,
        progress=False,
    )
    assert stored == 6
    request = {"messages": [{"role": "user", "content": "question 3"}], "temperature": 0}
    keys = make_keys(Endpoint.CHAT, request, engine="large", version="v1", partition=GLOBAL)
    hit = await cache.lookup(keys)
    assert hit is not None and hit.json()["choices"][0]["message"]["content"] == "answer 3"
    assert len(cache.index) == 6


USER_P = [{"role": "user", "content": "p"}]
LARGE_V1: dict[str, Any] = {"engine": "large", "version": "v1", "partition": GLOBAL}


@pytest.mark.parametrize(
    ("endpoint", "row", "param"),
    [
        # stored as given, these failed every later request for "p" (usage.get, int("ten"))
        (Endpoint.CHAT, {"prompt": "p", "answer": "a", "usage": "x"}, "rows[1].usage"),
        (
            Endpoint.CHAT,
            {"prompt": "p", "answer": "a", "usage": {"prompt_tokens": "ten"}},
            "rows[1].usage.prompt_tokens",
        ),
        (
            Endpoint.CHAT,
            {"prompt": "p", "answer": "a", "usage": {"completion_tokens": -1}},
            "rows[1].usage.completion_tokens",
        ),
        # these raised KeyError 'prompt' after passing the admin endpoint's check
        (Endpoint.CHAT, {"request": "str", "answer": "a"}, "rows[1].request"),
        (Endpoint.CHAT, {"messages": [], "answer": "a"}, "rows[1].messages"),
        (Endpoint.COMPLETIONS, {"messages": USER_P, "answer": "a"}, "rows[1].messages"),
        # stored under a key no request can have
        (Endpoint.CHAT, {"prompt": 5, "messages": None, "answer": "a"}, "rows[1].prompt"),
        (Endpoint.COMPLETIONS, {"prompt": ["p"], "answer": "a"}, "rows[1].prompt"),
        (
            Endpoint.CHAT,
            {"messages": [{"role": "user", "content": 5}], "answer": "a"},
            "rows[1].messages[0].content",
        ),
        (
            Endpoint.CHAT,
            {"request": {"messages": USER_P, "temperature": 9}, "answer": "a"},
            "rows[1].request.temperature",
        ),
        (
            Endpoint.COMPLETIONS,
            {"request": {"messages": USER_P}, "answer": "a"},
            "rows[1].request.prompt",
        ),
        (Endpoint.CHAT, {"prompt": "p", "answer": 5}, "rows[1].answer"),
        (Endpoint.CHAT, {"prompt": "p"}, "rows[1].answer"),
        (Endpoint.CHAT, {"prompt": "p", "answer": "a", "mesages": USER_P}, "rows[1].mesages"),
        (Endpoint.CHAT, ["p", "a"], "rows[1]"),
    ],
)
async def test_import_rejects_a_bad_row_by_index_and_field_and_stores_nothing(
    cache: ResponseCache, endpoint: Endpoint, row: Any, param: str
) -> None:
    from proxy.errors import InvalidRequest

    good = {"prompt": "q", "answer": "a"}
    with pytest.raises(InvalidRequest) as err:
        await cache.import_rows(
            [good, row], engine="large", version="v1", partition=GLOBAL, endpoint=endpoint
        )
    assert err.value.param == param and err.value.message.startswith(f"{param}: ")
    assert await cache.store.count() == 0  # the good row before it is not stored either


async def test_imported_rows_of_every_shape_are_hit_by_their_request(
    cache: ResponseCache,
) -> None:
    chat = [
        {"prompt": "p1", "answer": "a1", "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
        {"messages": USER_P, "prompt": "ignored", "answer": "a2"},
        {"request": {"messages": [{"role": "user", "content": "p3"}]}, "answer": "a3"},
        {"prompt": "p4", "messages": None, "request": None, "usage": None, "answer": "a4"},
    ]
    stored = await cache.import_rows(chat, engine="large", version="v1", partition=GLOBAL)
    assert stored == 4
    for question, text in [("p1", "a1"), ("p", "a2"), ("p4", "a4")]:
        request = {"temperature": 0, "messages": [{"role": "user", "content": question}]}
        hit = await cache.lookup(cache.keys(Endpoint.CHAT, request, **LARGE_V1))
        assert hit is not None and hit.json()["choices"][0]["message"]["content"] == text
    request = {"messages": [{"role": "user", "content": "p3"}]}
    assert await cache.lookup(cache.keys(Endpoint.CHAT, request, **LARGE_V1)) is not None
    completion = [{"prompt": "c", "answer": "d"}]
    assert await cache.import_rows(
        completion, engine="large", version="v1", partition=GLOBAL, endpoint=Endpoint.COMPLETIONS
    )
    request = {"temperature": 0, "prompt": "c"}
    hit = await cache.lookup(cache.keys(Endpoint.COMPLETIONS, request, **LARGE_V1))
    assert hit is not None and hit.json()["choices"][0]["text"] == "d"


async def test_import_jsonl_names_the_bad_line_and_stores_nothing(
    cache: ResponseCache, tmp_path: Path
) -> None:
    from proxy.errors import InvalidRequest

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "answer": "a"}\n\n{"prompt": "p", "answer": 1}\n')
    with pytest.raises(InvalidRequest, match=r"pairs.jsonl:3.answer: "):
        await cache.import_jsonl(
            pairs, engine="large", version="v1", partition=GLOBAL, progress=False
        )
    assert await cache.store.count() == 0
    pairs.write_text("".join(f'{{"prompt": "q{i}", "answer": "a"}}\n' for i in range(5)))
    stored = await cache.import_jsonl(
        pairs, engine="large", version="v1", partition=GLOBAL, batch_size=2, progress=False
    )
    assert stored == 5 and await cache.store.count() == 5


partitions = st.builds(
    Partition,
    st.sampled_from(list(Scope)),
    st.lists(st.sampled_from(["a", "b", ""]), max_size=2).map(tuple),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stored_in=partitions, looked_up_in=partitions, question=st.sampled_from(["q1", "q2"]))
async def test_no_lookup_crosses_a_partition(
    tmp_path_factory: pytest.TempPathFactory,
    stored_in: Partition,
    looked_up_in: Partition,
    question: str,
) -> None:
    from proxy.cache.index import SemanticIndex

    cache = ResponseCache(
        DiskStore(tmp_path_factory.mktemp("p")),
        index=SemanticIndex(DIM),
        verifier=CosineVerifier(0.5),
    )
    await cache.store_response(keys_for("q1", partition=stored_in), answer("a"), embedding=vec(1))
    hit = await cache.lookup(keys_for(question, partition=looked_up_in), embedding=vec(1))
    if stored_in != looked_up_in:
        assert hit is None
    else:
        assert hit is not None and hit.kind == ("exact" if question == "q1" else "semantic")
    await cache.aclose()


async def test_streamed_followers_of_a_streaming_leader() -> None:
    flights: SingleFlight[bytes, bytes] = SingleFlight()
    leader = flights.join("k", streaming=True)
    assert isinstance(leader, Leader)
    plain, with_usage = flights.join("k"), flights.join("k")
    assert isinstance(plain, Follower) and isinstance(with_usage, Follower)
    assert plain.streaming
    chunks = replay(Endpoint.CHAT, answer("one two three"), include_usage=True)

    async def collect(follower: Follower[bytes, bytes], request: dict[str, Any]) -> bytes:
        usage = wants_usage(request)
        events = follow_as_sse(follower, Endpoint.CHAT, include_usage=usage)
        return b"".join([e async for e in events])

    tasks = [
        asyncio.create_task(collect(plain, body("q"))),
        asyncio.create_task(collect(with_usage, body("q", stream_options={"include_usage": True}))),
    ]
    for chunk in chunks:
        leader.publish(orjson.dumps(chunk))
        await asyncio.sleep(0)
    leader.finish(orjson.dumps(answer("one two three")))
    plain_raw, usage_raw = await asyncio.gather(*tasks)
    plain_payloads, usage_payloads = parse_all(plain_raw), parse_all(usage_raw)
    assert plain_payloads[-1] == usage_payloads[-1] == b"[DONE]"
    assert len(usage_payloads) == len(plain_payloads) + 1
    assembled = assemble(Endpoint.CHAT, [orjson.loads(p) for p in usage_payloads[:-1]])
    assert assembled == normalise_response(answer("one two three"))


async def test_streamed_follower_of_a_plain_leader_gets_a_replay() -> None:
    flights: SingleFlight[bytes, bytes] = SingleFlight()
    leader = flights.join("k")
    follower = flights.join("k")
    assert isinstance(leader, Leader) and isinstance(follower, Follower)
    assert not follower.streaming
    request = body("q", stream_options={"include_usage": True})
    task = asyncio.create_task(_collect_sse(follower, request))
    await asyncio.sleep(0)
    leader.finish(orjson.dumps(answer("four")))
    payloads = parse_all(await task)
    assert payloads[-1] == b"[DONE]"
    assembled = assemble(Endpoint.CHAT, [orjson.loads(p) for p in payloads[:-1]])
    assert assembled["choices"][0]["message"]["content"] == "four"
    assert assembled["usage"] == answer("four")["usage"]


async def _collect_sse(follower: Follower[bytes, bytes], request: dict[str, Any]) -> bytes:
    events = follow_as_sse(follower, Endpoint.CHAT, include_usage=wants_usage(request))
    return b"".join([e async for e in events])


async def test_long_questions_are_matched_exactly_only(cache: ResponseCache) -> None:
    prefix = "word " * 300  # beyond what the embedding model reads
    await cache.store_response(keys_for(prefix + "ending one"), answer("1"), embedding=vec(1))
    assert len(cache.index) == 0
    assert await cache.lookup(keys_for(prefix + "ending two"), embedding=vec(1)) is None
    assert await cache.lookup(keys_for(prefix + "ending one"), embedding=vec(1)) is not None


def _snapshotting(
    tmp_path: Path, clock: Clock, index: SemanticIndex, *, threshold: float
) -> ResponseCache:
    """A cache on the disk store in ``tmp_path/c`` that snapshots its index to ``tmp_path/snap``."""
    return ResponseCache(
        DiskStore(tmp_path / "c"),
        index=index,
        verifier=CosineVerifier(threshold),
        clock=clock,
        snapshot_dir=tmp_path / "snap",
    )


async def test_restart_from_a_snapshot_reconciles_with_the_store(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cache.index import SemanticIndex

    def make() -> ResponseCache:
        return _snapshotting(tmp_path, clock, SemanticIndex(DIM, flat_limit=4), threshold=0.99)

    first = make()
    await first.start()
    await first.ready()

    def one_hot(i: int) -> np.ndarray:
        v = np.zeros(DIM, dtype=np.float32)
        v[i] = 1.0
        return v

    for i in range(7):
        await first.store_response(keys_for(f"q{i}"), answer(str(i)), embedding=one_hot(i))
    await first.aclose()  # saves the snapshot
    assert (tmp_path / "snap" / "manifest.json").exists()

    # while the proxy is down: one entry disappears, one arrives without the index knowing
    offline = DiskStore(tmp_path / "c")
    await offline.delete([keys_for("q3").exact])
    await offline.close()
    late = make()
    await late.store_response(keys_for("q7"), answer("7"), embedding=one_hot(7))
    await late.store.close()

    added: list[int] = []
    original = SemanticIndex.add_many

    def spy(self: SemanticIndex, partition: str, labels: Any, vectors: np.ndarray) -> None:
        added.append(len(labels))
        original(self, partition, labels, vectors)

    monkeypatch.setattr(SemanticIndex, "add_many", spy)
    second = make()
    await second.start()
    await second.ready()
    assert added == [1]  # only the late entry: the rest came from the snapshot
    assert len(second.index) == 7
    assert await second.lookup(keys_for("Q7"), embedding=one_hot(7)) is not None
    assert await second.lookup(keys_for("Q3"), embedding=one_hot(3)) is None
    hit = await second.lookup(keys_for("Q5"), embedding=one_hot(5))
    assert hit is not None and hit.meta.query_text == "q5"
    await second.aclose()


async def test_a_truncated_snapshot_is_rebuilt_from_the_store(tmp_path: Path, clock: Clock) -> None:
    from proxy.cache.index import SemanticIndex

    def make() -> ResponseCache:
        return _snapshotting(tmp_path, clock, SemanticIndex(DIM), threshold=0.9)

    first = make()
    await first.start()
    await first.ready()
    await first.store_response(keys_for("capital of France?"), answer("Paris"), embedding=vec(1))
    await first.aclose()  # saves the snapshot
    flat = tmp_path / "snap" / "flat.npz"
    flat.write_bytes(flat.read_bytes()[:100])  # a crash or a full disk while it was written

    second = make()
    await second.start()
    await second.ready()
    assert len(second.index) == 1
    hit = await second.lookup(keys_for("France's capital?"), embedding=vec(1, 0.05))
    assert hit is not None and hit.kind == "semantic"
    await second.aclose()


class FlakyScans(DiskStore):
    """A disk store whose first ``failures`` scans fail (a backend in trouble at start-up: Redis
    paused, or its client backing off after a failed request)."""

    def __init__(self, directory: Path, failures: int = 1) -> None:
        super().__init__(directory)
        self.failures = failures
        self.scans = 0

    async def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        self.scans += 1
        if self.scans <= self.failures:
            raise CacheBackendError("redis unavailable (retrying after back-off): scan")
        async for entry in super().scan(with_embedding=with_embedding):
            yield entry


class FollowedFlakyScans(FlakyScans):
    async def follow(self) -> AsyncIterator[EntryAdded | Resync]:
        yield Resync()
        await asyncio.Event().wait()  # nothing more from other replicas


async def _store_one(directory: Path) -> None:
    other = ResponseCache(DiskStore(directory), index=SemanticIndex(DIM))
    async with other:
        await other.ready()
        await other.store_response(
            keys_for("capital of France?"), answer("Paris"), embedding=vec(1)
        )


@pytest.mark.parametrize("store_class", [FlakyScans, FollowedFlakyScans])
async def test_a_failed_index_rebuild_is_tried_again(
    tmp_path: Path, store_class: type[FlakyScans]
) -> None:
    await _store_one(tmp_path / "c")
    recorder = Recorder()
    store = store_class(tmp_path / "c", failures=2)
    cache = ResponseCache(
        store,
        config=CacheConfig(rebuild_retry_s=0.01),
        index=SemanticIndex(DIM),
        verifier=CosineVerifier(0.9),
        observer=recorder,
    )
    async with cache:
        await cache.ready()  # after the first try, failed: lookups need not wait for the rest
        for _ in range(300):
            if len(cache.index) == 1:
                break
            await asyncio.sleep(0.01)
        assert store.scans == 3 and len(cache.index) == 1
        assert recorder.errors == ["rebuild", "rebuild"]  # counted, each time
        hit = await cache.lookup(keys_for("France's capital?"), embedding=vec(1, 0.05))
        assert hit is not None and hit.kind == "semantic"


class DuplicateScans(DiskStore):
    """Redis's SCAN guarantees every key at least once, not exactly once."""

    async def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        async for entry in super().scan(with_embedding=with_embedding):
            yield entry
            yield entry


async def test_a_rebuild_takes_a_key_scanned_twice_once(tmp_path: Path) -> None:
    first = ResponseCache(DiskStore(tmp_path / "c"), index=SemanticIndex(DIM))
    rng = np.random.default_rng(1)
    async with first:
        await first.ready()
        for i in range(10):
            vector = rng.normal(size=DIM)
            await first.store_response(keys_for(f"q{i}"), answer(str(i)), embedding=vector)
    # past flat_limit a context is bulk-added into a graph, which refuses a label twice
    second = ResponseCache(DuplicateScans(tmp_path / "c"), index=SemanticIndex(DIM, flat_limit=4))
    async with second:
        await second.ready()
        context = keys_for("q0").context
        assert context is not None and len(second.index.labels(context)) == 10


class HeldEmbedding:
    """A background encoder that answers (with one fixed vector) only once released."""

    def __init__(self) -> None:
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def embed(self, text: str) -> np.ndarray:
        await self._released.wait()
        return vec(1, 0.1)


async def stored_before_embedded(cache: ResponseCache) -> tuple[HeldEmbedding, CacheKeys]:
    """Paris for "capital of France?", stored exact at once; its embedding held back."""
    held = HeldEmbedding()
    keys = keys_for("capital of France?")
    cache.store_when_embedded(keys, orjson.dumps(answer("Paris")), held.embed)
    for _ in range(500):
        if await cache.store.get(keys.exact) is not None:
            return held, keys
        await asyncio.sleep(0.01)
    raise AssertionError("the exact entry was never stored")


async def test_an_answer_stored_before_its_embedding_is_found_by_meaning_once_it_has_one(
    cache: ResponseCache,
) -> None:
    held, _ = await stored_before_embedded(cache)
    assert await cache.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12)) is None
    held.release()
    await cache.drain()
    hit = await cache.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12))
    assert hit is not None and hit.kind == "semantic"
    stats = (await cache.stats()).to_json()
    assert stats["late_embeddings"] == {"waiting": 0, "added": 1, "dropped": 0}


async def test_a_late_embedding_never_brings_back_an_invalidated_entry(
    cache: ResponseCache,
) -> None:
    held, keys = await stored_before_embedded(cache)
    assert await cache.invalidate(InvalidationFilter(engine="large")) == 1
    held.release()
    await cache.drain()
    assert await cache.lookup(keys) is None
    assert await cache.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12)) is None
    assert await cache.store.count() == 0


async def test_late_embeddings_are_bounded(cache: ResponseCache) -> None:
    from proxy.cache.service import LATE_EMBEDDINGS

    held = HeldEmbedding()
    for i in range(LATE_EMBEDDINGS + 3):
        keys = keys_for(f"question {i}")
        cache.store_when_embedded(keys, orjson.dumps(answer("a")), held.embed)
    assert cache.late_embeddings_dropped == 3
    held.release()
    await cache.drain()
    assert await cache.store.count() == LATE_EMBEDDINGS + 3  # every answer stored exactly
    assert cache.late_embeddings_dropped == 3


async def test_the_disk_stores_inline_paths_count_as_the_awaited_ones(tmp_path: Path) -> None:
    """A lookup and a background store call the disk store's get and put inline (no coroutine,
    no task): their outcomes and failures are counted as through ``_guarded`` and
    ``store_response``."""
    recorder = Recorder()
    store = DiskStore(tmp_path / "c", max_pending=1)
    cache = ResponseCache(store, observer=recorder)
    stored = cache.store_in_background(keys_for("q"), orjson.dumps(answer("a")))
    assert stored.done() and stored.result() is True  # at once: the put only queues
    hit = await cache.lookup(keys_for("q"))
    assert hit is not None and hit.kind == "exact"
    # the queue is full: StoreBusy, a failed store and no backend error
    busy = cache.store_in_background(keys_for("r"), answer("b"))
    assert busy.result() is False
    assert recorder.stores == ["stored", "failed"] and cache._backend_errors == 0
    rejected = cache.store_in_background(keys_for("s"), answer("c", reason="abort"))
    assert rejected.result() is False and recorder.stores[-1] == "rejected"

    def broken(key: str) -> None:
        raise OSError("disk gone")

    store.get_sync = broken  # type: ignore[method-assign]
    assert await cache.lookup(keys_for("q")) is None
    assert recorder.errors == ["get"] and cache._backend_errors == 1
    assert recorder.lookups == ["exact", "miss"]
    await cache.aclose()


async def test_a_disk_store_subclass_with_its_own_get_and_put_is_awaited(tmp_path: Path) -> None:
    calls: list[str] = []

    class Watched(DiskStore):
        async def get(self, key: str) -> CacheEntry | None:
            calls.append("get")
            return await super().get(key)

        async def put(self, entry: CacheEntry) -> None:
            calls.append("put")
            await super().put(entry)

    cache = ResponseCache(Watched(tmp_path / "c"))
    assert await cache.store_in_background(keys_for("q"), answer("a"))
    assert await cache.lookup(keys_for("q")) is not None
    assert calls == ["put", "get"]
    await cache.aclose()


async def test_an_answer_parsed_by_the_caller_is_not_parsed_again(tmp_path: Path) -> None:
    """``parsed`` decides whether the answer is storable; the bytes given are what is stored."""
    cache = ResponseCache(DiskStore(tmp_path / "c"))
    raw = orjson.dumps(answer("a"))
    assert await cache.store_response(keys_for("q"), raw, parsed=orjson.loads(raw))
    hit = await cache.lookup(keys_for("q"))
    assert hit is not None and hit.response == raw
    unfinished = orjson.loads(raw)
    unfinished["choices"][0]["finish_reason"] = None
    assert not cache.store_in_background(keys_for("r"), raw, parsed=unfinished).result()
    assert (await cache.stats()).stores == {"stored": 1, "rejected": 1, "failed": 0, "bypass": 0}
    await cache.aclose()
