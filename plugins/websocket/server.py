"""The WebSocket chat transport (SPEC §2) on trio-websocket.

One task per connection reads client frames and submits them; one writer task per socket
owns the socket's ``socket_sequence`` and is the only one that sends: it takes frames from
the socket's bounded queue and sends a heartbeat whenever one is due. What is queued when
the writer wakes goes out in one system call (:class:`~.stream.HeldStream`). ``deliver`` never
waits on a socket: it puts each event into every queue of its chat with ``send_nowait``,
and a socket whose queue is full is closed with 1013 (the client resumes with ``since``).

Every close goes through :meth:`_Socket.close`: it records the code and reason, stops the
queue, and gives the connection ``close_timeout_s`` to finish; the writer sends the close
frame once the frame it may be sending is complete (a frame is never cut in half). A close
that does not finish in time (a client that stopped reading: the close frame cannot leave a
full TCP buffer) is cut, and counted like the others (:func:`_count_close`)."""

from __future__ import annotations

import logging
import math
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection
from wsproto.extensions import PerMessageDeflate

from bridge import (
    CHAT_EVENT,
    AuthError,
    ContractError,
    DecodeError,
    DeliveryError,
    Failed,
    Health,
    Identity,
    Message,
    Outcome,
    Rejected,
    ReplayGap,
    StorageUnavailable,
    TransportContext,
)
from bridge import CLIENT_MSG_ID as META_CLIENT_ID
from bridge import CLIENT_MSG_RETRY as META_RETRY

from .framing import Framer, JsonFramer, MsgpackFramer
from .handshake import (
    REFUSAL_CODE_BASE,
    ChatRequest,
    Refusal,
    parse_request,
    wants_readable_refusals,
)
from .stream import HeldStream

if TYPE_CHECKING:
    from . import WebSocketSettings

log = logging.getLogger("bridge_plugins.websocket")

# Close codes (RFC 6455 §7.4.1 and the IANA registry).
NORMAL, GOING_AWAY, ABNORMAL, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_AGAIN = (
    1000, 1001, 1006, 1007, 1008, 1009, 1011, 1013)
#: Private-use close code (docs/security.md): the handshake's credentials have expired.
EXPIRED = 4001
#: Fields only the server assigns; dropped from client frames before they enter the bridge.
SERVER_FIELDS = frozenset({"eventId", "timestamp", "timestampms", "socket_sequence"})
FRAMERS: dict[str, Callable[[Any], Framer]] = {"json": JsonFramer, "msgpack": MsgpackFramer}
#: The opt-in top-level key of a client update that names it (docs/websocket.md), what it
#: may hold, and the ``Message.meta`` keys it travels under: the id, and the mark the history
#: puts on a retry it recognised (the message is then the original event; plugins/history.py).
CLIENT_MSG_ID = "clientMsgId"
CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: With ``marks=true``: the key on replayed updates, and the frame between replay and live.
REPLAYED, REPLAY_END = "replayed", "replay_end"
#: With ``hello=true``: the first frame on the socket.
HELLO = "hello"
#: The smallest event id: a replay after it answers a gap if the chat was ever pruned.
FIRST_EVENT_ID = "0" * 20
#: The event id a retry's echo is queued under: greater than every real id, so the writer
#: never takes it for a live copy of an event its replay sent already.
ALWAYS = "~"
#: Queued frames a socket's writer sends in one system call, at most.
WRITE_BATCH = 64
#: Bytes a writer sends in one system call, at most (but one frame at least). A close frame
#: waits behind the write in flight, so this also bounds what a slow reader must drain
#: before its 1013 frame, beside what the kernel holds (docs/websocket.md).
WRITE_BATCH_BYTES = 16 * 1024
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
#: Refusals one IP address gets as close codes (``refusals=close``) per second, and at once;
#: beyond that it gets the HTTP status, which costs less than an upgrade and a close.
READABLE_REFUSALS, READABLE_REFUSALS_BURST = 2.0, 20
#: Addresses whose readable-refusal budget is remembered (least recently refused forgotten).
BUDGET_ADDRESSES = 4096
#: Seconds between two log lines about refusals of one kind (the others are counted).
REFUSAL_LOG_INTERVAL = 10.0


def close_reason(text: str) -> str:
    """``text`` cut to the 123 bytes a close frame can carry."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


def reason_for(error: Exception) -> str:
    """A rejection's reason, naming the field when the error knows it."""
    text = str(error)
    field = getattr(error, "field", "")
    if field and not text.startswith(field):
        text = f"{field}: {text}"
    return text


@dataclass(frozen=True, slots=True)
class _Outbound:
    event_id: str
    prepared: Any  # what the socket's framer prepared, shared by every socket of the encoding


