"""Scenario 1, WS -> AMQP: client chat updates into RabbitMQ, confirmed and persistent.

Three configurations, interleaved over the rounds, each on a fresh durable queue:

* ``raw aio-pika publish``: one asyncio process publishes N persistent messages (the size of
  an enriched update) with publisher confirms, 256 unconfirmed at most - the ceiling of the
  Python AMQP client.
* ``naive websockets+aio-pika``: bench/baselines.py ``naive``: a websockets server that awaits
  each publish's confirm (what a user would write).
* ``bridged``: a ``bridged run`` process (websocket -> amqp route; validation, enrichment and
  the SQLite history on, as by default; the outbox fsynced per batch, publisher confirms),
  the bridge as shipped.

The WebSocket load comes from ``--procs`` client processes with ``--sockets`` sockets each
(one chat per socket), sending N frames in all as fast as the server reads them. The time is
from the first frame sent to the moment the queue holds N messages (polled every 10 ms).

    .venv/bin/python bench/ws_to_amqp.py [--n 20000] [--rounds 5] [--procs 2] [--sockets 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from functools import partial
from typing import Any

import aio_pika
import harness
import rabbit
import wsload
from harness import Bench, cpu_seconds, processes, unique, worker_cmd

CONFIG = harness.DAEMON_HEAD + """
rate_limit_per_s = 1000000.0
rate_burst = 1000000
[transports.rabbit]
type = "amqp"
url = "@URL@"
consume_queue = ""
dead_letter_queue = ""
exchange = ""
routing_key = "@QUEUE@"
[[routes]]
name = "chat-to-amqp"
from = "chat"
to = ["rabbit"]
"""

BODY = json.dumps({"type": "update", "eventId": "00001763800000000000", "timestamp": 1763800000,
                   "timestampms": 1763800000000, "message": [
                       {"type": "message", "text": "Hello, I need help with my booking #12345",
                        "sender": "client", "send_date": 1763800000}]}).encode()


def bridged_config(port: int, url: str, queue: str) -> str:
    return (CONFIG.replace("@PORT@", str(port)).replace("@URL@", url)
            .replace("@QUEUE@", queue))


async def raw_publish(url: str, queue: str, n: int, window: int) -> dict[str, Any]:
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(queue, durable=True)
        t0, c0 = time.perf_counter(), harness.cpu_seconds(os.getpid())
        await rabbit.publish_window(ch, queue, n, lambda i: BODY, window)
        elapsed = time.perf_counter() - t0
        cpu = harness.cpu_seconds(os.getpid()) - c0
    return {"msgs_per_s": n / elapsed, "seconds": elapsed, "cpu_us_per_msg": cpu / n * 1e6}


def run_ws(args: Any, server_pid: int, port: int, queue: str,
           client_script: str = __file__) -> dict[str, Any]:
    """Drive the WebSocket clients (the ``clients`` worker of ``client_script``) against a
    server on ``port``; the rate into ``queue``."""
    per_socket = args.n // (args.procs * args.sockets)
    n = per_socket * args.procs * args.sockets
    tag = unique("c")
    cmds = [worker_cmd(client_script, "clients", port=port, sockets=args.sockets, frames=per_socket,
                       chat=f"{tag}-{p}", queue=queue) for p in range(args.procs)]
    with processes(cmds) as clients:
        c0 = cpu_seconds(server_pid)
        for c in clients:
            c.go()
        end = rabbit.wait_depth(args.url, queue, n, timeout=120)
        cpu = cpu_seconds(server_pid) - c0
        starts = [c.read(60)["start_ns"] for c in clients]
    elapsed = end - min(starts) / 1e9
    return {"msgs_per_s": n / elapsed, "seconds": elapsed, "server_cpu_us_per_msg": cpu / n * 1e6}


def measure(args: Any, config: str) -> dict[str, Any]:
    queue = unique("bench.ws2amqp")
    try:
        if config == "raw aio-pika publish":
            out = harness.Proc(worker_cmd(__file__, "raw", url=args.url, queue=queue, n=args.n))
            return out.result()
        rabbit.declare(args.url, queue)
        port = harness.free_port()
        if config == "naive websockets+aio-pika":
            cmd = [sys.executable, str(harness.BENCH / "baselines.py"), "naive",
                   "--port", str(port), "--queue", queue, "--url", args.url]
            with processes([cmd]) as (server,):
                return run_ws(args, server.pid, port, queue)
        with harness.daemon(bridged_config(port, args.url, queue), profile=args.profile) as d:
            return run_ws(args, d.pid, port, queue)
    finally:
        rabbit.delete(args.url, queue)


CONFIGS = ("raw aio-pika publish", "naive websockets+aio-pika", "bridged")


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The options of :func:`run_ws`'s load, and of its ``clients`` workers."""
    p.add_argument("--n", type=int, default=20000, help="messages per run")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--sockets", type=int, default=16, help="sockets per client process")
    p.add_argument("--port", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--chat", default="bench")
    p.add_argument("--queue")


def main() -> None:
    p = harness.parser(__doc__, rounds=5)
    add_load_options(p)
    args = p.parse_args()
    if args.worker == "raw":
        harness.print_json(asyncio.run(raw_publish(args.url, args.queue, args.n, 256)))
        return
    if args.worker == "clients":
        urls = [wsload.chat_url(args.port, f"{args.chat}-{i}") for i in range(args.sockets)]
        asyncio.run(wsload.blast(urls, args.frames))
        return
    bench = Bench("ws_to_amqp", args)
    print(f"WS -> AMQP, N={args.n}, {args.procs}x{args.sockets} sockets, {args.rounds} rounds")
    bench.rounds({c: partial(measure, args, c) for c in CONFIGS}, args.rounds,
                 lambda r: f"{r['msgs_per_s']:8,.0f} msg/s")
    bench.ratio("bridged / raw aio-pika publish", "bridged", "raw aio-pika publish",
                "msgs_per_s")
    bench.ratio("bridged / naive", "bridged", "naive websockets+aio-pika", "msgs_per_s")
    bench.report(["msgs_per_s", "cpu_us_per_msg", "server_cpu_us_per_msg"])


if __name__ == "__main__":
    main()
