"""Scenario 6, latency at a fixed rate (1,000 msg/s): p50/p99 from send to receive.

Four configurations, interleaved:

* ``ws->ws raw broadcast``: a sender socket and a receiver socket on bench/baselines.py
  ``broadcast`` (a raw trio-websocket relay).
* ``ws->ws bridged``: the same two sockets on one chat of a ``bridged run`` process (chat ->
  chat route: validate, enrich, store in the history, fan out).
* ``notification raw aio-pika``: an aio-pika publisher (persistent, no confirm wait) and an
  aio-pika consumer (manual ack, prefetch 256) in another process - the broker's floor.
* ``notification bridged``: the same publisher; the daemon consumes, validates, transforms,
  stores and delivers to a WebSocket client.

Sender, receiver and server are separate processes. Each message carries its send time
(CLOCK_MONOTONIC, one clock for all processes); the receiver takes the difference. The
first ``--warmup`` seconds are left out.

    .venv/bin/python bench/latency.py [--rate 1000] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from functools import partial
from typing import Any

import aio_pika
import harness
import rabbit
import websockets
import wsload
from harness import Bench, cpu_seconds, now_ns, percentile, print_json, processes, worker_cmd

CONFIG = harness.DAEMON_HEAD + """
rate_limit_per_s = 100000.0
rate_burst = 100000
@AMQP@
"""
FANOUT = """
[[routes]]
name = "chat-fanout"
from = "chat"
to = ["chat"]
"""
AMQP = """
[transports.rabbit]
type = "amqp"
url = "@URL@"
consume_queue = "@QUEUE@"
dead_letter_queue = "@QUEUE@.dead"
exchange = ""
routing_key = "@QUEUE@.out"
[[routes]]
name = "notifications-to-chat"
from = "rabbit"
to = ["chat"]
kinds = ["notification"]
transforms = ["notification_to_chat"]
"""


async def paced(rate: float, seconds: float, send: Any) -> int:
    """Call ``send(i)`` at ``rate`` per second on a fixed schedule (late ones go at once)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)
    return n


def ws_frame(t: int) -> str:
    return json.dumps({"type": "update", "message": [
        {"type": "message", "text": f"t={t}", "sender": "bench"}]})


async def ws_sender(port: int, chat: str, rate: float, seconds: float) -> None:
    async with websockets.connect(wsload.chat_url(port, chat), ping_interval=None,
                                  compression=None) as ws:
        print_json({"ready": True})
        await wsload.go_signal()

        async def drain() -> None:
            async for _ in ws:  # its own echoes
                pass

        reader = asyncio.create_task(drain())
        n = await paced(rate, seconds, lambda i: ws.send(ws_frame(now_ns())))
        print_json({"sent": n})
        await asyncio.sleep(2)
        reader.cancel()


async def amqp_sender(url: str, queue: str, chat: str, rate: float, seconds: float) -> None:
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel(publisher_confirms=False)
        await ch.declare_queue(queue, durable=True)
        print_json({"ready": True})
        await wsload.go_signal()

        async def send(i: int) -> None:
            body = json.dumps({"userId": chat, "message": f"t={now_ns()}",
                               "timestamp": "2026-11-22T08:00:00Z"}).encode()
            await ch.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=rabbit.PERSISTENT, message_id=str(i),
                                 content_type="application/json"), routing_key=queue)

        print_json({"sent": await paced(rate, seconds, send)})


def summary(latencies: list[float], skip: int) -> dict[str, Any]:
    kept = latencies[skip:]
    return {"p50_ms": percentile(kept, 50), "p99_ms": percentile(kept, 99),
            "max_ms": max(kept, default=float("nan")), "count": len(latencies)}


async def ws_receiver(port: int, chat: str, expect: int, skip: int) -> None:
    latencies: list[float] = []
    async with websockets.connect(wsload.chat_url(port, chat), ping_interval=None,
                                  compression=None) as ws:
        print_json({"ready": True})
        try:
            async with asyncio.timeout(expect / 500 + 20):
                while len(latencies) < expect:
                    frame = json.loads(await ws.recv())
                    if frame.get("type") == "heartbeat":
                        continue
                    text = frame["message"][0]["text"]
                    latencies.append((now_ns() - int(text[2:])) / 1e6)
        except TimeoutError:
            pass
    print_json(summary(latencies, skip))


async def amqp_receiver(url: str, queue: str, expect: int, skip: int) -> None:
    latencies: list[float] = []
    done = asyncio.Event()
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=256)
        q = await ch.declare_queue(queue, durable=True)

        async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            text = json.loads(m.body)["message"]
            latencies.append((now_ns() - int(text[2:])) / 1e6)
            await m.ack()
            if len(latencies) >= expect:
                done.set()

        await q.consume(on)
        print_json({"ready": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), expect / 500 + 20)
    print_json(summary(latencies, skip))


