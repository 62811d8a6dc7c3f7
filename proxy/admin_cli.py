"""Operator commands that talk to a running proxy's admin API, and the router's offline tools.

    frugal cache stats --url http://127.0.0.1:8000
    frugal cache invalidate --url URL [--engine E] [--version V] [--scope S [--owner NAME ...]]
                            [--older-than SECONDS]
    frugal cache import FILE.jsonl --url URL --engine E [--scope S] [--owner NAME ...]
    frugal router score --input prompts.jsonl --output scores.jsonl
    frugal router calibrate --input prompts.jsonl --strong-share 0.3

Admin commands read the admin key from ``FRUGAL_ADMIN_KEY`` (sent as a bearer token).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
IMPORT_BATCH = 256
# A batch's rows stay under this many bytes of JSON: the proxy refuses bodies over its
# server.max_body_bytes (4 MiB by default) with a 413, which stopped an import half-way (a
# batch refused so, under a lower limit, is sent again in halves).
IMPORT_BATCH_BYTES = 1 << 20

SCOPE_HELP = (
    "the partition the entries go to, who may hit them (default: the proxy's cache.scope, "
    "tenant unless configured; a tier policy may set another)"
)
OWNERS = (
    'none for global, TIER for tier, TENANT for tenant, TENANT USER for user (USER "" for '
    "requests without a 'user' field). Without API keys every request is tenant 'anonymous', "
    "and without policy files tier 'open'"
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = sub.add_parser("cache", help="the response cache of a running proxy")
    cache_sub = cache.add_subparsers(metavar="ACTION", required=True)

    stats = cache_sub.add_parser("stats", help="entries, lookups and hit counts")
    _url(stats)
    stats.set_defaults(run=_cache_stats)

    inval = cache_sub.add_parser("invalidate", help="remove entries matching every filter given")
    _url(inval)
    inval.add_argument("--engine")
    inval.add_argument("--version")
    _partition_arguments(
        inval,
        "only entries of this scope (every owner's, e.g. every tenant's, unless --owner)",
        f"only the partition of this owner (with --scope): {OWNERS}",
    )
    inval.add_argument("--older-than", type=finite_float(0, math.inf), metavar="SECONDS")
    inval.add_argument("--all", action="store_true", help="needed to invalidate with no filter")
    inval.set_defaults(run=_cache_invalidate)

    imp = cache_sub.add_parser(
        "import",
        help="warm the cache from prompt/answer pairs (JSONL)",
        description='Each line: {"prompt": str, "answer": str}, or "messages" (chat) or '
        '"request" (a whole request body) instead of the prompt, and optionally "usage" '
        "(token counts). Every line is checked before any is sent: with a bad line all bad "
        "lines are listed by line number and nothing is imported (exit 2).",
    )
    imp.add_argument("file", type=Path)
    _url(imp)
    imp.add_argument("--engine", required=True, help="engine name; its current version is used")
    imp.add_argument("--version", help="a specific version (default: the engine's current one)")
    _partition_arguments(imp, SCOPE_HELP, f"the partition's owner: {OWNERS}")
    imp.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    imp.add_argument(
        "--max-tokens",
        type=int,
        help="the max_tokens the requests to hit carry (it is part of the key): a tier with a "
        "daily budget sends its max_tokens cap to the engine on every request that sets none, "
        "so import for such a tier with --max-tokens CAP",
    )
    imp.set_defaults(run=_cache_import)

    router = sub.add_parser("router", help="the difficulty classifier, offline")
    router_sub = router.add_subparsers(metavar="ACTION", required=True)
    score = router_sub.add_parser("score", help="score prompts (JSONL of messages, id)")
    score.add_argument("--input", type=Path, required=True)
    score.add_argument("--output", type=Path, required=True)
    score.add_argument("--classifier", type=Path, help="a difficulty head .npz")
    score.set_defaults(run=_router_score)
    cal = router_sub.add_parser("calibrate", help="threshold that meets a target strong share")
    cal.add_argument("--input", type=Path, required=True, help="prompts or scores JSONL")
    cal.add_argument("--strong-share", type=float, required=True)
    cal.add_argument("--classifier", type=Path, help="a difficulty head .npz")
    cal.set_defaults(run=_router_calibrate)


def _partition_arguments(parser: argparse.ArgumentParser, scope: str, owner: str) -> None:
    parser.add_argument("--scope", choices=["global", "tier", "tenant", "user"], help=scope)
    parser.add_argument("--owner", nargs="+", metavar="NAME", help=owner)


def _url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        type=http_url,  # argparse checks the FRUGAL_URL default with it too
        default=os.environ.get("FRUGAL_URL", DEFAULT_URL),
        help=f"the proxy (default: $FRUGAL_URL or {DEFAULT_URL})",
    )


def http_url(text: str) -> str:
    """argparse type for the proxy's address: an http(s) URL with a host. urllib raises
    ValueError (not URLError) for some malformed ones, which came out as a traceback."""
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() or not c.isprintable() for c in text)
    ):
        raise argparse.ArgumentTypeError(f"not an http(s) URL like {DEFAULT_URL}: {text!r}")
    return text


def finite_float(low: float, high: float) -> Callable[[str], float]:
    """argparse type for a number in [low, high]: 'nan' and 'inf' parse as floats, and went
    to the proxy as JSON it cannot read."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"not a number in [{low:g}, {high:g}]: {text!r}")
        return value

    return parse


