"""WebSocket load generators for the scenarios: asyncio + ``websockets`` clients (the fastest
Python client here, so that the load generator takes as little of the machine as it can).
Every function runs inside a worker process (``--worker``); results go out as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
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
