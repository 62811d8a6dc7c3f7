"""``ResponseCache``: the facade the request pipeline calls.

    keys = make_keys(Endpoint.CHAT, body, engine="large", version=v, partition=partition)
    hit = await cache.lookup(keys, embedding=vector, mode=mode)     # exact, then semantic
    if hit is None:
        flight = cache.flights.join(keys.exact)                     # single-flight the miss
        ...
        cache.store_in_background(keys, body_bytes, embedding=vector, compute_seconds=t)

Lookups are exact first (the sha256 key of every answer-shaping field, see ``keys.py``), then
semantic: the nearest cached questions under the same context key (same engine version, same
partition, same everything except the last user turn's text) are fetched and handed to the
verifier, which picks one or none. A backend failure is a miss or a skipped write, counted and
logged, never an error for the client; admin operations (invalidate, import) fail with
``ServiceUnavailable`` instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

import numpy as np
import orjson
from mypy_extensions import mypyc_attr

from proxy.cache import guards
from proxy.cache.entry import (
    CacheEntry,
    EntryMeta,
    is_expired,
    refresh_early,
)
from proxy.cache.index import SemanticIndex
from proxy.cache.keys import CacheKeys, Endpoint, Partition, Scope, is_storable_response, make_keys
from proxy.cache.modes import CacheMode
from proxy.cache.singleflight import Follower, SingleFlight
from proxy.cache.store import (
    CacheStore,
    DiskStore,
    EntryAdded,
    FollowableStore,
    Resync,
    StoreBusy,
    followable,
)
from proxy.cache.stream_codec import replay_sse
from proxy.errors import InvalidRequest, ServiceUnavailable
from proxy.sse import DONE_EVENT, frame
from proxy.tasks import cancelling, stop
from proxy.wire import Kind, parse_request

log = logging.getLogger(__name__)

LookupOutcome = Literal["exact", "semantic", "miss", "refresh", "bypass"]
StoreOutcome = Literal["stored", "rejected", "failed", "bypass"]
Encode = Callable[[list[str]], np.ndarray]
_T = TypeVar("_T")
# Answers stored exact-only while the encoder was busy that may wait at once for their
# question's embedding (encoded at the lowest CPU priority, when the cores are otherwise idle).
LATE_EMBEDDINGS: Final = 256


# ---------------------------------------------------------------------------------------------
# seams: verifier and metrics observer


@dataclass(frozen=True, slots=True)
class SemanticCandidate:
    """A cached question close to the incoming one, for the verifier."""

    text: str
    similarity: float
    age_seconds: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verifier's choice: which candidate answers the query, and its score."""

    index: int
    score: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """The verifier served none of the candidates; ``reason`` is why it refused the most similar
    one (:func:`proxy.cache.verifier.accept`'s reasons: ``below_threshold``, ``veto_<guard>``,
    ``verifier_reject``), counted on ``/metrics`` so an operator sees what keeps hits away."""

    reason: str


class SemanticVerifier(Protocol):
    """Decides whether a cached question asks the same thing as the query.

    Called with candidates best-cosine first; returns the accepted one, or a :class:`Refusal`
    (None: refused, no reason given). It may be slow
    (a model): ``ResponseCache`` calls it off the event loop unless ``cheap`` is True or
    ``ready`` says this call needs no model work (its inputs are prepared: then the call is a
    fraction of a millisecond, less than the two thread hand-offs it would otherwise cost).
    ``cutoff`` replaces the verifier's own acceptance cut-off for this call (a tier's fixed or
    self-tuned value, see proxy/shadow/tuner.py); None keeps its own.
    """

    @property
    def cheap(self) -> bool: ...

    def ready(self, query: str, candidates: Sequence[SemanticCandidate]) -> bool: ...

    def reads_whole(self, text: str, *, count: bool = True) -> bool:
        """Whether the embedding model reads all of ``text`` (a text past its window embeds like
        any other with the same start: such a question is matched exactly only). ``count=False``
        asks for a quick answer, without tokenizing a text the model has not reported on."""
        ...

    def select(
        self,
        query: str,
        candidates: Sequence[SemanticCandidate],
        *,
        cutoff: float | None = None,
    ) -> Verdict | Refusal | None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # (a verifier to build on, compiled or not)
@dataclass(frozen=True, slots=True)
class CosineVerifier:
    """Default verifier: the most similar candidate if its cosine reaches ``threshold`` (its only
    cut-off, so a ``cutoff`` given per call replaces it)."""

    threshold: float = 0.92
    cheap: bool = True

    def ready(self, query: str, candidates: Sequence[SemanticCandidate]) -> bool:
        return True

    def reads_whole(self, text: str, *, count: bool = True) -> bool:
        return True  # no model of its own: the caller's embedder is trusted to read every text

    def select(
        self,
        query: str,
        candidates: Sequence[SemanticCandidate],
        *,
        cutoff: float | None = None,
    ) -> Verdict | Refusal | None:
        threshold = self.threshold if cutoff is None else cutoff
        best = max(range(len(candidates)), key=lambda i: candidates[i].similarity, default=None)
        if best is None:
            return None
        if candidates[best].similarity < threshold:
            return Refusal("below_threshold")
        return Verdict(best, candidates[best].similarity)


class CacheObserver(Protocol):
    """Metrics hooks (the metrics module implements this; the cache does not import it).

    Each failure is reported once: a put that failed (the backend's failure or ``StoreBusy``)
    as ``on_store("failed")``, a failure of any other operation as ``on_backend_error``."""

    def on_lookup(self, outcome: LookupOutcome, seconds: float) -> None: ...

    def on_store(self, outcome: StoreOutcome) -> None: ...

    def on_backend_error(self, operation: str, error: BaseException) -> None: ...

    def on_semantic_refusal(self, reason: str) -> None: ...


