"""The seam between trio and aio-pika: a trio-native AMQP client on an asyncio "island".

aio-pika is asyncio-only and the daemon is trio. This module runs one asyncio event loop in
a dedicated thread (:func:`open_island`) and offers trio code a small AMQP API on top of it
(:class:`Connection`, :class:`Publisher`, :class:`Consumer`). It is the only module in the
project that imports asyncio, aio-pika or aiormq. The design and its measurements are in
docs/amqp.md; the rules it follows (from the feasibility study):

* Hand-offs are batched both ways. Work for asyncio is queued and one
  ``loop.call_soon_threadsafe`` wakes the loop for everything queued meanwhile; results for
  trio are queued and one ``TrioToken.run_sync_soon`` runs them all.
* Callbacks that run on the trio loop never raise (an exception there kills the trio run):
  each one is wrapped and logged.
* :meth:`Island.call` is KeyboardInterrupt-protected between "submitted" and "parked", and
  a trio cancellation waits for the asyncio side to finish (``Abort.FAILED``, rescheduled
  from the asyncio task's done callback), so no asyncio work outlives its trio caller.
* Closing is shielded and bounded; the loop thread is always stopped and joined.
* A consumer's trio channel holds at least ``prefetch`` deliveries, so the broker's
  prefetch (with manual acks) bounds what is handed over and the channel never overflows;
  with a :class:`SizeLimit`, a delivery over it is dead-lettered on the asyncio side, one at
  a time, and never handed over, so the bound is in bytes too.
* A lost connection is noticed through the connection's and channels' ``close_callbacks``
  (in aio-pika 10.2.1 ``closed()`` does not complete on a server-side close).

The hot paths (publish with confirms, deliveries, acks) use aiormq, aio-pika's protocol
layer, directly: the benchmark (bench/seam.py) shows what that buys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

import aio_pika
import aiormq
import outcome
import trio
from aio_pika.connection import make_url
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.frame import marshal
from pamqp.header import ContentHeader
from yarl import URL

log = logging.getLogger("bridge.amqp.seam")

T = TypeVar("T")

#: Longest wait before results are handed to the other thread when a batch is not full.
FLUSH_DELAY_S = 0.0005


class IslandClosed(RuntimeError):
    """The asyncio loop has stopped; nothing more can run on it."""


class ConnectionLost(ConnectionError):
    """The broker connection (or one of its channels) closed."""


class PublishFailed(ConnectionError):
    """The broker refused (nacked) a publish, or the channel closed before it confirmed."""


# --------------------------------------------------------------------------- the island


class Island:
    """One asyncio event loop running in its own thread, driven from trio.

    Create it with :func:`open_island`. ``post`` and ``call`` are for the trio thread;
    ``to_trio`` is for the asyncio thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken) -> None:
        self.loop = loop
        self._token = token
        self._lock = threading.Lock()
        self._to_aio: list[Callable[[], None]] = []
        self._aio_scheduled = False
        self._to_trio: list[Callable[[], None]] = []
        self._trio_scheduled = False
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()  # asyncio side only

    # ------------------------------------------------------------ trio -> asyncio

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the asyncio loop soon (FIFO with every other ``post``). From trio."""
        with self._lock:
            if self._closed:
                raise IslandClosed("the asyncio loop has stopped")
            self._to_aio.append(fn)
            if self._aio_scheduled:
                return
            self._aio_scheduled = True
        self.loop.call_soon_threadsafe(self._run_aio)

    def _run_aio(self) -> None:
        with self._lock:
            items, self._to_aio = self._to_aio, []
            self._aio_scheduled = False
        for fn in items:
            try:
                fn()
            except Exception:
                log.exception("asyncio-side callback failed")

    # ------------------------------------------------------------ asyncio -> trio

    def to_trio(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the trio loop soon. From the asyncio thread; never raises."""
        with self._lock:
            self._to_trio.append(fn)
            if self._trio_scheduled:
                return
            self._trio_scheduled = True
        try:
            self._token.run_sync_soon(self._run_trio)
        except trio.RunFinishedError:
            log.debug("trio run finished; dropped callbacks from asyncio")

    def _run_trio(self) -> None:
        # Runs as a trio system callback: an exception here would be a TrioInternalError.
        with self._lock:
            items, self._to_trio = self._to_trio, []
            self._trio_scheduled = False
        for fn in items:
            try:
                fn()
            except Exception:
                log.exception("trio-side callback failed")

    # ------------------------------------------------------------ awaiting asyncio work

    @trio.lowlevel.enable_ki_protection
    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine ``fn()`` as an asyncio task and wait for its result.

        A trio cancellation cancels the asyncio task and waits until it has finished, so
        nothing is left running on the island once this returns or raises.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        state = _CallState()

        def resume(result: outcome.Outcome[Any]) -> None:  # trio thread
            if state.resumed:
                return
            state.resumed = True
            trio.lowlevel.reschedule(task, result)

        def done(fut: asyncio.Future[T]) -> None:  # asyncio thread
            self.to_trio(partial(finish, fut))

        def finish(fut: asyncio.Future[T]) -> None:  # trio thread
            if fut.cancelled():
                if state.raise_cancel is not None:
                    resume(outcome.capture(state.raise_cancel))
                else:
                    resume(outcome.Error(IslandClosed("the asyncio loop stopped")))
                return
            exc = fut.exception()
            resume(outcome.Error(exc) if exc is not None else outcome.Value(fut.result()))

        def start() -> None:  # asyncio thread
            try:
                fut = asyncio.ensure_future(fn())
            except Exception as e:
                err = e
                self.to_trio(lambda: resume(outcome.Error(err)))
                return
            state.future = fut
            fut.add_done_callback(done)

        def cancel() -> None:  # asyncio thread
            if state.future is not None:
                state.future.cancel()

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            state.raise_cancel = raise_cancel
            try:
                self.post(cancel)
            except IslandClosed:  # nothing runs any more: give up on the result
                state.resumed = True
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        self.post(start)
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def spawn(self, coro: Callable[[], Awaitable[Any]], what: str,
              on_done: Callable[[asyncio.Future[Any]], None] | None = None
              ) -> asyncio.Future[Any]:
        """Start ``coro()`` as a fire-and-forget asyncio task; ``on_done(task)`` runs when it
        ends, else a failure is only logged. Call on the asyncio thread."""
        fut = asyncio.ensure_future(coro())
        self._tasks.add(fut)  # asyncio holds tasks weakly: keep them until they end
        fut.add_done_callback(self._tasks.discard)
        fut.add_done_callback(on_done or partial(_log_failure, what))
        return fut


