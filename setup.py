"""Build hook for the compiled build: FRUGAL_COMPILE=1 compiles the request path's modules with
mypyc (pyproject.toml holds everything else). Without it the package is plain Python.

    FRUGAL_COMPILE=1 pip install .                         # what the Docker image does
    FRUGAL_COMPILE=1 python setup.py build_ext --inplace   # .so files beside the sources

The compiled modules are the ones every request runs through (scripts/bench_request_path.py:
their Python is most of Frugal's CPU per request). mypyc does not compile async generators
(``async def`` with ``yield``, so also ``@asynccontextmanager``) or an enum with ``__init__``:
modules with those stay Python until they are rewritten. The same sources run either way; the
test suite runs against both builds (scripts/test).
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "proxy/pipeline.py",
    "proxy/wire.py",
    "proxy/sse.py",
    "proxy/recent.py",
    "proxy/stats.py",
    "proxy/cache/keys.py",
    "proxy/cache/entry.py",
    "proxy/cache/guards.py",
    "proxy/cache/service.py",
    "proxy/cache/singleflight.py",
    "proxy/observability/families.py",
    "proxy/observability/metrics.py",
    "proxy/policy/admission.py",
    "proxy/policy/policyset.py",
    "proxy/policy/keys.py",
    "proxy/policy/limits.py",
    "proxy/routing/budget.py",
    "proxy/routing/decision.py",
    "proxy/routing/router.py",
    "proxy/engines/pool.py",
    "proxy/engines/breaker.py",
    "proxy/engines/timelimit.py",
    "proxy/engines/client.py",
    "proxy/engines/http1.py",
    "proxy/rollout/metrics.py",
    "proxy/rollout/split.py",
    "proxy/rollout/manager.py",
    "proxy/rollout/stats.py",
    "proxy/stopping.py",
    "proxy/observability/savings.py",
]


def _extensions() -> list[object]:
    if os.environ.get("FRUGAL_COMPILE", "0") != "1":
        return []
    from mypyc.build import mypycify  # (a build requirement: pyproject.toml)

    return list(mypycify(COMPILED, opt_level="3", verbose=False))


setup(ext_modules=_extensions())
