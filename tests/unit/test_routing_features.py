"""Cheap difficulty features and the message helpers."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routing.features import (
    _CHOICE_LINE,
    _CODE_PATTERN,
    _MATH_PATTERN,
    CHEAP_FEATURE_NAMES,
    EMBEDDING_DIM,
    FEATURE_CHARS,
    cheap_features,
    extract_features,
    last_user_text,
    message_text,
)


def words(text: str) -> int:
    return len(text.split())


def feature(messages: list[dict[str, object]], name: str) -> float:
    return float(cheap_features(messages, words)[CHEAP_FEATURE_NAMES.index(name)])


def user(text: str) -> dict[str, object]:
    return {"role": "user", "content": text}


def test_last_user_text_skips_assistant_and_system_turns() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        user("first"),
        {"role": "assistant", "content": "answer"},
        user("second"),
        {"role": "assistant", "content": "trailing"},
    ]
    assert last_user_text(messages) == "second"
    assert last_user_text([{"role": "system", "content": "x"}]) == ""


def test_content_parts_keep_only_text() -> None:
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "http://x"}},
            {"type": "text", "text": "here"},
        ],
    }
    assert message_text(message) == "look\nhere"
    assert message_text({"role": "user", "content": None}) == ""


def test_token_counts_use_the_given_counter_and_split_last_from_earlier() -> None:
    messages = [user("one two three"), {"role": "assistant", "content": "a b c d e"}, user("four")]
    assert feature(messages, "log_tokens_last_turn") == pytest.approx(np.log1p(1))
    assert feature(messages, "log_tokens_earlier_turns") == pytest.approx(np.log1p(3))
    assert feature(messages, "follow_up_turn") == 1.0
    assert feature([user("only")], "follow_up_turn") == 0.0


def test_code_prompt_has_code_markers_and_chitchat_has_none() -> None:
    code = [user("Fix this:\n```python\ndef f(x):\n    return x[0]\n```")]
    chat = [user("hi, how are you today?")]
    assert feature(code, "code_markers") > 0
    assert feature(chat, "code_markers") == 0


def test_math_prompt_has_math_markers() -> None:
    assert feature([user("Solve for x: 3x + 5 = 20")], "math_markers") > 0
    assert feature([user("Tell me about cats")], "math_markers") == 0


def test_multiple_choice_needs_two_option_lines() -> None:
    options = user("Which?\nA. red\nB. blue\nC. green\nAnswer:")
    assert feature([options], "multiple_choice") == 1.0
    assert feature([user("A. single line")], "multiple_choice") == 0.0


def test_extract_features_checks_the_embedding_shape() -> None:
    with pytest.raises(ValueError, match="384"):
        extract_features([user("x")], np.zeros(10), words)
    feats = extract_features([user("x")], np.ones(EMBEDDING_DIM), words)
    assert feats.embedding.dtype == np.float32
    assert feats.cheap.shape == (len(CHEAP_FEATURE_NAMES),)


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), st.text()), max_size=6))
def test_cheap_features_are_finite_for_any_conversation(turns: list[tuple[str, str]]) -> None:
    messages: list[dict[str, object]] = [{"role": r, "content": c} for r, c in turns]
    values = cheap_features(messages, words)
    assert values.shape == (len(CHEAP_FEATURE_NAMES),)
    assert np.all(np.isfinite(values))


# The patterns as first written (one \b per alternative): the grouped ones must match the same.
_FLAT_CODE = re.compile(
    r"```|\bdef\s+\w+\s*\(|\bclass\s+\w+|\bfunction\b|\bimport\s+\w+|#include|\breturn\b"
    r"|\bSELECT\b|=>|::|\bconsole\.|\bprintf\b|\bpublic\s+static\b|\bpython\b|\bjava(script)?\b"
    r"|\bc\+\+|\bcode\b|\balgorithm\b|\bregex\b|\bsql\b|\bbash\b|\bcompile",
    re.IGNORECASE,
)
_FLAT_MATH = re.compile(
    r"\\frac|\\sqrt|\\int|\$[^$]+\$|\d\s*[-+*/^=]\s*\d|\bsolve\b|\bequation\b|\bintegral\b"
    r"|\bderivative\b|\bprove\b|\bcalculate\b|\bcompute\b|\bhow (many|much)\b|\bprobability\b"
    r"|\bpercent|\bsum of\b|\bproduct of\b|\bprime\b|\bmatrix\b|\bpolynomial\b|\bx\s*=",
    re.IGNORECASE,
)
_WORDS = (
    "def f( class A import os return SELECT => :: console. printf public static python java "
    "javascript c++ code algorithm regex sql bash compiler #include ``` \\frac \\sqrt \\int "
    "$x$ 3+4 2 = 5 solve equation integral derivative prove calculate compute how many much "
    "probability percentage sum product of prime matrix polynomial x X= a _ 1 ( ) . xcode recode "
    "Python3 re-turn"
)
_PIECES = st.sampled_from([*_WORDS.split(), " ", "\n", ""])


@given(st.lists(_PIECES, max_size=30).map("".join))
def test_grouped_patterns_match_what_the_flat_ones_matched(text: str) -> None:
    for grouped, flat in ((_CODE_PATTERN, _FLAT_CODE), (_MATH_PATTERN, _FLAT_MATH)):
        assert [m.span() for m in grouped.finditer(text)] == [m.span() for m in flat.finditer(text)]


# The option-line pattern as first written: ^\s* let the match tried at each of n blank lines run
# over all the lines after it (n^2: 20,000 newlines took ~10 s, on the event loop).
_FLAT_CHOICE_LINE = re.compile(r"^\s*\(?[A-D][.)]\s", re.MULTILINE)
_CHOICE_PIECES = st.sampled_from(
    ["\n", " ", "\t", "\r", "\x0b", "\u2028", "(", "A", "B", "D", "E", ".", ")", "x", "A.", "(B)"]
)


@given(st.lists(_CHOICE_PIECES, max_size=40).map("".join))
def test_option_lines_are_counted_as_the_first_pattern_counted_them(text: str) -> None:
    assert len(_CHOICE_LINE.findall(text)) == len(_FLAT_CHOICE_LINE.findall(text))


@pytest.mark.parametrize("blank", ["\n", "\n \n", " \n\t"])
def test_blank_lines_cost_linear_time(blank: str) -> None:
    started = time.perf_counter()
    cheap_features([user(blank * 20_000)], words)
    assert time.perf_counter() - started < 1.0


def test_a_huge_prompt_is_read_through_a_bounded_window() -> None:
    # A 4 MB prompt to `auto` held the event loop for seconds: the tokenizer and five scans over
    # all of it. The counter and the patterns now see at most FEATURE_CHARS characters.
    seen: list[int] = []

    def counting(text: str) -> int:
        seen.append(len(text))
        return words(text)

    long_turn = "Solve 3 + 4 = x, step by step. " * 130_000  # ~4 MB
    earlier = [user("hi there")] * 20_000
    started = time.perf_counter()
    values = cheap_features([*earlier, user(long_turn)], counting)
    assert time.perf_counter() - started < 1.0
    assert max(seen) <= FEATURE_CHARS
    named = dict(zip(CHEAP_FEATURE_NAMES, values, strict=True))
    # the counts are estimated for the whole turn from its window, not cut off at it
    assert named["log_tokens_last_turn"] == pytest.approx(np.log1p(words(long_turn)), rel=0.01)
    assert named["log_tokens_earlier_turns"] == pytest.approx(np.log1p(2 * 20_000), rel=0.01)
    assert named["log_chars_last_turn"] == pytest.approx(np.log1p(len(long_turn)))
    assert named["math_markers"] == pytest.approx(np.log1p(2 * 130_000), rel=0.01)
    assert named["reasoning_words"] == pytest.approx(np.log1p(130_000), rel=0.01)


def test_a_prompt_within_the_window_is_read_whole() -> None:
    seen: list[str] = []

    def counting(text: str) -> int:
        seen.append(text)
        return words(text)

    turns = [user("first question"), user("x" * (FEATURE_CHARS // 2)), user("last one")]
    cheap_features(turns, counting)
    assert seen == ["last one", "first question", "x" * (FEATURE_CHARS // 2)]
