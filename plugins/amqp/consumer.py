"""Consuming with manual acks, on aiormq 7.2's channel internals.

Deliveries are read inline by the channel's reader (no asyncio task per delivery), a
delivery over a :class:`SizeLimit` is dead-lettered on the asyncio side without being
handed to trio, and acks are batched. A consumer's trio channel holds at least
``prefetch`` deliveries, so the broker's prefetch (with manual acks) bounds what is handed
over and the channel never overflows; with a size limit the bound is in bytes too. aiormq
is pinned to 7.2.x (docs/amqp.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiormq
import trio
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from .island import Island, IslandClosed
from .publisher import Properties, describe

log = logging.getLogger("bridge.amqp.seam")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message delivered to a consumer (or fetched with ``basic.get``)."""

    tag: int
    body: bytes
    routing_key: str
    exchange: str
    redelivered: bool
    content_type: str
    message_id: str
    headers: Mapping[str, Any]
    delivery_mode: int

    @classmethod
    def from_aiormq(cls, message: DeliveredMessage) -> Delivery:
        props = message.header.properties
        delivery = message.delivery
        return cls(
            tag=getattr(delivery, "delivery_tag", 0) or 0,
            body=message.body,
            routing_key=message.routing_key or "",
            exchange=message.exchange or "",
            redelivered=bool(getattr(delivery, "redelivered", False)),
            content_type=props.content_type or "",
            message_id=props.message_id or "",
            headers=dict(props.headers or {}),
            delivery_mode=props.delivery_mode or 1,
        )


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """The largest body a consumer hands to trio. A delivery whose content header announces
    more than ``max_bytes`` never reaches trio: the seam reads it and publishes it unchanged
    to ``queue`` (default exchange), with ``properties(delivery, size)`` (``delivery`` has
    an empty body; called on the asyncio thread, so it must only compute), acknowledges it
    once the broker confirms that, and then runs ``done(delivery, size, ok)`` on trio. If
    the publish fails, the delivery stays unacknowledged and the broker redelivers it."""

    max_bytes: int
    queue: str
    properties: Callable[[Delivery, int], Properties]
    done: Callable[[Delivery, int, bool], None]



def _deliver_inline(raw: aiormq.Channel, on_message: Callable[[DeliveredMessage], None],
                    on_too_large: Callable[[spec.Basic.Deliver, ContentHeader],
                                           Awaitable[None]] | None = None,
                    max_body: int = 0) -> None:
    """Hand the deliveries of ``raw`` (a channel with one consumer) to ``on_message`` as its
    reader reads them.

    aiormq starts an asyncio task per delivery to run the consumer callback; for a callback
    that only queues the delivery, the task is most of the cost (about 13 µs a delivery,
    bench/seam.py). This replaces the channel's ``_on_deliver_frame`` with one that reads
    the delivery as aiormq 7.2 does (``_get_frame``, ``_read_content``) and calls
    ``on_message`` inline; ``on_message`` must not block or raise. Deliveries for a consumer
    the channel no longer has (cancelled) are dropped, as aiormq drops them. aiormq is pinned
    to 7.2.x.

    With ``on_too_large``, a delivery whose content header announces a body over
    ``max_body`` bytes is not read here: ``on_too_large(frame, header)`` reads its body
    frames instead (the channel reader, and through the channel's bounded frame buffer the
    connection's reader, wait for it, so one such body at a time is in memory).
    """
    async def on_deliver_frame(frame: spec.Basic.Deliver) -> None:
        header = await raw._get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"unexpected frame {header!r} instead of a content header")
        if on_too_large is not None and (header.body_size or 0) > max_body:
            await on_too_large(frame, header)
            return
        message = await raw._read_content(frame, header)
        if frame.consumer_tag is None or frame.consumer_tag not in raw.consumers:
            return  # as aiormq does: no consumer (cancelled); the broker redelivers it
        try:
            on_message(message)
        except Exception:  # the channel's reader must go on
            log.exception("delivery %s could not be queued", frame.delivery_tag)

    raw._on_deliver_frame = on_deliver_frame  # type: ignore[method-assign]  # see above


