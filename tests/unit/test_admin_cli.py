"""The operator commands' --url: a malformed one is a usage error naming it (exit 2), never a
traceback from urllib."""

from __future__ import annotations

import argparse
import http.server
import threading
from collections.abc import Iterator

import pytest

from proxy import admin_cli
from proxy.cli import main

REAL_ADMIN = admin_cli._admin


@pytest.fixture(autouse=True)
def no_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> tuple[int, object]:
        raise AssertionError("a request was sent")

    monkeypatch.setattr(admin_cli, "_admin", refuse)


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "stats"],
        ["cache", "invalidate", "--all"],
        ["rollout", "status", "small"],
        ["rollout", "share", "small", "0.2"],
    ],
)
@pytest.mark.parametrize("url", ["notaurl", "localhost:8000", "http://", "http://h:port"])
def test_a_malformed_url_exits_2_naming_it(
    argv: list[str], url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--url", url])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].endswith(
        f"argument --url: not an http(s) URL like {admin_cli.DEFAULT_URL}: {url!r}"
    )


def test_a_malformed_frugal_url_is_caught_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRUGAL_URL", "notaurl")
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "stats"])
    assert exit_.value.code == 2
    assert "'notaurl'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "https://proxy.example/", "http://[::1]:8000/base"]
)
def test_http_urls_pass_unchanged(url: str) -> None:
    assert admin_cli.http_url(url) == url


@pytest.mark.parametrize(
    "url", ["ftp://h", "http://h:99999", "http://[::1", "http://h/a b", "http://h\n"]
)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        admin_cli.http_url(url)


def test_a_reader_leaving_early_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # `frugal cache stats | head`: the pipe closes while the report is written
    def closed_pipe(*args: object) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(admin_cli, "_call", lambda *args, **kwargs: (200, {"lookups": {}}))
    monkeypatch.setattr(admin_cli, "_report", closed_pipe)
    assert main(["cache", "stats", "--url", "http://127.0.0.1:9"]) == 0
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("group", ["cache", "keys", "policy", "rollout", "router", "bench"])
def test_a_command_group_without_its_action_is_a_usage_error_naming_it(
    group: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # (before: `frugal keys` and `frugal policy` printed the top-level help instead)
    with pytest.raises(SystemExit) as exit_:
        main([group])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: frugal {group} " in err
    assert "the following arguments are required" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["rollout", "share", "small", "nan"],
        ["rollout", "share", "small", "1.5"],
        ["cache", "invalidate", "--older-than", "nan"],
        ["cache", "invalidate", "--older-than", "-1"],
    ],
)
def test_numbers_the_proxy_cannot_take_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # (before: nan went out as JSON NaN and the proxy answered "not valid JSON")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--url", "http://127.0.0.1:9"])
    assert exit_.value.code == 2
    assert "not a number in [" in capsys.readouterr().err


def test_an_engine_name_is_quoted_into_the_admin_path(monkeypatch: pytest.MonkeyPatch) -> None:
    paths: list[str] = []

    def record(url: str, method: str, path: str, payload: object = None) -> tuple[int, object]:
        paths.append(path)
        return 404, {"error": {"message": "no engine"}}

    monkeypatch.setattr(admin_cli, "_admin", record)
    # (before: a space made urllib raise InvalidURL, a traceback)
    assert main(["rollout", "status", "x y", "--url", "http://127.0.0.1:9"]) == 1
    assert main(["rollout", "promote", "a/b", "--url", "http://127.0.0.1:9"]) == 1
    assert paths == ["/admin/rollout/x%20y", "/admin/rollout/a%2Fb/promote"]


class _NotTheProxy(http.server.BaseHTTPRequestHandler):
    """An address that answers, but not as the proxy: a web page at 200, or not HTTP at all."""

    def do_GET(self) -> None:
        if self.path.startswith("/admin/rollout"):
            self.wfile.write(b"-ERR unknown command\r\n")  # (a Redis port, say)
            return
        body = b"<html>a dashboard</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def not_the_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(admin_cli, "_admin", REAL_ADMIN)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTheProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["cache", "stats"], "answered with something that is not JSON"),
        (["rollout", "status", "small"], "answered with something that is not HTTP"),
    ],
)
def test_an_address_that_is_not_the_proxy_is_one_line(
    argv: list[str], says: str, not_the_proxy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # (before: a JSONDecodeError or BadStatusLine traceback)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--url", not_the_proxy])
    assert exit_.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"frugal: {not_the_proxy}")
    assert says in line and line.endswith("is it the proxy's address?")
