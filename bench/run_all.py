"""Every scenario of BENCHMARKS.md in one go, each with its default settings (about 20-25
minutes on the 2-vCPU development VM for scenarios 1-7, plus about 7 for the cluster
scenario, which needs PostgreSQL). Each scenario prints its own table and writes its JSON to
bench/results/; this prints which files were written.

    .venv/bin/python bench/run_all.py [--only ws_to_amqp,fanout] [--quick]

``--quick`` runs every scenario once with small counts (a smoke test of the harness, a few
minutes; not figures to quote).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from harness import BENCH, ROOT

SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    # name: (default arguments, --quick arguments)
    "ws_to_amqp": ([], ["--n", "4000", "--rounds", "1"]),
    "amqp_to_ws": ([], ["--n", "4000", "--rounds", "1"]),
    "seam": ([], ["--n", "4000", "--rounds", "1"]),
    "fanout": ([], ["--events", "50", "--rounds", "1"]),
    "connections": ([], ["--sockets", "1000", "--interval", "2", "--window", "5",
                         "--rounds", "1"]),
    "latency": ([], ["--seconds", "3", "--rounds", "1"]),
    "lifecycle": ([], ["--rounds", "1"]),
    # needs PostgreSQL (127.0.0.1:5432, database test) and rabbitmqctl (a vhost per run)
    "cluster": ([], ["--quick"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    started = time.monotonic()
    for name in names:
        full, quick = SCENARIOS[name]
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *(quick if args.quick else full)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"=== {name} took {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\nall done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