@dataclass(slots=True)
class _CallState:
    future: asyncio.Future[Any] | None = None
    raise_cancel: trio.lowlevel.RaiseCancelT | None = None
    resumed: bool = False


def _log_failure(what: str, fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.debug("%s failed: %r", what, exc)


def _loop_thread(loop: asyncio.AbstractEventLoop, island: Island, done: trio.Event,
                 token: trio.lowlevel.TrioToken) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Stopped: cancel what is left and let it finish (cancelling may start more
        # tasks, such as aio-pika's close handlers: repeat), then close the loop.
        for _ in range(10):
            tasks = asyncio.all_tasks(loop)
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    except Exception:
        log.exception("asyncio loop thread failed")
    finally:
        loop.close()
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)


@contextlib.asynccontextmanager
async def open_island(name: str = "amqp", *, close_timeout: float = 5.0
                      ) -> AsyncIterator[Island]:
    """Start an asyncio loop in a thread for the duration of the block.

    On exit (also on cancellation) the loop is stopped within ``close_timeout``: pending
    asyncio tasks are cancelled and awaited, then the thread is joined.
    """
    token = trio.lowlevel.current_trio_token()
    loop = asyncio.new_event_loop()
    island = Island(loop, token)
    done = trio.Event()
    thread = threading.Thread(target=_loop_thread, args=(loop, island, done, token),
                              name=f"asyncio-{name}", daemon=True)
    thread.start()
    try:
        yield island
    finally:
        with trio.CancelScope(shield=True):
            with island._lock:
                island._closed = True
            loop.call_soon_threadsafe(loop.stop)
            with trio.move_on_after(close_timeout):
                await done.wait()
                await trio.to_thread.run_sync(thread.join)
            if thread.is_alive():
                log.warning("asyncio loop thread %s did not stop within %.1f s",
                            thread.name, close_timeout)


# --------------------------------------------------------------------------- AMQP values


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


# --------------------------------------------------------------------------- connection


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
                   name: str = "bridged") -> Connection:
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
        reason = _describe(exc)
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

    async def queue_purge(self, queue: str) -> None:
        await self._on_temporary_channel(lambda raw: raw.queue_purge(queue))

    async def exchange_delete(self, exchange: str) -> None:
        await self._on_temporary_channel(lambda raw: raw.exchange_delete(exchange))

    async def get(self, queue: str) -> Delivery | None:
        """Fetch one message with ``basic.get`` and auto-ack (for tools and tests)."""

        async def run(raw: aiormq.abc.AbstractChannel) -> Delivery | None:
            msg = await raw.basic_get(queue, no_ack=True)
            if isinstance(msg.delivery, spec.Basic.GetEmpty):
                return None
            return Delivery.from_aiormq(msg)

        return await self._on_temporary_channel(run)

    async def open_publisher(self, window: int) -> Publisher:
        """A channel in confirm mode with at most ``window`` unconfirmed publishes."""
        return Publisher(self.island, await self._channel(confirms=True), window)

    async def open_consumer(self, queue: str, prefetch: int,
                            dead_letter_confirms: bool = True,
                            size_limit: SizeLimit | None = None) -> Consumer:
        """Consume ``queue`` with manual acks and ``prefetch`` unacked deliveries at most.
        The channel is in confirm mode so that dead letters are confirmed before the ack.
        ``size_limit``: what happens to a delivery too large to hand over (see there)."""
        raw = await self._channel(confirms=dead_letter_confirms)
        consumer = Consumer(self.island, raw, prefetch, size_limit)
        self._consumers.append(consumer)

        async def start() -> None:
            await raw.basic_qos(prefetch_count=prefetch)
            raw.on_consumer_cancel_callbacks.add(consumer._on_broker_cancel_aio)
            _deliver_inline(raw, consumer._on_message_aio,
                            consumer._too_large_aio if size_limit is not None else None,
                            size_limit.max_bytes if size_limit is not None else 0)
            ok = await raw.basic_consume(queue, consumer._on_delivery_task, no_ack=False)
            consumer.tag = ok.consumer_tag or ""

        await self.island.call(start)
        return consumer

    async def close(self, grace_s: float = 5.0) -> None:
        """Close gracefully, shielded and bounded by ``grace_s`` seconds."""
        async def close() -> None:
            # Acks and dead letters still queued go out before the connection closes.
            settling = [t for c in self._consumers for t in c._settle_now_aio()]
            if settling:
                await asyncio.wait(settling, timeout=grace_s)
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


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "connection closed"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