def _admin(url: str, method: str, path: str, payload: Any | None = None) -> tuple[int, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    key = os.environ.get("FRUGAL_ADMIN_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, {"error": {"message": body.decode(errors="replace")}}
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        raise NotTheProxy(f"answered with something that is not JSON ({status}, {path})") from None


class NotTheProxy(Exception):
    """An address that answers, but not as the proxy's admin API does."""


def _report(status: int, body: Any) -> int:
    if status >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else body
        print(f"frugal: the proxy answered {status}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0


def _call(url: str, method: str, path: str, payload: Any | None = None) -> tuple[int, Any]:
    try:
        return _admin(url, method, path, payload)
    except (urllib.error.URLError, OSError) as exc:
        print(f"frugal: cannot reach {url}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (http.client.HTTPException, NotTheProxy) as exc:
        # (before: a traceback) something answers there, but not as the proxy: a web page, or
        # not HTTP at all (a Redis port, say)
        what = " ".join(str(exc).split()) or "no answer"
        if isinstance(exc, http.client.HTTPException):
            what = f"answered with something that is not HTTP ({type(exc).__name__}: {what})"
        print(f"frugal: {url} {what}: is it the proxy's address?", file=sys.stderr)
        raise SystemExit(1) from None


def _cache_stats(args: argparse.Namespace) -> int:
    return _report(*_call(args.url, "GET", "/admin/cache/stats"))


def _cache_invalidate(args: argparse.Namespace) -> int:
    where = {
        k: v
        for k, v in {
            "engine": args.engine,
            "version": args.version,
            "scope": args.scope,
            "owner": args.owner,
            "older_than_seconds": args.older_than,
        }.items()
        if v is not None
    }
    if not where and not args.all:
        print("frugal: no filter given; pass --all to invalidate every entry", file=sys.stderr)
        return 2
    if not where:
        where = {"all": True}
    return _report(*_call(args.url, "POST", "/admin/cache/invalidate", where))


def _cache_import(args: argparse.Namespace) -> int:
    """Every line is checked here first (JSON, then the proxy's own row check): with any bad
    line, every bad one is listed and nothing is sent, so a bad line 5,000 cannot leave half a
    file imported. The rows then go in batches; a batch the proxy refuses stops the import,
    and what was stored before it is reported."""
    from tqdm import tqdm

    from proxy.cache.keys import Endpoint
    from proxy.cache.service import import_row_problem

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        print(f"frugal: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    endpoint = Endpoint(args.endpoint)
    rows: list[Any] = []
    numbers: list[int] = []  # each row's line in the file (blank lines are skipped)
    sizes: list[int] = []  # each row's JSON bytes, to keep a batch under the proxy's body limit
    bad = 0
    # Lines are split on newlines only: str.splitlines would also split at a U+2028 inside a
    # JSON string, and a line that is not UTF-8 is one bad line, not a traceback.
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        problem: tuple[str, str] | None
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = ("", f"not UTF-8 text (byte {exc.start} of the line)")
        except ValueError as exc:
            problem = ("", f"not JSON: {exc}")
        else:
            problem = import_row_problem(row, endpoint)
        if problem is not None:
            field, what = problem
            where = f"{args.file}:{number}" + (f": {field}" if field else "")
            print(f"frugal: {where}: {what}", file=sys.stderr)
            bad += 1
            continue
        rows.append(row)
        numbers.append(number)
        sizes.append(len(json.dumps(row)))  # as it is sent (non-ASCII escaped)
    if bad:
        print(f"frugal: {bad} bad line(s) in {args.file}; nothing was imported", file=sys.stderr)
        return 2
    if not rows:
        # (an empty file is most likely the wrong file: a success would hide that, and a bad
        # --engine with it)
        print(f"frugal: {args.file} has no rows; nothing was imported", file=sys.stderr)
        return 2
    stored = 0
    partition: dict[str, Any] = {}  # where the proxy put them (its default scope when not given)
    with tqdm(total=len(rows), unit="pair", desc="import") as bar:
        pending = _batches(sizes)
        while pending:
            start, end = pending.pop(0)
            batch = rows[start:end]
            payload = {
                "engine": args.engine,
                "version": args.version,
                "scope": args.scope,
                "owner": args.owner,
                "endpoint": args.endpoint,
                "max_tokens": args.max_tokens,
                "rows": batch,
            }
            status, body = _call(args.url, "POST", "/admin/cache/import", payload)
            if status == 413 and len(batch) > 1:
                # over the proxy's server.max_body_bytes (refused unread): send it in halves
                middle = (start + end) // 2
                pending[:0] = [(start, middle), (middle, end)]
                continue
            if status == 413:
                print(
                    f"frugal: {args.file}:{numbers[start]}: the row ({sizes[start]} bytes of "
                    "JSON) is larger than the proxy accepts in a request (server.max_body_bytes)",
                    file=sys.stderr,
                )
            elif status >= 400:
                _report(status, _in_file_terms(body, args.file, numbers[start:]))
            if status >= 400:
                print(
                    f"frugal: the import stopped in the batch from line {numbers[start]}; the "
                    f"{stored} rows before that batch were stored, none after it",
                    file=sys.stderr,
                )
                return 1
            stored += int(body.get("stored", 0))
            partition = {"scope": body.get("scope"), "owner": body.get("owner")}
            bar.update(len(batch))
    print(json.dumps({"rows": len(rows), "stored": stored, **partition}))
    return 0


def _batches(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) of consecutive rows: at most IMPORT_BATCH rows and IMPORT_BATCH_BYTES
    bytes each (a larger row goes alone)."""
    batches: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= IMPORT_BATCH or total + size > IMPORT_BATCH_BYTES):
            batches.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        batches.append((start, len(sizes)))
    return batches


def _in_file_terms(body: Any, file: Path, numbers: list[int]) -> Any:
    """The proxy names a bad row by its index in the batch (``rows[3].usage``): name its line
    in the file instead."""
    error = body.get("error") if isinstance(body, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    found = re.match(r"rows\[(\d+)\]", param) if isinstance(param, str) else None
    if error is None or found is None or int(found[1]) >= len(numbers):
        return body
    where = f"{file}:{numbers[int(found[1])]}"
    message = str(error.get("message", ""))
    # "rows[3].usage: ..." as the local check words it: "f.jsonl:12: usage: ..."
    message = message.replace(f"{found[0]}.", f"{where}: ", 1).replace(found[0], where, 1)
    return {**body, "error": {**error, "message": message, "param": where}}


def _router_score(args: argparse.Namespace) -> int:
    from proxy.routing.commands import score_command

    return score_command(args.input, args.output, classifier_path=args.classifier)


def _router_calibrate(args: argparse.Namespace) -> int:
    from proxy.routing.commands import calibrate_command

    return calibrate_command(args.input, args.strong_share, classifier_path=args.classifier)
