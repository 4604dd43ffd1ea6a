"""Publishing with confirms, in batches, on aiormq 7.2's channel internals.

The hot path uses aiormq, aio-pika's protocol layer, directly: the benchmark
(bench/seam.py) shows what that buys. aiormq is pinned to 7.2.x (docs/amqp.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiormq
import trio
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from .island import Island

log = logging.getLogger("bridge.amqp.seam")

#: Longest wait before results are handed to the other thread when a batch is not full.
FLUSH_DELAY_S = 0.0005


class PublishFailed(ConnectionError):
    """The broker refused (nacked) a publish, or the channel closed before it confirmed."""


@dataclass(frozen=True, slots=True)
class Properties:
    """The AMQP basic properties the bridge uses."""

    content_type: str = ""
    message_id: str = ""
    persistent: bool = True
    headers: Mapping[str, Any] = field(default_factory=dict)

    def to_pamqp(self) -> spec.Basic.Properties:
        return spec.Basic.Properties(
            content_type=self.content_type or None,
            message_id=self.message_id or None,
            delivery_mode=2 if self.persistent else 1,
            headers=dict(self.headers) if self.headers else None,
        )



@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish. ``token`` comes back with its confirmation."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Properties
    token: Any = None


@dataclass(frozen=True, slots=True)
class Confirm:
    """The broker's answer for one published message."""

    token: Any
    ok: bool
    reason: str = ""



def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "connection closed"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


