"""The engine launcher: placeholder filling, command building, and child process lifetimes.

The process tests use a tiny stand-in engine (python's http.server), never vLLM.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.demo.errors import EngineStartError
from proxy.demo.launcher import (
    EngineSpec,
    build_spec,
    engines_running,
    free_port,
    launch_engines,
    port_is_free,
    served_model_ids,
    substitute,
)

names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


def test_substitute_fills_every_placeholder() -> None:
    values = {"python": "/venv/bin/python", "port": "8101"}
    assert substitute("{python}", values) == "/venv/bin/python"
    assert substitute("--port={port}", values) == "--port=8101"
    assert (
        substitute("{python}:{port}:{python}", values) == "/venv/bin/python:8101:/venv/bin/python"
    )


def test_substitute_doubled_braces_are_literal() -> None:
    assert substitute('{{"a": {port}}}', {"port": "1"}) == '{"a": 1}'


@pytest.mark.parametrize("template", ["{nope}", "{port.real}", "{port!r}", "{port:>6}", "{0}"])
def test_substitute_rejects_unknown_or_fancy_placeholders(template: str) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        substitute(template, {"port": "1"})


def test_substitute_rejects_unbalanced_braces() -> None:
    with pytest.raises(ValueError):
        substitute("{port", {"port": "1"})


@given(st.text().filter(lambda t: "{" not in t and "}" not in t))
def test_substitute_leaves_brace_free_text_alone(text: str) -> None:
    assert substitute(text, {"port": "1"}) == text


@given(name=names, value=st.text())
def test_substituted_values_are_not_substituted_again(name: str, value: str) -> None:
    # A model path containing braces must reach the command line unchanged.
    assert substitute(f"<{{{name}}}>", {name: value, "other": "x"}) == f"<{value}>"


def test_build_spec_fills_command_and_env_with_model_and_port() -> None:
    spec = build_spec(
        name="small",
        served_model="smollm2-135m",
        port=8101,
        command=["{python}", "-m", "vllm.x", "--model", "{model_dir}", "--name={model}", "{port}"],
        env={"LOG": "{model}.log", "PLAIN": "1"},
        values={"python": "/v/bin/python", "model_dir": "/data/models/smollm2-135m"},
    )
    assert spec.command == (
        "/v/bin/python", "-m", "vllm.x", "--model", "/data/models/smollm2-135m",
        "--name=smollm2-135m", "8101",
    )  # fmt: skip
    assert dict(spec.env) == {"LOG": "smollm2-135m.log", "PLAIN": "1"}
    assert spec.url == "http://127.0.0.1:8101"


def test_build_spec_names_a_missing_value() -> None:
    with pytest.raises(ValueError, match="model_dir"):
        build_spec(name="x", served_model="m", port=1, command=["{model_dir}"], env={}, values={})


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        ({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}, ["a", "b"]),
        ({"data": [{"id": "a"}, "junk", {"no": "id"}]}, ["a"]),
        ({"data": "nope"}, []),
        (["a"], []),
        (None, []),
    ],
)
def test_served_model_ids(body: object, ids: list[str]) -> None:
    assert served_model_ids(body) == ids


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        assert not port_is_free("127.0.0.1", taken)
    assert port_is_free("127.0.0.1", free_port())


# --- child processes ---------------------------------------------------------------------------

STAND_IN_ENGINE = textwrap.dedent(
    """
    import json, os, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    model, port = sys.argv[1], int(sys.argv[2])
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/health": {}, "/v1/models": {"data": [{"id": model}]}}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())
        def log_message(self, *args):
            pass
    print("stand-in engine up", flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def stand_in_spec(
    tmp_path: Path, name: str, *, env: dict[str, str] | None = None, timeout: float = 30
) -> EngineSpec:
    # A file, not `-c`: the script's own braces are not placeholders.
    script = tmp_path / "stand_in_engine.py"
    script.write_text(STAND_IN_ENGINE)
    return build_spec(
        name=name,
        served_model=f"{name}-model",
        port=free_port(),
        command=["{python}", str(script), "{model}", "{port}"],
        env=env or {},
        values={"python": sys.executable},
        startup_timeout_s=timeout,
    )


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_engines_start_answer_and_are_stopped(tmp_path: Path) -> None:
    specs = [stand_in_spec(tmp_path, "one"), stand_in_spec(tmp_path, "two")]
    with engines_running(specs, tmp_path, progress=False) as running:
        assert [e.name for e in running] == ["one", "two"]
        assert [e.url for e in running] == [s.url for s in specs]
        assert all(is_alive(e.pid) for e in running)
        pids = [e.pid for e in running]
    assert not any(is_alive(pid) for pid in pids)
    assert "stand-in engine up" in (tmp_path / "logs" / "one.log").read_text()


def test_an_engine_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    spec = stand_in_spec(tmp_path, "stubborn", env={"IGNORE_TERM": "1"})
    with engines_running([spec], tmp_path, progress=False, grace_s=0.5) as running:
        pid = running[0].pid
    assert not is_alive(pid)


def test_early_exit_raises_with_the_log_tail(tmp_path: Path) -> None:
    crashing = build_spec(
        name="crash",
        served_model="m",
        port=free_port(),
        command=[sys.executable, "-c", "print('CUDA? no: boom'); raise SystemExit(3)"],
        env={},
        values={},
    )
    healthy = stand_in_spec(tmp_path, "fine")
    with (
        pytest.raises(EngineStartError) as caught,
        engines_running([healthy, crashing], tmp_path, progress=False),
    ):
        pytest.fail("must not get here")
    message = str(caught.value)
    assert "'crash'" in message
    assert "code 3" in message
    assert "CUDA? no: boom" in message


def test_timeout_raises_and_stops_the_child(tmp_path: Path) -> None:
    # Serves, but under a different model name, so it never counts as ready.
    spec = stand_in_spec(tmp_path, "wrong", timeout=1.5)
    spec = dataclasses.replace(spec, served_model="another-model")
    with (
        pytest.raises(EngineStartError, match="within 2s"),
        engines_running([spec], tmp_path, progress=False),
    ):
        pytest.fail("must not get here")


def test_a_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        spec = stand_in_spec(tmp_path, "clash")
        spec = dataclasses.replace(spec, port=sock.getsockname()[1])
        with (
            pytest.raises(EngineStartError, match="already in use"),
            engines_running([spec], tmp_path, progress=False),
        ):
            pytest.fail("must not get here")


async def test_async_launcher_stops_engines_on_error(tmp_path: Path) -> None:
    spec = stand_in_spec(tmp_path, "async")
    with pytest.raises(RuntimeError, match="inside the block"):
        async with launch_engines([spec], tmp_path, progress=False) as running:
            pid = running[0].pid
            raise RuntimeError("inside the block")
    assert not is_alive(pid)
