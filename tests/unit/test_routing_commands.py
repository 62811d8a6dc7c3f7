"""`frugal router score/calibrate` functions, with a fake embedder (no model load)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.routing.classifier import DifficultyClassifier
from proxy.routing.commands import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    PromptFileError,
    calibrate_command,
    embed_texts,
    read_prompts,
    read_scores_or_prompts,
    score_command,
    score_prompts,
)
from proxy.routing.features import CHEAP_FEATURE_NAMES, EMBEDDING_DIM


class FakeEmbedder:
    """Maps a text to a unit vector pointing along axis len(text) % 384."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def encode(self, sentences: list[str], **kwargs: Any) -> np.ndarray:
        self.batches.append(sentences)
        out = np.zeros((len(sentences), EMBEDDING_DIM), dtype=np.float32)
        for i, s in enumerate(sentences):
            out[i, len(s) % EMBEDDING_DIM] = 1.0
        return out


def linear_head(weight_on_axis: dict[int, float]) -> DifficultyClassifier:
    n_in = EMBEDDING_DIM + len(CHEAP_FEATURE_NAMES)
    out_w = np.zeros(n_in, dtype=np.float32)
    for axis, w in weight_on_axis.items():
        out_w[axis] = w
    return DifficultyClassifier(
        input_mean=np.zeros(n_in, dtype=np.float32),
        input_scale=np.ones(n_in, dtype=np.float32),
        out_w=out_w,
        out_b=0.0,
        metadata={},
    )


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_read_prompts_keeps_ids_and_defaults_to_line_numbers(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "p.jsonl", [{"id": "a", "messages": chat("x")}, "", {"messages": chat("y")}]
    )
    prompts = read_prompts(path)
    assert [p.id for p in prompts] == ["a", 3]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "JSON object"),
        ('{"id": 1}', "'messages'"),
        ('{"messages": [{"content": "x"}]}', "role"),
        ('{"messages": [{"role": "system", "content": "x"}]}', "no user turn"),
    ],
)
def test_bad_line_is_named_by_number(tmp_path: Path, bad_line: str, problem: str) -> None:
    path = write_lines(tmp_path / "p.jsonl", [{"messages": chat("fine")}, bad_line])
    with pytest.raises(PromptFileError, match=f"line 2: .*{problem}") as info:
        read_prompts(path)
    assert info.value.line_number == 2


def test_a_line_that_is_not_utf8_is_named_by_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "ok"}]}\n{"id": "caf\xe9"}\n')
    # (before: a UnicodeDecodeError traceback from score and calibrate)
    assert score_command(path, tmp_path / "out.jsonl") == EXIT_BAD_INPUT
    assert f"{path} line 2: not UTF-8 text" in capsys.readouterr().err
    assert calibrate_command(path, 0.3) == EXIT_BAD_INPUT
    assert f"{path} line 2: not UTF-8 text" in capsys.readouterr().err


def test_score_command_reports_bad_input_without_loading_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(tmp_path / "p.jsonl", [{"messages": chat("ok")}, {"messages": []}])
    assert score_command(path, tmp_path / "out.jsonl") == EXIT_BAD_INPUT
    assert "line 2" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_embed_texts_batches_and_keeps_input_order() -> None:
    embedder = FakeEmbedder()
    texts = ["ccc", "a", "bb", "dddd", "e"]
    vectors = embed_texts(embedder, texts, batch_size=2, progress=False)
    assert [int(np.argmax(v)) for v in vectors] == [3, 1, 2, 4, 1]
    assert [len(b) for b in embedder.batches] == [2, 2, 1]


def test_score_prompts_uses_the_last_user_turn() -> None:
    head = linear_head({5: 4.0})  # texts of length 5 score high
    prompts = read_prompts_from(
        [
            chat("hello"),
            chat("hi"),
            [*chat("hi"), {"role": "assistant", "content": "x"}, *chat("12345")],
        ]
    )
    scores = score_prompts(prompts, head, FakeEmbedder(), lambda t: len(t.split()), progress=False)
    assert scores[0] > 0.9 and scores[1] == pytest.approx(0.5) and scores[2] > 0.9


def read_prompts_from(conversations: list[list[dict[str, str]]]) -> list[Any]:
    from proxy.routing.commands import PromptLine

    return [PromptLine(i, list(c)) for i, c in enumerate(conversations)]  # type: ignore[arg-type]


def test_calibrate_from_scores_prints_the_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(
        tmp_path / "s.jsonl",
        [{"id": i, "score": s} for i, s in enumerate([0.1, 0.2, 0.3, 0.4, 0.9])],
    )
    assert calibrate_command(path, 0.4) == EXIT_OK
    out = capsys.readouterr()
    threshold = float(out.out.strip())
    assert 0.3 < threshold <= 0.4
    assert "40.0%" in out.err


def test_calibrate_rejects_bad_share_and_bad_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(tmp_path / "s.jsonl", [{"score": 0.2}, {"score": 7}])
    assert calibrate_command(path, 1.5) == EXIT_BAD_INPUT
    assert calibrate_command(path, 0.3) == EXIT_BAD_INPUT
    assert "line 2" in capsys.readouterr().err


def test_prompt_lines_are_scored_through_the_callback(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [{"messages": chat("a")}, {"messages": chat("b")}])
    seen: list[int] = []

    def score_missing(prompts: list[Any]) -> np.ndarray:
        seen.append(len(prompts))
        return np.array([0.2, 0.7])

    np.testing.assert_allclose(read_scores_or_prompts(path, score_missing), [0.2, 0.7])
    assert seen == [2]


def test_mixed_scores_and_prompts_are_refused(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [{"score": 0.2}, {"messages": chat("b")}])
    with pytest.raises(PromptFileError, match="mixes"):
        read_scores_or_prompts(path, lambda p: np.zeros(len(p)))


def test_an_output_that_cannot_be_written_is_one_line_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # (before: every prompt was scored, then a FileNotFoundError traceback lost the work)
    from proxy.routing import commands

    def no_model(*_: object) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(commands, "load_embedder", no_model)
    path = write_lines(tmp_path / "p.jsonl", [{"messages": chat("ok")}])
    output = tmp_path / "missing" / "out.jsonl"
    assert score_command(path, output) == EXIT_BAD_INPUT
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"error: cannot write {output}: No such file or directory"
