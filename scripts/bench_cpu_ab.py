"""CPU per request at 64 connections of two Frugal checkouts, side by side, against the relay.

    .venv/bin/python scripts/bench_cpu_ab.py --before ../main            # `frugal` config
    .venv/bin/python scripts/bench_cpu_ab.py --before ../main --config frugal-full --rounds 5

Both checkouts serve scripts/bench_overhead.py's configuration (``frugal`` or ``frugal-full``) in
front of one zero-delay fake engine, next to the relay; each round drives every proxy in turn
(rotating order) with wrk at 64 connections and reads its process CPU time from /proc. CPU per
request is the steady figure on a shared machine (throughput and latency move with whatever else
runs); the medians over rounds are printed with the load average. ``--after`` defaults to this
checkout. The engine and relay come from this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench_overhead as bench  # noqa: E402  (a sibling script: its configs and wrk runner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--after", type=Path, default=REPO)
    parser.add_argument("--config", choices=bench.FRUGAL_TARGETS, default="frugal")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6, help="wrk duration per measurement")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="frugal-cpu-ab-"))
    engine_port = bench.free_port()
    engine = bench.Target("engine", engine_port, None)
    targets: list[bench.Target] = []
    for name, tree in (("before", args.before.resolve()), ("after", args.after.resolve())):
        folder = work / name
        folder.mkdir()
        target = bench.build_targets([args.config], engine_port, folder, None)[0]
        assert target.command is not None
        # Same interpreter, the checkout's own code: `python -m proxy` run from its folder.
        target.name, target.cwd = name, tree
        target.env = {"PYTHONPATH": str(tree)}
        targets.append(target)
    relay = bench.build_targets(["relay"], engine_port, work, None)[0]
    targets.append(relay)
    body = work / "body.json"

    with bench.running(targets, engine):
        command = [sys.executable, "-m", "proxy.engines.fake", "--port", str(engine_port)]
        engine.process = bench.start(
            [*command, "--model", bench.MODEL], work / "engine.log", {}, REPO
        )
        bench.wait_ready(bench.Target("direct", engine_port, None), 30, work / "engine.log")
        for target in targets:
            assert target.command is not None
            log = work / f"{target.name}.log"
            target.process = bench.start(target.command, log, target.env, target.cwd)
            bench.wait_ready(target, 120, log)
            (work / f"body-{target.name}.json").write_text(
                json.dumps(bench.body_for(target, unique=True))
            )
            bench.run_wrk(target, work / f"body-{target.name}.json", 8, 3, None)
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        rps: dict[str, list[float]] = {t.name: [] for t in targets}
        for index in range(args.rounds):
            shift = index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                body = work / f"body-{target.name}.json"
                before = bench.cpu_seconds(target)
                result = bench.run_wrk(target, body, 64, args.seconds, None)
                after = bench.cpu_seconds(target)
                assert before is not None and after is not None
                cpu[target.name].append((after - before) * 1e6 / max(1, result["requests"]))
                rps[target.name].append(result["rps"])
                print(
                    f"round {index + 1} {target.name}: {cpu[target.name][-1]:.0f} µs/request,"
                    f" {result['rps']:.0f} req/s, errors {result['error_total']}",
                    flush=True,
                )
                bench.wait_ready(target, 60, None)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    relay_cpu = statistics.median(cpu["relay"])
    print(f"\n{args.config}, {args.rounds} rounds of {args.seconds} s at 64 connections")
    print(f"load average after: {load}")
    for name in cpu:
        median = statistics.median(cpu[name])
        print(
            f"{name:6}: {median:6.1f} µs/request CPU (median; x relay {median / relay_cpu:.2f}),"
            f" {statistics.median(rps[name]):,.0f} req/s"
        )


if __name__ == "__main__":
    main()
