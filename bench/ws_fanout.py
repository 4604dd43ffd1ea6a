"""End-to-end chat fan-out through a real daemon process.

Starts ``bridged run`` (a websocket transport with the chat -> chat route) in its own
process, opens ``--clients`` sockets on one chat from this process, has one of them send
``--events`` updates, and waits until every socket has received every echo. Prints
deliveries per second and the daemon's CPU seconds.

    .venv/bin/python bench/ws_fanout.py [--clients 100] [--events 1000] [--window 64]

``PROFILE=out.prof`` runs the daemon under cProfile and writes its profile there.

The load generator shares the machine with the daemon (on 2 cores both saturate): read the
numbers as a lower bound, and compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket

CONFIG = """
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[log]
level = "warning"
[transports.chat]
type = "websocket"
port = {port}
outbound_queue = 4096
[[routes]]
name = "chat-fanout"
from = "chat"
to = ["chat"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_listening(port: int) -> None:
    with trio.fail_after(20):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def load(port: int, clients: int, events: int, window: int) -> float:
    frame = json.dumps({"type": "update", "message": [
        {"type": "message", "text": "Hello, how can I help you today?", "sender": "bench"}]})
    done = trio.Event()
    remaining = clients
    sent_ok = trio.Semaphore(window)

    async def receiver(ws: WebSocketConnection, is_sender: bool) -> None:
        nonlocal remaining
        for _ in range(events):
            await ws.get_message()
            if is_sender:
                sent_ok.release()
        remaining -= 1
        if remaining == 0:
            done.set()

    async with trio.open_nursery() as nursery:
        sockets = []
        for _ in range(clients):
            ws = await nursery.start(_client, port)
            sockets.append(ws)
        for i, ws in enumerate(sockets):
            nursery.start_soon(receiver, ws, i == 0)
        start = time.perf_counter()
        for _ in range(events):
            await sent_ok.acquire()  # at most `window` updates without their echo
            await sockets[0].send_message(frame)
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


async def _client(port: int, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    async with open_websocket("127.0.0.1", port, "/v1/chats/bench", use_ssl=False) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(CONFIG.format(state=Path(tmp) / "state", port=port))
        profile = ["-m", "cProfile", "-o", os.environ["PROFILE"]] if "PROFILE" in os.environ else []
        daemon = subprocess.Popen([sys.executable, *profile, "-m", "bridge", "run", "-c",
                                   str(config)])
        try:
            trio.run(wait_listening, port)
            cpu0 = cpu_seconds(daemon.pid)
            elapsed = trio.run(load, port, args.clients, args.events, args.window)
            cpu = cpu_seconds(daemon.pid) - cpu0
        finally:
            daemon.terminate()
            daemon.wait(15)
    deliveries = args.clients * args.events
    print(f"{args.clients} sockets x {args.events} events = {deliveries} deliveries in "
          f"{elapsed:.2f} s: {deliveries / elapsed:,.0f} deliveries/s, "
          f"{args.events / elapsed:,.0f} events/s; daemon CPU {cpu:.2f} s "
          f"({cpu / elapsed:.0%} of one core)")


if __name__ == "__main__":
    main()
