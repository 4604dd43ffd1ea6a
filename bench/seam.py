"""Benchmark: the trio seam (bridge_plugins.amqp) against plain asyncio aio-pika.

Publish: N messages with publisher confirms and a window of unconfirmed messages.
Consume: N messages, manual ack, bounded prefetch (the queue is filled before timing).
Each measurement runs in a fresh process; rounds interleave the four configurations in a
shuffled order so that machine noise hits them alike. Medians and ratios (seam / asyncio)
are printed and written as JSON to bench/results/.

    python bench/seam.py                     # N=20000, 5 rounds, window and prefetch 256
    python bench/seam.py --n 5000 --rounds 3 --transient

This file imports asyncio and aio-pika because the plain-asyncio baseline is what it
measures; the daemon itself uses asyncio only inside the seam module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aio_pika
import trio
from harness import commit

from bridge_plugins.amqp.connection import Connection
from bridge_plugins.amqp.island import open_island
from bridge_plugins.amqp.publisher import Outgoing, Properties

CONFIGS = ("publish/asyncio", "publish/seam", "consume/asyncio", "consume/seam")
RESULTS = Path(__file__).parent / "results"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _body(i: int) -> bytes:
    return json.dumps({"seq": i, "pad": "x" * 160}).encode()


# --------------------------------------------------------------------------- asyncio


async def _aio_fill(url: str, queue: str, n: int, window: int, persistent: bool) -> None:
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(queue, durable=True)
        await _aio_publish_all(ch, queue, n, window, persistent)


async def _aio_publish_all(ch: aio_pika.abc.AbstractChannel, queue: str, n: int, window: int,
                           persistent: bool) -> None:
    mode = aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
    sem = asyncio.Semaphore(window)
    exchange = ch.default_exchange

    async def one(i: int) -> None:
        try:
            await exchange.publish(aio_pika.Message(_body(i), delivery_mode=mode,
                                                    message_id=str(i),
                                                    content_type="application/json"),
                                   routing_key=queue)
        finally:
            sem.release()

    tasks = []
    for i in range(n):
        await sem.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def aio_publish(url: str, queue: str, n: int, window: int, persistent: bool
                      ) -> tuple[float, float]:
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(queue, durable=True)
        t0, c0 = time.perf_counter(), _cpu()
        await _aio_publish_all(ch, queue, n, window, persistent)
        return time.perf_counter() - t0, _cpu() - c0


async def aio_consume(url: str, queue: str, n: int, prefetch: int) -> tuple[float, float]:
    conn = await aio_pika.connect(url)
    async with conn:
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

        t0, c0 = time.perf_counter(), _cpu()
        tag = await q.consume(on_message)
        await done.wait()
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        await q.cancel(tag)
        return elapsed, cpu


# --------------------------------------------------------------------------- seam


async def seam_publish(url: str, queue: str, n: int, window: int, persistent: bool
                       ) -> tuple[float, float]:
    async with open_island("bench") as island:
        conn = await Connection.open(island, url)
        try:
            await conn.declare(queues=[queue])
            publisher = await conn.open_publisher(window)
            t0, c0 = time.perf_counter(), _cpu()
            async with trio.open_nursery() as nursery:

                async def produce() -> None:
                    for start in range(0, n, window):
                        await publisher.publish([
                            Outgoing("", queue, _body(i),
                                     Properties("application/json", str(i), persistent), i)
                            for i in range(start, min(start + window, n))])

                nursery.start_soon(produce)
                confirmed = 0
                while confirmed < n:
                    batch = await publisher.confirms()
                    if not all(c.ok for c in batch):
                        raise RuntimeError("a publish was not confirmed")
                    confirmed += len(batch)
            return time.perf_counter() - t0, _cpu() - c0
        finally:
            await conn.close()


async def seam_consume(url: str, queue: str, n: int, prefetch: int) -> tuple[float, float]:
    async with open_island("bench") as island:
        conn = await Connection.open(island, url)
        try:
            t0, c0 = time.perf_counter(), _cpu()
            consumer = await conn.open_consumer(queue, prefetch)
            seen = 0
            while seen < n:
                for d in await consumer.receive():
                    json.loads(d.body)
                    consumer.ack(d.tag)
                    seen += 1
            elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
            return elapsed, cpu
        finally:
            await conn.close()


# --------------------------------------------------------------------------- processes


def worker(args: argparse.Namespace) -> None:
    queue = f"bench.seam.{uuid.uuid4().hex[:10]}"
    op, impl = args.worker.split("/")
    persistent = not args.transient
    try:
        if op == "publish":
            if impl == "asyncio":
                elapsed, cpu = asyncio.run(aio_publish(args.url, queue, args.n, args.window,
                                                       persistent))
            else:
                elapsed, cpu = trio.run(seam_publish, args.url, queue, args.n, args.window,
                                        persistent)
        else:
            asyncio.run(_aio_fill(args.url, queue, args.n, args.window, persistent))
            if impl == "asyncio":
                elapsed, cpu = asyncio.run(aio_consume(args.url, queue, args.n, args.prefetch))
            else:
                elapsed, cpu = trio.run(seam_consume, args.url, queue, args.n, args.prefetch)
    finally:
        asyncio.run(_delete(args.url, queue))
    print(json.dumps({"config": args.worker, "seconds": elapsed,
                      "msgs_per_s": args.n / elapsed, "cpu_us_per_msg": cpu / args.n * 1e6}))


async def _delete(url: str, queue: str) -> None:
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        await ch.queue_delete(queue)


def orchestrate(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = list(CONFIGS)
        random.shuffle(order)
        for config in order:
            cmd = [sys.executable, __file__, "--worker", config, "--n", str(args.n),
                   "--window", str(args.window), "--prefetch", str(args.prefetch),
                   "--url", args.url] + (["--transient"] if args.transient else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[config].append(result)
            print(f"round {r + 1}/{args.rounds} {config:16} {result['msgs_per_s']:9.0f} msg/s"
                  f" {result['cpu_us_per_msg']:6.0f} us CPU/msg", flush=True)

    def med(config: str, key: str) -> float:
        return float(statistics.median(x[key] for x in runs[config]))

    summary: dict[str, Any] = {}
    for config in CONFIGS:
        rates = [x["msgs_per_s"] for x in runs[config]]
        summary[config] = {"median_msgs_per_s": med(config, "msgs_per_s"),
                           "min": min(rates), "max": max(rates),
                           "median_cpu_us_per_msg": med(config, "cpu_us_per_msg")}
    def ratio(op: str) -> float:
        return med(f"{op}/seam", "msgs_per_s") / med(f"{op}/asyncio", "msgs_per_s")

    ratios = {"publish": ratio("publish"), "consume": ratio("consume")}
    print()
    for config, s in summary.items():
        print(f"{config:16} median {s['median_msgs_per_s']:9.0f} msg/s"
              f" ({s['min']:.0f}-{s['max']:.0f}), {s['median_cpu_us_per_msg']:.0f} us CPU/msg")
    print(f"ratio seam/asyncio: publish {ratios['publish']:.2f}x,"
          f" consume {ratios['consume']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"seam-{stamp}.json"
    path.write_text(json.dumps({
        "command": " ".join(["python", "bench/seam.py", *sys.argv[1:]]),
        "when": stamp, "commit": commit(), "n": args.n, "rounds": args.rounds,
        "window": args.window,
        "prefetch": args.prefetch, "persistent": not args.transient,
        "python": platform.python_version(), "machine": platform.machine(),
        "versions": {p: version(p) for p in ("aio-pika", "aiormq", "trio")},
        "summary": summary, "ratios": ratios, "runs": runs,
    }, indent=2) + "\n")
    print(f"written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=256, help="unconfirmed publishes")
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--transient", action="store_true", help="delivery mode 1")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
