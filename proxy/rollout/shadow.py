"""Canary quality signal: a share of answered requests is also sent, in the background, to the
other version of the engine, and the two answers are compared.

The user's answer is never delayed: the shadow call starts after the user's answer is complete,
runs as a background task, and is dropped (counted as ``dropped``) when ``max_concurrency`` shadow
calls are already in flight or the engine's admission queue has requests waiting.

Agreement: deterministic requests (``temperature: 0``) agree when the answer texts are exactly
equal; sampled requests agree when the token-set Jaccard overlap of the two texts reaches
``overlap_agree`` (a crude signal: the same sampled question answered twice rarely matches
exactly, even by one version).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from typing import Any, Literal

import orjson
import structlog

from proxy.engines.client import EngineCaller
from proxy.engines.pool import Engine
from proxy.errors import FrugalError
from proxy.settings import CanaryQualitySettings

log = structlog.get_logger("frugal.rollout")

Outcome = Literal["agree", "disagree", "error", "dropped"]
_WORDS = re.compile(r"\w+")


def answer_text(body: bytes) -> str | None:
    """The first choice's text of a chat or text completion body."""
    try:
        parsed: Any = orjson.loads(body)
        choice = parsed["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else None


def token_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' lower-cased word sets (1.0 for two empty texts)."""
    left, right = set(_WORDS.findall(a.lower())), set(_WORDS.findall(b.lower()))
    if not left and not right:
        return 1.0
    return len(left & right) / len(left | right)


def agree(a: str, b: str, *, deterministic: bool, overlap_agree: float) -> bool:
    if deterministic:
        return a == b
    return token_overlap(a, b) >= overlap_agree


def is_deterministic(body: dict[str, Any]) -> bool:
    temperature = body.get("temperature", 1.0)
    return isinstance(temperature, int | float) and temperature == 0


def shadow_body(body: dict[str, Any], model: str) -> bytes:
    """The request as the other version gets it: its model name, not streamed."""
    copy = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    copy["model"] = model
    return orjson.dumps(copy)


Report = Callable[[Outcome], None]


class ShadowComparer:
    """Starts bounded background comparisons; ``report`` records each outcome."""

    def __init__(self, caller: EngineCaller, *, rng: random.Random | None = None) -> None:
        self._caller = caller
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def sampled(self, quality: CanaryQualitySettings) -> bool:
        return quality.share > 0 and self._rng.random() < quality.share

    def start(
        self,
        *,
        other: Engine,
        path: str,
        body: dict[str, Any],
        affinity: bytes | None,
        primary_answer: bytes,
        quality: CanaryQualitySettings,
        busy: bool,
        report: Report,
    ) -> None:
        if busy or len(self._tasks) >= quality.max_concurrency:
            report("dropped")
            return
        task = asyncio.create_task(
            self._compare(other, path, body, affinity, primary_answer, quality, report)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(
        self,
        other: Engine,
        path: str,
        body: dict[str, Any],
        affinity: bytes | None,
        primary_answer: bytes,
        quality: CanaryQualitySettings,
        report: Report,
    ) -> None:
        mine = answer_text(primary_answer)
        headers = {"Content-Type": "application/json", "x-frugal-shadow": "1"}
        if other.settings.api_key:
            headers["Authorization"] = f"Bearer {other.settings.api_key}"
        try:
            upstream = await self._caller.open(
                other, path, shadow_body(body, other.wire_model), headers,
                affinity=affinity, stream=False,
            )  # fmt: skip
            upstream.finish(ok=True)
        except FrugalError as exc:
            log.info("shadow call failed", engine=other.name, version=other.version,
                     error=exc.message)  # fmt: skip
            report("error")
            return
        theirs = answer_text(upstream.body) if upstream.status == 200 else None
        if mine is None or theirs is None:
            report("error")
            return
        same = agree(
            mine, theirs, deterministic=is_deterministic(body), overlap_agree=quality.overlap_agree
        )
        report("agree" if same else "disagree")

    async def drain(self) -> None:
        """Wait for the comparisons in flight (tests, reports)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