class _Socket:
    """One accepted (or being accepted) client on a chat."""

    __slots__ = ("_close_timeout", "_scope", "chat", "code", "flush", "framer", "id", "pending",
                 "reason", "receive", "send")
    _ids = count(1)

    def __init__(self, chat: ChatRequest, framer: Framer, queue: int, close_timeout: float,
                 scope: trio.CancelScope) -> None:
        self.id = f"ws-{next(self._ids)}"
        self.chat = chat
        self.framer = framer
        self.send, self.receive = trio.open_memory_channel[_Outbound](queue)
        self.code: int | None = None  # set once a close is under way
        self.reason = ""
        self.flush = False  # send what is queued before the close frame
        self.pending = 0  # frames this client sent that the pipeline has not settled yet
        self._close_timeout = close_timeout
        self._scope = scope

    def offer(self, item: _Outbound) -> bool:
        """Queue ``item``; False when the queue is full."""
        try:
            self.send.send_nowait(item)
        except trio.WouldBlock:
            return False
        except trio.ClosedResourceError:
            pass  # closing already: the client resumes with since
        return True

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Close with ``code`` (the first close asked for wins), within ``close_timeout``.
        With ``flush``, what is queued is sent first, and so are the echoes of the frames
        this client sent that the pipeline has not settled yet: the queue stays open for
        them until the last one settles (:meth:`settle`)."""
        if self.code is not None:
            return
        self.code, self.reason, self.flush = code, close_reason(reason), flush
        if not flush or self.pending == 0:
            self.send.close()
        self._scope.deadline = min(self._scope.deadline,
                                   trio.current_time() + self._close_timeout)

    def stopping(self) -> bool:
        """Closing, without sending what is queued first."""
        return self.code is not None and not self.flush

    def settle(self, outcome: Outcome) -> None:
        """The pipeline's verdict on a frame this client sent. It comes after the event was
        delivered, so an accepted frame's echo is queued by now."""
        self.pending -= 1
        if isinstance(outcome, Rejected):
            code = INVALID_DATA if isinstance(outcome.error, DecodeError) else POLICY
            self.close(code, reason_for(outcome.error), flush=True)
        elif isinstance(outcome, Failed):  # retry: storage is down for now (a full disk)
            self.close(TRY_AGAIN if outcome.retry else INTERNAL, outcome.reason, flush=True)
        if self.pending == 0 and self.code is not None and self.flush:
            self.send.close()  # every echo it waited for is queued


