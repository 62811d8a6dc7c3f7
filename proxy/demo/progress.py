"""Progress display and subprocess streaming shared by the demo preparation steps."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from proxy.demo.errors import SetupStepError

# Without a terminal (CI logs) a bar redrawn ten times a second only makes noise.
_NON_TTY_REFRESH_SECONDS = 15.0


def refresh_seconds() -> float:
    """How often to redraw a bar whose numbers change only with time (elapsed)."""
    return 1.0 if sys.stderr.isatty() else _NON_TTY_REFRESH_SECONDS


def make_bar(*, desc: str, enabled: bool, **kwargs: Any) -> tqdm[Any]:
    """A tqdm bar on stderr that redraws rarely when stderr is not a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else _NON_TTY_REFRESH_SECONDS,
        **kwargs,
    )


def read_log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a text log ('' if it does not exist)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except FileNotFoundError:
        return ""


def shorten(text: str, width: int) -> str:
    """One display line of at most `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def run_logged(
    command: Sequence[str],
    *,
    desc: str,
    log_path: Path,
    progress: bool,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run `command`, append its output to `log_path`, and show a spinner with elapsed time.

    The spinner's postfix is the child's latest output line, so a long pip install or model
    conversion visibly moves. Raises SetupStepError with the log's tail on a non-zero exit.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with (
        log_path.open("a", encoding="utf-8") as log,
        make_bar(
            desc=desc, enabled=progress, total=None, bar_format="{desc}: {elapsed} {postfix}"
        ) as bar,
    ):
        started = time.monotonic()
        log.write(f"[{time.strftime('%H:%M:%S')}] $ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            text=True,
            errors="replace",
            bufsize=1,
        )
        stop_ticking = threading.Event()
        ticker = threading.Thread(target=_tick, args=(bar, stop_ticking), daemon=True)
        ticker.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                # tqdm redraws progress bars of children with \r; keep only the last frame.
                bar.set_postfix_str(shorten(line.rsplit("\r", 1)[-1], 70), refresh=False)
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            stop_ticking.set()
            ticker.join()
            log.write(f"[{time.strftime('%H:%M:%S')}] ({time.monotonic() - started:.1f}s)\n")
            log.flush()
    if returncode != 0:
        raise SetupStepError(
            f"{desc} failed (exit code {returncode}); full log: {log_path}\n"
            f"--- last lines ---\n{read_log_tail(log_path)}"
        )


def _tick(bar: tqdm[Any], stop: threading.Event) -> None:
    """Refresh the elapsed time even while the child prints nothing."""
    while not stop.wait(refresh_seconds()):
        bar.refresh()
