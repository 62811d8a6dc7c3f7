"""The build: the modules setup.py compiles, and that a test run runs the build it means to."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import proxy

REPO = Path(__file__).resolve().parents[2]


def _listed() -> list[str]:
    """The modules setup.py hands to mypyc (read, not run: running it would build)."""
    text = (REPO / "setup.py").read_text()
    paths = re.findall(r'^    "(proxy/[\w/]+\.py)",$', text, flags=re.MULTILINE)
    return [path.removesuffix(".py").replace("/", ".") for path in paths]


def test_the_compiled_modules_are_listed_once_and_exist() -> None:
    listed = _listed()
    assert len(listed) >= 10 and len(set(listed)) == len(listed)
    for name in listed:
        importlib.import_module(name)


def test_the_run_uses_the_build_it_means_to() -> None:
    for name in _listed():
        importlib.import_module(name)
    if os.environ.get("FRUGAL_EXPECT_COMPILED") == "1":  # scripts/test's compiled run
        assert proxy.compiled_modules() == sorted(_listed())
    else:
        # Plain Python: a compiled module left beside its source would hide edits to it.
        assert proxy.compiled_modules() == []
