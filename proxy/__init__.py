"""Frugal: an OpenAI-compatible proxy that makes LLM inference cheaper."""

from __future__ import annotations

import sys


def compiled_modules() -> list[str]:
    """The loaded modules of this package that run compiled (the mypyc build, setup.py)."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("proxy.")
        and (getattr(module, "__file__", None) or "").endswith((".so", ".pyd"))
    )
