"""Helpers for the WebSocket transport tests: a daemon with a `chat` WebSocket transport on
port 0 (plus a `side` memory transport routed into it), real clients, frames checked against
the seed contract's JSON Schema, and a tiny in-memory history plugin for resume tests."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket

from bridge import CHAT_EVENT, ContractError, Message, ReplayGap, hookimpl
from bridge.daemon import Daemon
from bridge.testing import run_bridge, write_config

# The schema of seeds/chat-websocket-asyncapi.md (components.schemas), as JSON, with the
# types the seed leaves out added: eventId string, timestamp and timestampms integers.
_ITEM = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "enum": ["message", "chat_event"]},
        "text": {"type": "string"},
        "sender": {"type": "string"},
        "send_date": {"type": "integer"},
    },
}
CHAT_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "definitions": {
        "default": {
            "type": "object",
            "required": ["type", "socket_sequence"],
            "properties": {"socket_sequence": {"type": "integer"}},
        },
        "heartbeat": {"allOf": [
            {"properties": {"type": {"type": "string", "const": "heartbeat"}},
             "required": ["type"]},
            {"$ref": "#/definitions/default"},
        ]},
        "update": {"allOf": [
            {"properties": {
                "type": {"type": "string", "const": "update"},
                "eventId": {"type": "string"},  # added: the seed leaves it untyped
                "timestamp": {"type": "integer"},  # added
                "timestampms": {"type": "integer"},  # added
                "message": {"$ref": "#/definitions/message"},
            }, "required": ["type", "eventId", "message", "timestamp", "timestampms"]},
            {"$ref": "#/definitions/default"},
        ]},
        "message": {"type": "array", "items": _ITEM},
    },
    "type": "object",
    "oneOf": [{"$ref": "#/definitions/heartbeat"}, {"$ref": "#/definitions/update"}],
}
VALIDATOR = jsonschema.Draft7Validator(CHAT_SCHEMA)

BASE_CONFIG = """
[plugins]
disable = {disable}

[transports.chat]
type = "websocket"
port = 0
{settings}

[transports.side]
type = "memory"

[[routes]]
name = "chat-fanout"
from = "chat"
to = ["chat"]

[[routes]]
name = "side-to-chat"
from = "side"
to = ["chat"]
"""


def config_text(disable: Sequence[str] = (), extra: str = "", **settings: Any) -> str:
    lines = "\n".join(f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}"
                      for k, v in settings.items())
    return BASE_CONFIG.format(settings=lines, disable=json.dumps(list(disable))) + extra


@dataclass
class Bridge:
    daemon: Daemon
    port: int

    @property
    def side(self) -> Any:
        return self.daemon.transports["side"]

    def metric(self, name: str, **labels: str) -> float:
        value = self.daemon.metrics.registry.get_sample_value(
            f"bridged_{name}", {"transport": "chat", **labels})
        return value or 0.0

    async def inject(self, chat_id: str, text: str, sender: str = "side") -> Message:
        """A chat event through the `side` memory transport; returns it as accepted."""
        outcome = await self.side.inject(
            {"type": "update", "message": [{"type": "message", "text": text, "sender": sender}]},
            kind=CHAT_EVENT, chat_id=chat_id)
        message: Message = outcome.message
        return message


@asynccontextmanager
async def chat_bridge(tmp_path: Path, *, extra_plugins: Iterable[object] = (),
                      disable: Sequence[str] = (), extra: str = "",
                      **settings: Any) -> AsyncIterator[Bridge]:
    """A daemon with the websocket transport `chat` (``settings``) and the memory transport
    `side`, routed into it; ``disable`` names built-in plugins not to load, ``extra`` is
    appended to the config (plugin tables)."""
    path = write_config(tmp_path, config_text(disable, extra, **settings))
    async with run_bridge(path, extra_plugins=extra_plugins) as daemon:
        port = daemon.transports["chat"].port  # type: ignore[attr-defined]
        assert isinstance(port, int)
        yield Bridge(daemon, port)


@asynccontextmanager
async def client(port: int, chat_id: str = "room", query: str = "", *,
                 subprotocols: Sequence[str] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 message_queue_size: int = 16) -> AsyncIterator[WebSocketConnection]:
    resource = f"/v1/chats/{chat_id}" + (f"?{query}" if query else "")
    async with open_websocket("127.0.0.1", port, resource, use_ssl=ssl_context or False,
                              subprotocols=subprotocols, extra_headers=headers,
                              message_queue_size=message_queue_size, connect_timeout=5,
                              disconnect_timeout=5) as ws:
        try:
            yield ws
        finally:
            # The closing handshake first (1000), so the server sees a normal close.
            with trio.move_on_after(5):
                await ws.aclose()
            # trio-websocket 0.12's client never closes its TCP stream when the server
            # closed the WebSocket first (aclose returns early), so the socket leaks.
            await ws._stream.aclose()


async def raw_handshake(port: int, resource: str, *, subprotocols: Sequence[str] = (),
                        headers: Sequence[tuple[str, str]] = ()) -> tuple[int, str]:
    """An opening handshake over a plain TCP stream: the HTTP status and body of the answer.
    (trio-websocket's client leaks its socket when a handshake is refused, so refusals are
    tested with this.)"""
    status, _, body = await raw_handshake_full(port, resource, subprotocols=subprotocols,
                                               headers=headers)
    return status, body


async def raw_handshake_full(port: int, resource: str, *, subprotocols: Sequence[str] = (),
                             headers: Sequence[tuple[str, str]] = ()
                             ) -> tuple[int, dict[str, str], str]:
    """:func:`raw_handshake` with the response headers (lower-case names)."""
    lines = [f"GET {resource} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    lines += [f"{k}: {v}" for k, v in headers]
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                assert chunk, f"connection closed after {data!r}"
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            answer: dict[str, str] = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                answer[name.strip().lower().decode()] = value.strip().decode()
            length = int(answer.get("content-length", "0"))
            while len(body) < length:
                chunk = await stream.receive_some()
                assert chunk, "connection closed in the body"
                body += chunk
    return int(head.split()[1]), answer, body.decode()


def decode_frame(data: str | bytes) -> dict[str, Any]:
    """A server frame decoded (text: JSON, binary: msgpack) and checked against the seed
    schema; fails the test if it does not validate."""
    frame = json.loads(data) if isinstance(data, str) else msgpack.unpackb(data)
    VALIDATOR.validate(frame)
    assert isinstance(frame, dict)
    return frame


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame, decoded and checked (fails the test after 5 s)."""
    with trio.fail_after(5):
        return decode_frame(await ws.get_message())


