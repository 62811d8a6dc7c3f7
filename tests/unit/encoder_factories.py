"""Stand-in encoders for tests of proxy/embeddings/process.py, built in its child processes.

Each row is a text's stable hash spread over 4 numbers, then the child's pid and the CPU
priority (nice) of the thread that encoded it. Texts that start with a command make the child
misbehave, or wait until that many calls are encoding at once ("together:N")."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from proxy.cache.verifier import EncodedBatch

DIM = 6


def row(text: str) -> np.ndarray:
    digest = hashlib.sha256(text.encode()).digest()
    return np.frombuffer(digest[:16], dtype=np.uint32).astype(np.float32)


class Hashed:
    def __init__(self) -> None:
        self._together: dict[int, threading.Barrier] = {}

    def encode(self, texts: Sequence[str], *, use_helper: bool = True) -> EncodedBatch:
        for text in texts:
            if text.startswith("raise:"):
                raise ValueError(text)
            if text.startswith("exit:"):
                os._exit(3)
            if text.startswith("sleep:"):
                time.sleep(float(text.split(":")[1]))
            if text.startswith("together:"):
                parties = int(text.split(":")[1])
                barrier = self._together.setdefault(parties, threading.Barrier(parties))
                barrier.wait(timeout=10)  # broken (an error) unless the calls run side by side
        rows = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            rows[i, :4] = row(text)
            rows[i, 4] = os.getpid()
            rows[i, 5] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        whole = np.array([use_helper] * len(texts), dtype=bool)
        return EncodedBatch(rows, rows * 2, rows * 3, whole)


def hashed() -> Hashed:
    return Hashed()


def failing(*, why: str) -> Hashed:
    raise RuntimeError(why)
