"""The ``frugal`` command: serve, up, fake-engine, and the operator commands.

Each subcommand imports what it needs when it runs, so ``frugal --help`` stays fast and the
proxy does not load ML libraries for commands that do not use them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Command = Callable[[argparse.Namespace], int]


CORE_COMMANDS = frozenset({"serve", "up", "fake-engine"})

# Exit statuses of the server commands (and the operator commands' convention).
EXIT_RUNTIME = 1  # could not do the job: the address is taken, the proxy is unreachable
EXIT_USAGE = 2  # a bad flag or configuration


def _server_epilog(also: str = "") -> str:
    return (
        f"exit status: 0 after Ctrl-C or SIGTERM, {EXIT_RUNTIME} if the address cannot be taken "
        f"(in use, not permitted){also}, {EXIT_USAGE} for a bad flag or configuration"
    )


SERVER_EPILOG = _server_epilog()
SERVE_EPILOG = _server_epilog(" or the data folder cannot be written")


class ListenError(Exception):
    """A server could not take its address: in use, not permitted, or an unknown host."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        # asyncio's bind error repeats the address in strerror; the errno's own text is enough.
        errno = error.errno or 0
        reason = os.strerror(errno) if errno > 0 else error.strerror or str(error)
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


class DataDirError(Exception):
    """A folder the proxy writes to (data_dir, cache.data_dir) cannot be created or written, or
    (``error`` not an OSError, saying why and what to do) is another proxy's."""

    def __init__(self, field: str, path: Path, error: Exception) -> None:
        if not isinstance(error, OSError):
            super().__init__(f"{field}: cannot use {path}: {error}")
            return
        reason = os.strerror(error.errno) if error.errno else str(error)
        super().__init__(
            f"{field}: cannot use {path}: {reason} (set {field} in the config"
            + (" or $FRUGAL_DATA_DIR" if field == "data_dir" else "")
            + " to a writable folder)"
        )


def port_number(text: str) -> int:
    """argparse type for a TCP port; 0 asks the system for a free one (the server says which)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {text!r}")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The proxy's own commands skip importing the operator tools (plotting, ML, ...).
    parser = build_parser(operator_tools=not (argv and argv[0] in CORE_COMMANDS))
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "run", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        return command(args)
    except (ListenError, DataDirError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except BrokenPipeError:
        # Whoever read the output left early (`frugal cache stats | head`): not our error. Point
        # stdout at /dev/null so the interpreter's final flush does not raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def build_parser(*, operator_tools: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frugal",
        description="An OpenAI-compatible proxy that makes LLM inference cheaper.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the proxy in front of running engines", epilog=SERVE_EPILOG
    )
    serve.add_argument("--config", type=Path, required=True, help="YAML config file")
    serve.add_argument("--port", type=port_number, help="override server.port (0: any free port)")
    serve.set_defaults(run=_serve)

    up = sub.add_parser(
        "up", help="prepare the demo models, start two vLLM engines and serve the proxy"
    )
    up.add_argument("--config", type=Path, help="config with engines[].launch (default: demo)")
    up.add_argument(
        "--data-dir", type=Path, help="default: $FRUGAL_DATA_DIR or ~/.local/share/frugal"
    )
    up.add_argument("--port", type=port_number, default=8000, help="the proxy's port (8000)")
    up.set_defaults(run=_up)

    fake = sub.add_parser(
        "fake-engine", help="an OpenAI/vLLM-shaped fake engine for tests", epilog=SERVER_EPILOG
    )
    from proxy.engines.fake import add_cli_arguments

    add_cli_arguments(fake)
    fake.set_defaults(run=_fake_engine)

    if operator_tools:
        _add_optional(sub, "proxy.admin_cli", "add_parsers")
        _add_optional(sub, "proxy.policy.commands", "add_policy_parsers")
        _add_optional(sub, "proxy.bench.cli", "add_bench_parser")
        _add_optional(sub, "proxy.rollout.commands", "add_rollout_parsers")
    return parser


def _add_optional(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], module: str, fn: str
) -> None:
    """Operator command groups register their own flags, next to their code."""
    import importlib

    try:
        register = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        return
    register(sub)


def _serve(args: argparse.Namespace) -> int:
    from proxy.server import run_proxy
    from proxy.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        run_proxy(settings, port=args.port)
    except ConfigError as exc:
        # Checked as the app is built (the policy folder, open access): the message names the
        # field; the file is the config's.
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _up(args: argparse.Namespace) -> int:
    from proxy.demo.up import run_up
    from proxy.settings import default_data_dir

    data_dir: Path = args.data_dir or default_data_dir()
    return int(run_up(data_dir=data_dir, config=args.config, port=args.port))


def _fake_engine(args: argparse.Namespace) -> int:
    from proxy.engines.fake import options_from_cli, run_fake_engine

    try:
        options = options_from_cli(args)
    except ValueError as exc:
        print(f"frugal fake-engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run_fake_engine(options, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
