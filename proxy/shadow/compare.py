"""Do two answers to (what the cache thinks is) the same question agree? Pure functions.

A semantic hit served an answer written for another wording of the question; the audit asks the
engine again with the user's own wording and compares:

- ``exact``: only the same text (after trimming whitespace) agrees. Right for deterministic,
  short answers (classification, extraction, a number), too strict for free prose: greedy
  decoding of a reworded question rarely gives the same words.
- ``embedding``: the same text agrees, and so does a text whose MiniLM embedding has cosine at
  least ``bound`` with the cached one. MiniLM reads only the first 128 word pieces here, so long
  answers are compared on their beginning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np


class CompareMode(StrEnum):
    EXACT = "exact"
    EMBEDDING = "embedding"


Outcome = Literal["identical", "similar", "different"]


@dataclass(frozen=True, slots=True)
class Comparison:
    outcome: Outcome
    similarity: float | None  # cosine of the embeddings, when they were compared

    @property
    def agreed(self) -> bool:
        return self.outcome != "different"


def answer_text(body: Mapping[str, Any]) -> str | None:
    """The generated text of a chat or text completion body, choices joined in index order;
    None when the body carries no text (tool calls only, or not a completion)."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    parts: list[tuple[int, str]] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, Mapping):
            continue
        index = choice.get("index", position)
        message = choice.get("message")
        text = message.get("content") if isinstance(message, Mapping) else choice.get("text")
        if isinstance(text, str):
            parts.append((index if isinstance(index, int) else position, text))
    if not parts:
        return None
    return "\n".join(text for _, text in sorted(parts))


def same_text(cached: str, fresh: str) -> bool:
    return cached.strip() == fresh.strip()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 for a zero vector)."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norms if norms > 0 else 0.0


def judge(
    cached: str,
    fresh: str,
    *,
    mode: CompareMode,
    similarity: float | None = None,
    bound: float = 0.9,
) -> Comparison:
    """Agreement of a cached and a fresh answer.

    ``similarity`` is the cosine of their embeddings (the caller embeds them; None when no
    embedding is available, and then only the exact comparison can agree).
    """
    if same_text(cached, fresh):
        return Comparison("identical", similarity)
    if mode is CompareMode.EMBEDDING and similarity is not None and similarity >= bound:
        return Comparison("similar", similarity)
    return Comparison("different", similarity)
