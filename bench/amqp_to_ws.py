"""Scenario 2, AMQP -> WS: notifications consumed (manual acks) and delivered to a socket.

* ``raw aio-pika consume``: one asyncio process drains a filled durable queue, manual ack,
  prefetch 256, each body decoded (bench/seam.py's baseline).
* ``bridged``: a ``bridged run`` process consumes the same kind of filled queue (prefetch 256,
  batched acks), validates and enriches each notification, turns it into a chat update
  (``notification_to_chat``), stores it in the history and delivers it to one WebSocket
  client in another process; the rate is counted at that client.

With ``--stages``, two more configurations run in the same rounds, to show what the
bridge's own stages cost: ``bridged, no history`` (the history plugin disabled) and
``bridged, no history, no validation``. Enrichment stays: it provides the
``notification_to_chat`` transform.

The queue is filled before the consumer starts. For the bridge, a holder process keeps the
queue in exclusive use until the WebSocket client is connected; the daemon's consumer is
refused meanwhile and retries every 50 ms, so the time is taken from the first update the
client receives to the N-th.

    .venv/bin/python bench/amqp_to_ws.py [--n 20000] [--rounds 5] [--stages]
"""

from __future__ import annotations

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
import websockets
import wsload
from harness import Bench, Proc, cpu_seconds, now_ns, print_json, unique, worker_cmd

CONFIG = """
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[log]
level = "error"
[transports.chat]
type = "websocket"
port = @PORT@
outbound_queue = 100000
[transports.rabbit]
type = "amqp"
url = "@URL@"
consume_queue = "@QUEUE@"
dead_letter_queue = "@QUEUE@.dead"
exchange = ""
routing_key = "@QUEUE@.out"
reconnect_initial_s = 0.05
reconnect_max_s = 0.05
[plugins.history]
retention_count = 100000
[[routes]]
name = "notifications-to-chat"
from = "rabbit"
to = ["chat"]
kinds = ["notification"]
transforms = ["notification_to_chat"]
"""


def notification(chat: str) -> Any:
    def body(i: int) -> bytes:
        return json.dumps({"userId": chat, "message": f"Your appointment #{i} is tomorrow",
                           "timestamp": "2026-11-22T08:00:00Z"}).encode()
    return body


async def raw_consume(url: str, queue: str, n: int, prefetch: int) -> dict[str, Any]:
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=prefetch)
        q = await ch.declare_queue(queue, durable=True)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            json.loads(message.body)
            await message.ack()
            seen += 1
            if seen == n:
                done.set()

        t0, c0 = time.perf_counter(), cpu_seconds(os.getpid())
        tag = await q.consume(on_message)
        await done.wait()
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(os.getpid()) - c0
        await q.cancel(tag)
    return {"msgs_per_s": n / elapsed, "seconds": elapsed, "cpu_us_per_msg": cpu / n * 1e6}


async def hold(url: str, queue: str) -> None:
    """Keep ``queue`` in exclusive use until told to go."""
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=1)
        q = await ch.declare_queue(queue, durable=True)
        await q.consume(lambda m: asyncio.sleep(0), exclusive=True)
        print_json({"ready": True})
        await wsload.go_signal()
    print_json({"released_ns": now_ns()})


async def receive(port: int, chat: str, n: int) -> None:
    async with websockets.connect(wsload.chat_url(port, chat), ping_interval=None,
                                  max_size=2**20, compression=None) as ws:
        print_json({"ready": True})
        first, cpu0 = 0, 0.0
        for i in range(n):
            frame = json.loads(await ws.recv())
            if i == 0:
                first, cpu0 = now_ns(), cpu_seconds(os.getpid())
            if frame.get("type") != "update":
                raise RuntimeError(f"unexpected frame {frame}")
        print_json({"first_ns": first, "last_ns": now_ns(),
                    "client_cpu_us_per_msg": (cpu_seconds(os.getpid()) - cpu0) / (n - 1) * 1e6})


def measure(args: Any, config: str) -> dict[str, Any]:
    queue = unique("bench.amqp2ws")
    chat = unique("chat")
    try:
        rabbit.fill(args.url, queue, args.n, notification(chat))
        if config == "raw aio-pika consume":
            return Proc(worker_cmd(__file__, "raw", url=args.url, queue=queue, n=args.n)).result()
        port = harness.free_port()
        text = (CONFIG.replace("@PORT@", str(port)).replace("@URL@", args.url)
                .replace("@QUEUE@", queue))
        if STAGES[config]:
            text = text.replace("[plugins.history]\nretention_count = 100000\n",
                                f"[plugins]\ndisable = {json.dumps(STAGES[config])}\n")
        hold_cmd = worker_cmd(__file__, "hold", url=args.url, queue=queue)
        receive_cmd = worker_cmd(__file__, "receive", port=port, chat=chat, n=args.n)
        with (harness.processes([hold_cmd]) as (holder,),
              harness.daemon(text, wait="port", port=port, profile=args.profile) as d,
              harness.processes([receive_cmd]) as (client,)):
            c0 = cpu_seconds(d.pid)
            holder.go()
            result = client.read(120)
            cpu = cpu_seconds(d.pid) - c0
        elapsed = (result["last_ns"] - result["first_ns"]) / 1e9
        return {"msgs_per_s": (args.n - 1) / elapsed, "seconds": elapsed,
                "server_cpu_us_per_msg": cpu / args.n * 1e6,
                "client_cpu_us_per_msg": result["client_cpu_us_per_msg"]}
    finally:
        rabbit.delete(args.url, queue, queue + ".dead")


CONFIGS = ("raw aio-pika consume", "bridged")
#: The bridge's configurations: the built-in plugins each one disables.
STAGES: dict[str, list[str]] = {"bridged": [], "bridged, no history": ["history"],
                                "bridged, no history, no validation": ["history", "validation"]}


def main() -> None:
    p = harness.parser(__doc__, rounds=5)
    p.add_argument("--n", type=int, default=20000, help="messages per run")
    p.add_argument("--port", type=int)
    p.add_argument("--chat")
    p.add_argument("--queue")
    p.add_argument("--stages", action="store_true",
                   help="also run the bridge without the history, and without validation")
    args = p.parse_args()
    if args.worker == "raw":
        print_json(asyncio.run(raw_consume(args.url, args.queue, args.n, 256)))
    elif args.worker == "hold":
        asyncio.run(hold(args.url, args.queue))
    elif args.worker == "receive":
        asyncio.run(receive(args.port, args.chat, args.n))
    else:
        bench = Bench("amqp_to_ws", args)
        print(f"AMQP -> WS, N={args.n}, {args.rounds} rounds", file=sys.stderr)
        configs = [*CONFIGS, *(list(STAGES)[1:] if args.stages else [])]
        bench.rounds({c: partial(measure, args, c) for c in configs}, args.rounds,
                     lambda r: f"{r['msgs_per_s']:8,.0f} msg/s")
        for c in configs[1:]:
            bench.ratio(f"{c} / raw aio-pika consume", c, "raw aio-pika consume",
                        "msgs_per_s")
        bench.report(["msgs_per_s", "cpu_us_per_msg", "server_cpu_us_per_msg",
                      "client_cpu_us_per_msg"])


if __name__ == "__main__":
    main()
