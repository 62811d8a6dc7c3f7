"""Errors raised while preparing or running the `frugal up` demo.

DemoError (RuntimeError)
  ├── SetupStepError       a download, install or conversion step failed (message has a log tail)
  ├── IntegrityError       a file's sha256 differs from its pin
  └── EngineStartError     an engine exited early or did not become ready in time
"""

from __future__ import annotations


class DemoError(RuntimeError):
    """Base of every demo failure; the message is meant for a human at a terminal."""


class SetupStepError(DemoError):
    pass


class IntegrityError(DemoError):
    pass


class EngineStartError(DemoError):
    pass
