"""``frugal serve`` with a config that only building the app finds wrong: exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import server
from proxy.cli import main

ENGINE = "engines:\n  - {name: small, model: m, urls: ['http://127.0.0.1:9']}\n"
OFF = "cache: {enabled: false}\nembeddings: {enabled: false}\n"


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    # serve configures process-wide logging; the test leaves it as it found it.
    monkeypatch.setattr(server, "configure_logging", lambda **_: None)


def _serve(tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "frugal.yaml"
    path.write_text(config)
    code = main(["serve", "--config", str(path), "--port", "0"])
    return code, capsys.readouterr().err


def test_open_access_on_a_public_host_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _serve(tmp_path, "server: {host: 0.0.0.0}\n" + ENGINE + OFF, capsys)
    assert code == 2
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith(f"{tmp_path / 'frugal.yaml'}: server.host: 0.0.0.0 ")
    assert "server.allow_open" in line


def test_an_invalid_policy_folder_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiers").mkdir()
    (tmp_path / "tiers" / "free.yaml").write_text("tier: free\nbogus: 1\n")
    code, err = _serve(tmp_path, "policies: tiers\n" + ENGINE + OFF, capsys)
    assert code == 2
    assert "Traceback" not in err
    first, *issues = err.splitlines()
    assert first.endswith(f"policies: {tmp_path / 'tiers'}: invalid tier policies")
    assert any("free.yaml:2 bogus" in issue for issue in issues)
