"""The backplane: the doorbell between instances (research/cluster.md §4.4).

After an instance stores a chat event, it publishes it to the topic exchange
``bridged.cluster`` (configurable) on the AMQP transport's broker. Every instance consumes
the exchange through an exclusive, server-named queue bound to everything (``#``), with a
length cap that drops the oldest messages first: a slow or cut-off instance loses backplane
messages, never the events, which it reads again from PostgreSQL (the sequencer's repairs).
So the live path may lose messages but never stalls a writer or the broker:

* publishing waits little: events go into a bounded queue that a task drains to the broker;
  when it is full the writer waits up to a second while the broker is connected, and the
  events that do not fit are dropped and counted (the broker away or too slow);
* consuming acknowledges what it has handed to the sequencer; events of chats with no local
  socket, and the instance's own events, are acknowledged unread.

The routing key is ``<bucket>.<chat id>`` (a bucket of 64 by a hash of the chat id), so that a
later version can bind per bucket instead of ``#``. Each message carries the event's JSON
body; the headers name the chat, the writing instance and the publish time (the receiver's
``bridged_cluster_backplane_lag_seconds``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from bridge import CHAT_EVENT, Message

from ..amqp.connection import Connection, TlsOptions
from ..amqp.consumer import Consumer, Delivery
from ..amqp.island import Island, open_island
from ..amqp.publisher import Outgoing, Properties, Publisher
from ..amqp.settings import redact

log = logging.getLogger("bridge.cluster")

CHAT_HEADER = "x-bridged-chat"
INSTANCE_HEADER = "x-bridged-instance"
AT_HEADER = "x-bridged-at"
BUCKETS = 64
#: events waiting to be published at most; more are dropped (and repaired by the others)
OUTGOING = 4096
#: how long a writer waits for room in a full queue while the broker is connected
PUSH_BACK_S = 1.0
PREFETCH = 512
WINDOW = 512


def _jsonable(value: object) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_jsonable)


def routing_key(chat_id: str) -> str:
    return f"{zlib.crc32(chat_id.encode()) % BUCKETS}.{chat_id}"


class Backplane:
    def __init__(self, *, instance: str, url: str, tls: TlsOptions | None, exchange: str,
                 max_length: int, wants: Callable[[str], bool],
                 arrived: Callable[[list[Message]], Awaitable[None]],
                 connected: Callable[[], Awaitable[None]],
                 count: Callable[..., None], observe: Callable[..., None]) -> None:
        self.instance = instance
        self._url = url
        self._tls = tls
        self.exchange = exchange
        self._max_length = max_length
        self._wants = wants
        self._arrived = arrived
        self._on_connected = connected
        self._count = count
        self._observe = observe
        self._send, self._receive = trio.open_memory_channel[Message](OUTGOING)
        self.connected = False
        self.last_error = "not connected yet"
        self.dropped = 0

    async def publish(self, messages: Sequence[Message]) -> None:
        """Queue ``messages`` (stored events) for the other instances. While the broker is
        connected a full queue pushes back on the writer for up to :data:`PUSH_BACK_S`;
        otherwise (the broker away, or too slow) what does not fit is dropped and counted:
        the others read it from PostgreSQL."""
        for i, m in enumerate(messages):
            try:
                self._send.send_nowait(m)
                continue
            except trio.WouldBlock:
                pass
            if self.connected:
                with trio.move_on_after(PUSH_BACK_S):
                    await self._send.send(m)
                    continue
            self.dropped += len(messages) - i
            self._count("cluster_backplane_dropped_total", len(messages) - i)
            return

    async def run(self) -> None:
        """Connect, and connect again whenever the connection is lost, until cancelled."""
        async with open_island("cluster") as island:
            delay = 0.1
            while True:
                try:
                    await self._session(island)
                except Exception as e:  # lost: the sequencer's head checks carry on
                    self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    if self.connected:
                        log.warning("cluster: backplane lost: %s", self.last_error)
                    self.connected = False
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                if self.connected:
                    delay = 0.1

    async def _session(self, island: Island) -> None:
        with trio.fail_after(15):
            conn = await Connection.open(island, self._url, heartbeat_s=30, timeout_s=10,
                                         tls=self._tls, name="bridged cluster backplane")
        try:
            with trio.fail_after(15):
                queue = await conn.declare_private_queue(self.exchange, "topic", "#",
                                                         self._max_length)
                publisher = await conn.open_publisher(WINDOW)
                consumer = await conn.open_consumer(queue, PREFETCH,
                                                    dead_letter_confirms=False)
            self.connected = True
            self.last_error = ""
            log.info("cluster: backplane connected to %s (exchange %s, queue %s)",
                     redact(self._url), self.exchange, queue)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.wait_lost)
                nursery.start_soon(self._publish, publisher)
                nursery.start_soon(self._drain_confirms, publisher)
                nursery.start_soon(self._consume, consumer)
                await self._on_connected()  # catch up on what was missed meanwhile
        finally:
            self.connected = False
            with trio.CancelScope(shield=True):
                await conn.close(2.0)

    async def _publish(self, publisher: Publisher) -> None:
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < WINDOW:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            at = repr(time.time())
            await publisher.publish([
                Outgoing(self.exchange, routing_key(m.chat_id or ""),
                         _ENCODER.encode(m.body).encode(),
                         Properties("application/json", m.id, False,
                                    {CHAT_HEADER: m.chat_id, INSTANCE_HEADER: self.instance,
                                     AT_HEADER: at}))
                for m in batch])

    async def _drain_confirms(self, publisher: Publisher) -> None:
        while True:
            for c in await publisher.confirms():
                if not c.ok:
                    self._count("cluster_backplane_dropped_total", 1)

    async def _consume(self, consumer: Consumer) -> None:
        while True:
            deliveries = await consumer.receive()
            events = [m for d in deliveries if (m := self._event(d)) is not None]
            if events:
                await self._arrived(events)
            for d in deliveries:
                consumer.ack(d.tag)

    def _event(self, d: Delivery) -> Message | None:
        chat_id = d.headers.get(CHAT_HEADER)
        if (not isinstance(chat_id, str) or d.headers.get(INSTANCE_HEADER) == self.instance
                or not self._wants(chat_id)):
            return None
        at = d.headers.get(AT_HEADER)
        if isinstance(at, str):
            with contextlib.suppress(ValueError):
                lag = max(0.0, time.time() - float(at))
                self._observe("cluster_backplane_lag_seconds", lag)
        try:
            body = json.loads(d.body)
        except ValueError:
            log.warning("cluster: backplane message %s is not JSON; ignored", d.message_id)
            return None
        return Message(CHAT_EVENT, body, "cluster", d.message_id, chat_id)
