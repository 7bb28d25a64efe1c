"""python -m benchmarks.reliability [--clients 32] [--per-client 100] [--fuzz 2000] [--chunks 200] [--load-seconds S]

Load, fuzz and faults on real servers of its own (the load server: auth on, a 2 MiB disk tier, a
16K-token pool; the crash test: two more), in that order; writes
``benchmarks/results/<date>-<device>-reliability.{json,md,png}``. ``tests/reliability/`` runs the same
steps with smaller numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.fidelity import device_name
from benchmarks.reliability import faults, report
from benchmarks.reliability.run import Harness, timed

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=8)
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--chunks", type=int, default=200, help="chunks in the remember killed by kill -9")
    parser.add_argument("--disk-chunks", type=int, default=40, help="chunks remembered into the full disk tier")
    parser.add_argument("--load-seconds", type=float, default=None,
                        help="start no load request after this many seconds (the report says how many of the "
                             "planned clients x per-client were sent; the load under the residency kill gets a "
                             "quarter of it); default: no limit")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="amem-reliability-"))
    t0 = time.monotonic()
    results: dict = {}
    harness = Harness(work / "load", n_namespaces=args.namespaces, seed=args.seed)
    results["load_server_start_s"] = round(harness.server.startup_s, 1)
    try:
        results["load"] = timed(harness.load, args.clients, args.per_client, args.load_seconds, 60.0)
        print("load:", report.short(results["load"]), flush=True)
        results["fuzz"] = timed(harness.fuzz, args.fuzz)
        print("fuzz:", report.short(results["fuzz"]), flush=True)
        results["residency_kill"] = timed(harness.residency_kill, 16, max(2, args.per_client // 10), 5.0,
                                          args.load_seconds and max(60.0, args.load_seconds / 4))
        print("residency kill:", report.short(results["residency_kill"]), flush=True)
        results["disk_full"] = timed(harness.disk_full, args.disk_chunks)
        print("disk full:", report.short(results["disk_full"]), flush=True)
        results["final"] = harness.health()
    finally:
        harness.stop()
    results["crash"] = timed(faults.kill_during_remember, work / "crash", chunks=args.chunks,
                             kill_at=args.chunks // 2, seed=args.seed)
    print("crash:", report.short(results["crash"]), flush=True)
    meta = {"device": device_name(), "model": "SmolLM2-135M-Instruct (bf16)", "seconds": round(time.monotonic() - t0),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.reliability " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: str(v) for k, v in vars(args).items()}}
    stem = args.out / f"{dt.date.today().isoformat()}-{meta['device']}-reliability"
    report.write(stem, meta, results)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