class Publisher:
    """Publishes with confirms and a bounded window of unconfirmed messages.

    The asyncio side keeps at most ``window`` publishes unconfirmed at the broker and
    refills the window by itself as confirms arrive; up to another ``window`` messages wait
    on the asyncio side for a slot, so the two threads trade messages and confirms in
    batches rather than one by one. :meth:`publish` waits while ``2 * window`` messages are
    handed over and not yet answered, hands the messages over in one batch and returns;
    :meth:`confirms` returns the broker's answers (batched, in order), and a message stops
    counting only when its answer is taken there.

    Filling the window writes every message that fits in one go: their frames are marshalled
    into one buffer and queued as one write, so a batch costs one ``send()``. aiormq's
    ``basic_publish`` costs one task, one write and one system call per message, about 50 µs
    of a system call alone on the development VM. The batch does what ``basic_publish``
    does for each message: it takes the channel's next delivery tag and registers a
    confirmation future under it, created by the channel, so that aiormq settles it on
    ``basic.ack``/``nack`` and rejects it when the channel closes. This uses aiormq 7.2's
    channel fields (``delivery_tag``, ``confirmations``, ``write_queue``); the seam tests
    exercise all of them against the broker.
    """

    def __init__(self, island: Island, channel: aiormq.Channel, window: int) -> None:
        self.island = island
        self._raw = channel
        self._window = window
        self._limit = 2 * window
        self._batch = max(window // 4, 1)  # messages or confirms per hand-off, when busy
        self._unconfirmed = 0  # handed to asyncio, answer not yet taken by confirms()
        self._answers: list[Confirm] = []  # trio side: arrived, not yet taken
        self._space = trio.lowlevel.ParkingLot()  # publish() waiting for window slots
        self._arrived = trio.lowlevel.ParkingLot()  # confirms() waiting for answers
        # asyncio side
        self._in_flight = 0  # published, confirmation pending
        self._waiting: collections.deque[Outgoing] = collections.deque()
        self._done: list[Confirm] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._pump_scheduled = False
        self._writes: collections.deque[ChannelFrame] = collections.deque()  # queue full
        self._writer: asyncio.Future[Any] | None = None

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Send ``messages`` in order. Returns once all are handed to the asyncio side."""
        await trio.lowlevel.checkpoint()
        i = 0
        while i < len(messages):
            free = self._limit - self._unconfirmed
            if free < min(len(messages) - i, self._batch):  # hand over in batches
                await self._space.park()
                continue
            chunk = messages[i:i + free]
            self._unconfirmed += len(chunk)
            self.island.post(partial(self._publish_aio, chunk))
            i += len(chunk)

    async def confirms(self) -> list[Confirm]:
        """The next confirmations (at least one). Releases one window slot per item."""
        if self._answers:
            await trio.lowlevel.checkpoint()
        while not self._answers:
            await self._arrived.park()
        batch, self._answers = self._answers, []
        self._unconfirmed -= len(batch)
        self._space.unpark_all()
        return batch

    def _arrive(self, batch: list[Confirm]) -> None:  # trio thread
        self._answers.extend(batch)
        self._arrived.unpark_all()

    def _publish_aio(self, batch: Sequence[Outgoing]) -> None:  # asyncio thread
        self._waiting.extend(batch)
        self._pump_aio()

    def _pump_aio(self) -> None:  # asyncio thread: fill the window, in one write
        self._pump_scheduled = False
        ch = self._raw
        payloads: list[bytes] = []
        while self._waiting and self._in_flight < self._window:
            m = self._waiting.popleft()
            if ch.is_closed:
                self._answer_aio(m.token, False, "the channel is closed")
                continue
            try:  # marshalled before it takes a delivery tag: a failure here costs no tag
                if len(m.routing_key.encode()) > 255:
                    raise ValueError("routing key too long (max 255 bytes)")
                frames: list[Any] = [
                    spec.Basic.Publish(exchange=m.exchange, routing_key=m.routing_key),
                    ContentHeader(properties=m.properties.to_pamqp(), body_size=len(m.body)),
                    *ch._split_body(m.body)]
                payload = b"".join([marshal(frame, ch.number) for frame in frames])
            except Exception as e:  # this message cannot be sent; the others can
                self._answer_aio(m.token, False, f"cannot be sent: {e}")
                continue
            ch.delivery_tag += 1
            confirmation = ch.create_future()
            ch.confirmations[ch.delivery_tag] = confirmation
            confirmation.add_done_callback(partial(self._done_aio, m.token))
            self._in_flight += 1
            payloads.append(payload)
        if payloads:
            self._write_aio(ChannelFrame(payload=b"".join(payloads), should_close=False))

    def _write_aio(self, frame: ChannelFrame) -> None:  # asyncio thread
        """Queue ``frame`` for aiormq's writer, in order, also when its queue is full."""
        if not self._writes:
            try:
                self._raw.write_queue.put_nowait(frame)
                return
            except asyncio.QueueFull:
                pass
        self._writes.append(frame)
        if self._writer is None or self._writer.done():  # done: its callback may not have run
            self._writer = self.island.spawn(self._write_backlog_aio, "publishing",
                                             self._backlog_done_aio)

    async def _write_backlog_aio(self) -> None:  # asyncio thread
        while self._writes:
            if self._raw.is_closed:  # the channel's closing rejects their confirmations
                self._writes.clear()
                return
            await self._raw.write_queue.put(self._writes[0])
            self._writes.popleft()

    def _backlog_done_aio(self, task: asyncio.Future[Any]) -> None:  # asyncio thread
        if self._writer is task:
            self._writer = None
        if not task.cancelled() and task.exception() is not None:
            log.debug("publishing failed: %r", task.exception())
        # What could not be written stays unconfirmed: the channel's closing rejects it.

    def _done_aio(self, token: Any, future: asyncio.Future[Any]) -> None:  # asyncio thread
        self._in_flight -= 1
        if future.cancelled():
            self._answer_aio(token, False, "cancelled")
        elif (exc := future.exception()) is not None:
            self._answer_aio(token, False, describe(exc))
        else:
            result = future.result()
            ok = isinstance(result, spec.Basic.Ack)
            self._answer_aio(token, ok, "" if ok else f"broker answered {result!r}")
        if not self._pump_scheduled:  # refill once for all the confirms of this turn
            self._pump_scheduled = True
            self.island.loop.call_soon(self._pump_aio)

    def _answer_aio(self, token: Any, ok: bool, reason: str) -> None:  # asyncio thread
        self._done.append(Confirm(token, ok, reason))
        # Hand confirms over in batches: at once when a batch is full, else a moment later
        # (each thread hand-off costs far more than the wait).
        if len(self._done) >= self._batch:
            self._flush_aio()
        elif self._flush_timer is None:
            self._flush_timer = self.island.loop.call_later(FLUSH_DELAY_S, self._flush_aio)

    def _flush_aio(self) -> None:  # asyncio thread
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._done:
            batch, self._done = self._done, []
            self.island.to_trio(partial(self._arrive, batch))