class NullObserver:
    def on_lookup(self, outcome: LookupOutcome, seconds: float) -> None:
        pass

    def on_store(self, outcome: StoreOutcome) -> None:
        pass

    def on_backend_error(self, operation: str, error: BaseException) -> None:
        pass

    def on_semantic_refusal(self, reason: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# configuration and results

DEFAULT_TTLS: dict[Scope, float] = {
    Scope.GLOBAL: 7 * 86400.0,
    Scope.TIER: 7 * 86400.0,
    Scope.TENANT: 86400.0,
    Scope.USER: 3600.0,
}


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl_seconds: Mapping[Scope, float] = field(default_factory=lambda: dict(DEFAULT_TTLS))
    # XFetch beta: 0 disables early refresh; >1 refreshes earlier.
    xfetch_beta: float = 1.0
    # How many nearest questions the verifier sees, and the cosine below which none is shown.
    semantic_candidates: int = 4
    semantic_floor: float = 0.7
    # Longer questions are matched exactly only, without asking the verifier whether its model
    # reads them whole (MiniLM reads 128 word pieces: far fewer than 1,000 characters of text).
    semantic_max_chars: int = 1000
    # A failed index rebuild is tried again after this many seconds, doubling up to the maximum
    # (the semantic index stays as it was meanwhile: exact hits and entries stored since).
    rebuild_retry_s: float = 1.0
    rebuild_retry_max_s: float = 30.0
    # Entries the store drops by itself (the disk store's size-limit eviction, TTL expiry) stay
    # in the index until a lookup happens upon them: under sustained unique questions it would
    # hold every question ever stored. Once it holds twice what the last rebuild found (and
    # this many more), it is rebuilt from the store.
    index_slack: int = 100_000

    def ttl(self, scope: Scope) -> float:
        return float(self.ttl_seconds.get(scope, DEFAULT_TTLS[scope]))


# A request's outcome when it looked up more than once: its hit, else an early refresh, else a
# miss (bypass: it did not read the cache at all).
_PRECEDENCE: dict[LookupOutcome, int] = {
    "bypass": 0,
    "miss": 1,
    "refresh": 2,
    "exact": 3,
    "semantic": 3,
}


@dataclass(slots=True)
class LookupTally:
    """One request's lookups, counted as one outcome.

    A request may look up more than once: the pipeline reads the strongest engine's exact key
    before routing, then the routed engines' keys (exact and by meaning) after. Counted per call,
    each missing request would count two misses or more. ``lookup(tally=...)`` notes each call's
    outcome here instead, and :meth:`ResponseCache.count_lookups` counts the request once, when
    its lookups are done: its hit, else ``refresh`` if one lookup refreshed early, else
    ``miss``; the time is that of all its lookups. (A request that fails between its lookups,
    e.g. refused by routing, is not counted, as the pipeline's own lookup metrics are not.)"""

    outcome: LookupOutcome | None = None
    seconds: float = 0.0

    def note(self, outcome: LookupOutcome, seconds: float) -> None:
        self.seconds += seconds
        if self.outcome is None or _PRECEDENCE[outcome] > _PRECEDENCE[self.outcome]:
            self.outcome = outcome


@dataclass(frozen=True, slots=True)
class CacheHit:
    kind: Literal["exact", "semantic"]
    # The stored response body (JSON bytes as the engine produced it; for streamed answers the
    # assembled body). Ids/created are the original answer's; the pipeline serves fresh ones.
    response: bytes
    similarity: float  # 1.0 for exact hits
    score: float | None  # the verifier's score for semantic hits
    age_seconds: float
    meta: EntryMeta

    def json(self) -> dict[str, Any]:
        body = orjson.loads(self.response)
        assert isinstance(body, dict)
        return body


@dataclass(slots=True)
class CacheStats:
    lookups: dict[str, int]
    stores: dict[str, int]
    backend_errors: int
    index_entries: int
    index_partitions: int
    stored_entries: int | None
    inflight: int
    # answers stored exact-only while the encoder was busy: embeddings waiting, added, dropped
    late_embeddings: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "lookups": dict(self.lookups),
            "stores": dict(self.stores),
            "backend_errors": self.backend_errors,
            "index_entries": self.index_entries,
            "index_partitions": self.index_partitions,
            "stored_entries": self.stored_entries,
            "inflight": self.inflight,
            "late_embeddings": dict(self.late_embeddings),
        }


@dataclass(frozen=True, slots=True)
class InvalidationFilter:
    """Entries matching every given field are invalidated (no field: everything)."""

    engine: str | None = None
    version: str | None = None
    scope: Scope | None = None
    partition: Partition | None = None
    older_than_seconds: float | None = None

    def matches(self, meta: EntryMeta, now: float) -> bool:
        return (
            (self.engine is None or meta.engine == self.engine)
            and (self.version is None or meta.version == self.version)
            and (self.scope is None or meta.scope == self.scope.value)
            and (self.partition is None or meta.partition == self.partition.id)
            and (self.older_than_seconds is None or now - meta.created_at > self.older_than_seconds)
        )


# ---------------------------------------------------------------------------------------------


