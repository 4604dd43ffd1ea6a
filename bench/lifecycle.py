"""Scenario 7, lifecycle: start to READY, and the SIGTERM drain under load.

Configurations, interleaved:

* ``import floor``: ``python -c 'import bridge.cli, bridge_plugins.websocket,
  bridge_plugins.amqp'`` from spawn to exit - what any start pays before doing anything.
* ``bridged idle``: a ``bridged run`` process (websocket + amqp transports, the history,
  validation, enrichment; routes chat -> amqp, chat -> chat, amqp -> chat): spawn to
  ``READY=1`` on a ``NOTIFY_SOCKET``, then SIGTERM to exit with nothing going on.
* ``bridged under load``: the same, with ``--procs`` x ``--sockets`` WebSocket clients
  sending updates as fast as their echoes come back (``--window`` in flight per socket) for
  ``--load-s`` seconds, then SIGTERM; the time to exit, and the check that nothing was lost:
  every update a client got its echo (its eventId) for must be in the AMQP queue after
  the exit.

    .venv/bin/python bench/lifecycle.py [--rounds 5]
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from functools import partial
from typing import Any

import harness
import rabbit
import websockets
import wsload
from harness import Bench, print_json, processes, worker_cmd

CONFIG = harness.DAEMON_HEAD + """
rate_limit_per_s = 100000.0
rate_burst = 100000
[transports.rabbit]
type = "amqp"
url = "@URL@"
consume_queue = "@QUEUE@.in"
dead_letter_queue = "@QUEUE@.dead"
exchange = ""
routing_key = "@QUEUE@"
[[routes]]
name = "notifications-to-chat"
from = "rabbit"
to = ["chat"]
kinds = ["notification"]
transforms = ["notification_to_chat"]
[[routes]]
name = "chat-to-amqp"
from = "chat"
to = ["rabbit"]
[[routes]]
name = "chat-fanout"
from = "chat"
to = ["chat"]
"""
IMPORTS = "import bridge.cli, bridge_plugins.websocket, bridge_plugins.amqp"


async def load(port: int, chat: str, sockets: int, window: int) -> None:
    """Send updates, ``window`` not yet echoed per socket, until the server closes; report
    the eventIds echoed back (accepted) and the frames sent."""
    import json

    urls = [wsload.chat_url(port, f"{chat}-{i}") for i in range(sockets)]
    conns = await wsload.connect_all(urls)
    print_json({"ready": len(conns)})
    await wsload.go_signal()
    accepted: list[str] = []
    sent = 0
    codes: list[int | None] = []

    async def one(ws: websockets.ClientConnection) -> None:
        nonlocal sent
        slots = asyncio.Semaphore(window)

        async def echoes() -> None:
            try:
                async for frame in ws:
                    body = json.loads(frame)
                    if body.get("type") == "update":
                        accepted.append(body["eventId"])
                        slots.release()
            finally:
                for _ in range(window):
                    slots.release()  # wake the sender: its next send finds the close

        reader = asyncio.create_task(echoes())
        try:
            while not reader.done():
                await slots.acquire()
                await ws.send(wsload.FRAME)
                sent += 1
        except websockets.ConnectionClosed:
            pass
        await asyncio.gather(reader, return_exceptions=True)
        codes.append(ws.close_code)

    await asyncio.gather(*(one(ws) for ws in conns))
    print_json({"accepted": accepted, "sent": sent,
                "close_codes": sorted({str(c) for c in codes})})


def measure(args: Any, config: str) -> dict[str, Any]:
    if config == "import floor":
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True)
        return {"ready_s": time.monotonic() - t0}
    port = harness.free_port()
    queue = harness.unique("bench.lifecycle")
    text = (CONFIG.replace("@PORT@", str(port)).replace("@URL@", args.url)
            .replace("@QUEUE@", queue))
    rabbit.declare(args.url, queue)
    try:
        with harness.daemon(text, profile=args.profile) as d:
            out: dict[str, Any] = {"ready_s": d.ready_s}
            if config == "bridged idle":
                out["drain_s"] = d.stop()
                out["exit_code"] = d.exit_code
                return out
            chat = harness.unique("life")
            cmds = [worker_cmd(__file__, "load", port=port, chat=f"{chat}-{k}",
                               sockets=args.sockets, window=args.window)
                    for k in range(args.procs)]
            with processes(cmds) as clients:
                for c in clients:
                    c.go()
                time.sleep(args.load_s)
                out["drain_s"] = d.stop()
                out["exit_code"] = d.exit_code
                results = [c.read(60) for c in clients]
        accepted = {i for r in results for i in r["accepted"]}
        published = rabbit.drain_ids(args.url, queue)
        lost = accepted - set(published)
        out.update(sent=sum(r["sent"] for r in results), accepted=len(accepted),
                   published=len(published), lost=len(lost),
                   published_not_echoed=len(set(published) - accepted),
                   duplicates=len(published) - len(set(published)),
                   close_codes=sorted({c for r in results for c in r["close_codes"]}))
        out["load_msgs_per_s"] = len(accepted) / args.load_s
        return out
    finally:
        rabbit.delete(args.url, queue, queue + ".in", queue + ".dead")


CONFIGS = ("import floor", "bridged idle", "bridged under load")


def show(r: dict[str, Any]) -> str:
    text = f"ready {r['ready_s'] * 1000:6.0f} ms"
    if "drain_s" in r:
        text += f", SIGTERM->exit {r['drain_s'] * 1000:6.0f} ms (exit {r['exit_code']})"
    if "lost" in r:
        text += (f", {r['accepted']} accepted ({r['load_msgs_per_s']:,.0f}/s), "
                 f"{r['published']} published, lost {r['lost']}, close {r['close_codes']}")
    return text


def main() -> None:
    p = harness.parser(__doc__, rounds=5)
    p.add_argument("--procs", type=int, default=2, help="load client processes")
    p.add_argument("--sockets", type=int, default=8, help="sockets per client process")
    p.add_argument("--window", type=int, default=16, help="updates in flight per socket")
    p.add_argument("--load-s", type=float, default=3.0, help="seconds of load before SIGTERM")
    p.add_argument("--port", type=int)
    p.add_argument("--chat")
    args = p.parse_args()
    if args.worker == "load":
        asyncio.run(load(args.port, args.chat, args.sockets, args.window))
        return
    bench = Bench("lifecycle", args)
    print(f"lifecycle: {args.rounds} rounds; load {args.procs}x{args.sockets} sockets,"
          f" window {args.window}, SIGTERM after {args.load_s} s")
    bench.rounds({c: partial(measure, args, c) for c in CONFIGS}, args.rounds, show)
    bench.ratio("READY / import floor", "bridged idle", "import floor", "ready_s")
    bench.ratio("drain under load / idle", "bridged under load", "bridged idle", "drain_s")
    bench.report(["ready_s", "drain_s", "load_msgs_per_s", "accepted", "published", "lost",
                  "published_not_echoed", "duplicates"])


if __name__ == "__main__":
    main()
