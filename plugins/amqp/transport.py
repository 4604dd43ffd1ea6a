"""The AMQP transport (RabbitMQ): ``[transports.X] type = "amqp"``.

Inbound, it consumes one durable queue with manual acknowledgements: each delivery is
decoded (by its content type), submitted to the pipeline, and acknowledged once the
pipeline has settled it; a delivery that cannot be decoded or is rejected is published to
the dead-letter queue with the reason in its headers and then acknowledged. Outbound,
``deliver`` writes messages to an on-disk spool and returns; a publisher task drains the
spool in order to the exchange, with publisher confirms, and removes what is confirmed.

The broker connection lives on an asyncio thread (:mod:`.island`, :mod:`.connection`). See
docs/amqp.md for settings, topology, delivery guarantees and failure behaviour.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from bridge import (
    CLIENT_MSG_ID,
    Accepted,
    DecodeError,
    DeliveryError,
    Failed,
    Health,
    Message,
    Outcome,
    Rejected,
    StorageUnavailable,
    TransportContext,
    TransportType,
    hookimpl,
)

from ..codecs import codec_for
from .asyncapi import describe as describe_asyncapi
from .connection import Connection, ConnectionLost, TlsOptions, refused_by_broker
from .consumer import Consumer, Delivery, SizeLimit
from .inbox import ACK, LEAVE, DeadLetter, Inbox
from .island import Island, open_island
from .outbox import Entry, Spool
from .publisher import Outgoing, Properties, Publisher, PublishFailed
from .settings import AmqpSettings, redact

log = logging.getLogger("bridge.amqp")

HOPS_HEADER = "x-bridge-hops"
CHAT_ID_HEADER = "x-bridge-chat-id"
KIND_HEADER = "x-bridge-kind"
#: A delivery that failed for a transient reason (storage down) is submitted again after
#: this pause, doubled while it keeps failing, up to RETRY_MAX_S.
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 5.0
#: While the broker's port refuses connections, how often it is probed during a backoff.
PROBE_INTERVAL_S = 0.5
#: Once the port accepts again, attempts that fail (a broker still starting) are retried
#: after about PROBE_INTERVAL_S this many times before the backoff resumes; a broker that
#: refuses the login or a vhost gets the backoff at once.
QUICK_RETRIES = 8


class AmqpTransport:
    def __init__(self, name: str, settings: AmqpSettings) -> None:
        self.name = name
        self.settings = settings
        self._ctx: TransportContext | None = None
        self._spool: Spool | None = None
        self._accepting = True
        self._connected = False
        self._established = False
        self._consumer: Consumer | None = None
        self._direct: Publisher | None = None  # publish_confirmed's channel, while connected
        self._conn: Connection | None = None  # the session's connection
        self._direct_lock = trio.Lock()
        self._last_error = "not connected yet"
        self._changed = trio.Event()  # fired on spool and connection changes
        self._spool_grown = trio.Event()
        self._inbox = Inbox(settings.dedupe_window)  # what is consumed and not yet settled
        #: id(message) -> its outbox seqs (one per leg to this transport), until commit
        self._held: dict[int, list[int]] = {}
        self._to_drop: list[int] = []  # outbox seqs to delete at the next commit
        self._appending = 0  # deliver() calls in progress
        self._commit_failed = trio.Event()  # set when a commit failed: retried later
        #: deliveries of the current consumer that failed for a transient reason (storage
        #: down), to submit again
        self._parked: list[tuple[Consumer, Message, Delivery]] = []
        self._unparked = trio.Event()  # set while nothing is parked
        self._unparked.set()
        self._parked_now = trio.Event()  # fired when the first delivery is parked
        self._tls = TlsOptions(
            ca_file=_path(settings.tls_ca_file), cert_file=_path(settings.tls_cert_file),
            key_file=_path(settings.tls_key_file), verify=settings.tls_verify)

    @property
    def tls(self) -> TlsOptions:
        """The TLS options of the broker connection (cluster mode's backplane uses them)."""
        return self._tls

    @property
    def ctx(self) -> TransportContext:
        if self._ctx is None:
            raise RuntimeError(f"transport {self.name} is not running")
        return self._ctx

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError(f"transport {self.name} is not running")
        return self._spool

    # ------------------------------------------------------------------ lifecycle

    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        self._spool = await Spool.open(ctx.state_dir / "outbox.sqlite3",
                                       max_messages=self.settings.max_spool_messages,
                                       synchronous=self.settings.spool_sync)
        await self._reconcile()
        if self._spool.depth:
            log.info("%s: %d messages wait in the outbox", self.name, self._spool.depth)
        ctx.gauge("spool_depth", self._spool.depth)
        try:
            async with open_island(self.name, close_timeout=self.settings.close_timeout_s
                                   ) as island, trio.open_nursery() as nursery:
                nursery.start_soon(self._connect_forever, island)
                nursery.start_soon(self._recommit)
                # Started once the outbox is open: it takes deliveries whether the broker
                # answers or not, so no transport listed after this one waits for it.
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._spool.close()

    def stop_accepting(self) -> None:
        self._accepting = False
        if self._consumer is not None:
            self._consumer.cancel()
        self._unpark_all()  # parked deliveries stay with the broker
        self._fire()

    async def drain(self) -> None:
        """Wait for the consumer's cancellation, and publish what is spooled while the
        broker is reachable; the rest stays on disk for the next start."""
        consumer = self._consumer
        if consumer is not None and consumer.stopped:
            with trio.move_on_after(self.settings.close_timeout_s):
                await consumer.cancel_done.wait()
        while self._connected and self.spool.depth > 0:
            await self._changed.wait()

    def health(self) -> Health:
        if self._ctx is None:
            return Health(False, "not started")
        if not self._connected:
            return Health(False, f"not connected to the broker: {self._last_error}")
        if self.settings.consume_queue:
            if not self._accepting:
                return Health(False, "stopped consuming (shutting down)")
            if self._consumer is None:
                return Health(False, f"connected but not consuming {self.settings.consume_queue}")
        return Health(True)

    async def wait_changed(self) -> None:
        """Return at the next change of the connection or the spool (for tools and tests)."""
        await self._changed.wait()

    @property
    def spool_depth(self) -> int:
        """Messages waiting in the outbox (published but unconfirmed ones included)."""
        return self.spool.depth

    def _fire(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------------ connection

    async def _connect_forever(self, island: Island) -> None:
        s = self.settings
        delay = s.reconnect_initial_s
        attempt = 0
        quick = 0  # attempts left at a short pause once the port has come back
        while True:
            if attempt:
                self.ctx.count("amqp_reconnects_total")
            attempt += 1
            self._established = False
            refused = False
            try:
                await self._session(island)
            except* Exception as group:  # aiormq, aio-pika and OS errors share no base
                self._lost(group)
                refused = refused_by_broker(_first(group))
            if self._established:
                delay = s.reconnect_initial_s
            if quick and not refused:
                # The port came back a moment ago: the broker may still be starting (it
                # accepts TCP before it serves AMQP), so try again soon, a few times.
                quick -= 1
                await trio.sleep(PROBE_INTERVAL_S * random.uniform(1.0, 1.5))
                continue
            quick = 0
            pause = min(delay, s.reconnect_max_s) * random.uniform(0.5, 1.0)
            delay = min(delay * 2, s.reconnect_max_s)
            log.info("%s: reconnecting in %.2f s", self.name, pause)
            if await self._pause(pause):
                log.info("%s: the broker's port accepts again; reconnecting now", self.name)
                delay = s.reconnect_initial_s
                quick = QUICK_RETRIES

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before the next attempt; True if cut short. While the broker's
        port refuses TCP (down, restarting, unreachable), it is probed every
        PROBE_INTERVAL_S and the wait ends once it accepts. A broker that accepts TCP and
        then fails the connection (authentication, a timeout, a refused vhost) gets the
        whole backoff, so it is not hammered (but see QUICK_RETRIES for one that is still
        starting)."""
        with trio.move_on_after(seconds):
            if await self._broker_accepts():
                await trio.sleep_forever()
            while True:
                await trio.sleep(PROBE_INTERVAL_S)
                if await self._broker_accepts():
                    return True
        return False

    async def _broker_accepts(self) -> bool:
        """Whether the broker's host and port accept a TCP connection now (closed at once,
        before any AMQP is said)."""
        parts = urlsplit(self.settings.url)
        try:
            port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        except ValueError:  # not a port: the connection itself says why
            return True
        with trio.move_on_after(PROBE_INTERVAL_S):
            try:
                stream = await trio.open_tcp_stream(parts.hostname or "localhost", port)
            except OSError:
                return False
            await stream.aclose()
            return True
        return False

    def _lost(self, group: BaseExceptionGroup[Exception]) -> None:
        exc = _first(group)
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("%s: broker connection lost: %s", self.name, self._last_error)
        self._fire()  # health() says why

    async def _session(self, island: Island) -> None:
        """One connection's life: declare, publish, consume; raises once it is lost."""
        s = self.settings
        with trio.fail_after(s.connect_timeout_s + 1):
            conn = await Connection.open(island, s.url, heartbeat_s=s.heartbeat_s,
                                         timeout_s=s.connect_timeout_s, tls=self._tls,
                                         name=f"bridged {self.name}")
        try:
            await self._declare(conn)
            publisher = await conn.open_publisher(s.publish_window)
            self._conn = conn
            self._direct = await conn.open_publisher(s.publish_window)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.wait_lost)
                nursery.start_soon(self._publish, publisher)
                if s.consume_queue and self._accepting:
                    consumer = await conn.open_consumer(
                        s.consume_queue, s.prefetch,
                        size_limit=SizeLimit(s.max_message_bytes, s.dead_letter_queue,
                                             self._too_large_properties, self._too_large))
                    nursery.start_soon(self._consume, consumer)
                    self._consumer = consumer
                self._connected = self._established = True
                self._fire()
                log.info("%s: connected to %s%s", self.name, redact(s.url),
                         f", consuming {s.consume_queue}" if self._consumer else "")
        finally:
            self._connected = False
            self._consumer = None
            self._direct = None
            self._conn = None
            self._fire()
            await conn.close(s.close_timeout_s)

    async def _declare(self, conn: Connection) -> None:
        s = self.settings
        queues = [q for q in (s.consume_queue, s.dead_letter_queue) if q]
        exchanges = [(s.exchange, s.exchange_type)] if s.exchange else []
        bindings = ([(s.consume_queue, s.exchange, key)
                     for key in s.bind_consume_queue_to_exchange]
                    if s.consume_queue and s.exchange else [])
        await conn.declare(queues=queues, exchanges=exchanges, bindings=bindings)

    # ------------------------------------------------------------------ publishing

    async def deliver(self, messages: Sequence[Message]) -> None:
        """Spool ``messages`` durably and hold them until :meth:`commit` (the pipeline calls
        it once it knows which of them the history stored)."""
        entries = [self._entry(m) for m in messages]
        self._appending += 1
        try:
            stored = await self.spool.append(entries, hold=True)
        finally:
            self._appending -= 1
        for message, entry in zip(messages, stored, strict=True):
            self._held.setdefault(id(message), []).append(entry.seq)
        self.ctx.gauge("spool_depth", self.spool.depth)
        self._fire()

    async def commit(self, kept: Sequence[Message], dropped: Sequence[Message]) -> None:
        """Publish the held messages that were stored (``kept``) and forget the others.
        If the release fails (a full disk), it is tried again later (:meth:`_recommit`)."""
        for m in dropped:
            self._to_drop.extend(self._held.get(id(m), ()))
        self._held.clear()  # every held message is resolved by this call
        await self._release()

    async def _release(self) -> None:
        try:
            await self.spool.commit(self._to_drop)
        except Exception:
            self._commit_failed.set()
            raise
        self._to_drop.clear()
        self._spool_grown.set()
        self._spool_grown = trio.Event()
        self.ctx.gauge("spool_depth", self.spool.depth)
        self._fire()

    async def _recommit(self) -> None:
        """Release what a failed commit left held, once no batch is between its deliver and
        its commit (the spool's worker runs calls in order, so a release submitted now never
        covers rows appended after it)."""
        pause = RETRY_INITIAL_S
        while True:
            await self._commit_failed.wait()
            await trio.sleep(pause)
            if self._held or self._appending:  # a batch is in flight: its commit releases
                continue
            self._commit_failed = trio.Event()
            try:
                await self._release()
            except Exception as e:
                pause = min(pause * 2, RETRY_MAX_S)
                log.warning("%s: releasing held messages failed again: %s", self.name, e)
            else:
                pause = RETRY_INITIAL_S

    async def _reconcile(self) -> None:
        """Store and release what the outbox still held when the daemon stopped: the
        history may or may not have it, and storing is idempotent (docs/architecture.md)."""
        held = await self.spool.held()
        if not held:
            return
        dropped: list[int] = []
        try:
            await self.ctx.persist([self._message(e) for e in held])
        except StorageUnavailable:
            raise  # a full disk at start: exit 3, as for a database that cannot open
        except Exception:  # find the rows that cannot be stored; they are not published
            for e in held:
                try:
                    await self.ctx.persist([self._message(e)])
                except StorageUnavailable:
                    raise
                except Exception:
                    log.exception("%s: held message %s cannot be stored; it is dropped, not"
                                  " published", self.name, e.message_id or "-")
                    dropped.append(e.seq)
        await self.spool.commit(dropped)
        log.info("%s: %d held messages stored in the history and released for publishing",
                 self.name, len(held) - len(dropped))

    def _message(self, e: Entry) -> Message:
        """The message an outbox entry was made from (for the history: its kind, chat id,
        id, body and client message id)."""
        chat_id = e.headers.get(CHAT_ID_HEADER)
        hops = e.headers.get(HOPS_HEADER, 1)
        meta = {CLIENT_MSG_ID: e.client_msg_id} if e.client_msg_id else {}
        return Message(str(e.headers.get(KIND_HEADER, "")),
                       self.ctx.codec(e.content_type).decode(e.body), self.name, e.message_id,
                       chat_id if isinstance(chat_id, str) else None,
                       hops - 1 if isinstance(hops, int) and hops > 0 else 0, meta)

    def _entry(self, message: Message) -> Entry:
        s = self.settings
        if message.chat_id is None and "{chat_id}" in s.routing_key:
            raise DeliveryError(f"{self.name}: message {message.id or '-'} has no chat id"
                                f" for the routing key {s.routing_key!r}")
        key = s.routing_key.format(chat_id=message.chat_id or "", kind=message.kind,
                                   source=message.source)
        if len(key.encode()) > 255:  # AMQP's limit: the broker could never take it
            raise DeliveryError(f"{self.name}: message {message.id or '-'}: routing key of"
                                f" {len(key.encode())} bytes is over AMQP's 255")
        codec = self.ctx.codec("application/json")
        headers: dict[str, Any] = {HOPS_HEADER: message.hops + 1, KIND_HEADER: message.kind}
        if message.chat_id is not None:
            headers[CHAT_ID_HEADER] = message.chat_id
        client_id = message.meta.get(CLIENT_MSG_ID)
        return Entry(s.exchange, key, codec.content_type, message.id, headers,
                     codec.encode(message.body),
                     client_msg_id=client_id if isinstance(client_id, str) else None)

    async def publish_confirmed(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` now, in order, and return once the broker has confirmed every
        one; raise (:class:`ConnectionError`) when it is not connected, refuses one, or does
        not answer within ``connect_timeout_s``. The spool is not used: the caller keeps them
        until this returns (cluster mode's outbox in PostgreSQL). After a failure the next
        call gets a new channel, so no answer meant for this call is taken for its own."""
        entries = [self._entry(m) for m in messages]
        async with self._direct_lock:
            if self._direct is None and self._connected and self._conn is not None:
                self._direct = await self._conn.open_publisher(self.settings.publish_window)
            publisher = self._direct
            if publisher is None or not self._connected:
                raise ConnectionError(f"{self.name}: not connected to the broker")
            ok = False
            try:
                with trio.fail_after(self.settings.connect_timeout_s):
                    await publisher.publish([
                        Outgoing(e.exchange, e.routing_key, e.body,
                                 Properties(e.content_type, e.message_id, True, e.headers), i)
                        for i, e in enumerate(entries)])
                    waiting = set(range(len(entries)))
                    while waiting:
                        for c in await publisher.confirms():
                            if not c.ok:
                                raise PublishFailed(f"{self.name}: publish of"
                                                    f" {messages[c.token].id} failed: {c.reason}")
                            waiting.discard(c.token)
                ok = True
            except trio.TooSlowError:
                raise PublishFailed(f"{self.name}: the broker did not confirm within"
                                    f" {self.settings.connect_timeout_s} s") from None
            finally:
                if not ok and self._direct is publisher:
                    self._direct = None  # its unanswered confirms die with it
        self.ctx.count("published_total", len(entries))

    async def _publish(self, publisher: Publisher) -> None:
        """Drain the spool in order; everything unconfirmed is re-sent on a new connection."""
        cursor = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._confirm, publisher)
            while True:
                grown = self._spool_grown
                entries = await self.spool.read(cursor, self.settings.publish_window)
                if not entries:
                    await grown.wait()
                    continue
                cursor = entries[-1].seq
                await publisher.publish([
                    Outgoing(e.exchange, e.routing_key, e.body,
                             Properties(e.content_type, e.message_id, True, e.headers), e.seq)
                    for e in entries])

    async def _confirm(self, publisher: Publisher) -> None:
        while True:
            confirms = await publisher.confirms()
            done: list[int] = []
            failed = None
            for c in confirms:
                if not c.ok:
                    failed = c
                    break
                done.append(c.token)
            if done:
                await self.spool.remove(done)
                self.ctx.count("published_total", len(done))
                self.ctx.gauge("spool_depth", self.spool.depth)
                self._fire()
            if failed is not None:
                raise PublishFailed(f"publish of outbox entry {failed.token} failed:"
                                    f" {failed.reason}")

    # ------------------------------------------------------------------ consuming

    async def _consume(self, consumer: Consumer) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_cancel, consumer)
            nursery.start_soon(self._retry_parked, consumer)
            try:
                while self._accepting:
                    for delivery in await consumer.receive():
                        # while storage is down, new deliveries wait behind the parked ones
                        # (prefetch then stops the broker): they stay with the broker
                        await self._unparked.wait()
                        if not self._accepting:
                            return  # left unacknowledged: the broker redelivers them
                        await self._handle(consumer, delivery)
            finally:
                self._unpark_all()

    async def _retry_parked(self, consumer: Consumer) -> None:
        """Submit this consumer's parked deliveries again, in order, after a pause that
        doubles while they keep failing (:data:`RETRY_INITIAL_S` to :data:`RETRY_MAX_S`)."""
        pause = RETRY_INITIAL_S
        while self._accepting:
            await self._wait_parked()
            await trio.sleep(pause * random.uniform(0.75, 1.0))
            if not self._accepting or consumer is not self._consumer:
                return
            parked, self._parked = sorted(self._parked, key=lambda p: p[2].tag), []
            round_ = _Round(len(parked))
            for _, message, d in parked:
                await self.ctx.submit(message, partial(self._settle_retried, round_,
                                                       consumer, d, message))
            await round_.done.wait()
            if self._parked:
                pause = min(pause * 2, RETRY_MAX_S)
            else:
                pause = RETRY_INITIAL_S
                self._unparked.set()

    async def _wait_parked(self) -> None:
        """Return once a delivery is parked."""
        while self._unparked.is_set():
            await self._parked_now.wait()

    def _park(self, consumer: Consumer, message: Message, d: Delivery) -> None:
        self._parked.append((consumer, message, d))
        if self._unparked.is_set():
            self._unparked = trio.Event()
            self._parked_now.set()
            self._parked_now = trio.Event()

    def _unpark_all(self) -> None:
        """The consumer is gone (connection lost, shutting down): the broker redelivers what
        was parked; let the copies held behind them go too."""
        for consumer, _, d in self._parked:
            self._inbox.settle(consumer, d, LEAVE)
        self._parked.clear()
        self._unparked.set()

    async def _watch_cancel(self, consumer: Consumer) -> None:
        await consumer.cancelled.wait()
        if self._accepting:  # the broker cancelled us (queue deleted): start over
            raise ConnectionLost(f"the broker cancelled the consumer of"
                                 f" {self.settings.consume_queue}")

    async def _handle(self, consumer: Consumer, d: Delivery) -> None:
        if self._inbox.duplicate(consumer, d):  # acknowledged, or held behind the first copy
            self.ctx.count("duplicates_total")
            self._fire()
            return
        try:
            message = self._decode(d)
        except DecodeError as e:
            self._dead_letter(consumer, d, "DecodeError", str(e))
            return
        self._inbox.handling(d)
        await self.ctx.submit(message, partial(self._settle, consumer, d, message))

    def _decode(self, d: Delivery) -> Message:
        content_type = d.content_type or "application/json"
        codec = codec_for(self.ctx.codec, content_type)
        body = codec.decode(d.body)
        if not isinstance(body, dict):
            raise DecodeError(f"the body must be an object, not {type(body).__name__}")
        hops = d.headers.get(HOPS_HEADER, 0)
        if not isinstance(hops, int) or isinstance(hops, bool) or hops < 0:
            raise DecodeError(f"header {HOPS_HEADER} must be a non-negative integer")
        chat_id = d.headers.get(CHAT_ID_HEADER)
        meta = {"content_type": content_type, "routing_key": d.routing_key,
                "exchange": d.exchange, "redelivered": d.redelivered}
        return Message(self.settings.consume_kind, body, self.name, d.message_id,
                       chat_id if isinstance(chat_id, str) else None, hops, meta)

    def _settle(self, consumer: Consumer, d: Delivery, message: Message,
                outcome: Outcome) -> None:
        """The pipeline is done with delivery ``d``: ack it, dead-letter then ack it, or
        park it to submit it again later (a transient failure: storage is down)."""
        if isinstance(outcome, Failed) and outcome.retry:
            if consumer.stopped or not self._accepting or consumer is not self._consumer:
                self._inbox.settle(consumer, d, LEAVE)  # shutting down or reconnected: the
            else:                                       # broker keeps it and redelivers it
                self._park(consumer, message, d)
            return
        if isinstance(outcome, Accepted):
            self._inbox.settle(consumer, d, ACK)
            return
        if isinstance(outcome, Rejected):
            self._dead_letter(consumer, d, type(outcome.error).__name__, outcome.reason)
        else:
            self._dead_letter(consumer, d, "Failed", outcome.reason)

    def _settle_retried(self, round_: _Round, consumer: Consumer, d: Delivery,
                        message: Message, outcome: Outcome) -> None:
        self._settle(consumer, d, message, outcome)
        round_.settled()
    def _too_large_error(self, size: int) -> str:
        return (f"the body is {size} bytes, over max_message_bytes"
                f" ({self.settings.max_message_bytes}); not decoded")

    def _too_large_properties(self, d: Delivery, size: int) -> Properties:
        """The dead letter of a delivery over ``max_message_bytes`` (asyncio thread)."""
        return self._dead_letter_properties(d, "TooLarge", self._too_large_error(size))

    def _too_large(self, d: Delivery, size: int, ok: bool) -> None:
        """The seam dead-lettered (``ok``) a delivery over ``max_message_bytes``, or failed
        to, which leaves it to the broker to redeliver."""
        if ok:
            log.info("%s: dead-lettered delivery %s (TooLarge): %s", self.name,
                     d.message_id or "-", self._too_large_error(size))
            self.ctx.count("dead_letters_total", reason="TooLarge")
        self._fire()

    def _dead_letter(self, consumer: Consumer, d: Delivery, reason: str, error: str) -> None:
        s = self.settings
        log.info("%s: dead-lettering delivery %s (%s): %s", self.name, d.message_id or "-",
                 reason, error)
        props = self._dead_letter_properties(d, reason, error)
        ctx = self.ctx

        def done(ok: bool) -> None:
            if ok:
                ctx.count("dead_letters_total", reason=reason)

        self._inbox.settle(consumer, d, DeadLetter(s.dead_letter_queue, props, done))

    def _dead_letter_properties(self, d: Delivery, reason: str, error: str) -> Properties:
        """The dead letter's properties: the original ones and the reason in headers."""
        s = self.settings
        headers = {k: v for k, v in d.headers.items() if isinstance(k, str)}
        headers.update({
            "x-bridge-reason": reason,
            "x-bridge-error": error[:1000],
            "x-bridge-transport": self.name,
            "x-bridge-original-queue": s.consume_queue,
            "x-bridge-original-exchange": d.exchange,
            "x-bridge-original-routing-key": d.routing_key,
        })
        return Properties(d.content_type, d.message_id, True, headers)


class _Round:
    """One round of parked deliveries submitted again: done once each is settled."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = trio.Event()
        if n == 0:
            self.done.set()

    def settled(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


def _path(p: Path | None) -> str | None:
    return str(p) if p is not None else None


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, Exception)
    return exc


def _create(name: str, settings: Any) -> AmqpTransport:
    return AmqpTransport(name, settings)


def _reflects(settings: Any) -> bool:
    return bool(settings.consume_queue and settings.bind_consume_queue_to_exchange)


TRANSPORT = TransportType("amqp", AmqpSettings, _create, reflects=_reflects,
                          describe=describe_asyncapi)


@hookimpl
def bridge_register_transports(register: Callable[[TransportType], None]) -> None:
    register(TRANSPORT)


__all__ = ["AmqpSettings", "AmqpTransport", "redact"]