class ResponseCache:
    def __init__(
        self,
        store: CacheStore,
        *,
        config: CacheConfig | None = None,
        index: SemanticIndex | None = None,
        verifier: SemanticVerifier | None = None,
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[], float] = random.random,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.store = store
        # The disk store as it is (not a subclass with its own get or put): its get reads
        # inline and its put only queues, so a lookup and a store call them directly (see
        # ``_get_now``, ``_store_now``).
        self._disk: DiskStore | None = (
            store
            if isinstance(store, DiskStore)
            and type(store).get is DiskStore.get
            and type(store).put is DiskStore.put
            else None
        )
        # where the semantic index is saved at shutdown and loaded at start-up (optional: without
        # it every start rebuilds the graphs from the store, minutes at a million entries)
        self.snapshot_dir = snapshot_dir
        self.config = config if config is not None else CacheConfig()
        # (an empty index is falsy: it has __len__)
        self.index = index if index is not None else SemanticIndex()
        self.verifier: SemanticVerifier = verifier if verifier is not None else CosineVerifier()
        self.observer: CacheObserver = observer if observer is not None else NullObserver()
        # chunks: SSE data payloads (JSON bytes, no framing, no [DONE]); result: the full
        # response body JSON (assembled for streamed answers). See ``follow_as_sse``.
        self.flights: SingleFlight[bytes, bytes] = SingleFlight()
        self._clock = clock
        self._uniform = uniform
        # label -> (exact key, context key) for entries in the semantic index
        self._labels: dict[int, tuple[str, str]] = {}
        self._lookups = dict.fromkeys(("exact", "semantic", "miss", "refresh", "bypass"), 0)
        self._stores = dict.fromkeys(("stored", "rejected", "failed", "bypass"), 0)
        self._backend_errors = 0
        self._backend_down = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # the task keeping the index in step with the store: the start-up rebuild (retried until it
        # succeeds) and, for a shared store, following other replicas' entries
        self._indexer: asyncio.Task[None] | None = None
        self._rebuilding: list[CacheEntry] | None = None
        self._rebuilt = False  # a rebuild has succeeded: the index holds the whole store
        self._prune_at = self.config.index_slack  # index size that starts a pruning rebuild
        self._pruning: asyncio.Task[None] | None = None
        # How often a rebuild reading a large store logs how far it has come (checked every
        # progress_rows entries read).
        self.progress_every_s = 5.0
        self.progress_rows = 4096
        self._ready = asyncio.Event()
        self._late_embeddings = 0  # answers waiting for their question's embedding
        self.late_embeddings_added = 0
        self.late_embeddings_dropped = 0  # answers left exact-only: too many waiting, or failed

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the semantic index from the store (in the background) and, for a shared
        store, follow entries other replicas add. Lookups work meanwhile (exact only)."""
        shared = followable(self.store)
        if shared is not None:
            self._indexer = asyncio.create_task(self._follow(shared), name="cache-follow")
        else:
            self._indexer = asyncio.create_task(self._initial_rebuild(), name="cache-rebuild")

    async def _initial_rebuild(self) -> None:
        failures = 0
        while True:
            try:
                await self.rebuild_index(use_snapshot=True)
                return
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc  # a stop that surfaced as a timeout
                failures += 1
                delay = self._rebuild_failed("rebuild", exc, failures)
            finally:
                self._ready.set()  # lookups go on meanwhile (exact, and entries stored since)
            await asyncio.sleep(delay)

    async def ready(self) -> None:
        """Wait until the start-up index rebuild has finished (or failed once: it is tried
        again in the background)."""
        await self._ready.wait()

    async def aclose(self) -> None:
        await stop(self._indexer)
        await self.drain()
        await self.index.wait_idle()
        await self.save_snapshot()
        await self.store.close()

    async def drain(self) -> None:
        """Wait for background stores (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aenter__(self) -> ResponseCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def run_in_background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that feeds the cache beyond its request (kept alive; ``drain`` awaits it)."""
        return self._spawn(coro)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- keys -----------------------------------------------------------------------------------

    @staticmethod
    def keys(
        endpoint: Endpoint,
        body: Mapping[str, Any],
        *,
        engine: str,
        version: str,
        partition: Partition,
    ) -> CacheKeys:
        return make_keys(endpoint, body, engine=engine, version=version, partition=partition)

    # -- lookup ---------------------------------------------------------------------------------

    async def lookup(
        self,
        keys: CacheKeys,
        *,
        embedding: np.ndarray | None = None,
        mode: CacheMode = CacheMode.ON,
        semantic: bool = True,
        cutoff: float | None = None,
        refused: list[CacheHit] | None = None,
        max_age: float | None = None,
        exact: bool = True,
        tally: LookupTally | None = None,
    ) -> CacheHit | None:
        """Exact hit, else a verified semantic hit, else None (a miss; also on backend errors).

        ``embedding`` is the last user turn's embedding; without it only exact lookup runs.
        ``cutoff`` overrides the verifier's acceptance cut-off for this lookup (per tier).
        ``refused``, when given, receives the best candidate of a semantic miss that passed the
        cosine gate and the guards and was refused only by the cut-off (never served: it feeds
        counterfactual audits, see proxy/shadow/tuner.py).
        ``max_age`` is the reader's own TTL: no entry older than it is served, whatever TTL it
        was stored with (a scope shared by tiers with different TTLs). ``exact=False`` skips the
        exact read (the caller has just made it; a second draw could undo an early refresh).
        ``tally``: this lookup is one of a request's several, counted together by
        :meth:`count_lookups` (without it, it is counted as the request's only lookup).
        """
        started = time.perf_counter()
        outcome: LookupOutcome = "miss"
        hit: CacheHit | None = None
        try:
            if not mode.read:
                outcome = "bypass"
                return None
            now = self._clock()
            entry: CacheEntry | None = None
            if exact:
                if self._disk is not None:
                    entry = self._get_now(self._disk, keys.exact)
                else:
                    entry = await self._guarded("get", self.store.get(keys.exact))
            if (
                entry is not None
                and self._belongs(entry.meta, keys)
                and not is_expired(entry.meta, now, max_age)
            ):
                if refresh_early(
                    entry.meta,
                    now,
                    beta=self.config.xfetch_beta,
                    uniform=self._uniform(),
                    max_age=max_age,
                ):
                    outcome = "refresh"
                    return None
                hit = CacheHit(
                    "exact", entry.response, 1.0, None, now - entry.meta.created_at, entry.meta
                )
                outcome = "exact"
                return hit
            if semantic and embedding is not None and self._semantic_ok(keys):
                hit = await self._semantic(keys, embedding, now, cutoff, refused, max_age)
                if hit is not None:
                    outcome = "semantic"
            return hit
        finally:
            seconds = time.perf_counter() - started
            if tally is None:
                self._count_lookup(outcome, seconds)
            else:
                tally.note(outcome, seconds)

    def _get_now(self, store: DiskStore, key: str) -> CacheEntry | None:
        """``store.get`` guarded (as ``_guarded`` does it): the disk store's read runs inline
        anyway (see store.py), so it is called as it is, without its coroutine and the
        guard's."""
        try:
            entry = store.get_sync(key)
        except Exception as exc:
            self._backend_error("get", exc)
            return None
        self._backend_ok()
        return entry

    def count_lookups(self, tally: LookupTally) -> None:
        """Count a request's lookups as one outcome (see :class:`LookupTally`): once, however
        often this is called; nothing if it made none."""
        if tally.outcome is not None:
            self._count_lookup(tally.outcome, tally.seconds)
            tally.outcome, tally.seconds = None, 0.0

    def _count_lookup(self, outcome: LookupOutcome, seconds: float) -> None:
        self._lookups[outcome] += 1
        self.observer.on_lookup(outcome, seconds)

    def semantic_fits(self, text: str, *, count: bool = True) -> bool:
        """Whether a question of this text may be matched by meaning: short enough, and read
        whole by the embedding model (else two questions after the same long context would
        embed alike and one would be served the other's answer). ``count=False``: a quick
        answer that may still say yes to a text the model turns out not to read whole."""
        return self.exact_only_reason(text, count=count) is None

    def exact_only_reason(self, text: str, *, count: bool = True) -> str | None:
        """Why a question of this text is matched exactly only (``too_long``: over
        ``semantic_max_chars``; ``no_words``: not one letter or digit, so nothing for a model
        of meaning to read (whitespace, control characters, emoji, punctuation: such texts
        embed alike); ``past_window``: the embedding model does not read it whole), or None
        when it may be matched by meaning."""
        if len(text) > self.config.semantic_max_chars:
            return "too_long"
        if not guards.has_words(text):
            return "no_words"
        if not self.verifier.reads_whole(text, count=count):
            return "past_window"
        return None

    def _semantic_ok(self, keys: CacheKeys) -> bool:
        return (
            keys.context is not None
            and keys.query_text is not None
            and self.semantic_fits(keys.query_text)
        )

    @staticmethod
    def _belongs(meta: EntryMeta, keys: CacheKeys) -> bool:
        # The keys already hash these; checking again costs nothing and makes a served entry
        # from another engine version or partition impossible even on a hash collision.
        return (
            meta.engine == keys.engine
            and meta.version == keys.version
            and meta.partition == keys.partition.id
            and meta.endpoint == keys.endpoint.value
        )

    async def _semantic(
        self,
        keys: CacheKeys,
        embedding: np.ndarray,
        now: float,
        cutoff: float | None = None,
        refused: list[CacheHit] | None = None,
        max_age: float | None = None,
    ) -> CacheHit | None:
        assert keys.context is not None and keys.query_text is not None
        query = np.asarray(embedding, dtype=np.float32).reshape(-1)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        found = self.index.search(keys.context, query, self.config.semantic_candidates)
        near = [(label, cos) for label, cos in found if cos >= self.config.semantic_floor]
        if not near:
            return None
        wanted = {label: self._labels[label][0] for label, _ in near if label in self._labels}
        entries = await self._guarded("get_many", self.store.get_many(list(wanted.values())))
        if entries is None:
            return None
        candidates: list[tuple[CacheEntry, float]] = []
        for label, cos in near:
            key = wanted.get(label)
            entry = entries.get(key) if key is not None else None
            if entry is None:
                self._forget(label)  # expired or invalidated elsewhere: drop from the index
                continue
            meta = entry.meta
            if (
                # this very request's entry is the exact lookup's to serve or refuse (expired,
                # or refreshed early): never served again as a paraphrase of itself
                meta.key != keys.exact
                and self._belongs(meta, keys)
                and meta.context == keys.context
                and meta.query_text is not None
                and not is_expired(meta, now, max_age)
            ):
                candidates.append((entry, _exact_cosine(query, entry.embedding, cos)))
        if not candidates:
            return None
        candidates.sort(key=lambda c: -c[1])
        shown = [
            SemanticCandidate(e.meta.query_text or "", cos, now - e.meta.created_at)
            for e, cos in candidates
        ]
        verdict = await self._select(keys.query_text, shown, cutoff)
        if isinstance(verdict, Refusal):
            self.observer.on_semantic_refusal(verdict.reason)
        if not isinstance(verdict, Verdict) or not 0 <= verdict.index < len(candidates):
            if refused is not None:
                # The same choice with no cut-off: the candidate the cut-off alone refused.
                # (The verifier's vectors are remembered by now, so this is the cheap part.)
                best = await self._select(keys.query_text, shown, 0.0)
                if isinstance(best, Verdict) and 0 <= best.index < len(candidates):
                    entry, cos = candidates[best.index]
                    refused.append(
                        CacheHit(
                            "semantic",
                            entry.response,
                            cos,
                            best.score,
                            now - entry.meta.created_at,
                            entry.meta,
                        )
                    )
            return None
        entry, cos = candidates[verdict.index]
        return CacheHit(
            "semantic", entry.response, cos, verdict.score, now - entry.meta.created_at, entry.meta
        )

    async def _select(
        self, query: str, shown: list[SemanticCandidate], cutoff: float | None
    ) -> Verdict | Refusal | None:
        if self.verifier.cheap or self.verifier.ready(query, shown):
            return self.verifier.select(query, shown, cutoff=cutoff)
        return await asyncio.to_thread(
            functools.partial(self.verifier.select, cutoff=cutoff), query, shown
        )

    # -- store ----------------------------------------------------------------------------------

    def store_in_background(
        self,
        keys: CacheKeys,
        response: bytes | Mapping[str, Any],
        **fields: Any,
    ) -> asyncio.Future[bool]:
        """Fire-and-forget ``store_response`` (the task is kept alive until done; ``drain``
        awaits). Into the disk store it is done at once (see :meth:`_store_now`): the future
        returned is already done."""
        store = self._disk
        if store is None:
            task: asyncio.Task[bool] = self._spawn(self.store_response(keys, response, **fields))
            return task
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(self._store_now(store, keys, response, **fields))
        return done

    def store_soon(self, keys: CacheKeys, response: bytes, **fields: Any) -> None:
        """``store_in_background`` for a caller that does not wait for the outcome (every
        miss's answer): without a future nobody reads."""
        store = self._disk
        if store is None:
            self._spawn(self.store_response(keys, response, **fields))
        else:
            self._store_now(store, keys, response, **fields)

    def store_when_embedded(
        self,
        keys: CacheKeys,
        response: bytes,
        embed: Callable[[str], Awaitable[np.ndarray]],
        **kwargs: Any,
    ) -> None:
        """Store now for exact lookups, and add the question's embedding to the entry once ``embed``
        (a background encoder) has it, so that paraphrases can hit: for an answer whose question
        was not embedded because the encoder was busy. The embedding goes only into the entry
        as it then stands (one invalidated, evicted or expired meanwhile stays gone). At most
        ``LATE_EMBEDDINGS`` wait at once; past that the answer stays exact-only (counted in
        ``late_embeddings_dropped``)."""
        stored = self.store_in_background(keys, response, **kwargs)
        text = keys.query_text
        if keys.context is None or text is None or not self.semantic_fits(text, count=False):
            return  # it could not be indexed anyway: no encoder time for it
        if self._late_embeddings >= LATE_EMBEDDINGS:
            self.late_embeddings_dropped += 1
            return
        self._late_embeddings += 1
        self._spawn(self._store_embedded(keys, stored, text, embed))

    async def _store_embedded(
        self,
        keys: CacheKeys,
        stored: asyncio.Future[bool],
        text: str,
        embed: Callable[[str], Awaitable[np.ndarray]],
    ) -> None:
        try:
            embedding = await embed(text)
        except Exception:  # the worker stopped or gave up: the exact entry stands
            self.late_embeddings_dropped += 1
            log.debug("cache.late_embedding_failed", exc_info=True)
            return
        finally:
            self._late_embeddings -= 1
        if not await stored:  # the exact entry was not stored: nothing to add to
            return
        try:
            entry = await self.store.get(keys.exact)
            # Only the entry as it still stands: one invalidated, evicted or expired meanwhile
            # must not come back, and its expiry is kept.
            if entry is None or entry.embedding is not None:
                return
            entry = dataclasses.replace(
                entry, embedding=np.asarray(embedding, dtype=np.float32).reshape(-1)
            )
            await self.store.put(entry)
        except Exception as exc:
            self.late_embeddings_dropped += 1
            self._backend_error("put", exc, observe=False)
            return
        self.late_embeddings_added += 1
        self._index_entry(entry)

    async def store_response(
        self,
        keys: CacheKeys,
        response: bytes | Mapping[str, Any],
        *,
        status: int = 200,
        embedding: np.ndarray | None = None,
        compute_seconds: float = 0.0,
        mode: CacheMode = CacheMode.ON,
        ttl: float | None = None,
        parsed: Mapping[str, Any] | None = None,
    ) -> bool:
        """Store a complete answer. Never raises: returns whether it was stored.

        ``parsed``: ``response``'s bytes as the caller has already parsed them (the pipeline
        has, to count tokens), so they are not parsed again to see whether they are storable;
        what is stored is ``response`` itself."""
        entry = self._storable(
            keys, response, status=status, embedding=embedding, compute_seconds=compute_seconds,
            mode=mode, ttl=ttl, parsed=parsed,
        )  # fmt: skip
        if entry is None:
            return False
        try:
            await self.store.put(entry)
        except Exception as exc:
            return self._put_failed(exc)
        return self._stored(entry)

    def _store_now(
        self, store: DiskStore, keys: CacheKeys, response: bytes | Mapping[str, Any], **fields: Any
    ) -> bool:
        """``store_response`` into the disk store, whose put only queues the entry (its writer
        runs on its own): no coroutine and no task per answer (~4 µs of CPU a miss); the same
        outcomes and counts."""
        entry = self._storable(keys, response, **fields)
        if entry is None:
            return False
        try:
            store.put_nowait(entry)
        except Exception as exc:
            return self._put_failed(exc)
        return self._stored(entry)

    def _storable(
        self,
        keys: CacheKeys,
        response: bytes | Mapping[str, Any],
        *,
        status: int = 200,
        embedding: np.ndarray | None = None,
        compute_seconds: float = 0.0,
        mode: CacheMode = CacheMode.ON,
        ttl: float | None = None,
        parsed: Mapping[str, Any] | None = None,
    ) -> CacheEntry | None:
        """The entry to put, or None (counted: bypass or rejected)."""
        if not mode.write:
            self._count_store("bypass")
            return None
        try:
            # (exact types first: an ABC's isinstance check costs far more)
            answer: Any
            if type(response) is bytes or isinstance(response, bytes | bytearray | memoryview):
                raw = bytes(response)
                answer = orjson.loads(raw) if parsed is None else parsed
            else:
                answer = response
                raw = orjson.dumps(response)
            mapping = type(answer) is dict or isinstance(answer, Mapping)
            if not mapping or not is_storable_response(status, answer):
                self._count_store("rejected")
                return None
            return self._entry(keys, raw, embedding, compute_seconds, ttl)
        except Exception:
            log.warning("cache.store.bad_response", exc_info=True)
            self._count_store("rejected")
            return None

    def _put_failed(self, error: Exception) -> bool:
        if isinstance(error, StoreBusy):
            self._count_store("failed")  # overloaded, not down: no backend-down warning
            return False
        self._backend_error("put", error, observe=False)  # on_store("failed") reports it
        self._count_store("failed")
        return False

    def _stored(self, entry: CacheEntry) -> bool:
        self._backend_ok()
        self._index_entry(entry)
        self._count_store("stored")
        return True

    def _entry(
        self,
        keys: CacheKeys,
        raw: bytes,
        embedding: np.ndarray | None,
        compute_seconds: float,
        ttl: float | None,
    ) -> CacheEntry:
        meta = EntryMeta(
            key=keys.exact,
            context=keys.context,
            endpoint=keys.endpoint.value,
            engine=keys.engine,
            version=keys.version,
            partition=keys.partition.id,
            scope=keys.partition.scope.value,
            created_at=self._clock(),
            ttl=float(ttl if ttl is not None else self.config.ttl(keys.partition.scope)),
            compute_seconds=float(compute_seconds),
            query_text=keys.query_text,
        )
        vector = None
        if embedding is not None and self._semantic_ok(keys):
            vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        return CacheEntry(meta, raw, vector)

    def _count_store(self, outcome: StoreOutcome) -> None:
        self._stores[outcome] += 1
        self.observer.on_store(outcome)

    def _index_entry(self, entry: CacheEntry) -> None:
        meta = entry.meta
        # (another replica's entry too: one of an older version may carry a cut-off embedding)
        if entry.embedding is None or meta.context is None or not self._semantic_ok_meta(meta):
            return
        if self._rebuilding is not None:
            self._rebuilding.append(entry)
            return
        if entry.embedding.shape[0] != self.index.ndim:
            log.warning("cache.index.wrong_dim", extra={"dim": entry.embedding.shape[0]})
            return
        self.index.add(meta.context, meta.label, entry.embedding)
        self._labels[meta.label] = (meta.key, sys.intern(meta.context))
        # (a shared store's follower resyncs by itself; before the first rebuild, that one prunes)
        grown = len(self._labels) > self._prune_at and self._rebuilt and not self.shared
        if grown and self._pruning is None:
            self._pruning = self._spawn(self._prune())

    async def _prune(self) -> None:
        """Rebuild the index from the store to drop the entries the store dropped itself."""
        before = len(self._labels)
        try:
            await self.rebuild_index()
        except Exception as exc:
            self._rebuild_failed("prune", exc, 1)
            self._prune_at = 2 * len(self._labels) + self.config.index_slack  # not at once again
        else:
            log.info("cache.index.pruned", extra={"before": before, "after": len(self._labels)})
        finally:
            self._pruning = None

    def _forget(self, label: int) -> None:
        known = self._labels.pop(label, None)
        if known is not None:
            self.index.remove(known[1], label)

    # -- index rebuild and following other replicas -----------------------------------------------

    async def rebuild_index(self, *, use_snapshot: bool = False) -> int:
        """Rebuild the semantic index from every live entry in the store; returns its size.

        With ``use_snapshot`` (start-up) and a snapshot in ``snapshot_dir``, the saved graphs are
        loaded and reconciled with the store (entries gone are removed, entries the snapshot
        lacks are added) instead of building every graph again. The new index is built on a
        worker thread and swapped in; entries stored meanwhile are added after the swap.

        Raises if the store could not be read (or the index not built): the index then stays as
        it was, with the entries stored meanwhile, and the caller decides when to try again.
        """
        self._rebuilding = []
        try:
            base = await self._load_snapshot() if use_snapshot else None
            known = {name: base.labels(name) for name in base.partitions()} if base else {}
            seen: dict[str, set[int]] = {}
            groups: dict[str, tuple[list[int], list[np.ndarray]]] = {}
            labels: dict[int, tuple[str, str]] = {}
            now = self._clock()
            scanned, reported = 0, time.monotonic()
            async for entry in self.store.scan(with_embedding=True):
                scanned += 1
                if (
                    scanned % self.progress_rows == 0
                    and time.monotonic() - reported >= self.progress_every_s
                ):
                    # a store of millions takes minutes to read: say how far it has come
                    reported = time.monotonic()
                    log.info(
                        "cache.index.rebuilding", extra={"scanned": scanned, "kept": len(labels)}
                    )
                meta = entry.meta
                if (
                    entry.embedding is None
                    or meta.context is None
                    or is_expired(meta, now)
                    or entry.embedding.shape[0] != self.index.ndim
                    or not self._semantic_ok_meta(meta)
                ):
                    continue
                context = sys.intern(meta.context)  # shared by many entries
                in_context = seen.setdefault(context, set())
                if meta.label in in_context:
                    # Redis's SCAN may return a key twice; usearch's bulk add (a context past
                    # flat_limit) refuses a batch with a label in it twice.
                    continue
                in_context.add(meta.label)
                labels[meta.label] = (meta.key, context)
                if meta.label in known.get(context, ()):
                    continue  # already in the snapshot's graph
                ids, vectors = groups.setdefault(context, ([], []))
                ids.append(meta.label)
                vectors.append(entry.embedding)
            fresh = base or SemanticIndex(
                self.index.ndim, flat_limit=self.index.flat_limit, hnsw=self.index.hnsw_params
            )

            def build() -> None:
                for name, have in known.items():
                    for label in have - seen.get(name, set()):
                        fresh.remove(name, label)
                for context, (ids, vectors) in groups.items():
                    fresh.add_many(context, ids, np.stack(vectors))

            if scanned >= self.progress_rows:
                log.info("cache.index.building", extra={"scanned": scanned, "kept": len(labels)})
            await asyncio.to_thread(build)
        except BaseException:
            # (a cancelled rebuild too: later entries must not pile up in the list unindexed)
            pending, self._rebuilding = self._rebuilding, None
            for entry in pending or []:
                self._index_entry(entry)
            raise
        await self.index.wait_idle()
        self.index, self._labels = fresh, labels
        self._rebuilt = True
        self._prune_at = 2 * len(labels) + self.config.index_slack
        pending, self._rebuilding = self._rebuilding, None
        for entry in pending:
            self._index_entry(entry)
        log.info(
            "cache.index.rebuilt",
            extra={"entries": len(self.index), "from_snapshot": base is not None},
        )
        return len(self.index)

    def _semantic_ok_meta(self, meta: EntryMeta) -> bool:
        return meta.query_text is not None and self.semantic_fits(meta.query_text)

    async def _load_snapshot(self) -> SemanticIndex | None:
        folder = self.snapshot_dir
        if folder is None or not (folder / "manifest.json").exists():
            return None
        try:
            snapshot = await asyncio.to_thread(
                SemanticIndex.load,
                folder,
                flat_limit=self.index.flat_limit,
                hnsw=self.index.hnsw_params,
            )
        except ValueError:
            log.warning("cache.index.snapshot_unusable", exc_info=True)
            return None
        return snapshot if snapshot.ndim == self.index.ndim else None

    async def save_snapshot(self) -> bool:
        """Save the semantic index to ``snapshot_dir`` (done by ``aclose``); False on failure.

        Not before a rebuild has succeeded: the index then holds only the entries stored since
        start-up, and would replace a whole snapshot with a partial one."""
        if self.snapshot_dir is None or self._rebuilding is not None or not self._rebuilt:
            return False
        await self.index.wait_idle()
        try:
            await asyncio.to_thread(self.index.save, self.snapshot_dir)
        except (OSError, RuntimeError, ValueError):
            log.warning("cache.index.snapshot_failed", exc_info=True)
            return False
        return True

    async def _follow(self, store: FollowableStore) -> None:
        first = True  # until a rebuild succeeds, it starts from the saved snapshot
        failures = 0
        while True:
            operation = "follow"
            try:
                async for event in store.follow():
                    if isinstance(event, Resync):
                        operation = "rebuild"
                        await self.rebuild_index(use_snapshot=first)
                        operation, first, failures = "follow", False, 0
                        self._ready.set()
                    elif (
                        isinstance(event, EntryAdded) and event.entry.meta.label not in self._labels
                    ):
                        # (our own writes come back through the stream too)
                        self._index_entry(event.entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc  # a stop that surfaced as a timeout
                # A failed rebuild (a timeout on a busy or flaky backend, or Redis's back-off
                # after a failed request) must not end the follower or leave the index without
                # the store's entries until the next outage: release the waiters, and start
                # over after a back-off with a fresh resync (a new stream position, then a scan).
                self._ready.set()
                failures += 1
                await asyncio.sleep(self._rebuild_failed(operation, exc, failures))

    def _rebuild_failed(self, operation: str, error: Exception, failures: int) -> float:
        """Count and log a failed rebuild (or follow); returns how long to wait before the next
        try: ``rebuild_retry_s``, doubling with each failure in a row up to the maximum."""
        self._backend_error(operation, error)
        config = self.config
        delay = min(config.rebuild_retry_s * 2.0 ** (failures - 1), config.rebuild_retry_max_s)
        log.warning(
            "cache.index.rebuild_failed",
            extra={
                "operation": operation,
                "failures": failures,
                "retry_in_s": delay,
                "error": f"{type(error).__name__}: {error}",
            },
        )
        return delay

    # -- invalidation ---------------------------------------------------------------------------

    async def invalidate(self, where: InvalidationFilter) -> int:
        """Delete every entry matching ``where``; returns how many. A backend error raises
        ``ServiceUnavailable`` (an admin operation should say it failed, and why)."""
        now = self._clock()
        try:
            deleted = await self.store.delete_where(lambda meta: where.matches(meta, now))
        except Exception as exc:
            self._backend_error("invalidate", exc)
            raise ServiceUnavailable(
                f"the cache store is unavailable: {type(exc).__name__}: {exc}",
                code="cache_unavailable",
            ) from exc
        for meta in deleted:
            self._forget(meta.label)
        return len(deleted)

    @property
    def shared(self) -> bool:
        """Whether other proxy replicas use this store too (Redis), so it holds what they serve."""
        return followable(self.store) is not None

    async def purge_versions(
        self, keep: Collection[tuple[str, str]], *, engines: Collection[str] | None = None
    ) -> int:
        """Delete entries of every (engine, version) not in ``keep`` (versions no longer served),
        of ``engines`` only when given (a shared store holds other replicas' engines too)."""
        served = set(keep)
        mine = None if engines is None else set(engines)
        deleted = await self.store.delete_where(
            lambda m: (m.engine, m.version) not in served and (mine is None or m.engine in mine)
        )
        for meta in deleted:
            self._forget(meta.label)
        return len(deleted)

    # -- stats ----------------------------------------------------------------------------------

    async def stats(self) -> CacheStats:
        count = await self._guarded("count", self.store.count())
        return CacheStats(
            lookups=dict(self._lookups),
            stores=dict(self._stores),
            backend_errors=self._backend_errors,
            index_entries=len(self.index),
            index_partitions=len(self.index.partition_sizes()),
            stored_entries=count,
            inflight=len(self.flights),
            late_embeddings={
                "waiting": self._late_embeddings,
                "added": self.late_embeddings_added,
                "dropped": self.late_embeddings_dropped,
            },
        )

    # -- warm-up --------------------------------------------------------------------------------

    async def import_jsonl(
        self,
        path: Path,
        *,
        engine: str,
        version: str,
        partition: Partition,
        endpoint: Endpoint = Endpoint.CHAT,
        template: Mapping[str, Any] | None = None,
        encode: Encode | None = None,
        batch_size: int = 64,
        progress: bool = True,
        model: str | None = None,
    ) -> int:
        """Warm the cache from JSONL prompt/answer pairs for one engine version.

        Each line: ``{"prompt": str, "answer": str}`` plus optionally ``"messages"`` (chat only:
        the full conversation instead of a single user turn), ``"request"`` (a complete request
        body; wins over both) and ``"usage"`` (token counts, non-negative integers). Other
        request fields come from ``template`` (default ``{"temperature": 0}``): an entry is only
        hit by requests with the same fields. With ``encode`` the questions are embedded for
        semantic hits. ``model`` is the answers' ``model`` field: the name the engine serves
        (default: the engine's name). Every line is checked before any is stored
        (``InvalidRequest`` naming the first bad line). Returns entries stored.
        """
        from tqdm import tqdm

        text = await asyncio.to_thread(path.read_text)
        rows: list[Any] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"{path}:{number}: not JSON: {exc}") from None
            check_import_row(row, endpoint, f"{path}:{number}")
            rows.append(row)
        stored = 0
        with tqdm(total=len(rows), disable=not progress, unit="pair") as bar:
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                stored += await self._store_rows(
                    batch,
                    engine=engine,
                    version=version,
                    partition=partition,
                    endpoint=endpoint,
                    template=template,
                    encode=encode,
                    model=model,
                )
                bar.update(len(batch))
        return stored

    async def import_rows(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        engine: str,
        version: str,
        partition: Partition,
        endpoint: Endpoint = Endpoint.CHAT,
        template: Mapping[str, Any] | None = None,
        encode: Encode | None = None,
        model: str | None = None,
    ) -> int:
        """Store one batch of import rows (the format of :meth:`import_jsonl`); entries stored.

        Every row is checked first: one that cannot become an entry a request hits and the
        proxy serves raises ``InvalidRequest`` naming ``rows[i]`` and the field, and nothing of
        the batch is stored."""
        for i, row in enumerate(rows):
            check_import_row(row, endpoint, f"rows[{i}]")
        return await self._store_rows(
            rows,
            engine=engine,
            version=version,
            partition=partition,
            endpoint=endpoint,
            template=template,
            encode=encode,
            model=model,
        )

    async def _store_rows(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        engine: str,
        version: str,
        partition: Partition,
        endpoint: Endpoint,
        template: Mapping[str, Any] | None,
        encode: Encode | None,
        model: str | None = None,
    ) -> int:
        """Store rows already checked (``import_jsonl`` checks a whole file first)."""
        base = dict(template) if template is not None else {"temperature": 0}
        items = [
            (
                make_keys(
                    endpoint,
                    _import_request(row, endpoint, base),
                    engine=engine,
                    version=version,
                    partition=partition,
                ),
                _import_response(row, endpoint, model or engine),
            )
            for row in rows
        ]
        vectors: np.ndarray | None = None
        if encode is not None:
            texts = [k.query_text or "" for k, _ in items]
            vectors = await asyncio.to_thread(encode, texts)
        stored = 0
        for i, (keys, response) in enumerate(items):
            vector = vectors[i] if vectors is not None and keys.query_text else None
            ok = await self.store_response(keys, response, embedding=vector)
            if not ok and not self._backend_down and isinstance(self.store, DiskStore):
                # The disk's write queue is full (this import outruns the disk): an import can
                # wait for it, where a live answer is dropped.
                await self.store.flush()
                ok = await self.store_response(keys, response, embedding=vector)
            if not ok:
                # A checked row is only refused by the store: say so rather than report fewer
                # stored (an outage "imported" a file as 0 entries and exit 0).
                why = (
                    "is unavailable" if self._backend_down else "is busy (its write queue is full)"
                )
                raise ServiceUnavailable(
                    f"the cache store {why}: rows[{i}] and the rows after it were not stored "
                    f"(the {stored} before it were)",
                    param=f"rows[{i}]",
                    code="cache_unavailable",
                )
            stored += 1
        return stored

    # -- backend health -------------------------------------------------------------------------

    async def _guarded(self, operation: str, call: Awaitable[_T]) -> _T | None:
        try:
            result = await call
        except Exception as exc:
            self._backend_error(operation, exc)
            return None
        self._backend_ok()
        return result

    def _backend_error(self, operation: str, error: BaseException, *, observe: bool = True) -> None:
        self._backend_errors += 1
        if observe:
            self.observer.on_backend_error(operation, error)
        if not self._backend_down:
            self._backend_down = True
            log.warning(
                "cache.backend.down",
                extra={"operation": operation, "error": f"{type(error).__name__}: {error}"},
            )

    def _backend_ok(self) -> None:
        if self._backend_down:
            self._backend_down = False
            log.warning("cache.backend.recovered")


def _exact_cosine(query: np.ndarray, stored: np.ndarray | None, approximate: float) -> float:
    """Re-score a candidate with its stored embedding: the index may keep vectors quantised
    (i8/bf16), but thresholds and the verifier should see the true cosine."""
    if stored is None or stored.shape != query.shape:
        return approximate
    norm = float(np.linalg.norm(stored))
    return float(stored @ query) / norm if norm > 0 else approximate


# The fields of an import row (``ResponseCache.import_jsonl`` says what each holds).
IMPORT_FIELDS: Final = ("prompt", "messages", "request", "answer", "usage")


def import_row_problem(row: Any, endpoint: Endpoint) -> tuple[str, str] | None:
    """Why ``row`` cannot be imported, as (field path, problem; the path is empty for the row
    itself), or None when it can.

    A row is imported only if it makes an entry that some request can hit and that the proxy
    can serve: a stored ``"usage": "x"`` failed every later request for its prompt, and a row
    whose question no request can ask (``"prompt": 5``) was stored for nothing. The question is
    checked as the proxy checks a request (``parse_request``), built as ``_import_request``
    builds it.
    """
    if not isinstance(row, Mapping):
        return "", "must be a JSON object"
    unknown = sorted(str(k) for k in row if k not in IMPORT_FIELDS)
    if unknown:
        # (a misspelt "mesages" would otherwise be dropped silently and the prompt keyed)
        return unknown[0], f"unknown field; a row holds {', '.join(IMPORT_FIELDS)}"
    if not isinstance(row.get("answer"), str):
        return "answer", "must be a string (the answer's text)"
    usage = row.get("usage")
    if usage is not None:
        if not isinstance(usage, Mapping):
            return "usage", "must be an object of token counts"
        for name, count in usage.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                return f"usage.{name}", f"must be a non-negative integer, not {count!r}"
    kind: Kind = "chat" if endpoint is Endpoint.CHAT else "completion"
    request, messages = row.get("request"), row.get("messages")
    if request is not None:
        if not isinstance(request, Mapping):
            return "request", "must be an object (a complete request body)"
        return _request_problem(request, kind, "request")
    if messages is not None:
        if endpoint is Endpoint.COMPLETIONS:
            return "messages", "is for chat imports; a completions row has a prompt string"
        return _request_problem({"messages": messages}, kind, "")
    if not isinstance(row.get("prompt"), str):
        other = "a request" if endpoint is Endpoint.COMPLETIONS else "messages or a request"
        return "prompt", f"must be a string (or give {other})"
    return None


def check_import_row(row: Any, endpoint: Endpoint, where: str) -> None:
    """Raise ``InvalidRequest`` naming ``where`` (``rows[3]``, ``file:12``) and the field when
    ``row`` cannot be imported (see :func:`import_row_problem`)."""
    problem = import_row_problem(row, endpoint)
    if problem is not None:
        field, what = problem
        name = f"{where}.{field}" if field else where
        raise InvalidRequest(f"{name}: {what}", param=name)


def _request_problem(body: Mapping[str, Any], kind: Kind, prefix: str) -> tuple[str, str] | None:
    # The model is not part of the key (the engine is): a placeholder if the row has none.
    probe = {**body, "model": body.get("model", "import")}
    try:
        parse_request(orjson.dumps(probe), kind)
    except orjson.JSONEncodeError as exc:
        return prefix, f"cannot be written as JSON: {exc}"
    except InvalidRequest as err:
        field = ".".join(p for p in (prefix, err.param) if p)
        return field, err.message
    return None


def _import_request(row: Mapping[str, Any], endpoint: Endpoint, base: Mapping[str, Any]) -> Any:
    # (as import_row_problem checks it: a null request or messages counts as absent)
    request = row.get("request")
    if request is not None:
        return request
    if endpoint is Endpoint.COMPLETIONS:
        return {**base, "prompt": row["prompt"]}
    messages = row.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": row["prompt"]}]
    return {**base, "messages": messages}


def _import_response(row: Mapping[str, Any], endpoint: Endpoint, model: str) -> dict[str, Any]:
    usage = row.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    created = int(time.time())
    if endpoint is Endpoint.COMPLETIONS:
        choice: dict[str, Any] = {
            "index": 0,
            "text": row["answer"],
            "logprobs": None,
            "finish_reason": "stop",
        }
        obj = "text_completion"
    else:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": row["answer"]},
            "logprobs": None,
            "finish_reason": "stop",
        }
        obj = "chat.completion"
    return {
        "id": f"cache-import-{created}",
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def follow_as_sse(
    follower: Follower[bytes, bytes], endpoint: Endpoint, *, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE events for a streamed request that follows another request's flight.

    A streaming leader's chunks are relayed as they come (from the first one); the usage chunk
    is dropped unless this request's client asked for it (``include_usage``, read before the
    pipeline asks the engine for usage on every stream). A non-streaming leader's result is
    replayed. Raises ``LeaderFailed`` if the leader fails (after the chunks already relayed).
    """
    return _FollowAsSse(follower, endpoint, include_usage)


class _FollowAsSse(AsyncIterator[bytes]):
    """:func:`follow_as_sse`: a class, not a generator, so the module compiles (setup.py)."""

    __slots__ = ("_chunks", "_endpoint", "_follower", "_include_usage", "_left")

    def __init__(
        self, follower: Follower[bytes, bytes], endpoint: Endpoint, include_usage: bool
    ) -> None:
        self._follower = follower
        self._endpoint = endpoint
        self._include_usage = include_usage
        self._chunks: AsyncIterator[bytes] | None = None
        self._left: list[bytes] | None = None  # the last events, known at once: sent in order

    async def __anext__(self) -> bytes:
        if self._left is None:
            follower = self._follower
            if follower.streaming:
                if self._chunks is None:
                    self._chunks = follower.chunks()
                async for payload in self._chunks:
                    if self._include_usage or not _is_usage_only(payload):
                        return frame(payload)
                self._left = [DONE_EVENT]
            else:
                result = orjson.loads(await follower.result())
                events = replay_sse(self._endpoint, result, include_usage=self._include_usage)
                self._left = list(events)
            self._left.reverse()
        if not self._left:
            raise StopAsyncIteration
        return self._left.pop()


def _is_usage_only(payload: bytes) -> bool:
    if b'"usage"' not in payload:
        return False
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and not chunk.get("choices") and chunk.get("usage") is not None
