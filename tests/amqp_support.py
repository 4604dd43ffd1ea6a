"""Helpers for the tests that run against the real RabbitMQ (127.0.0.1:5672, guest/guest).

Every test process works in a vhost of its own (created on first use, deleted at exit), so
``rabbitmqctl close_all_connections --vhost`` only touches this process's connections, and
each test also uses unique queue and exchange names.
"""

from __future__ import annotations

import atexit
import itertools
import json
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import aiormq
import trio
from pamqp import commands as spec

from bridge_plugins.amqp.connection import Connection
from bridge_plugins.amqp.consumer import Delivery
from bridge_plugins.amqp.island import open_island
from bridge_plugins.amqp.publisher import Outgoing, Properties

BROKER = "127.0.0.1", 5672

T = TypeVar("T")


@cache
def vhost() -> str:
    """This process's vhost on the test broker (created once, deleted at exit)."""
    name = f"bridged-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True)
    atexit.register(subprocess.run, ["rabbitmqctl", "-q", "delete_vhost", name],
                    capture_output=True)
    return name


def broker_url(host: str = BROKER[0], port: int = BROKER[1]) -> str:
    return f"amqp://guest:guest@{host}:{port}/{vhost()}"


_counter = itertools.count()


@dataclass(frozen=True)
class Names:
    """Unique queue and exchange names for one test."""

    queue: str
    dead: str
    exchange: str
    archive: str  # a test queue bound to the exchange (what an archiver would read)

    @classmethod
    def make(cls) -> Names:
        tag = f"{uuid.uuid4().hex[:8]}.{next(_counter)}"
        return cls(f"n.{tag}", f"n.{tag}.dead", f"chat.{tag}", f"archive.{tag}")


def amqp_table(name: str, names: Names, url: str, **extra: Any) -> str:
    """A ``[transports.<name>]`` table for the amqp transport with small test intervals."""
    values: dict[str, Any] = {
        "type": "amqp", "url": url, "consume_queue": names.queue,
        "dead_letter_queue": names.dead, "exchange": names.exchange,
        "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, "connect_timeout_s": 2.0,
        "heartbeat_s": 5, "close_timeout_s": 2.0,
    }
    values.update(extra)
    lines = [f"[transports.{name}]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


async def close_all_connections() -> None:
    """Have the broker close every connection of this process's vhost."""
    await trio.run_process(["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost(),
                            "--limit", "1000", "test: closing every connection"],
                           capture_stdout=True, capture_stderr=True)


class AdminConnection(Connection):
    """A connection with the operations that only tests use, each on a channel of its own."""

    async def _on_temporary_channel(
            self, fn: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]]) -> T:
        """``fn(channel)`` on a channel opened for it and closed afterwards."""

        async def run() -> T:
            ch = await self._conn.channel(publisher_confirms=False)
            try:
                return await fn(await ch.get_underlay_channel())
            finally:
                await ch.close()

        return await self.island.call(run)

    async def queue_info(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of an existing queue (passive declare)."""

        async def run(raw: aiormq.abc.AbstractChannel) -> tuple[int, int]:
            ok = await raw.queue_declare(queue, passive=True)
            return ok.message_count or 0, ok.consumer_count or 0

        return await self._on_temporary_channel(run)

    async def queue_delete(self, queue: str) -> None:
        await self._on_temporary_channel(lambda raw: raw.queue_delete(queue))

    async def get(self, queue: str) -> Delivery | None:
        """Fetch one message with ``basic.get`` and auto-ack."""

        async def run(raw: aiormq.abc.AbstractChannel) -> Delivery | None:
            msg = await raw.basic_get(queue, no_ack=True)
            if isinstance(msg.delivery, spec.Basic.GetEmpty):
                return None
            return Delivery.from_aiormq(msg)

        return await self._on_temporary_channel(run)


class Broker:
    """Test-side access to the broker through the seam."""

    def __init__(self, conn: AdminConnection) -> None:
        self.conn = conn

    async def publish(self, routing_key: str, body: bytes, *, exchange: str = "",
                      content_type: str = "application/json", message_id: str = "",
                      headers: Mapping[str, Any] | None = None) -> None:
        """Publish one message and wait for the broker's confirm."""
        publisher = await self.conn.open_publisher(1)
        await publisher.publish([Outgoing(exchange, routing_key, body,
                                          Properties(content_type, message_id, True,
                                                     headers or {}))])
        (confirm,) = await publisher.confirms()
        assert confirm.ok, confirm.reason

    async def bind_archive(self, names: Names, key: str = "chat.#") -> None:
        """Declare the exchange and a queue bound to it, like a chat archiver."""
        await self.conn.declare(queues=[names.archive], exchanges=[(names.exchange, "topic")],
                                bindings=[(names.archive, names.exchange, key)])

    async def read(self, queue: str, n: int, within: float = 10.0) -> list[Delivery]:
        """At least the next ``n`` messages of ``queue`` (acknowledged), waiting for them;
        more if more arrive before the ``n``-th (so duplicates show)."""
        consumer = await self.conn.open_consumer(queue, max(n, 1))
        got: list[Delivery] = []
        with trio.fail_after(within):
            while len(got) < n:
                for d in await consumer.receive():
                    consumer.ack(d.tag)
                    got.append(d)
        consumer.cancel()
        return got

    async def ready(self, queue: str) -> int:
        """Messages ready in ``queue``."""
        ready, _consumers = await self.conn.queue_info(queue)
        return ready


@asynccontextmanager
async def open_broker(url: str | None = None) -> AsyncIterator[Broker]:
    """A connection to the test broker (this process's vhost unless ``url`` says)."""
    async with open_island("test") as island:
        conn = await AdminConnection.open(island, url or broker_url(), timeout_s=5)
        try:
            yield Broker(conn)
        finally:
            await conn.close()


class Proxy:
    """A TCP proxy to the broker that a test can cut (close every connection and refuse
    new ones) and restore."""

    def __init__(self, target: tuple[str, int] = BROKER,
                 tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.tls = tls  # terminate TLS (amqps) in front of the plain broker port
        self.port = 0
        self.cut_ = False
        self._scopes: set[trio.CancelScope] = set()
        self.accepted = 0

    @property
    def url(self) -> str:
        url = broker_url(port=self.port)
        return url.replace("amqp://", "amqps://") if self.tls else url

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.cut_ = True
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.cut_ = False

    async def _handle(self, raw: trio.SocketStream) -> None:
        client: trio.abc.Stream = raw
        if self.tls is not None:
            client = trio.SSLStream(raw, self.tls, server_side=True)
        async with client:
            if self.cut_:
                return
            self.accepted += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                         ssl.SSLError):
                    pass
                finally:
                    self._scopes.discard(scope)


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
    while data := await src.receive_some(65536):
        await dst.send_all(data)
    scope.cancel()


def notification(user: str, text: str) -> bytes:
    return json.dumps({"userId": user, "message": text,
                       "timestamp": "2026-01-02T03:04:05Z"}).encode()


def update(text: str) -> dict[str, Any]:
    """A client chat update with one message item."""
    return {"type": "update", "message": [{"type": "message", "text": text}]}


def bodies(deliveries: Sequence[Delivery]) -> list[Any]:
    return [json.loads(d.body) for d in deliveries]
