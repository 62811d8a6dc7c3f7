"""Cache audits: a small share of semantic hits is asked of the engine again, in the background.

    auditor.consider(tier=..., cache_policy=policy.cache, engine=engine, kind="chat",
                     body=req.body, hit=hit, cutoff=cutoff)       # returns at once

The user already has the cached answer; the audit is a fire-and-forget task that

- never delays the user: it is spawned after the decision, holds no request ticket, and is dropped
  (counted, not queued) when ``max_concurrent`` audits are in flight or the engine has no free
  admission slot right now; it takes the slot at the lowest priority, so the engine's own cap holds;
- is billed to nobody: it bypasses the tier's rate, token, concurrency and budget counters, and its
  engine cost shows as ``frugal_cache_audit_cost_usd_total`` instead;
- compares the fresh answer with the cached one (:mod:`proxy.shadow.compare`; embeddings through
  the app's batching embedding worker) and hands the outcome to the tuner, which publishes the
  disagreement rate and may move the tier's cut-off;
- is cancelled at shutdown (``aclose`` from the app's cleanup context).

Counterfactual audits (tiers tuned by the evidence rule): on a semantic *miss* whose best
candidate was refused only by the cut-off, :meth:`CacheAuditor.counterfactual` returns a callback
the pipeline calls with the engine's fresh answer once the user has it; the refused candidate's
stored answer is compared with it (no extra engine call) and the tuner records "would have
agreed / disagreed at score s". They draw on the same per-tier sampler as hit audits, so the
scored audits are a uniform sample of everything the cache could serve at any cut-off.

Which hits: systematic sampling per tier (every ``1/share``-th semantic hit), not a random draw,
so the audited share is exact over any stretch of traffic and tests are deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import structlog

from proxy.cache.service import CacheHit
from proxy.engines.client import EngineCaller
from proxy.engines.pool import Engine
from proxy.errors import FrugalError
from proxy.policy.admission import EngineAdmission
from proxy.policy.schema import Cache
from proxy.settings import CacheAuditSettings
from proxy.shadow.compare import CompareMode, answer_text, cosine, judge
from proxy.shadow.metrics import ShadowMetrics
from proxy.shadow.tuner import CacheTuner

log = structlog.get_logger("frugal.shadow")

PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
AUDIT_PRIORITY = -1  # below every tier (policies use 0..1000)
# An audit waits at most this long for its two answers' embeddings. They are encoded at the lowest
# CPU priority (proxy/embeddings/worker.py), so under sustained load they may not run for a long
# time: the audit is then dropped rather than holding one of the ``max_concurrent`` slots.
EMBED_WAIT_S = 10.0

Embed = Callable[[str], Awaitable[np.ndarray]]


class AuditSampler:
    """Every ``1/share``-th event per tier: a credit grows by ``share`` per event and an audit
    is taken each time it reaches 1."""

    __slots__ = ("_credit",)

    def __init__(self) -> None:
        self._credit: dict[str, float] = {}

    def take(self, tier: str, share: float) -> bool:
        if share <= 0:
            return False
        credit = self._credit.get(tier, 0.0) + share
        if credit >= 1.0 - 1e-9:
            self._credit[tier] = credit - 1.0
            return True
        self._credit[tier] = credit
        return False


@dataclass(frozen=True, slots=True)
class _Job:
    tier: str
    cache_policy: Cache
    engine: Engine
    path: str
    body: bytes
    cached_text: str
    cutoff: float | None
    score: float | None


class CacheAuditor:
    def __init__(
        self,
        settings: CacheAuditSettings,
        *,
        caller: EngineCaller,
        tuner: CacheTuner,
        metrics: ShadowMetrics,
        admissions: Mapping[str, EngineAdmission],
        embedder: Callable[[], Embed | None],
    ) -> None:
        self.settings = settings
        self.caller = caller
        self.tuner = tuner
        self.metrics = metrics
        self.admissions = admissions
        self._embedder = embedder
        self.sampler = AuditSampler()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def share(self, cache_policy: Cache) -> float:
        share = cache_policy.audit.share
        return self.settings.share if share is None else share

    def consider(
        self,
        *,
        tier: str,
        cache_policy: Cache,
        engine: Engine | None,
        kind: str,
        body: Mapping[str, Any],
        hit: CacheHit,
        cutoff: float | None,
    ) -> bool:
        """Maybe start an audit of this hit; True when one was started. Never blocks."""
        if self._closed or hit.kind != "semantic" or engine is None:
            return False
        if engine.version != hit.meta.version or kind not in PATHS:
            return False  # the engine serves other weights now: nothing to compare with
        if not self.sampler.take(tier, self.share(cache_policy)):
            return False
        cached_text = answer_text(hit.json())
        if cached_text is None:
            return False
        if len(self._tasks) >= self.settings.max_concurrent or not self._has_room(engine):
            self.metrics.audit(tier, "dropped")
            return False
        fresh = dict(body)
        fresh["model"] = engine.wire_model  # a canary may serve another name than its engine
        fresh["stream"] = False
        fresh.pop("stream_options", None)
        job = _Job(
            tier,
            cache_policy,
            engine,
            PATHS[kind],
            orjson.dumps(fresh),
            cached_text,
            cutoff,
            hit.score,
        )
        task = asyncio.get_running_loop().create_task(self._run(job), name="cache-audit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _has_room(self, engine: Engine) -> bool:
        admission = self.admissions.get(engine.name)
        if admission is None:
            return True
        cap = admission.cap
        return admission.waiting == 0 and (cap is None or admission.active < cap)

    async def _run(self, job: _Job) -> None:
        try:
            fresh = await self._ask(job)
            if fresh is None:
                self.metrics.audit(job.tier, "error")
                return
            agreed = await self._agree(job.cached_text, fresh)
            if agreed is None:
                self.metrics.audit(job.tier, "dropped")
                log.info("cache audit dropped: no CPU to compare the answers", tier=job.tier)
                return
        except asyncio.CancelledError:
            raise
        except (FrugalError, ValueError) as exc:
            self.metrics.audit(job.tier, "error")
            log.info("cache audit failed", tier=job.tier, engine=job.engine.name, error=str(exc))
            return
        except Exception:
            # A background task has nobody to raise to: count and log, never crash the loop.
            self.metrics.audit(job.tier, "error")
            log.warning("cache audit crashed", tier=job.tier, engine=job.engine.name, exc_info=True)
            return
        self.metrics.audit(job.tier, "agree" if agreed else "disagree")
        self.tuner.record(
            job.tier,
            job.cache_policy,
            disagreed=not agreed,
            cutoff_used=job.cutoff,
            score=job.score,
        )

    def counterfactual(
        self,
        *,
        tier: str,
        cache_policy: Cache,
        engine: Engine,
        refused: Sequence[CacheHit],
        cutoff: float | None,
    ) -> Callable[[bytes], None] | None:
        """Maybe audit a miss's refused candidate against the answer the engine is about to give.

        Returns the callback to call with that answer's body (JSON bytes), or None when this miss
        is not audited. Only a candidate the same engine version answered is compared.
        """
        if self._closed or not self.tuner.wants_counterfactual(cache_policy):
            return None
        same = [
            h
            for h in refused
            if h.meta.engine == engine.name
            and h.meta.version == engine.version
            and h.score is not None
            and h.score >= cache_policy.tune.min  # below the bound it could never be served
        ]
        if not same:
            return None
        best = max(same, key=lambda h: h.score or 0.0)
        if not self.sampler.take(tier, self.share(cache_policy)):
            return None
        cached_text = answer_text(best.json())
        if cached_text is None:
            return None
        score = best.score

        def answered(body: bytes) -> None:
            if self._closed:
                return
            if len(self._tasks) >= self.settings.max_concurrent:
                self.metrics.audit(tier, "dropped")
                return
            task = asyncio.get_running_loop().create_task(
                self._compare_refused(tier, cache_policy, cached_text, body, cutoff, score),
                name="cache-counterfactual-audit",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return answered

    async def _compare_refused(
        self,
        tier: str,
        cache_policy: Cache,
        cached_text: str,
        body: bytes,
        cutoff: float | None,
        score: float | None,
    ) -> None:
        try:
            parsed = orjson.loads(body)
            fresh = answer_text(parsed) if isinstance(parsed, dict) else None
            if fresh is None:
                self.metrics.audit(tier, "error")
                return
            agreed = await self._agree(cached_text, fresh)
            if agreed is None:
                self.metrics.audit(tier, "dropped")
                log.info("counterfactual cache audit dropped: no CPU to compare", tier=tier)
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            # A background task has nobody to raise to: count and log, never crash the loop.
            self.metrics.audit(tier, "error")
            log.warning("counterfactual cache audit failed", tier=tier, exc_info=True)
            return
        self.metrics.audit(tier, "would_agree" if agreed else "would_disagree")
        self.tuner.record(
            tier,
            cache_policy,
            disagreed=not agreed,
            cutoff_used=cutoff,
            score=score,
            counterfactual=True,
        )

    async def _agree(self, cached: str, fresh: str) -> bool | None:
        """Whether the fresh answer agrees with the cached one; None when their embeddings did
        not come within ``EMBED_WAIT_S`` (the audit is then dropped, not judged on text)."""
        similarity = None
        mode = CompareMode(self.settings.compare)
        embed = self._embedder()
        if mode is CompareMode.EMBEDDING and embed is not None and cached.strip() != fresh.strip():
            try:
                cached_vec, fresh_vec = await asyncio.wait_for(
                    asyncio.gather(embed(cached), embed(fresh)), EMBED_WAIT_S
                )
            except TimeoutError:
                return None
            similarity = cosine(cached_vec, fresh_vec)
        verdict = judge(
            cached, fresh, mode=mode, similarity=similarity, bound=self.settings.similarity_bound
        )
        return verdict.agreed

    async def _ask(self, job: _Job) -> str | None:
        """The engine's answer to the user's own wording, or None if it gave no text."""
        engine = job.engine
        headers = {"Content-Type": "application/json", "x-frugal-audit": "1"}
        if engine.settings.api_key:
            headers["Authorization"] = f"Bearer {engine.settings.api_key}"
        admission = self.admissions.get(engine.name)
        slot = (
            admission.slot(priority=AUDIT_PRIORITY, max_wait_s=0.0, tier="audit")
            if admission is not None
            else contextlib.nullcontext()
        )
        async with slot:
            upstream = await self.caller.open(
                engine, job.path, job.body, headers, affinity=None, stream=False
            )
            upstream.finish(ok=True)
        if upstream.status != 200:
            return None
        parsed = orjson.loads(upstream.body)
        if not isinstance(parsed, dict):
            return None
        usage = parsed.get("usage") or {}
        tokens_in = int(usage.get("prompt_tokens") or 0)
        tokens_out = int(usage.get("completion_tokens") or 0)
        self.metrics.audit_cost(
            job.tier,
            engine.name,
            engine.settings.cost.usd(tokens_in, tokens_out),
            tokens_in + tokens_out,
        )
        return answer_text(parsed)

    async def drain(self) -> None:
        """Wait for the audits in flight (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the audits in flight (shutdown): their answers would only feed a metric."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
