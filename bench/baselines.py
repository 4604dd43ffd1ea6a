"""Baseline servers the scenarios compare bridged with, each run in its own process.

``naive``: what a user would write in ten lines: a ``websockets`` server, one aio-pika
``connect_robust`` and a confirm channel; every client frame is parsed, stamped with an id
and a timestamp, and published persistently with ``await exchange.publish`` (one confirm at
a time per connection).

``broadcast``: a raw trio-websocket broadcast loop, the floor under the bridge's fan-out:
every connection is in one room; each frame a client sends is put, as received, into every
connection's bounded queue (``send_nowait``), and a writer task per connection sends from
its queue. With ``--heartbeat S`` the writer also sends a heartbeat frame every S seconds
when idle (the same loop shape as the bridge's writer); stdin ``start`` / ``stop``
records how late the writers woke for heartbeats and prints p50/p99.

    python bench/baselines.py naive --port 8765 --queue q
    python bench/baselines.py broadcast --port 8766 [--heartbeat 5] [--tuned-gc]

Each prints ``{"ready": true}`` once listening and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import sys
import time

import trio
from harness import percentile, print_json

# --------------------------------------------------------------------------- naive bridge


async def naive(port: int, queue: str, url: str) -> None:
    import aio_pika
    import websockets

    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(queue, durable=True)
    exchange = channel.default_exchange
    ids = itertools.count()

    async def handler(ws: websockets.ServerConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):  # the clients are killed
            await serve(ws)

    async def serve(ws: websockets.ServerConnection) -> None:
        async for frame in ws:
            body = json.loads(frame)
            now = time.time()
            event_id = f"{int(now * 1000) * 1000 + next(ids) % 1000:020d}"
            body.update(eventId=event_id, timestamp=int(now), timestampms=int(now * 1000))
            await exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), message_id=event_id,
                                 content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue)

    async with websockets.serve(handler, "127.0.0.1", port, max_size=65536):
        print_json({"ready": True})
        await asyncio.Future()


# --------------------------------------------------------------------------- broadcast


async def broadcast(port: int, heartbeat: float, queue_size: int) -> None:
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    room: set[trio.MemorySendChannel[str | bytes]] = set()
    heartbeat_frame = json.dumps({"type": "heartbeat"})
    lateness: list[float] | None = None  # heartbeat lateness (s), while recording

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        send, receive = trio.open_memory_channel[str | bytes](queue_size)

        async def writer() -> None:
            beat = trio.current_time() + heartbeat if heartbeat else math.inf
            with receive:
                while True:
                    frame: str | bytes | None = None
                    with trio.move_on_at(beat):
                        frame = await receive.receive()
                    if frame is None:
                        frame = heartbeat_frame
                        now = trio.current_time()
                        if lateness is not None:
                            lateness.append(now - beat)
                        beat = beat + heartbeat if beat + heartbeat > now else now + heartbeat
                    await ws.send_message(frame)

        room.add(send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                try:
                    while True:
                        frame = await ws.get_message()
                        for other in list(room):
                            try:
                                other.send_nowait(frame)
                            except trio.WouldBlock:
                                room.discard(other)  # too slow: dropped, as bridged closes it
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass
        finally:
            room.discard(send)

    async def commands() -> None:
        """stdin ``start``: record heartbeat lateness; ``stop``: print its percentiles."""
        nonlocal lateness
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            if line.strip() == "start":
                lateness = []
            elif line.strip() == "stop" and lateness is not None:
                print_json({"server_lateness_p50_ms": percentile(lateness, 50) * 1000,
                            "server_lateness_p99_ms": percentile(lateness, 99) * 1000,
                            "server_lateness_count": len(lateness)})
                lateness = None

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
        print_json({"ready": True})
        nursery.start_soon(commands)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("naive", "broadcast"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--queue", default="")
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--heartbeat", type=float, default=0.0)
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--tuned-gc", action="store_true",
                   help="the garbage-collector settings of bridged (bridge.cli.tune_gc)")
    a = p.parse_args()
    if a.kind == "naive":
        asyncio.run(naive(a.port, a.queue, a.url))
    else:
        if a.tuned_gc:
            from bridge.cli import tune_gc

            tune_gc()  # the bridge's own collector settings, for a like-for-like floor
        trio.run(broadcast, a.port, a.heartbeat, a.queue_size)


if __name__ == "__main__":
    main()
