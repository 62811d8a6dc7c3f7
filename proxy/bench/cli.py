"""``frugal bench replay`` and ``frugal bench compare``: flags and entry points.

The main CLI calls :func:`add_bench_parser` with its subparsers; each leaf sets ``run`` to the
command function, which takes the parsed namespace and returns the exit code::

    add_bench_parser(subparsers)
    args = parser.parse_args()
    sys.exit(args.run(args))

Exit codes: 0 done, 1 the run completed badly (no request succeeded / a strategy failed),
2 bad input (trace, config, URL), 130 stopped by Ctrl-C (what finished before it is still
written).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from proxy.bench.compare import CompareOptions, compare, default_serve_command, write_outputs
from proxy.bench.config import costs_from_config, costs_from_json
from proxy.bench.replay import NotLoopbackError, PaceMode, ReplayOptions, check_loopback, replay
from proxy.bench.summary import EngineCost, engine_roles, format_table, summarize
from proxy.bench.trace import TraceError, TraceRequest, load_trace
from proxy.settings import ConfigError

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def _role(text: str) -> tuple[str, str]:
    name, sep, role = text.partition("=")
    if not sep or not name or not role:
        raise argparse.ArgumentTypeError(f"expected ENGINE=ROLE (e.g. small=weak), got {text!r}")
    return name, role


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_replay_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``replay`` and ``compare``: how to pace and bound the replay."""
    parser.add_argument("--trace", type=Path, required=True, help="trace file (JSON lines)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=_positive, help="send at a fixed R requests/s")
    pace.add_argument("--timed", action="store_true", help="follow the trace's arrival times t")
    parser.add_argument(
        "--speed", type=_positive, default=1.0, help="with --timed: play the clock X times faster"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="most requests in flight (default 16)"
    )
    parser.add_argument("--api-key", help="bearer key for lines without their own api_key")
    parser.add_argument("--model", help="override every body's model (default: as in the trace)")
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    parser.add_argument(
        "--timeout", type=_positive, default=120.0, help="per-request limit, s (default 120)"
    )
    parser.add_argument(
        "--max-duration",
        type=_positive,
        default=1800.0,
        help="the whole replay stops after this many seconds (default 1800)",
    )
    parser.add_argument(
        "--engine-role",
        type=_role,
        action="append",
        default=[],
        metavar="ENGINE=ROLE",
        help="which trace reference score (weak/strong) an engine earns; default: cheapest=weak, "
        "dearest=strong",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench {replay,compare}`` to the main CLI's subparsers; returns the ``bench`` parser."""
    bench: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="replay traces against the proxy, compare strategies"
    )
    commands = bench.add_subparsers(dest="bench_command", required=True)

    rep = commands.add_parser(
        "replay", help="replay a trace against a running proxy (loopback only)"
    )
    _add_replay_flags(rep)
    rep.add_argument("--url", default="http://127.0.0.1:8000", help="proxy base URL (loopback)")
    prices = rep.add_mutually_exclusive_group()
    prices.add_argument("--config", type=Path, help="Frugal config to read engine costs from")
    prices.add_argument("--costs", type=Path, help='JSON {"engine": {"input_per_mtok": ..}}')
    rep.add_argument(
        "--out", type=Path, default=Path("bench-replay.json"), help="JSON summary file"
    )
    rep.add_argument("--results", type=Path, help="also write one JSON line per request here")
    rep.set_defaults(run=replay_command)

    cmp = commands.add_parser("compare", help="run the trace against several configs, HTML report")
    _add_replay_flags(cmp)
    cmp.add_argument("--configs", type=Path, nargs="+", required=True, help="strategy configs")
    cmp.add_argument("--out", type=Path, default=Path("bench-compare"), help="output folder")
    cmp.add_argument(
        "--ready-timeout", type=_positive, default=300.0, help="wait for /readyz, s (default 300)"
    )
    cmp.add_argument(
        "--serve-cmd",
        help="command that starts one proxy; placeholders {config} {port} {data_dir} "
        "(default: frugal serve --config {config} --port {port})",
    )
    cmp.set_defaults(run=compare_command)
    return bench


def _pace(args: argparse.Namespace) -> PaceMode:
    if args.timed:
        return "timed"
    return "rate" if args.rate is not None else "fast"


def _replay_options(args: argparse.Namespace, url: str) -> ReplayOptions:
    return ReplayOptions(
        url=url,
        mode=_pace(args),
        rate=args.rate,
        speed=args.speed,
        concurrency=max(1, args.concurrency),
        api_key=args.api_key,
        model=args.model,
        timeout_s=args.timeout,
        max_duration_s=args.max_duration,
        progress=not args.no_progress,
    )


def _load(args: argparse.Namespace) -> list[TraceRequest]:
    requests = load_trace(args.trace, args.limit)
    if not requests:
        raise TraceError(f"{args.trace}: no requests")
    return requests


def replay_command(args: argparse.Namespace) -> int:
    """``frugal bench replay``: print a table, write the JSON summary (and per-request lines)."""
    try:
        url = check_loopback(args.url)
        requests = _load(args)
        costs: dict[str, EngineCost] = {}
        if args.config is not None:
            costs = costs_from_config(args.config)
        elif args.costs is not None:
            costs = costs_from_json(args.costs)
    except (NotLoopbackError, TraceError, ConfigError, OSError, ValueError) as exc:
        print(f"frugal bench replay: {exc}", file=sys.stderr)
        return 2
    run = asyncio.run(replay(requests, _replay_options(args, url)))
    summary = summarize(run.results, run.duration_s, costs, dict(args.engine_role))
    summary["not_sent"] = run.not_sent
    summary["cancelled"] = run.cancelled
    summary["interrupted"] = run.interrupted
    summary["trace"] = str(args.trace)
    summary["url"] = url
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if args.results is not None:
        with args.results.open("wb") as handle:
            for result in run.results:
                handle.write(orjson.dumps(result) + b"\n")
    print(format_table(summary))
    if run.not_sent or run.cancelled:
        why = "interrupted" if run.interrupted else "stopped at --max-duration"
        print(f"{why}: {run.not_sent} not sent, {run.cancelled} cancelled", file=sys.stderr)
    print(f"summary: {args.out}", file=sys.stderr)
    if run.interrupted:
        return INTERRUPTED
    return 0 if summary["ok"] else 1


def compare_command(args: argparse.Namespace) -> int:
    """``frugal bench compare``: one fresh proxy per config, one HTML report."""
    try:
        requests = _load(args)
        # Roles come from all strategies' engines together, so a config with only the large
        # engine still scores its answers as "strong" and the strategies stay comparable.
        all_costs: dict[str, EngineCost] = {}
        for config in args.configs:
            all_costs.update(costs_from_config(config))
    except (TraceError, ConfigError, OSError, ValueError) as exc:
        print(f"frugal bench compare: {exc}", file=sys.stderr)
        return 2
    template: Sequence[str] = (
        shlex.split(args.serve_cmd) if args.serve_cmd else default_serve_command()
    )
    options = CompareOptions(
        replay=_replay_options(args, "http://127.0.0.1:0"),
        serve_command=tuple(template),
        ready_timeout_s=args.ready_timeout,
        roles=engine_roles(all_costs, dict(args.engine_role)),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    outcome = asyncio.run(compare(args.configs, requests, options, args.out))
    write_outputs(outcome, args.out, f"Frugal strategy comparison: {args.trace.name}")
    if outcome.summaries:
        print(f"report: {args.out / 'report.html'}", file=sys.stderr)
    if outcome.interrupted:
        return INTERRUPTED
    return 1 if outcome.failed or not outcome.summaries else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m proxy.bench.cli bench replay ...``."""
    parser = argparse.ArgumentParser(prog="frugal")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