def measure(args: Any, config: str) -> dict[str, Any]:
    expect = int(args.rate * args.seconds)
    skip = int(args.rate * args.warmup)
    port = harness.free_port()
    chat = harness.unique("lat")
    queue = harness.unique("bench.latency")
    common = {"rate": args.rate, "seconds": args.seconds}
    if config.startswith("ws->ws"):
        clients = [worker_cmd(__file__, "ws-receiver", port=port, chat=chat, expect=expect,
                              skip=skip),
                   worker_cmd(__file__, "ws-sender", port=port, chat=chat, **common)]
    else:
        receiver = (worker_cmd(__file__, "amqp-receiver", url=args.url, queue=queue,
                               expect=expect, skip=skip) if config.endswith("aio-pika")
                    else worker_cmd(__file__, "ws-receiver", port=port, chat=chat,
                                    expect=expect, skip=skip))
        clients = [receiver, worker_cmd(__file__, "amqp-sender", url=args.url, queue=queue,
                                        chat=chat, **common)]

    def drive(server_pid: int) -> dict[str, Any]:
        with processes(clients) as (recv, send):
            c0 = cpu_seconds(server_pid) if server_pid else 0.0
            s0 = harness.sys_seconds(server_pid) if server_pid else 0.0
            send.go()
            sent = send.read(args.seconds + 30)["sent"]
            out = recv.read(args.seconds + 60)
            if server_pid:
                out["server_cpu_share"] = (cpu_seconds(server_pid) - c0) / args.seconds
                out["server_sys_share"] = (harness.sys_seconds(server_pid) - s0) / args.seconds
            out["sent"] = sent
            return out

    try:
        if config == "ws->ws raw broadcast":
            cmd = [sys.executable, str(harness.BENCH / "baselines.py"), "broadcast",
                   "--port", str(port)]
            with processes([cmd]) as (server,):
                return drive(server.pid)
        if config == "notification raw aio-pika":
            rabbit.declare(args.url, queue)
            return drive(0)
        amqp = "" if config.startswith("ws->ws") else AMQP
        text = (CONFIG.replace("@AMQP@", amqp).replace("@PORT@", str(port))
                .replace("@URL@", args.url).replace("@QUEUE@", queue))
        if config.startswith("ws->ws"):
            text += FANOUT
        if args.history == "off":
            text = text.replace("[transports.chat]", '[plugins]\ndisable = ["history"]\n'
                                '[transports.chat]', 1)
        elif args.history == "no-prune":
            text += "[plugins.history]\nretention_count = 100000000\n"
        elif args.history != "full":
            text += f'[plugins.history]\nsynchronous = "{args.history}"\n'

        with harness.daemon(text, profile=args.profile) as d:
            return drive(d.pid)
    finally:
        if config.startswith("notification"):
            rabbit.delete(args.url, queue, queue + ".dead")


CONFIGS = ("ws->ws raw broadcast", "ws->ws bridged", "notification raw aio-pika",
           "notification bridged")


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    p.add_argument("--seconds", type=float, default=8.0, help="sending time per run")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds left out at the start")
    p.add_argument("--history", choices=("full", "normal", "off", "no-prune"), default="full",
                   help="the bridge's history: synchronous full (the default), normal, off,"
                        " or full without the per-chat retention pruning")
    p.add_argument("--port", type=int)
    p.add_argument("--chat")
    p.add_argument("--queue")
    p.add_argument("--expect", type=int)
    p.add_argument("--skip", type=int)
    args = p.parse_args()
    roles = {
        "ws-sender": lambda: ws_sender(args.port, args.chat, args.rate, args.seconds),
        "amqp-sender": lambda: amqp_sender(args.url, args.queue, args.chat, args.rate,
                                           args.seconds),
        "ws-receiver": lambda: ws_receiver(args.port, args.chat, args.expect, args.skip),
        "amqp-receiver": lambda: amqp_receiver(args.url, args.queue, args.expect, args.skip),
    }
    if args.worker:
        asyncio.run(roles[args.worker]())
        return
    bench = Bench("latency", args)
    print(f"latency at {args.rate:.0f} msg/s for {args.seconds} s, {args.rounds} rounds")
    bench.rounds({c: partial(measure, args, c) for c in CONFIGS}, args.rounds,
                 lambda r: f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms,"
                           f" max {r['max_ms']:.1f} ms, {r['count']}/{r['sent']} received")
    for kind, raw in (("ws->ws", "raw broadcast"), ("notification", "raw aio-pika")):
        for q in ("p50_ms", "p99_ms"):
            bench.ratio(f"{kind} {q} bridged / {raw}", f"{kind} bridged", f"{kind} {raw}", q)
    bench.report(["p50_ms", "p99_ms", "max_ms", "count", "server_cpu_share",
                  "server_sys_share"])


if __name__ == "__main__":
    main()
