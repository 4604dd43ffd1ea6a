"""Scenario 5, connections: many idle ``heartbeat=true`` sockets on one server.

For each count in ``--sockets`` (default 2,000 then 15,000), two servers:

* ``raw trio-websocket heartbeat``: bench/baselines.py ``broadcast --heartbeat 5``: a writer
  task per connection that sends a heartbeat frame every 5 s when idle.
* ``bridged``: a ``bridged run`` process, websocket transport with ``heartbeat_interval_s = 5``.

Clients: processes of at most ``--per-proc`` sockets (the file limit is 20,000 per
process), process k bound to 127.0.0.(k+2) so that ephemeral ports never run out; one chat
per socket. Once every socket is open and ``--settle`` seconds have passed, every client
records each heartbeat's arrival for ``--window`` seconds.

Figures: RSS growth of the server per socket (RSS after the window minus RSS before the first
connection, over the sockets); heartbeat lateness p50/p99 as the server sees it over the window
(how late each socket's writer woke for a heartbeat: the bridge's histogram
``bridged_heartbeat_lateness_seconds`` from /metrics, so bucket bounds; the raw server keeps
the exact values); the gap the clients see (arrival minus the previous heartbeat's arrival on
the socket, minus the interval); the server's CPU over the window (idle but for heartbeats).
The raw server runs twice: with CPython's default garbage-collector settings, and with the
bridge's (bridge/cli.py ``tune_gc``), the like-for-like floor.

    .venv/bin/python bench/connections.py [--sockets 2000,15000] [--rounds 1]
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
import urllib.request
from functools import partial
from typing import Any

import harness
import wsload
from harness import Bench, cpu_seconds, now_ns, percentile, processes, rss_bytes, worker_cmd

CONFIG = """
[daemon]
state_dir = "{state}"
[admin]
host = "127.0.0.1"
port = @ADMIN@
[log]
level = "warning"
[transports.chat]
type = "websocket"
port = @PORT@
heartbeat_interval_s = @INTERVAL@
max_connections = 16000
max_connections_per_address = 20000
handshake_timeout_s = 60.0
"""


async def idle_clients(port: int, count: int, prefix: str, local_host: str, interval: float,
                       window: float) -> None:
    """Open ``count`` heartbeat sockets; while recording, note each heartbeat's distance from
    the previous one on its socket, minus the interval (how much later than due it came,
    relative to the previous one)."""
    last: list[int] = [0] * count
    deviation: list[float] = []
    beats = [0] * count
    recording = False

    def on_frame(i: int) -> Any:
        def frame(payload: bytes) -> None:
            t = now_ns()
            if recording and last[i]:
                beats[i] += 1
                deviation.append(((t - last[i]) / 1e9 - interval) * 1000)
            last[i] = t
        return frame

    paths = [f"/v1/chats/{prefix}-{i}?heartbeat=true" for i in range(count)]
    t0 = time.monotonic()
    clients = await wsload.raw_connect_all(port, paths, on_frame, parallel=50,
                                           local_host=local_host)
    harness.print_json({"ready": len(clients), "connect_s": time.monotonic() - t0})
    await wsload.go_signal()
    recording = True
    await asyncio.sleep(window)
    recording = False
    closed = sum(1 for c in clients if c.closed.done())
    harness.print_json({"deviation_ms": [round(x, 2) for x in deviation],
                        "silent": sum(1 for b in beats if b == 0), "closed": closed})
    await asyncio.Future()


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a Prometheus histogram, summed over its labels."""
    buckets: dict[float, float] = {}
    for m in re.finditer(rf'^{name}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)$', text, re.M):
        le = float(m.group(1))
        buckets[le] = buckets.get(le, 0.0) + float(m.group(2))
    return sorted(buckets.items())


def quantiles(before: list[tuple[float, float]], after: list[tuple[float, float]]
              ) -> dict[str, float]:
    """p50 and p99 upper bounds (bucket edges, in ms) of what was observed in between."""
    old = dict(before)
    buckets = [(le, c - old.get(le, 0.0)) for le, c in after]
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    out = {f"server_lateness_p{q}_ms": 1000 * next(le for le, c in buckets
                                                   if c >= total * q / 100) for q in (50, 99)}
    out["server_lateness_count"] = total
    return out


class Server:
    """Start and stop the server's own lateness record around the window."""

    def start(self) -> None: ...

    def stop(self) -> dict[str, float]:
        return {}


class RawServer(Server):
    def __init__(self, proc: harness.Proc) -> None:
        self.proc = proc

    def start(self) -> None:
        self.proc.go("start")

    def stop(self) -> dict[str, float]:
        self.proc.go("stop")
        return self.proc.read(30)


class BridgedServer(Server):
    """The bridge's histogram ``bridged_heartbeat_lateness_seconds`` (bucket bounds)."""

    NAME = "bridged_heartbeat_lateness_seconds"

    def __init__(self, admin: int) -> None:
        self.url = f"http://127.0.0.1:{admin}/metrics"
        self.before: list[tuple[float, float]] = []

    def scrape(self) -> list[tuple[float, float]]:
        with urllib.request.urlopen(self.url, timeout=30) as r:
            return histogram(r.read().decode(), self.NAME)

    def start(self) -> None:
        self.before = self.scrape()

    def stop(self) -> dict[str, float]:
        return quantiles(self.before, self.scrape())


