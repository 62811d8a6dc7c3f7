"""The routing dev data (RouteLLM eval data, Apache-2.0) as features and labels, for the scripts.

Shared by train_router.py and bench_routing.py. Reads /work/shared/data at run time (never copied
into the repo); caches the MiniLM embeddings and the encoder's shallow views (the difficulty head's
second vote) under out/routing/cache/ by text hash.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from proxy.routing.commands import embed_texts, load_count_tokens, load_embedder, shallow_views
from proxy.routing.features import cheap_features, last_user_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEV_FILE = REPO.parent / "shared" / "data" / "routing_dev.csv.gz"
DEFAULT_CACHE_DIR = REPO / "out" / "routing" / "cache"
# Turn-2 prompts hold "<turn 1> \n[TURN2] <turn 2>"; whitespace around the marker varies.
TURN_SEPARATOR = re.compile(r"\s*\[TURN2\]\s*")


@dataclass(frozen=True)
class RoutingDevData:
    benchmark: npt.NDArray[np.str_]
    subset: npt.NDArray[np.str_]
    prompts: list[str]
    weak: npt.NDArray[np.float64]
    strong: npt.NDArray[np.float64]
    embeddings: npt.NDArray[np.float32]
    cheap: npt.NDArray[np.float32]
    groups: npt.NDArray[np.int64]  # near-duplicate groups (near_duplicate_groups): one fold each
    # The encoder's shallow view (proxy.cache.verifier.EncodedBatch.shallow) of the last user turn
    shallow: npt.NDArray[np.float32]


def near_duplicate_groups(
    embeddings: npt.NDArray[np.float32], prompts: list[str], *, min_cosine: float = 0.95
) -> npt.NDArray[np.int64]:
    """A group id per prompt, so that cross-validation keeps near-duplicates in one fold.

    Prompts whose embeddings have cosine >= min_cosine are joined (transitively): MMLU holds
    exact duplicates filed under two subjects and template variants that differ in one symbol.
    The turn-1 and turn-2 rows of one MT-Bench question share their first turn and are joined too.
    """
    parent = np.arange(len(prompts))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def join(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for start in range(0, len(prompts), 1024):
        similarity = embeddings[start : start + 1024] @ embeddings.T
        for a, b in zip(*np.nonzero(similarity >= min_cosine), strict=True):
            join(start + int(a), int(b))
    first_turns: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        join(i, first_turns.setdefault(TURN_SEPARATOR.split(prompt)[0], i))
    return np.array([root(i) for i in range(len(prompts))], dtype=np.int64)


def dev_prompt_messages(prompt: str) -> list[dict[str, object]]:
    """A dev prompt as chat messages; turn-2 prompts hold both user turns (answers are unknown)."""
    turns = TURN_SEPARATOR.split(prompt)
    messages: list[dict[str, object]] = []
    for i, turn in enumerate(turns):
        if i:
            # The answer to the earlier turn is not in the data; the features read user turns only.
            messages.append({"role": "assistant", "content": ""})
        messages.append({"role": "user", "content": turn})
    return messages


def cached_embeddings(texts: list[str], cache_file: Path) -> npt.NDArray[np.float32]:
    """MiniLM embeddings of `texts`, reusing those cached by text hash; embeds only the rest."""
    keys = np.array([hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts])
    known: dict[str, npt.NDArray[np.float32]] = {}
    if cache_file.exists():
        with np.load(cache_file) as cached:
            known = dict(zip(cached["keys"].tolist(), cached["embeddings"], strict=True))
    missing = sorted({k for k in keys.tolist() if k not in known})
    if missing:
        print(f"embedding {len(missing)} prompts (cache: {cache_file}) ...")
        text_of = dict(zip(keys.tolist(), texts, strict=True))
        vectors = embed_texts(load_embedder(), [text_of[k] for k in missing])
        known.update(zip(missing, vectors, strict=True))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, keys=np.array(list(known)), embeddings=np.stack(list(known.values())))
    return np.stack([known[k] for k in keys.tolist()]).astype(np.float32)


def cached_shallow_views(texts: list[str], cache_file: Path) -> npt.NDArray[np.float32]:
    """shallow_views of `texts`, reusing those cached by text hash; encodes only the rest."""
    keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    known: dict[str, npt.NDArray[np.float32]] = {}
    if cache_file.exists():
        with np.load(cache_file) as cached:
            known = dict(zip(cached["keys"].tolist(), cached["views"], strict=True))
    missing = sorted({k for k in keys if k not in known})
    if missing:
        print(f"computing shallow views of {len(missing)} prompts (cache: {cache_file}) ...")
        text_of = dict(zip(keys, texts, strict=True))
        known.update(zip(missing, shallow_views([text_of[k] for k in missing]), strict=True))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, keys=np.array(list(known)), views=np.stack(list(known.values())))
    return np.stack([known[k] for k in keys]).astype(np.float32)


def load_dev_data(
    path: Path = DEFAULT_DEV_FILE, cache_dir: Path = DEFAULT_CACHE_DIR
) -> RoutingDevData:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    messages = [dev_prompt_messages(r["prompt"]) for r in rows]
    texts = [last_user_text(m) for m in messages]
    embeddings = cached_embeddings(texts, cache_dir / "minilm-embeddings.npz")
    # Cheap features are recomputed every time (seconds), so editing features.py needs no cache
    # purge. Training counts tokens with MiniLM's WordPiece tokenizer.
    count_tokens = load_count_tokens()
    cheap = np.stack([cheap_features(m, count_tokens) for m in messages])
    prompts = [r["prompt"] for r in rows]
    return RoutingDevData(
        benchmark=np.array([r["benchmark"] for r in rows]),
        subset=np.array([r["subset"] for r in rows]),
        prompts=prompts,
        weak=np.array([float(r["weak_score"]) for r in rows]),
        strong=np.array([float(r["strong_score"]) for r in rows]),
        embeddings=embeddings,
        cheap=cheap,
        groups=near_duplicate_groups(embeddings, prompts),
        shallow=cached_shallow_views(texts, cache_dir / "minilm-shallow-views.npz"),
    )
