"""One AMQP connection, used from trio: open, declare, notice its loss, close.

It runs on an :class:`~.island.Island` and hands out the publisher and the consumer
(:mod:`.publisher`, :mod:`.consumer`). A lost connection is noticed through the
connection's and channels' ``close_callbacks`` (in aio-pika 10.2.1 ``closed()`` does not
complete on a server-side close). The package's modules on the island are the only ones in
the project that import asyncio, aio-pika or aiormq.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Self, cast

import aio_pika
import aiormq
import trio
from aio_pika.connection import make_url
from yarl import URL

from .consumer import Consumer, SizeLimit
from .island import Island
from .publisher import Publisher, describe

log = logging.getLogger("bridge.amqp.seam")


class ConnectionLost(ConnectionError):
    """The broker connection (or one of its channels) closed."""


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the broker (amqps)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    server_hostname: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx



class Connection:
    """One AMQP connection, used from trio. Open it with :meth:`open`; always :meth:`close`.

    :attr:`lost` is set as soon as the connection or any of its channels closes (by the
    broker, the network or us); :meth:`wait_lost` raises :class:`ConnectionLost` then.
    """

    def __init__(self, island: Island) -> None:
        self.island = island
        self._conn: aio_pika.abc.AbstractConnection
        self.lost = trio.Event()
        self.reason = ""
        self._consumers: list[Consumer] = []

    @classmethod
    async def open(cls, island: Island, url: str, *, heartbeat_s: int = 60,
                   timeout_s: float = 10.0, tls: TlsOptions | None = None,
                   name: str = "bridged") -> Self:
        """Connect to ``url`` (``amqp://`` or ``amqps://``)."""
        parsed = URL(url).update_query(heartbeat=str(heartbeat_s), name=name)
        ssl_context = tls.context() if tls is not None and parsed.scheme == "amqps" else None

        self = cls(island)

        async def connect() -> aio_pika.abc.AbstractConnection:
            conn = aio_pika.Connection(make_url(parsed), ssl_context=ssl_context)
            conn.close_callbacks.add(self._on_close_aio)  # before anything else can happen
            try:
                await conn.connect(timeout=timeout_s)
            except BaseException:
                # Closed here, on the loop: an unclosed aio-pika connection schedules its own
                # close from __del__, which may run on another thread (without a loop).
                await conn.close()
                raise
            return conn

        self._conn = await island.call(connect)
        return self

    def _on_close_aio(self, _sender: Any, exc: BaseException | None = None) -> None:
        reason = describe(exc)
        self.island.to_trio(partial(self._mark_lost, reason))

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()

    async def wait_lost(self) -> None:
        """Raise :class:`ConnectionLost` once the connection or a channel is closed."""
        await self.lost.wait()
        raise ConnectionLost(self.reason or "connection closed")

    async def _channel(self, *, confirms: bool) -> aiormq.Channel:
        """A new channel (its aiormq layer) whose closing marks the connection lost."""

        async def open_channel() -> aiormq.Channel:
            ch = await self._conn.channel(publisher_confirms=confirms)
            ch.close_callbacks.add(self._on_close_aio)
            return cast(aiormq.Channel, await ch.get_underlay_channel())

        return await self.island.call(open_channel)

    async def declare(self, *, queues: Sequence[str] = (),
                      exchanges: Sequence[tuple[str, str]] = (),
                      bindings: Sequence[tuple[str, str, str]] = (),
                      durable: bool = True) -> None:
        """Declare durable ``queues``, ``exchanges`` (name, type) and ``bindings``
        (queue, exchange, routing key), on a short-lived channel."""

        async def run() -> None:
            ch = await self._conn.channel(publisher_confirms=False)
            try:
                for ex_name, ex_type in exchanges:
                    await ch.declare_exchange(ex_name, aio_pika.ExchangeType(ex_type),
                                              durable=durable)
                declared = {}
                for q in queues:
                    declared[q] = await ch.declare_queue(q, durable=durable)
                for q, ex_name, key in bindings:
                    queue = declared.get(q) or await ch.declare_queue(q, durable=durable)
                    await queue.bind(ex_name, key)
            finally:
                await ch.close()

        await self.island.call(run)

    async def declare_private_queue(self, exchange: str, exchange_type: str, binding: str,
                                    max_length: int) -> str:
        """Declare the durable ``exchange`` and an exclusive, server-named queue bound to it
        with ``binding``, holding ``max_length`` messages at most (the oldest are dropped
        first); the queue's name. It lives as long as this connection."""

        async def run() -> str:
            ch = await self._conn.channel(publisher_confirms=False)
            try:
                ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType(exchange_type),
                                               durable=True)
                queue = await ch.declare_queue(
                    "", exclusive=True, auto_delete=True,
                    arguments={"x-max-length": max_length, "x-overflow": "drop-head"})
                await queue.bind(ex, binding)
                return str(queue.name)
            finally:
                await ch.close()

        return await self.island.call(run)

    async def open_publisher(self, window: int) -> Publisher:
        """A channel in confirm mode with at most ``window`` unconfirmed publishes."""
        return Publisher(self.island, await self._channel(confirms=True), window)

    async def open_consumer(self, queue: str, prefetch: int,
                            dead_letter_confirms: bool = True,
                            size_limit: SizeLimit | None = None) -> Consumer:
        """Consume ``queue`` with manual acks and ``prefetch`` unacked deliveries at most.
        Dead letters go out on a second channel, in confirm mode so that they are
        confirmed before the delivery is acknowledged.
        ``size_limit``: what happens to a delivery too large to hand over (see there)."""
        raw = await self._channel(confirms=False)
        # Dead letters go out on a channel of their own: the consumer channel's reader writes
        # an oversize body's dead letter itself, and must never wait on a lock that a
        # basic.cancel on its own channel holds until the reader delivers the CancelOk.
        dead_letters = await self._channel(confirms=dead_letter_confirms)
        consumer = Consumer(self.island, raw, prefetch, size_limit, dead_letters)
        self._consumers.append(consumer)
        await self.island.call(partial(consumer._start_aio, queue, prefetch))
        return consumer

    async def close(self, grace_s: float = 5.0) -> None:
        """Close gracefully, shielded and bounded by ``grace_s`` seconds."""
        async def close() -> None:
            # Acks and dead letters still queued go out before the connection closes; a
            # dead letter confirmed meanwhile queues its ack, which is awaited in turn.
            deadline = asyncio.get_running_loop().time() + grace_s
            while settling := [t for c in self._consumers for t in c._settle_now_aio()]:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                await asyncio.wait(settling, timeout=left)
            await self._conn.close()

        with trio.CancelScope(shield=True), trio.move_on_after(grace_s):
            try:
                await self.island.call(close)
            except Exception as e:
                log.debug("closing the AMQP connection: %r", e)
        self._mark_lost("closed by us")


def refused_by_broker(exc: BaseException) -> bool:
    """Whether the broker answered and refused (credentials, access to a vhost or a
    resource): trying again soon would not help, unlike a broker that is still starting."""
    return isinstance(exc, (aiormq.exceptions.ProbableAuthenticationError,
                            aiormq.exceptions.AuthenticationError,
                            aiormq.exceptions.ChannelAccessRefused))
