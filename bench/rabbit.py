"""RabbitMQ helpers of the benchmarks, on plain asyncio aio-pika (the baseline's own stack).

Non-robust connections throughout: a robust channel answers a passive declare from its cache
(research/peers.md §1), which would report a stale queue depth.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aio_pika

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


async def publish_window(channel: aio_pika.abc.AbstractChannel, routing_key: str, n: int,
                         body: Callable[[int], bytes], window: int = 256,
                         exchange: str = "", persistent: bool = True,
                         headers: dict[str, object] | None = None) -> None:
    """Publish ``n`` messages with at most ``window`` unconfirmed (a confirm channel)."""
    ex = channel.default_exchange if not exchange else await channel.get_exchange(exchange)
    mode = PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        try:
            await ex.publish(aio_pika.Message(body(i), delivery_mode=mode, message_id=str(i),
                                              content_type="application/json",
                                              headers=headers),  # type: ignore[arg-type]
                             routing_key=routing_key)
        finally:
            sem.release()

    tasks = []
    for i in range(n):
        await sem.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


def declare(url: str, *queues: str) -> None:
    async def go() -> None:
        async with await aio_pika.connect(url) as conn:
            ch = await conn.channel()
            for q in queues:
                await ch.declare_queue(q, durable=True)
    asyncio.run(go())


def delete(url: str, *queues: str) -> None:
    async def go() -> None:
        async with await aio_pika.connect(url) as conn:
            for q in queues:
                ch = await conn.channel()
                await ch.queue_delete(q)
    asyncio.run(go())


def fill(url: str, queue: str, n: int, body: Callable[[int], bytes], *,
         persistent: bool = True) -> None:
    """Put ``n`` messages into ``queue`` (declared durable) and wait for the confirms."""
    async def go() -> None:
        async with await aio_pika.connect(url) as conn:
            ch = await conn.channel(publisher_confirms=True)
            await ch.declare_queue(queue, durable=True)
            await publish_window(ch, queue, n, body, 512, persistent=persistent)
    asyncio.run(go())


def wait_depth(url: str, queue: str, n: int, timeout: float, poll_s: float = 0.01) -> float:
    """Poll until ``queue`` holds at least ``n`` messages; the monotonic time it did."""
    async def go() -> float:
        async with await aio_pika.connect(url) as conn:
            ch = await conn.channel()
            deadline = time.monotonic() + timeout
            while True:
                q = await ch.declare_queue(queue, passive=True)
                count = q.declaration_result.message_count or 0
                if count >= n:
                    return time.monotonic()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{queue}: {count} of {n} messages after {timeout} s")
                await asyncio.sleep(poll_s)
    return asyncio.run(go())


def depth(url: str, queue: str) -> int:
    async def go() -> int:
        async with await aio_pika.connect(url) as conn:
            ch = await conn.channel()
            q = await ch.declare_queue(queue, passive=True)
            return q.declaration_result.message_count or 0
    return asyncio.run(go())


def drain_ids(url: str, queue: str, timeout: float = 30) -> list[str]:
    """Every message id in ``queue`` (consumed and acked), in queue order."""
    async def go() -> list[str]:
        async with await aio_pika.connect(url) as conn:
            ch = await conn.channel()
            await ch.set_qos(prefetch_count=1000)
            q = await ch.declare_queue(queue, passive=True)
            total = q.declaration_result.message_count or 0
            ids: list[str] = []
            done = asyncio.Event()
            if total == 0:
                return ids

            async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
                ids.append(m.message_id or json.loads(m.body).get("eventId", ""))
                await m.ack()
                if len(ids) >= total:
                    done.set()

            await q.consume(on)
            await asyncio.wait_for(done.wait(), timeout)
            return ids
    return asyncio.run(go())