# --------------------------------------------------------------------------- publisher


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
            self._answer_aio(token, False, _describe(exc))
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


# --------------------------------------------------------------------------- consumer


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
                 size_limit: SizeLimit | None = None) -> None:
        self.island = island
        self._raw = channel
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
        if wanted:
            self._unacked[bare.tag] = None  # in delivery order, as _on_message_aio does
            props = limit.properties(bare, size)
            chunks = [marshal(spec.Basic.Publish(exchange="", routing_key=limit.queue),
                              raw.number),
                      marshal(ContentHeader(properties=props.to_pamqp(), body_size=size),
                              raw.number)]
        read = 0
        while read < size:  # the body frames must be read off the channel either way
            body = await raw._get_frame()
            if not isinstance(body, ContentBody):
                raise ValueError(f"unexpected frame {body!r} in a message body")
            read += len(body.value)
            if wanted:
                chunks.append(marshal(body, raw.number))
        if not wanted:
            return  # as aiormq does: no consumer (cancelled); the broker redelivers it
        payload = b"".join(chunks)
        del chunks
        try:
            async with raw.lock:  # the channel's publishes take their tags in order
                raw.delivery_tag += 1
                confirmation = raw.create_future() if raw.publisher_confirms else None
                if confirmation is not None:
                    raw.confirmations[raw.delivery_tag] = confirmation
                drain = raw.create_future()
                await raw.write_queue.put(ChannelFrame(payload=payload, should_close=False,
                                                       drain_future=drain))
            del payload
            await drain  # written: the next body may be read
        except Exception as e:
            log.warning("dead-lettering delivery %d (too large) failed: %s", bare.tag,
                        _describe(e))
            self.island.to_trio(partial(limit.done, bare, size, False))
            return

        def confirmed(future: asyncio.Future[Any]) -> None:
            ok = (not future.cancelled() and future.exception() is None
                  and isinstance(future.result(), spec.Basic.Ack))
            if ok:
                self._ready_aio(bare.tag)
            self.island.to_trio(partial(limit.done, bare, size, ok))

        if confirmation is None:
            self._ready_aio(bare.tag)
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
                result = await self._raw.basic_publish(
                    body, exchange="", routing_key=queue, properties=properties.to_pamqp())
                ok = result is None or isinstance(result, spec.Basic.Ack)
            except Exception as e:
                log.warning("dead-lettering delivery %d failed: %s", tag, _describe(e))
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
        self._ready.clear()


__all__ = [
    "Confirm",
    "Connection",
    "ConnectionLost",
    "Consumer",
    "Delivery",
    "Island",
    "IslandClosed",
    "Outgoing",
    "Properties",
    "PublishFailed",
    "Publisher",
    "SizeLimit",
    "TlsOptions",
    "open_island",
    "refused_by_broker",
]
