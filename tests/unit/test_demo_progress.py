"""run_logged: child output goes to the log; a failure names the step and shows the log's tail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from proxy.demo.errors import SetupStepError
from proxy.demo.progress import read_log_tail, run_logged, shorten


def test_output_is_appended_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "step.log"
    for word in ("first", "second"):
        run_logged(
            [sys.executable, "-c", f"print('{word}')"], desc="say", log_path=log, progress=False
        )
    text = log.read_text()
    assert text.index("first") < text.index("second")
    assert text.count("$ ") == 2  # each command line is recorded


def test_environment_reaches_the_child(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    command = [sys.executable, "-c", "import os; print(os.environ['FRUGAL_T'])"]
    run_logged(command, desc="env", log_path=log, progress=True, env={"FRUGAL_T": "xyz"})
    assert "xyz" in log.read_text()


def test_failure_raises_with_the_tail_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    script = "import sys\nfor i in range(100): print('line', i)\nsys.exit(7)"
    with pytest.raises(SetupStepError) as caught:
        run_logged([sys.executable, "-c", script], desc="count", log_path=log, progress=False)
    message = str(caught.value)
    assert "count failed (exit code 7)" in message
    assert "line 99" in message and "line 0\n" not in message
    assert str(log) in message


def test_read_log_tail(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    assert read_log_tail(path) == ""
    path.write_text("".join(f"{i}\n" for i in range(10)))
    assert read_log_tail(path, lines=3) == "7\n8\n9\n"


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [("short", 10, "short"), ("a  b\n", 10, "a b"), ("abcdefghij", 5, "abcd…")],
)
def test_shorten(text: str, width: int, expected: str) -> None:
    assert shorten(text, width) == expected