async def closed_with(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int, str]:
    """Read until the server closes: the frames before the close, its code and reason."""
    frames = []
    closed = None
    with trio.fail_after(5):
        while closed is None:
            try:
                frames.append(decode_frame(await ws.get_message()))
            except ConnectionClosed as e:
                closed = e.reason
    assert closed is not None
    return frames, closed.code, closed.reason or ""


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``condition()`` holds: for effects with no event to await,
    such as the server noticing that a peer vanished."""
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110  (a kernel event, not a trio one)
            await trio.sleep(0.005)


def update(*texts: str, **item: Any) -> str:
    """A client update frame (JSON text)."""
    return json.dumps({"type": "update",
                       "message": [{"type": "message", "text": t, **item} for t in texts]},
                      ensure_ascii=False)


async def raw_upgrade(port: int, resource: str = "/v1/chats/room", *,
                      rcvbuf: int | None = None) -> trio.SocketStream:
    """A plain TCP stream that has completed the opening handshake (101); with ``rcvbuf``,
    its ``SO_RCVBUF`` is set before it connects (a small one makes a frozen reader's TCP
    window fill fast)."""
    if rcvbuf is None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    else:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
    await stream.send_all(
        f"GET {resource} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode())
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(1)  # byte by byte: leave the frames unread
    assert data.startswith(b"HTTP/1.1 101"), data
    return stream


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False,
                 masked: bool = True) -> bytes:
    """A hand-made client frame: any opcode and bits, masked unless told not to."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = b"\x5a\xa5\x0f\xf0"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def server_frames(stream: trio.abc.ReceiveStream) -> tuple[list[bytes], int | None, str]:
    """Read the server's frames until its close frame or EOF: the data frames' payloads
    before it, then the close code and reason (``None``, ``""`` on EOF without a close
    frame, which a WebSocket client reports as 1006). Fails the test after 10 s."""
    buffer = b""
    frames: list[bytes] = []

    async def need(n: int) -> bool:
        nonlocal buffer
        while len(buffer) < n:
            chunk = await stream.receive_some()
            if not chunk:
                return False
            buffer += chunk
        return True

    with trio.fail_after(10):
        while await need(2):
            opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
            assert not buffer[1] & 0x80, "a server frame is never masked"
            start = 2 if length < 126 else 4 if length == 126 else 10
            if not await need(start):
                break
            if length >= 126:
                length = int.from_bytes(buffer[2:start], "big")
            if not await need(start + length):
                break
            payload, buffer = buffer[start:start + length], buffer[start + length:]
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                return frames, code, payload[2:].decode()
            frames.append(payload)
    return frames, None, ""


def vanish(stream: trio.SocketStream) -> None:
    """Drop the connection the way a crashed client does: a TCP reset, no close frame."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@dataclass
class MemoryHistory:
    """A minimal persistence plugin: keeps chat events in a list, replays after an id,
    raises ReplayGap below ``oldest`` and ContractError for unknown ids.

    With ``gated``, a replay stops twice so a test can act in the seam: it sets
    ``replay_started`` and waits for ``read_gate`` before reading the store, then sets
    ``read_done`` and waits for ``return_gate`` before returning what it read."""

    events: list[Message] = field(default_factory=list)
    oldest: str = ""
    gated: bool = False
    replay_started: trio.Event = field(default_factory=trio.Event)
    read_gate: trio.Event = field(default_factory=trio.Event)
    read_done: trio.Event = field(default_factory=trio.Event)
    return_gate: trio.Event = field(default_factory=trio.Event)

    @hookimpl
    def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        self.events.extend(m for m in messages if m.kind == CHAT_EVENT)

    @hookimpl
    async def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        if since < self.oldest:
            raise ReplayGap(f"events before {self.oldest} are no longer kept")
        if not any(m.id == since for m in self.events):
            raise ContractError(f"unknown eventId {since}", field="since", rule="known")
        self.replay_started.set()
        if self.gated:
            await self.read_gate.wait()
        found = [m for m in self.events if m.chat_id == chat_id and m.id > since]
        self.read_done.set()
        if self.gated:
            await self.return_gate.wait()
        return found