class Consumer:
    """Deliveries from one queue, with manual acks.

    :meth:`receive` returns every delivery waiting (at least one). :meth:`ack` and
    :meth:`dead_letter` return at once: the work is queued for the asyncio side, and
    consecutive acks are sent as one ``basic.ack(multiple=True)`` where that is safe (the
    acknowledged tags form a prefix of the unacknowledged ones).
    """

    def __init__(self, island: Island, channel: aiormq.Channel, prefetch: int,
                 size_limit: SizeLimit | None = None,
                 dead_letters: aiormq.Channel | None = None) -> None:
        self.island = island
        self._raw = channel
        #: where dead letters are published (a channel of their own; this one by default)
        self._out = dead_letters if dead_letters is not None else channel
        self._size_limit = size_limit
        self.tag = ""
        # The broker sends at most `prefetch` unacked deliveries: the channel cannot overflow.
        self._send, self._receive = trio.open_memory_channel[Delivery](max(prefetch, 1))
        self.cancelled = trio.Event()  # set when the broker cancelled the consumer
        self.stopped = False
        self.cancel_done = trio.Event()  # set once our basic.cancel is answered (or failed)
        # asyncio-side state
        self._unacked: dict[int, None] = {}
        self._ready: set[int] = set()
        self._settling: set[asyncio.Future[Any]] = set()
        self._flush_scheduled = False
        self._closing = False  # the connection is closing: no new dead letter of our own

    async def _start_aio(self, queue: str, prefetch: int) -> None:  # asyncio thread
        """Set the prefetch, read deliveries inline and start consuming ``queue``."""
        raw = self._raw
        await raw.basic_qos(prefetch_count=prefetch)
        raw.on_consumer_cancel_callbacks.add(self._on_broker_cancel_aio)
        limit = self._size_limit
        _deliver_inline(raw, self._on_message_aio,
                        self._too_large_aio if limit is not None else None,
                        limit.max_bytes if limit is not None else 0)
        ok = await raw.basic_consume(queue, self._on_delivery_task, no_ack=False)
        self.tag = ok.consumer_tag or ""

    # ------------------------------------------------------------ deliveries

    def _on_message_aio(self, message: DeliveredMessage) -> None:  # asyncio thread
        delivery = Delivery.from_aiormq(message)
        self._unacked[delivery.tag] = None
        self.island.to_trio(partial(self._put, delivery))

    async def _on_delivery_task(self, message: DeliveredMessage) -> None:  # asyncio thread
        """The callback aiormq registers; :func:`_deliver_inline` bypasses it."""
        self._on_message_aio(message)

    async def _too_large_aio(self, frame: spec.Basic.Deliver, header: ContentHeader
                             ) -> None:  # asyncio thread, in the channel's reader
        """Dead-letter a delivery over the size limit without handing it to trio: read its
        body frames, publish them unchanged to the limit's queue as one write (nothing
        else may come between a message's frames on the channel), wait until that write is
        done, and acknowledge the delivery once the broker confirms."""
        limit = self._size_limit
        assert limit is not None
        raw = self._raw
        size = header.body_size or 0
        wanted = frame.consumer_tag is not None and frame.consumer_tag in raw.consumers
        bare = Delivery.from_aiormq(DeliveredMessage(delivery=frame, header=header, body=b"",
                                                     channel=raw))
        out = self._out  # the dead letters' channel: its lock never waits on this reader
        if wanted:
            self._unacked[bare.tag] = None  # in delivery order, as _on_message_aio does
            props = limit.properties(bare, size)
            chunks = [marshal(spec.Basic.Publish(exchange="", routing_key=limit.queue),
                              out.number),
                      marshal(ContentHeader(properties=props.to_pamqp(), body_size=size),
                              out.number)]
        read = 0
        while read < size:  # the body frames must be read off the channel either way
            body = await raw._get_frame()
            if not isinstance(body, ContentBody):
                raise ValueError(f"unexpected frame {body!r} in a message body")
            read += len(body.value)
            if wanted:
                chunks.append(marshal(body, out.number))
        if not wanted:
            return  # as aiormq does: no consumer (cancelled); the broker redelivers it
        payload = b"".join(chunks)
        del chunks
        settled = asyncio.get_running_loop().create_future()  # the close waits for it
        self._track(settled)
        try:
            async with out.lock:  # the channel's publishes take their tags in order
                if self._closing:  # its ack could not follow: the broker redelivers it
                    settled.set_result(None)
                    return
                out.delivery_tag += 1
                confirmation = out.create_future() if out.publisher_confirms else None
                if confirmation is not None:
                    out.confirmations[out.delivery_tag] = confirmation
                drain = out.create_future()
                await out.write_queue.put(ChannelFrame(payload=payload, should_close=False,
                                                       drain_future=drain))
            del payload
            await drain  # written: the next body may be read
        except Exception as e:
            log.warning("dead-lettering delivery %d (too large) failed: %s", bare.tag,
                        describe(e))
            settled.set_result(None)
            self.island.to_trio(partial(limit.done, bare, size, False))
            return

        def confirmed(future: asyncio.Future[Any]) -> None:
            ok = (not future.cancelled() and future.exception() is None
                  and isinstance(future.result(), spec.Basic.Ack))
            if ok:
                self._ready_aio(bare.tag)
            if not settled.done():
                settled.set_result(None)
            self.island.to_trio(partial(limit.done, bare, size, ok))

        if confirmation is None:
            self._ready_aio(bare.tag)
            settled.set_result(None)
            self.island.to_trio(partial(limit.done, bare, size, True))
        else:
            confirmation.add_done_callback(confirmed)

    def _put(self, delivery: Delivery) -> None:  # trio thread
        try:
            self._send.send_nowait(delivery)
        except trio.WouldBlock:  # cannot happen while prefetch bounds the deliveries
            log.error("consumer buffer full; delivery %d will be redelivered", delivery.tag)

    def _on_broker_cancel_aio(self, _frame: Any) -> None:  # asyncio thread
        self.island.to_trio(self.cancelled.set)

    async def receive(self) -> list[Delivery]:
        """Every waiting delivery, at least one (waits for it)."""
        batch = [await self._receive.receive()]
        while True:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return batch

    # ------------------------------------------------------------ settling

    def ack(self, tag: int) -> None:
        """Acknowledge delivery ``tag`` (batched with others)."""
        try:
            self.island.post(partial(self._ready_aio, tag))
        except IslandClosed:
            log.debug("ack of %d dropped: the island is closed", tag)

    def requeue(self, tag: int) -> None:
        """Hand delivery ``tag`` back to the broker (``basic.reject`` with requeue), which
        delivers it again."""
        try:
            self.island.post(partial(self._requeue_aio, tag))
        except IslandClosed:
            log.debug("requeue of %d dropped: the island is closed", tag)

    def _requeue_aio(self, tag: int) -> None:  # asyncio thread
        if tag in self._unacked and not self._raw.is_closed:
            del self._unacked[tag]
            self._ready.discard(tag)
            self._track(self.island.spawn(
                partial(self._raw.basic_reject, tag, requeue=True, wait=False), "basic.reject"))

    def dead_letter(self, tag: int, queue: str, body: bytes, properties: Properties,
                    on_done: Callable[[bool], None]) -> None:
        """Publish ``body`` to ``queue`` (default exchange), wait for the broker's confirm,
        then acknowledge ``tag``. ``on_done(ok)`` runs on trio afterwards. If the publish
        fails the delivery stays unacknowledged, so the broker redelivers it later."""
        try:
            self.island.post(partial(self._dead_letter_aio, tag, queue, body, properties,
                                     on_done))
        except IslandClosed:
            on_done(False)

    def cancel(self) -> None:
        """Ask the broker to stop delivering (``basic.cancel``); returns at once."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.island.post(self._cancel_aio)
        except IslandClosed:
            self.cancel_done.set()

    def _cancel_aio(self) -> None:  # asyncio thread
        def done(_: asyncio.Future[Any]) -> None:
            self.island.to_trio(self.cancel_done.set)

        if self.tag and not self._raw.is_closed:
            self.island.spawn(partial(self._raw.basic_cancel, self.tag), "basic.cancel", done)
        else:
            done(asyncio.get_running_loop().create_future())

    def _dead_letter_aio(self, tag: int, queue: str, body: bytes, properties: Properties,
                         on_done: Callable[[bool], None]) -> None:  # asyncio thread
        async def run() -> None:
            ok = False
            try:
                result = await self._out.basic_publish(
                    body, exchange="", routing_key=queue, properties=properties.to_pamqp())
                ok = result is None or isinstance(result, spec.Basic.Ack)
            except Exception as e:
                log.warning("dead-lettering delivery %d failed: %s", tag, describe(e))
            if ok:
                self._ready_aio(tag)
            self.island.to_trio(partial(on_done, ok))

        self._track(self.island.spawn(run, "dead-lettering"))

    def _track(self, task: asyncio.Future[Any]) -> None:  # asyncio thread
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _settle_now_aio(self) -> list[asyncio.Future[Any]]:  # asyncio thread
        """Send the acks that wait for the next loop turn; the acks and dead letters in
        progress, to await before closing."""
        self._closing = True
        if self._flush_scheduled:
            self._flush_aio()
        return list(self._settling)

    def _ready_aio(self, tag: int) -> None:  # asyncio thread
        if tag not in self._unacked:
            return  # already acked, or a delivery of a previous channel
        self._ready.add(tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_aio)

    def _flush_aio(self) -> None:  # asyncio thread
        self._flush_scheduled = False
        if not self._ready:
            return
        if self._raw.is_closed:
            self._ready.clear()
            return
        last = None
        for tag in self._unacked:
            if tag not in self._ready:
                break
            last = tag
        if last is not None:
            for tag in list(self._unacked):
                del self._unacked[tag]
                self._ready.discard(tag)
                if tag == last:
                    break
            self._track(self.island.spawn(
                partial(self._raw.basic_ack, last, multiple=True, wait=False), "basic.ack"))
        for tag in self._ready:
            del self._unacked[tag]
            self._track(self.island.spawn(partial(self._raw.basic_ack, tag, wait=False),
                                          "basic.ack"))
