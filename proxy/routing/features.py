"""Difficulty features of a chat request: the shared embedding plus a few cheap text statistics.

The embedding is the one the semantic cache already computes (base all-MiniLM-L6-v2, L2-normalised,
384-d, of the last user turn's text); this module never computes it, it only checks its shape.
The cheap features read only the *user* turns, because the training data holds user turns only
(no system prompts, no assistant answers): a feature the head never saw in training would be noise.

Example::

    feats = extract_features(messages, embedding, count_tokens=tokenizer_len)
    score = classifier.score(feats)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

EMBEDDING_DIM = 384

FloatArray = npt.NDArray[np.float32]

# Order matters: the trained head stores these names and refuses to load if they differ.
CHEAP_FEATURE_NAMES: tuple[str, ...] = (
    "log_tokens_last_turn",
    "log_tokens_earlier_turns",
    "follow_up_turn",
    "log_chars_last_turn",
    "log_lines_last_turn",
    "question_marks",
    "code_markers",
    "math_markers",
    "digit_fraction",
    "numbers",
    "multiple_choice",
    "reasoning_words",
    "creative_words",
)

# The word alternatives share one leading \b: at a position that is not a word boundary the
# search fails at once instead of trying each alternative (3-4x faster on long prompts; the
# matches are the same, tests/unit/test_routing_features.py checks against the flat patterns).
_CODE_PATTERN = re.compile(
    r"```|#include|=>|::|\b(?:def\s+\w+\s*\(|class\s+\w+|function\b|import\s+\w+|return\b|SELECT\b"
    r"|console\.|printf\b|public\s+static\b|python\b|java(?:script)?\b|c\+\+|code\b|algorithm\b"
    r"|regex\b|sql\b|bash\b|compile)",
    re.IGNORECASE,
)
_MATH_PATTERN = re.compile(
    r"\\(?:frac|sqrt|int)|\$[^$]+\$|\d\s*[-+*/^=]\s*\d|\b(?:solve\b|equation\b|integral\b"
    r"|derivative\b|prove\b|calculate\b|compute\b|how (?:many|much)\b|probability\b|percent"
    r"|sum of\b|product of\b|prime\b|matrix\b|polynomial\b|x\s*=)",
    re.IGNORECASE,
)
_REASONING_PATTERN = re.compile(
    r"\bstep[- ]by[- ]step\b|\bexplain\b|\bwhy\b|\bcompare\b|\banaly[sz]e\b|\bjustify\b"
    r"|\btherefore\b|\bimplies\b|\bdeduce\b|\bevaluate\b|\bderive\b|\bwhich of the following\b",
    re.IGNORECASE,
)
_CREATIVE_PATTERN = re.compile(
    r"\bwrite (a|an|me)\b|\bcompose\b|\bpoem\b|\bstory\b|\bessay\b|\bblog\b|\bimagine\b"
    r"|\bpretend\b|\brole[- ]?play\b|\bslogan\b|\bdraft\b",
    re.IGNORECASE,
)
# Leading blanks within the line only: ^\s* ran on over every blank line after the start it was
# tried at (n^2 on a prompt of newlines); a match is still found at the line of its option.
_CHOICE_LINE = re.compile(r"^[^\S\n]*\(?[A-D][.)]\s", re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")

# The tokenizer and the patterns read at most this many characters of a request's user turns (the
# router scores on the event loop, and a 4 MB prompt held it for seconds); a longer text's counts
# are estimated from its start. The head was trained on prompts far shorter than this.
FEATURE_CHARS: Final = 8192
# More user turns than this are counted as one text (the training data has one or two).
_TURNS_COUNTED_APART: Final = 64


@dataclass(frozen=True, slots=True)
class RoutingFeatures:
    """Inputs of the difficulty head: the shared embedding, the cheap feature vector and the
    encoder's shallow view of the same text (None when the encoder does not compute it)."""

    embedding: FloatArray
    cheap: FloatArray
    shallow: FloatArray | None = None


def message_text(message: Mapping[str, object]) -> str:
    """The text of one OpenAI chat message; content parts other than text are skipped."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def user_turns(messages: Sequence[Mapping[str, object]]) -> list[str]:
    """The texts of the user messages, in order."""
    return [message_text(m) for m in messages if m.get("role") == "user"]


def last_user_text(messages: Sequence[Mapping[str, object]]) -> str:
    """The text the shared embedding is computed from: the last user turn ('' if none)."""
    turns = user_turns(messages)
    return turns[-1] if turns else ""


def _log_count(pattern: re.Pattern[str], text: str, scale: float = 1.0) -> float:
    return math.log1p(len(pattern.findall(text)) * scale)


def _token_count(texts: Sequence[str], count_tokens: Callable[[str], int]) -> float:
    """The tokens of ``texts``: each counted apart, as in training, while they are few and
    short; past that, the first FEATURE_CHARS characters of them counted and scaled up."""
    if len(texts) <= _TURNS_COUNTED_APART and sum(map(len, texts)) <= FEATURE_CHARS:
        return sum(count_tokens(text) for text in texts if text)
    whole = "\n".join(texts)
    return count_tokens(whole[:FEATURE_CHARS]) * len(whole) / FEATURE_CHARS


def cheap_features(
    messages: Sequence[Mapping[str, object]], count_tokens: Callable[[str], int]
) -> FloatArray:
    """The cheap feature vector, in CHEAP_FEATURE_NAMES order.

    Counts are log-scaled so that a different tokenizer at run time (the engine's) than in
    training (MiniLM's) shifts a feature a little rather than by a factor.
    """
    turns = user_turns(messages)
    last = turns[-1] if turns else ""
    earlier = turns[:-1]
    read = last[:FEATURE_CHARS]
    scale = len(last) / len(read) if read else 1.0  # counts in the window, for the whole turn
    characters = max(len(read), 1)
    digits = sum(ch.isdigit() for ch in read)
    values = (
        math.log1p(_token_count([last], count_tokens)),
        math.log1p(_token_count(earlier, count_tokens)),
        # 0/1, not a count: the training data has one or two user turns only, so a count would
        # be extrapolated far outside what the head saw for long conversations.
        float(len(turns) > 1),
        math.log1p(len(last)),
        math.log1p(last.count("\n") + 1),
        math.log1p(last.count("?")),
        _log_count(_CODE_PATTERN, read, scale),
        _log_count(_MATH_PATTERN, read, scale),
        digits / characters,
        _log_count(_NUMBER, read, scale),
        float(len(_CHOICE_LINE.findall(read)) >= 2),
        _log_count(_REASONING_PATTERN, read, scale),
        _log_count(_CREATIVE_PATTERN, read, scale),
    )
    return np.asarray(values, dtype=np.float32)


def extract_features(
    messages: Sequence[Mapping[str, object]],
    embedding: npt.ArrayLike,
    count_tokens: Callable[[str], int],
    shallow: npt.ArrayLike | None = None,
) -> RoutingFeatures:
    """Features of one request; `embedding` is the shared 384-d embedding of the last user turn,
    `shallow` the encoder's shallow view of it (proxy.cache.verifier.EncodedBatch.shallow)."""
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"embedding must have {EMBEDDING_DIM} values, got {vector.shape[0]}")
    view = None
    if shallow is not None:
        view = np.asarray(shallow, dtype=np.float32).reshape(-1)
        if view.shape != (EMBEDDING_DIM,):
            raise ValueError(f"shallow view must have {EMBEDDING_DIM} values, got {view.shape[0]}")
    return RoutingFeatures(
        embedding=vector, cheap=cheap_features(messages, count_tokens), shallow=view
    )
