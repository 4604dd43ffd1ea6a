"""Scenario 4, fan-out: one chat, 1,000 sockets; deliveries per second.

* ``raw trio-websocket broadcast``: bench/baselines.py ``broadcast``: each frame a client
  sends goes, as received, into every connection's bounded queue; one writer task per
  connection sends it.
* ``raw broadcast, tuned GC``: the same with the bridge's garbage-collector settings
  (bridge/cli.py ``tune_gc``), the like-for-like floor.
* ``bridged``: a ``bridged run`` process with the chat -> chat route: each update is
  validated, enriched (eventId, timestamps), stored in the history, encoded once and spliced
  with every socket's ``socket_sequence``.

``--sockets`` receiving sockets, spread over ``--procs`` client processes, and one sender
socket in its own process (also on the chat, so it gets every update too) that sends
``--events`` updates with at most ``--window`` not yet echoed back to it. Deliveries are
events x (sockets + 1); the time runs from the first send to the last socket's last update.

    .venv/bin/python bench/fanout.py [--sockets 1000] [--procs 4] [--events 200] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial
from typing import Any

import harness
import wsload
from harness import Bench, cpu_seconds, processes, unique, worker_cmd

CONFIG = harness.DAEMON_HEAD + """
outbound_queue = 4096
max_connections_per_address = 20000
rate_limit_per_s = 1000000.0
rate_burst = 1000000
[[routes]]
name = "chat-fanout"
from = "chat"
to = ["chat"]
"""


def run_clients(args: Any, server_pid: int, port: int) -> dict[str, Any]:
    chat = unique("room")
    per = [args.sockets // args.procs + (1 if i < args.sockets % args.procs else 0)
           for i in range(args.procs)]
    cmds = [worker_cmd(__file__, "receivers", port=port, chat=chat, count=k, events=args.events)
            for k in per]
    cmds.append(worker_cmd(__file__, "sender", port=port, chat=chat, events=args.events,
                           window=args.window))
    with processes(cmds) as procs:
        *receivers, sender = procs
        c0 = cpu_seconds(server_pid)
        sender.go()
        done = sender.read(300)
        lasts = [r.read(300) for r in receivers]
        cpu = cpu_seconds(server_pid) - c0
    end = max([done["end_ns"]] + [x["last_ns"] for x in lasts])
    elapsed = (end - done["start_ns"]) / 1e9
    deliveries = args.events * (args.sockets + 1)
    assert sum(x["received"] for x in lasts) == args.events * args.sockets
    return {"deliveries_per_s": deliveries / elapsed, "events_per_s": args.events / elapsed,
            "seconds": elapsed, "server_cpu_share": cpu / elapsed,
            "server_cpu_us_per_delivery": cpu / deliveries * 1e6}


def measure(args: Any, config: str) -> dict[str, Any]:
    port = harness.free_port()
    if config.startswith("raw"):
        cmd = [sys.executable, str(harness.BENCH / "baselines.py"), "broadcast",
               "--port", str(port)] + (["--tuned-gc"] if "tuned" in config else [])
        with processes([cmd]) as (server,):
            return run_clients(args, server.pid, port)
    with harness.daemon(CONFIG.replace("@PORT@", str(port)), profile=args.profile) as d:
        return run_clients(args, d.pid, port)


CONFIGS = ("raw trio-websocket broadcast", "raw broadcast, tuned GC", "bridged")


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--sockets", type=int, default=1000, help="receiving sockets")
    p.add_argument("--procs", type=int, default=4, help="receiving client processes")
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--window", type=int, default=32, help="events in flight at most")
    p.add_argument("--port", type=int)
    p.add_argument("--chat")
    p.add_argument("--count", type=int)
    args = p.parse_args()
    if args.worker == "receivers":
        paths = [f"/v1/chats/{args.chat}"] * args.count
        asyncio.run(wsload.receivers(args.port, paths, args.events))
    elif args.worker == "sender":
        asyncio.run(wsload.sender(wsload.chat_url(args.port, args.chat), args.events,
                                  args.window))
    else:
        bench = Bench("fanout", args)
        print(f"fan-out: 1 chat, {args.sockets} sockets in {args.procs} processes + 1 sender,"
              f" {args.events} events, window {args.window}, {args.rounds} rounds")
        bench.rounds({c: partial(measure, args, c) for c in CONFIGS}, args.rounds,
                     lambda r: f"{r['deliveries_per_s']:9,.0f} deliveries/s"
                               f" (server {r['server_cpu_share']:.0%} CPU)")
        bench.ratio("bridged / raw broadcast", "bridged", "raw trio-websocket broadcast",
                    "deliveries_per_s")
        bench.ratio("bridged / raw broadcast with the bridge's GC settings", "bridged",
                    "raw broadcast, tuned GC", "deliveries_per_s")
        bench.report(["deliveries_per_s", "events_per_s", "server_cpu_share",
                      "server_cpu_us_per_delivery"])


if __name__ == "__main__":
    main()
