"""`python -m proxy.demo.prepare`: build the vLLM venv and the demo models ahead of time.

scripts/test runs it so the e2e tests find everything ready. Prints served-name → folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from proxy.demo.errors import DemoError
from proxy.demo.models import prepare_demo_models
from proxy.demo.vllm_env import ensure_vllm_python
from proxy.settings import default_data_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo.prepare", description=__doc__)
    parser.add_argument(
        "--data-dir", type=Path, help="default: $FRUGAL_DATA_DIR or ~/.local/share/frugal"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir or default_data_dir()
    progress = not args.no_progress
    started = time.monotonic()
    try:
        python = ensure_vllm_python(data_dir, progress=progress)
        folders = prepare_demo_models(data_dir, progress=progress)
    except DemoError as exc:
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 1
    print(f"vLLM python: {python}")
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    print(f"ready in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
