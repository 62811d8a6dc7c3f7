"""``frugal rollout``: a running proxy's canary rollouts, through its admin API.

    frugal rollout status ENGINE --url http://127.0.0.1:8000 [--json]
    frugal rollout promote ENGINE --url URL
    frugal rollout rollback ENGINE --url URL
    frugal rollout share ENGINE 0.25 --url URL

The admin key comes from ``FRUGAL_ADMIN_KEY`` (as for ``frugal cache ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from proxy.admin_cli import _call, _url, finite_float


def add_rollout_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser("rollout", help="canary rollouts of a running proxy")
    rollout_sub = rollout.add_subparsers(metavar="ACTION", required=True)
    for action, help_text in (
        ("status", "state and per-version figures"),
        ("promote", "make the canary the engine's version"),
        ("rollback", "remove the canary"),
    ):
        parser = rollout_sub.add_parser(action, help=help_text)
        parser.add_argument("engine")
        _url(parser)
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
        parser.set_defaults(run=_run, action=action)
    share = rollout_sub.add_parser("share", help="set the canary's traffic share (0..1)")
    share.add_argument("engine")
    share.add_argument("share", type=finite_float(0, 1), help="0..1")
    _url(share)
    share.add_argument("--json", action="store_true", help="print the raw JSON")
    share.set_defaults(run=_run, action="share")


def _run(args: argparse.Namespace) -> int:
    # (quoted: a space in the name made urllib raise, a '/' named another endpoint)
    path = f"/admin/rollout/{urllib.parse.quote(args.engine, safe='')}"
    if args.action == "status":
        status, body = _call(args.url, "GET", path)
    elif args.action == "share":
        status, body = _call(args.url, "POST", path + "/share", {"share": args.share})
    else:
        status, body = _call(args.url, "POST", f"{path}/{args.action}", {})
    if status >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else body
        print(f"frugal: the proxy answered {status}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else format_status(body))
    return 0


def _fmt(value: Any, spec: str = ".3f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_status(status: dict[str, Any]) -> str:
    """A rollout status as a short report with one row of figures per version."""
    lines = [
        f"engine {status['engine']}: {status['status']}"
        + (f" (canary share {status['share']:.1%})" if status["status"] == "canary" else "")
        + (f", reason: {status['reason']}" if status.get("reason") else ""),
        f"stable {status['stable_version']}, canary {status['canary_version'] or '-'}"
        + (f", previous {status['previous']}" if status.get("previous") else ""),
        "",
        f"{'version':<16} {'role':<7} {'req/s':>7} {'err%':>6} {'p50 ms':>8} {'p95 ms':>8}"
        f" {'p99 ms':>8} {'tok/ans':>8} {'cost $':>10} {'agree':>6}",
    ]
    for version, row in status["versions"].items():
        f = row.get("figures") or {}
        latency = f.get("latency_ms") or {}
        error_rate = f.get("error_rate")
        agreement = f.get("shadow_agreement")
        lines.append(
            f"{version[:16]:<16} {row['role']:<7} {_fmt(f.get('request_rate_per_s'), '.2f'):>7}"
            f" {_fmt(error_rate * 100 if error_rate is not None else None, '.1f'):>6}"
            f" {_fmt(latency.get('p50'), '.1f'):>8} {_fmt(latency.get('p95'), '.1f'):>8}"
            f" {_fmt(latency.get('p99'), '.1f'):>8} {_fmt(f.get('tokens_per_answer'), '.1f'):>8}"
            f" {_fmt(f.get('cost_usd'), '.6f'):>10}"
            f" {'-' if agreement is None else f'{agreement * 100:.0f}%':>6}"
        )
    return "\n".join(lines)