def run_clients(args: Any, pid: int, port: int, n: int, server: Server) -> dict[str, Any]:
    procs = math.ceil(n / args.per_proc)
    counts = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
    tag = harness.unique("idle")
    cmds = [worker_cmd(__file__, "idle", port=port, count=c, chat=f"{tag}-{k}",
                       local_host=f"127.0.0.{k + 2}", interval=args.interval,
                       window=args.window) for k, c in enumerate(counts)]
    time.sleep(0.5)
    rss0 = rss_bytes(pid)
    t0 = time.monotonic()
    with processes(cmds, ready_timeout=300) as clients:
        connect_s = time.monotonic() - t0
        time.sleep(args.settle)
        server.start()
        spy = harness.start_spy(pid, args.profile) if args.profile else None
        c0 = cpu_seconds(pid)
        w0 = time.monotonic()
        for c in clients:
            c.go()
        results = [c.read(args.window + 60) for c in clients]
        window_at = (w0, time.monotonic())
        cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        if spy is not None:
            harness.stop_spy(spy)
        own = server.stop()
        rss1 = rss_bytes(pid)
    deviation = [x for r in results for x in r["deviation_ms"]]
    return {"sockets": n, "connect_s": connect_s,
            "rss_kb_per_socket": (rss1 - rss0) / n / 1024, "rss_mb": rss1 / 2**20,
            **own,
            "client_gap_p50_ms": percentile(deviation, 50),
            "client_gap_p99_ms": percentile(deviation, 99),
            "client_gap_max_ms": max(deviation, default=math.nan),
            "heartbeats": len(deviation),
            "silent_sockets": sum(r["silent"] for r in results),
            "closed_sockets": sum(r["closed"] for r in results),
            "idle_cpu_share": cpu, "window_monotonic": window_at}


def measure(args: Any, config: str, n: int) -> dict[str, Any]:
    port = harness.free_port()
    if config.startswith("raw"):
        cmd = [sys.executable, str(harness.BENCH / "baselines.py"), "broadcast",
               "--port", str(port), "--heartbeat", str(args.interval)]
        cmd += ["--tuned-gc"] if "tuned" in config else []
        with processes([cmd]) as (server,):
            return run_clients(args, server.pid, port, n, RawServer(server))
    admin = harness.free_port()
    text = (CONFIG.replace("@PORT@", str(port)).replace("@ADMIN@", str(admin))
            .replace("@INTERVAL@", str(args.interval)))
    with harness.daemon(text) as d:  # --profile: the window only (run_clients)
        return run_clients(args, d.pid, port, n, BridgedServer(admin))


def main() -> None:
    p = harness.parser(__doc__, rounds=1)
    p.add_argument("--sockets", default="2000,15000", help="socket counts, in order")
    p.add_argument("--per-proc", type=int, default=3000, help="sockets per client process")
    p.add_argument("--interval", type=float, default=5.0, help="heartbeat interval (s)")
    p.add_argument("--window", type=float, default=11.0, help="seconds recorded")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--port", type=int)
    p.add_argument("--count", type=int)
    p.add_argument("--chat")
    p.add_argument("--local-host")
    args = p.parse_args()
    if args.worker == "idle":
        asyncio.run(idle_clients(args.port, args.count, args.chat, args.local_host,
                                 args.interval, args.window))
        return
    bench = Bench("connections", args)
    keys = ["connect_s", "rss_kb_per_socket", "rss_mb", "server_lateness_p50_ms",
            "server_lateness_p99_ms", "client_gap_p50_ms", "client_gap_p99_ms",
            "client_gap_max_ms", "idle_cpu_share", "silent_sockets", "closed_sockets"]
    for n in (int(x) for x in args.sockets.split(",")):
        print(f"{n} heartbeat=true sockets, interval {args.interval} s, window {args.window} s")
        configs = {f"{c} {n}": partial(measure, args, c, n)
                   for c in ("raw trio-websocket heartbeat", "raw, tuned GC", "bridged")}
        bench.rounds(configs, args.rounds,
                     lambda r: f"{r['rss_kb_per_socket']:.1f} KB/socket, lateness p50"
                               f" {r.get('server_lateness_p50_ms', math.nan):.1f}"
                               f" p99 {r.get('server_lateness_p99_ms', math.nan):.1f} ms,"
                               f" client gap p99 {r['client_gap_p99_ms']:.1f} ms,"
                               f" CPU {r['idle_cpu_share']:.1%}, connect {r['connect_s']:.1f} s")
        bench.ratio(f"RSS per socket bridged / raw at {n}", f"bridged {n}",
                    f"raw trio-websocket heartbeat {n}", "rss_kb_per_socket")
        bench.ratio(f"RSS per socket bridged / raw with tuned GC at {n}", f"bridged {n}",
                    f"raw, tuned GC {n}", "rss_kb_per_socket")
    bench.report(keys)


if __name__ == "__main__":
    main()