class WebSocketTransport:
    def __init__(self, name: str, settings: WebSocketSettings) -> None:
        self.name = name
        self.settings = settings
        self.port: int | None = None  # the bound port, once listening (useful with port 0)
        self._ctx: TransportContext | None = None
        self._chats: dict[str, set[_Socket]] = {}
        self._connections = 0
        self._per_address: dict[str, int] = {}
        self._tls: ssl.SSLContext | None = None  # the listener's, reloaded in place
        self._sockets = 0
        self._listening = False
        self._accepting = True
        self._accept_scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()
        self._framers: dict[str, tuple[Any, Framer]] = {}  # encoding -> (codec, framer)
        self._refusal_budget = _AddressBudget(READABLE_REFUSALS, READABLE_REFUSALS_BURST)
        self._refusal_log = _RefusalLog(name, REFUSAL_LOG_INTERVAL)
        #: (chat_id, clientMsgId) of updates in the pipeline: a retry waits for the first
        self._in_flight: dict[tuple[str, str], trio.Event] = {}
        self._join: Callable[[str], Awaitable[None]] | None = None
        self._leave: Callable[[str], None] | None = None

    def watch_chats(self, join: Callable[[str], Awaitable[None]],
                    leave: Callable[[str], None]) -> None:
        """Call ``join(chat_id)`` for each socket as it registers, before its replay is
        read and before its handshake completes (what raises there refuses the handshake
        with 503, reason ``storage``), and ``leave(chat_id)`` when a chat's last socket has
        gone. Cluster mode's sequencer keeps a chat's order from the first ``join`` on."""
        self._join, self._leave = join, leave

    # ----------------------------------------------------------------- lifecycle

    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        s = self.settings
        listeners: list[Any]
        if s.reuse_port:
            listeners = await _reuse_port_listeners(s.host, s.port)
        else:
            listeners = await trio.open_tcp_listeners(s.port, host=s.host)
        if s.tls_cert is not None:
            context = await trio.to_thread.run_sync(self._ssl_context)
            listeners = [trio.SSLListener(listener, context, https_compatible=True)
                         for listener in listeners]
        inner: Any = getattr(listeners[0], "transport_listener", listeners[0])
        self.port = int(inner.socket.getsockname()[1])
        ctx.gauge("open_sockets", 0)
        async with trio.open_nursery() as connections:
            await connections.start(self._serve, listeners, connections)
            log.info("%s listening on %s://%s:%d/v1/chats/{chat_id}", self.name,
                     "wss" if s.tls_cert else "ws", s.host, self.port)
            task_status.started()
            await trio.sleep_forever()

    async def _serve(self, listeners: list[Any], connections: trio.Nursery,
                     *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until :meth:`stop_accepting`; they live on in ``connections``."""
        with self._accept_scope:
            self._listening = True
            try:
                await trio.serve_listeners(self._on_stream, listeners,
                                           handler_nursery=connections, task_status=task_status)
            finally:
                self._listening = False

    def _ssl_context(self) -> ssl.SSLContext:
        context = new_ssl_context(self.settings)
        self._tls = context
        return context

    async def reconfigure(self, settings: WebSocketSettings) -> bool:
        """A reload (SIGHUP). The listening address, and switching TLS on or off, wait for a
        restart (False). The certificate and key are re-read on every reload, changed paths
        or not (a pair rotated in place); they serve new handshakes while open sockets keep
        theirs; a pair that does not load is refused and the old one kept. Every other
        setting applies to the connections opened from now on."""
        old = self.settings
        if ((settings.host, settings.port, settings.reuse_port)
                != (old.host, old.port, old.reuse_port)
                or (settings.tls_cert is None) != (old.tls_cert is None)
                or (settings.tls_cert is None) != (settings.tls_key is None)):
            return False
        if settings.tls_cert is not None:
            try:
                await trio.to_thread.run_sync(new_ssl_context, settings)  # does it load?
            except (OSError, ssl.SSLError) as e:
                log.error("%s: the new TLS certificate and key do not load (%s); keeping the"
                          " old pair", self.name, e)
                return False
            assert self._tls is not None
            await trio.to_thread.run_sync(self._tls.load_cert_chain, str(settings.tls_cert),
                                          str(settings.tls_key))
        self.settings = settings
        return True

    def stop_accepting(self) -> None:
        self._accepting = False  # handshakes under way: 503; client frames: no longer taken
        self._accept_scope.cancel()
        self._listening = False

    async def drain(self) -> None:
        for sockets in list(self._chats.values()):
            for sock in list(sockets):
                sock.close(GOING_AWAY, "server shutting down; resume with since=<last eventId>",
                           flush=True)
        await self._idle.wait()

    def health(self) -> Health:
        if self._listening:
            return Health(True)
        return Health(False, "not listening" if self._ctx else "not started")

    # ----------------------------------------------------------------- delivery

    async def deliver(self, messages: Sequence[Message]) -> None:
        for message in messages:
            if message.kind != CHAT_EVENT or not message.chat_id:
                raise DeliveryError(
                    f"{self.name} delivers chat events with a chat id, not {message.kind!r}"
                    " (route notifications through the notification_to_chat transform)")
            sockets = self._chats.get(message.chat_id)
            if not sockets:
                continue
            prepared: dict[str, _Outbound] = {}
            client_id = message.meta.get(META_CLIENT_ID)
            sender = message.meta.get("connection") if client_id else None
            retry = bool(message.meta.get(META_RETRY))
            for sock in list(sockets):
                if sock.id == sender:  # the echo: the only copy that carries the client's id
                    item = _Outbound(ALWAYS if retry else message.id, sock.framer.prepare(
                        {**message.body, CLIENT_MSG_ID: client_id}))
                elif retry:  # the others had the original event already
                    continue
                else:
                    shared = prepared.get(sock.framer.name)
                    if shared is None:
                        shared = _Outbound(message.id, sock.framer.prepare(message.body))
                        prepared[sock.framer.name] = shared
                    item = shared
                if not sock.offer(item):
                    self._ctx_().count("slow_client_closes_total")
                    sock.close(TRY_AGAIN, "too slow: outbound queue full;"
                               " reconnect with since=<last eventId>")

    # ----------------------------------------------------------------- connections

    def _ctx_(self) -> TransportContext:
        assert self._ctx is not None, "transport not started"
        return self._ctx

    async def _on_stream(self, stream: trio.abc.Stream) -> None:
        """One TCP (or TLS) connection, from its first byte to its close. Nothing raised
        here may escape: it would take the listener, and every other client, down."""
        self._connections += 1
        address = _peer_address(stream)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            with trio.CancelScope(deadline=trio.current_time()
                                  + self.settings.handshake_timeout_s) as scope:
                if isinstance(stream, trio.SSLStream):
                    try:  # here, so that a failed TLS handshake closes at once
                        await stream.do_handshake()
                    except trio.BrokenResourceError:
                        self._ctx_().count("tls_handshake_failures_total")
                        return
                async with trio.open_nursery() as nursery:  # the protocol reader lives here
                    held = HeldStream(stream)
                    request = await wrap_server_stream(
                        nursery, held, max_message_size=self.settings.max_message_bytes)
                    await self._handle(request, held, scope, address)
                    nursery.cancel_scope.cancel()
            if scope.cancelled_caught:
                self._ctx_().count("connections_cut_total")
        except* (ConnectionClosed, trio.BrokenResourceError):
            pass  # the peer went away during the handshake
        except* Exception:
            log.exception("%s: connection failed", self.name)
        finally:
            self._connections -= 1
            self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]
            with trio.move_on_after(self.settings.close_timeout_s):
                await stream.aclose()

    async def _handle(self, request: WebSocketRequest, stream: HeldStream,
                      scope: trio.CancelScope, address: str) -> None:
        ctx = self._ctx_()
        s = self.settings
        sock: _Socket | None = None
        connection: WebSocketConnection | None = None
        try:
            try:  # in the order of docs/security.md: caps, path and query, Origin, auth
                if self._connections > s.max_connections:
                    raise Refusal(503, "too many connections; try again later", "capacity")
                if self._per_address[address] > s.max_connections_per_address:
                    raise Refusal(429, "too many connections from your address", "address_cap")
                chat = parse_request(request.path, request.proposed_subprotocols)
                headers = _headers(request)
                origin = headers.get("origin")
                if (s.allowed_origins and origin is not None and "*" not in s.allowed_origins
                        and origin not in s.allowed_origins):
                    raise Refusal(403, "origin not allowed", "origin")
                identity = await self._authenticate(ctx, chat, request, headers,
                                                    _endpoint(stream.inner))
                del headers  # not kept for the life of the connection (memory per socket)
                sock = _Socket(chat, self._framer(ctx, chat.encoding),
                               self.settings.outbound_queue, self.settings.close_timeout_s,
                               scope)
                self._register(sock)  # before the replay is read: nothing falls in between
                if self._join is not None:
                    try:
                        await self._join(chat.chat_id)
                    except Exception as e:
                        log.warning("%s: chat %s cannot be joined: %s", self.name,
                                    chat.chat_id, e)
                        raise Refusal(503, "the chat's history is unavailable; try again"
                                      " later", "storage") from None
                replayed, complete = await self._replay(ctx, chat)
                if not self._accepting:
                    raise Refusal(503, "the server is shutting down; try again later",
                                  "shutting_down")
            except Refusal as e:
                await self._refuse(request, e, address, scope)
                return
            connection = await _accept(request, chat.subprotocol, s.permessage_deflate)
            if s.permessage_deflate:
                ctx.count("sockets_opened_total",
                          deflate=str(bool(_extensions(connection))).lower())
            stream.farewell = partial(_unsent_close, connection)
            if sock.code is None:
                scope.deadline = math.inf  # the handshake is done
            expires_at = _expires_at(identity)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, sock, connection, stream, replayed, complete,
                                   nursery.cancel_scope)
                if expires_at is not None:
                    nursery.start_soon(_expire, sock, expires_at)
                await self._read(ctx, sock, connection, identity, expires_at)
                if sock.code is None:  # the client went away: nothing more to send
                    nursery.cancel_scope.cancel()
        finally:
            if sock is not None:
                self._unregister(sock)
                if connection is not None:
                    _count_close(ctx, sock, connection)

    def _framer(self, ctx: TransportContext, encoding: str) -> Framer:
        """The framer of ``encoding`` (one per codec: framers keep no per-socket state)."""
        codec = ctx.codec(encoding)
        cached = self._framers.get(encoding)
        if cached is None or cached[0] is not codec:
            cached = self._framers[encoding] = (codec, FRAMERS[encoding](codec))
        return cached[1]

    async def _authenticate(self, ctx: TransportContext, chat: ChatRequest,
                            request: WebSocketRequest, headers: dict[str, str], remote: str
                            ) -> Identity | None:
        try:
            return await ctx.authenticate({
                "path": chat.path, "chat_id": chat.chat_id, "headers": headers,
                "query": dict(chat.query), "subprotocols": list(request.proposed_subprotocols),
                "remote": remote})
        except AuthError as e:
            raise Refusal(e.status, str(e), "token" if e.status == 401 else "forbidden"
                          ) from None
        except Exception:
            log.exception("%s: authentication hook failed", self.name)
            raise Refusal(500, "authentication failed: internal error", "internal") from None

    async def _replay(self, ctx: TransportContext, chat: ChatRequest
                      ) -> tuple[Sequence[Message], bool]:
        """What to send before live events, and whether it is all that was asked for (False:
        ``last=N`` got fewer than N because the chat's older events are no longer kept)."""
        if chat.last is not None:
            if chat.last > self.settings.max_last:
                raise Refusal(400, f"last: at most {self.settings.max_last} events")
            if chat.last == 0:
                return (), True
            events = await self._replay_from(ctx, chat, f"last:{chat.last}")
            if len(events) == chat.last:
                return events, True
            try:  # fewer: were older ones pruned, or does the chat hold no more?
                await ctx.replay(chat.chat_id, FIRST_EVENT_ID)
            except ReplayGap:
                return events, False
            except Exception:
                return events, True  # a history that cannot tell: the replay is all it has
            return events, True
        if chat.since is None:
            return (), True
        return await self._replay_from(ctx, chat, chat.since), True

    async def _replay_from(self, ctx: TransportContext, chat: ChatRequest, since: str
                           ) -> Sequence[Message]:
        try:
            return await ctx.replay(chat.chat_id, since)
        except ReplayGap as e:
            raise Refusal(410, f"since: {e}; reconnect without since for live events",
                          "since_gone") from None
        except ContractError as e:
            if chat.last is not None:  # the client sent last, not since: name what it sent
                raise Refusal(400, "last: the history cannot send the newest events; open"
                              f" without last ({reason_for(e)})", "last") from None
            raise Refusal(400, reason_for(e), "since") from None
        except StorageUnavailable as e:
            log.warning("%s: replay for chat %s: %s", self.name, chat.chat_id, e)
            raise Refusal(503, "the chat's history is unavailable; try again later",
                          "storage") from None
        except Exception:
            log.exception("%s: replay failed for chat %s", self.name, chat.chat_id)
            raise Refusal(500, "replay failed: internal error", "internal") from None

    async def _refuse(self, request: WebSocketRequest, refusal: Refusal, address: str,
                      scope: trio.CancelScope) -> None:
        """Refuse with the HTTP status, or, when the client asked (``refusals=close``) and
        its address is within :data:`READABLE_REFUSALS` per second, accept the upgrade and
        close at once with ``4000 + status`` and the same reason, which a browser can read.
        Either way the connection counts against the caps until it is gone, and it gets
        ``close_timeout_s`` at most from here."""
        ctx = self._ctx_()
        readable = (wants_readable_refusals(request.path)
                    and self._refusal_budget.take(address, trio.current_time()))
        answer = "close" if readable else "http"
        ctx.count("handshake_refusals_total", status=str(refusal.status))
        ctx.count("handshake_refusals_by_reason_total", reason=refusal.kind, answer=answer)
        self._refusal_log.note(refusal, address, answer, trio.current_time())
        scope.deadline = min(scope.deadline, trio.current_time() + self.settings.close_timeout_s)
        if readable:
            offered = list(request.proposed_subprotocols)
            known = [p for p in offered if p in FRAMERS]
            # a browser fails a handshake whose answer names none of the offered subprotocols
            chosen = (known or offered)[0] if offered else None
            connection = await request.accept(subprotocol=chosen)
            await connection.aclose(REFUSAL_CODE_BASE + refusal.status, refusal.reason)
            return
        headers = list(_TEXT)
        if refusal.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await request.reject(refusal.status, extra_headers=headers,
                             body=refusal.reason.encode() + b"\n")

    def _register(self, sock: _Socket) -> None:
        self._chats.setdefault(sock.chat.chat_id, set()).add(sock)
        self._sockets += 1
        self._idle = trio.Event() if self._sockets == 1 else self._idle
        self._ctx_().gauge("open_sockets", self._sockets)

    def _unregister(self, sock: _Socket) -> None:
        sockets = self._chats.get(sock.chat.chat_id)
        if sockets is None or sock not in sockets:
            return
        sockets.discard(sock)
        if not sockets:
            del self._chats[sock.chat.chat_id]
            if self._leave is not None:
                self._leave(sock.chat.chat_id)
        sock.send.close()
        self._sockets -= 1
        if self._sockets == 0:
            self._idle.set()
        self._ctx_().gauge("open_sockets", self._sockets)

    async def _read(self, ctx: TransportContext, sock: _Socket,
                    connection: WebSocketConnection, identity: Identity | None,
                    expires_at: float | None) -> None:
        """Client frames into the bridge until the connection closes or a frame is bad."""
        limit = self.settings.max_message_bytes
        rate, burst = self.settings.rate_limit_per_s, float(self.settings.rate_burst)
        tokens, refilled = burst, trio.current_time()
        meta: Mapping[str, Any] = {"identity": identity, "connection": sock.id}
        while sock.code is None:
            try:
                data = await connection.get_message()
            except ConnectionClosed:
                return
            if not self._accepting:
                continue  # draining: not taken, so never echoed; the client resends it
            if expires_at is not None and time.time() >= expires_at:
                sock.close(EXPIRED, "token expired", flush=True)
                return
            now = trio.current_time()
            tokens = min(burst, tokens + (now - refilled) * rate)
            refilled = now
            if tokens < 1:
                sock.close(POLICY, "rate limit exceeded", flush=True)
                return
            tokens -= 1
            raw = data.encode() if isinstance(data, str) else data
            if len(raw) > limit:
                sock.close(TOO_BIG, f"frame of {len(raw)} bytes is over the limit of {limit}",
                           flush=True)
                return
            try:
                frame = sock.framer.decode(raw)
            except DecodeError as e:
                sock.close(INVALID_DATA, str(e), flush=True)
                return
            if not isinstance(frame, dict):
                sock.close(POLICY, "frame: must be an object with a type", flush=True)
                return
            if frame.get("type") == "heartbeat":
                continue
            body = {k: v for k, v in frame.items() if k not in SERVER_FIELDS}
            client_id = body.pop(CLIENT_MSG_ID, None)
            if client_id is None:
                sock.pending += 1
                await ctx.submit(Message(CHAT_EVENT, body, self.name,
                                         chat_id=sock.chat.chat_id, meta=meta), sock.settle)
            elif isinstance(client_id, str) and CLIENT_ID.fullmatch(client_id):
                await self._submit_named(ctx, sock, body, client_id, meta)
            else:
                sock.close(POLICY, f"{CLIENT_MSG_ID}: must be 1-64 characters of"
                           " A-Z a-z 0-9 . _ : -", flush=True)
                return

    async def _submit_named(self, ctx: TransportContext, sock: _Socket, body: dict[str, Any],
                            client_id: str, meta: Mapping[str, Any]) -> None:
        """Submit an update that carries a client message id, after any update with the
        same id on this chat that is still in the pipeline (from this socket or one before
        it), so that the history knows the first one when it looks up the retry."""
        key = (sock.chat.chat_id, client_id)
        while (earlier := self._in_flight.get(key)) is not None:
            await earlier.wait()
        done = self._in_flight[key] = trio.Event()

        def settle(outcome: Outcome) -> None:
            if self._in_flight.get(key) is done:
                del self._in_flight[key]
            done.set()
            sock.settle(outcome)

        sock.pending += 1
        submitted = False
        try:
            await ctx.submit(Message(CHAT_EVENT, body, self.name, chat_id=sock.chat.chat_id,
                                     meta={**meta, META_CLIENT_ID: client_id}), settle)
            submitted = True
        finally:
            if not submitted:  # cancelled or closed: release whoever waits on this id
                settle(Failed("not submitted"))

    def _hello(self, sock: _Socket) -> dict[str, Any]:
        """The ``hello`` frame (``hello=true``): what a client needs to pace itself."""
        s = self.settings
        return {"type": HELLO,
                "heartbeatInterval": s.heartbeat_interval_s if sock.chat.heartbeat else None,
                "rateLimit": {"perSecond": s.rate_limit_per_s, "burst": s.rate_burst},
                "maxMessageBytes": s.max_message_bytes, "maxLast": s.max_last}

    async def _write(self, sock: _Socket, connection: WebSocketConnection, stream: HeldStream,
                     replayed: Sequence[Message], complete: bool, done: trio.CancelScope
                     ) -> None:
        """The socket's only sender: replayed events, then queued ones and heartbeats, then
        the close frame. ``socket_sequence`` counts every frame sent. Frames that are ready
        together go out in one system call, up to :data:`WRITE_BATCH` frames and
        :data:`WRITE_BATCH_BYTES`."""
        framer = sock.framer
        sequence = 0
        # Live events up to the last replayed one, or up to ``since`` when nothing was
        # replayed, reached the client already (here, or before it resumed: cluster mode's
        # live path may still bring an event the client saw on another instance).
        last = sock.chat.since or ""
        try:
            marks = sock.chat.marks
            if sock.chat.hello:
                await connection.send_message(framer.frame(framer.prepare(self._hello(sock)),
                                                           sequence))
                sequence += 1
            for i in range(0, len(replayed), WRITE_BATCH):
                page = [(m.id, framer.prepare({**m.body, REPLAYED: True} if marks else m.body))
                        for m in replayed[i:i + WRITE_BATCH]]
                sequence, last = await _send(sock, connection, stream, page, sequence, last,
                                             replay=True)
            if marks and not sock.stopping():
                await connection.send_message(framer.frame(framer.prepare({
                    "type": REPLAY_END, "replayed": len(replayed), "complete": complete,
                    "lastEventId": replayed[-1].id if replayed else None}), sequence))
                sequence += 1
            interval = self.settings.heartbeat_interval_s
            beat = trio.current_time() + interval if sock.chat.heartbeat else math.inf
            while not sock.stopping():
                item = None
                with trio.move_on_at(beat):  # only the wait: a send is never cut
                    try:
                        item = await sock.receive.receive()
                    except trio.EndOfChannel:
                        break
                if item is not None:
                    items = [(item.event_id, item.prepared)]
                    while len(items) < WRITE_BATCH:
                        try:
                            queued = sock.receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        items.append((queued.event_id, queued.prepared))
                    sequence, _ = await _send(sock, connection, stream, items, sequence, last)
                    continue
                now = trio.current_time()
                self._ctx_().observe("heartbeat_lateness_seconds", now - beat)
                await connection.send_message(framer.heartbeat(sequence))
                sequence += 1
                beat = beat + interval if beat + interval > now else now + interval
            await connection.aclose(sock.code or NORMAL, sock.reason or None)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; the reader sees it too
        done.cancel()


async def _send(sock: _Socket, connection: WebSocketConnection, stream: HeldStream,
                frames: Sequence[tuple[str, Any]], sequence: int, last: str, *,
                replay: bool = False) -> tuple[int, str]:
    """Send ``(event_id, prepared)`` frames in one write (one per
    :data:`WRITE_BATCH_BYTES`): live ones only when newer than the last replayed event
    ``last``. The sequence and the last replayed id afterwards.
    (A function, not a closure in ``_write``: a closure per socket costs memory.)"""
    stream.hold()
    try:
        for event_id, prepared in frames:
            if sock.stopping():
                break
            if replay or event_id > last:
                await connection.send_message(sock.framer.frame(prepared, sequence))
                sequence += 1
                if replay:
                    last = event_id
                if stream.held_bytes >= WRITE_BATCH_BYTES:
                    await stream.release()
                    stream.hold()
    finally:
        await stream.release()
    return sequence, last


class _AddressBudget:
    """A token bucket per IP address (``rate`` per second, ``burst`` at once), for the
    :data:`BUDGET_ADDRESSES` addresses seen last."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, address: str, now: float) -> bool:
        tokens, then = self._buckets.pop(address, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        ok = tokens >= 1
        self._buckets[address] = (tokens - 1 if ok else tokens, now)
        while len(self._buckets) > BUDGET_ADDRESSES:
            self._buckets.popitem(last=False)
        return ok


class _RefusalLog:
    """Logs a refused handshake, at most one line per kind of refusal per ``interval``
    seconds; the line says how many of that kind were refused since the last one."""

    def __init__(self, name: str, interval: float) -> None:
        self._name, self._interval = name, interval
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, refused since)

    def note(self, refusal: Refusal, address: str, answer: str, now: float) -> None:
        logged, unlogged = self._last.get(refusal.kind, (-math.inf, 0))
        if now - logged < self._interval:
            self._last[refusal.kind] = (logged, unlogged + 1)
            return
        self._last[refusal.kind] = (now, 0)
        more = f" ({unlogged} more of this kind since the last line)" if unlogged else ""
        log.info("%s: refused a handshake from %s: %d %s (%s, answered by %s)%s", self._name,
                 address, refusal.status, refusal.reason, refusal.kind, answer, more)


async def _reuse_port_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on ``host:port`` with ``SO_REUSEPORT``: several processes on one host
    share the port, and the kernel spreads new connections over them."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    listeners = []
    for family, type_, proto, _, address in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners


async def _accept(request: WebSocketRequest, subprotocol: str | None, deflate: bool
                  ) -> WebSocketConnection:
    """Accept the upgrade; with ``deflate``, accept permessage-deflate too when the client
    offered it. trio-websocket 0.12 gives ``accept`` no way to pass wsproto extensions, so
    this sends wsproto's ``AcceptConnection`` itself, as ``WebSocketConnection._accept``
    does (tests/test_websocket_deflate.py fails if that changes)."""
    event: Any = request._event  # wsproto's Request: the offered extensions
    offered = any(_deflate_offer_ok(str(e)) for e in event.extensions)
    if not (deflate and offered):
        return await request.accept(subprotocol=subprotocol)
    connection: Any = request._connection
    connection._subprotocol = subprotocol
    connection._path = event.target
    await connection._send(AcceptConnection(subprotocol=subprotocol,
                                            extensions=[_Deflate()]))
    connection._open_handshake.set()
    accepted: WebSocketConnection = connection
    return accepted


# The values of a permessage-deflate offer's window parameters (RFC 7692 §7.1.2) that the
# server can agree to: zlib has no 8-bit window for raw deflate, so a server_max_window_bits
# of 8 is declined (as §7.1.2.1 allows); client_max_window_bits may also come without one.
_SERVER_WINDOW = re.compile(r"9|1[0-5]")
_CLIENT_WINDOW = re.compile(r"[89]|1[0-5]")


def _deflate_offer_ok(offer: str) -> bool:
    """Whether the server can accept ``offer``: a permessage-deflate offer whose parameters
    are all known, none repeated, each value valid (RFC 7692 §5: else the server declines
    it). Checked here because wsproto raises on a bad value and ignores unknown names."""
    name, *params = (part.strip() for part in offer.split(";"))
    seen: set[str] = set()
    for param in params:
        key, equals, value = (part.strip() for part in param.partition("="))
        if key in seen:
            return False
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            ok = not equals
        elif key == "server_max_window_bits":
            ok = bool(_SERVER_WINDOW.fullmatch(value))
        elif key == "client_max_window_bits":
            ok = not equals or bool(_CLIENT_WINDOW.fullmatch(value))
        else:
            ok = False
        if not ok:
            return False
    return name == "permessage-deflate"


class _Deflate(PerMessageDeflate):
    """wsproto's permessage-deflate, agreeing to the first offer the server can accept and
    declining the rest (wsproto alone raises on a bad value and, of several offers, merges
    them all)."""

    def __init__(self) -> None:
        super().__init__()
        self._agreed = False

    def accept(self, offer: str) -> bool | str | None:
        if self._agreed or not _deflate_offer_ok(offer):
            return None
        self._agreed = True
        return super().accept(offer)


def _extensions(connection: WebSocketConnection) -> list[Any]:
    """The extensions in effect on ``connection`` (wsproto's)."""
    handshake = getattr(getattr(connection, "_wsproto", None), "handshake", None)
    frames = getattr(getattr(handshake, "connection", None), "_proto", None)
    return list(getattr(frames, "extensions", None) or [])


def _count_close(ctx: TransportContext, sock: _Socket, connection: WebSocketConnection
                 ) -> None:
    """Count an accepted socket's close in ``socket_closes_total{code}``, by the code the
    server sent or tried to send, else the client's, and in ``socket_closes_cut_total{code}``
    as well when it was cut after ``close_timeout_s`` (or at shutdown) before the close
    finished: that client most likely got no close frame and saw 1006."""
    closed = connection.closed
    code = sock.code or (closed.code if closed is not None else ABNORMAL)
    ctx.count("socket_closes_total", code=str(code))
    if trio.current_effective_deadline() == -math.inf:  # here because the scope was cancelled
        ctx.count("socket_closes_cut_total", code=str(code))


def _unsent_close(connection: WebSocketConnection) -> bytes:
    """The close frame of a protocol error found in the client's frames, if it is not sent.

    On a frame that breaks RFC 6455 (unmasked, a reserved bit or opcode, a control frame over
    125 bytes, a stray continuation, a bad close code) or text that is not UTF-8, wsproto
    reports a close with 1002 or 1007 and the reason, but leaves the connection ``OPEN``:
    trio-websocket 0.12 then marks the WebSocket closed with that code and closes the TCP
    stream without sending the frame, and the client would see 1006. The stream asks this
    when it closes: a WebSocket that is closed while wsproto still says ``OPEN`` sent no
    close frame and received none, so its code and reason go out now. (trio-websocket keeps
    the wsproto connection in ``_wsproto``; tests/test_websocket_closes.py fails if that
    changes.)"""
    closed = connection.closed
    protocol = getattr(connection, "_wsproto", None)
    if closed is None or protocol is None or protocol.state is not ConnectionState.OPEN:
        return b""
    data: bytes = protocol.send(CloseConnection(closed.code, close_reason(closed.reason or "")))
    return data


def new_ssl_context(settings: WebSocketSettings) -> ssl.SSLContext:
    """A server context for ``tls_cert``/``tls_key``: TLS 1.2 or later, Python's ciphers."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


def _peer_address(stream: trio.abc.Stream) -> str:
    """The client's IP address (for the per-address cap)."""
    inner: Any = getattr(stream, "transport_stream", stream)
    try:
        return str(inner.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "?"


def _endpoint(stream: trio.abc.Stream) -> str:
    """The client's endpoint as trio-websocket's ``request.remote`` gives it, taken from the
    real stream (trio-websocket sees only the :class:`HeldStream` around it)."""
    inner: Any = getattr(stream, "transport_stream", stream)
    try:
        host, port, *_ = inner.socket.getpeername()
    except (AttributeError, OSError):
        return repr(stream)
    return str(Endpoint(host, port, isinstance(stream, trio.SSLStream)))


def _headers(request: WebSocketRequest) -> dict[str, str]:
    """Request headers by lower-case name (the first of repeated ones)."""
    headers: dict[str, str] = {}
    for name, value in request.headers:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _expires_at(identity: Any) -> float | None:
    """When the identity's credentials expire (Unix time), if they say."""
    value = getattr(identity, "expires_at", None)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


async def _expire(sock: _Socket, expires_at: float) -> None:
    """Close ``sock`` with 4001 once the wall clock passes ``expires_at``. trio sleeps on a
    monotonic clock: after the sleep the wall clock is asked again (it may have been set
    back). A clock set forward meanwhile is caught by the next client frame's check."""
    while (remaining := expires_at - time.time()) > 0:  # noqa: ASYNC110  (wall-clock deadline)
        await trio.sleep(remaining)
    sock.close(EXPIRED, "token expired", flush=True)
