"""WebSocket load generators for the scenarios: asyncio + ``websockets`` clients (the fastest
Python client here, so that the load generator takes as little of the machine as it can).
Every function runs inside a worker process (``--worker``); results go out as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import websockets
from harness import now_ns, print_json, wait_go

FRAME = json.dumps({"type": "update", "message": [
    {"type": "message", "text": "Hello, I need help with my booking #12345", "sender": "client"}]})


def chat_url(port: int, chat: str, query: str = "", host: str = "127.0.0.1") -> str:
    return f"ws://{host}:{port}/v1/chats/{chat}" + (f"?{query}" if query else "")


async def connect_all(urls: Sequence[str], *, parallel: int = 100,
                      local_host: str | None = None) -> list[websockets.ClientConnection]:
    """Open one socket per URL, ``parallel`` handshakes at a time."""
    sem = asyncio.Semaphore(parallel)
    out: list[websockets.ClientConnection | None] = [None] * len(urls)

    async def one(i: int, url: str) -> None:
        async with sem:
            kwargs: dict[str, Any] = {"ping_interval": None, "max_size": 2**20,
                                      "compression": None, "open_timeout": 60}
            if local_host:
                kwargs["local_addr"] = (local_host, 0)
            out[i] = await websockets.connect(url, **kwargs)

    await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
    return [ws for ws in out if ws is not None]


def go_signal() -> asyncio.Future[None]:
    """Completes when the orchestrator writes ``go`` (read in a thread)."""
    return asyncio.get_running_loop().run_in_executor(None, wait_go)


async def blast(urls: Sequence[str], frames: int, frame: str = FRAME) -> None:
    """Open the sockets, say ready, wait for go, send ``frames`` frames on each socket as
    fast as the connection takes them; report when sending started and ended; then keep the
    sockets open (a close could cut frames the server has not read yet) until killed."""
    sockets = await connect_all(urls)
    print_json({"ready": len(sockets)})
    await go_signal()
    start = now_ns()

    async def send(ws: websockets.ClientConnection) -> None:
        for _ in range(frames):
            await ws.send(frame)

    await asyncio.gather(*(send(ws) for ws in sockets))
    print_json({"start_ns": start, "end_ns": now_ns(), "sent": frames * len(sockets)})
    await asyncio.Future()  # killed by the orchestrator


class RawClient(asyncio.Protocol):
    """A receive-mostly WebSocket client that parses frames by hand: a few microseconds per
    frame, so that 1,000 or 15,000 sockets cost the load generator little. ``on_frame(payload)``
    is called for every text or binary frame (unfragmented, as both servers send them)."""

    def __init__(self, host: str, port: int, path: str,
                 on_frame: Callable[[bytes], None]) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.on_frame = on_frame
        self.buffer = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            status = buf[:end].split(b" ", 2)[1]
            if status != b"101":
                self.upgraded.set_exception(ConnectionError(buf[:end].decode()))
                return
            self.upgraded.set_result(None)
            buf = buf[end + 4:]
        i, n = 0, len(buf)
        on_frame = self.on_frame
        while n - i >= 2:
            opcode, length = buf[i] & 0x0F, buf[i + 1] & 0x7F
            start = i + 2
            if length == 126:
                if n - i < 4:
                    break
                length = int.from_bytes(buf[i + 2:i + 4], "big")
                start = i + 4
            elif length == 127:
                if n - i < 10:
                    break
                length = int.from_bytes(buf[i + 2:i + 10], "big")
                start = i + 10
            if n - start < length:
                break
            if opcode in (1, 2):
                on_frame(buf[start:start + length])
            elif opcode == 8 and self.transport is not None:
                self.transport.close()
            i = start + length
        self.buffer = buf[i:]

    def send_text(self, text: str) -> None:
        """One masked text frame (mask of zeros: the payload goes as is)."""
        assert self.transport is not None
        data = text.encode()
        n = len(data)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        elif n < 65536:
            header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(header + b"\0\0\0\0" + data)


async def raw_connect(port: int, path: str, on_frame: Callable[[bytes], None], *,
                      host: str = "127.0.0.1", local_host: str | None = None) -> RawClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: RawClient(host, port, path, on_frame), host, port,
        local_addr=(local_host, 0) if local_host else None)
    await client.upgraded
    return client


async def raw_connect_all(port: int, paths: Sequence[str],
                          on_frame: Callable[[int], Callable[[bytes], None]], *,
                          parallel: int = 100, local_host: str | None = None
                          ) -> list[RawClient]:
    """``raw_connect`` for each path, ``parallel`` at a time; socket i gets on_frame(i)."""
    sem = asyncio.Semaphore(parallel)

    async def one(i: int, path: str) -> RawClient:
        async with sem:
            return await raw_connect(port, path, on_frame(i), local_host=local_host)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(paths))))


async def receivers(port: int, paths: Sequence[str], events: int) -> None:
    """Open the sockets, say ready; each reads ``events`` updates (heartbeats skipped); report
    when the last socket got its last one."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    got = [0] * len(paths)
    remaining = len(paths)
    last = 0

    def counter(i: int) -> Callable[[bytes], None]:
        def on_frame(payload: bytes) -> None:
            nonlocal remaining, last
            if b'"heartbeat"' in payload[:60]:
                return
            got[i] += 1
            if got[i] == events:
                remaining -= 1
                last = now_ns()
                if remaining == 0:
                    done.set_result(None)
        return on_frame

    clients = await raw_connect_all(port, paths, counter)
    print_json({"ready": len(clients)})
    await done
    print_json({"last_ns": last, "received": sum(got)})
    await asyncio.Future()


async def sender(url: str, events: int, window: int, frame: str = FRAME) -> None:
    """One socket that sends ``events`` updates with at most ``window`` of them not echoed
    back yet; it reads its own echoes (it is on the chat too)."""
    (ws,) = await connect_all([url])
    print_json({"ready": 1})
    await go_signal()
    slots = asyncio.Semaphore(window)
    start = now_ns()

    async def echoes() -> None:
        got = 0
        while got < events:
            data = await ws.recv()
            if '"heartbeat"' in data[:60]:
                continue
            got += 1
            slots.release()

    reader = asyncio.create_task(echoes())
    for _ in range(events):
        await slots.acquire()
        await ws.send(frame)
    await reader
    print_json({"start_ns": start, "end_ns": now_ns()})
    await asyncio.Future()
