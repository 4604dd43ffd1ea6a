"""Scenario 8, peers: RabbitMQ Web-STOMP on the same WS -> AMQP job as the bridge.

Two configurations, interleaved over the rounds, each on a fresh durable queue:

* ``web-stomp``: RabbitMQ's own WebSocket gateway (the ``rabbitmq_web_stomp`` plugin, STOMP
  1.2 over WebSocket). Each client frame is a STOMP ``SEND`` to ``/amq/queue/<queue>``,
  ``persistent:true``, with a ``receipt`` requested on every frame: the broker sends a
  receipt only after its publisher confirm, so the guarantee matches the bridge's.
* ``bridged``: the bridge as in scenario 1 (bench/ws_to_amqp.py: validation, enrichment and
  the history on, the outbox, publisher confirms, persistent).

The load is scenario 1's: ``--procs`` client processes with ``--sockets`` sockets each,
sending N frames in all (the body is the size of an enriched update) as fast as the server
reads them; the time is from the first frame sent to the moment the queue holds N messages.

Node-RED (research/peers.md) is not run: its AMQP node publishes without confirms and
non-persistent, so it does not do the same job.

Web-STOMP must be listening on 127.0.0.1:15674. Enabling it (loopback only) changes the
broker, so this script does not do it; the commands are in BENCHMARKS.md section 8.

    .venv/bin/python bench/peers.py [--n 20000] [--rounds 3] [--procs 2] [--sockets 16]
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import harness
import rabbit
import websockets
import ws_to_amqp
from harness import Bench, now_ns, print_json, unique

STOMP_PORT = 15674


def stomp_frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = "".join(f"{k}:{v}\n" for k, v in headers.items())
    return f"{command}\n{head}\n".encode() + body + b"\0"


async def stomp_blast(port: int, sockets: int, frames: int, queue: str) -> None:
    """Like wsload.blast, in STOMP: connect, say ready, wait for go, then send ``frames``
    SENDs on each socket while a reader per socket counts the receipts."""
    conns: list[websockets.ClientConnection] = []
    for _ in range(sockets):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", subprotocols=[
            websockets.Subprotocol("v12.stomp")], ping_interval=None, compression=None,
            max_size=2**20)
        await ws.send(stomp_frame("CONNECT", {"accept-version": "1.2", "host": "/",
                                              "login": "guest", "passcode": "guest"}))
        reply = await ws.recv()
        if not (reply if isinstance(reply, str) else reply.decode()).startswith("CONNECTED"):
            raise RuntimeError(f"Web-STOMP refused the connection: {reply!r}")
        conns.append(ws)
    print_json({"ready": len(conns)})
    await asyncio.get_running_loop().run_in_executor(None, harness.wait_go)
    start = now_ns()

    async def send(ws: websockets.ClientConnection, s: int) -> None:
        for i in range(frames):
            await ws.send(stomp_frame("SEND", {
                "destination": f"/amq/queue/{queue}", "persistent": "true",
                "content-type": "application/json", "receipt": f"{s}-{i}"},
                ws_to_amqp.BODY))

    async def receipts(ws: websockets.ClientConnection) -> None:
        got = 0
        while got < frames:
            frame = await ws.recv()
            text = frame if isinstance(frame, str) else frame.decode()
            if text.startswith("ERROR"):
                raise RuntimeError(f"Web-STOMP error: {text[:300]}")
            got += text.startswith("RECEIPT")

    await asyncio.gather(*(send(ws, s) for s, ws in enumerate(conns)),
                         *(receipts(ws) for ws in conns))
    print_json({"start_ns": start, "end_ns": now_ns(), "sent": frames * len(conns)})
    await asyncio.Future()  # killed by the orchestrator


def broker_pid() -> int:
    """The RabbitMQ node's OS process (its CPU is the peer's server CPU)."""
    out = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def measure(args: Any, config: str) -> dict[str, Any]:
    queue = unique("bench.peers")
    rabbit.declare(args.url, queue)
    try:
        if config == "web-stomp":
            return ws_to_amqp.run_ws(args, broker_pid(), STOMP_PORT, queue, client_script=__file__)
        port = harness.free_port()
        with harness.daemon(ws_to_amqp.bridged_config(port, args.url, queue),
                            profile=args.profile) as d:
            return ws_to_amqp.run_ws(args, d.pid, port, queue)
    finally:
        rabbit.delete(args.url, queue)


def web_stomp_listening() -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", STOMP_PORT)) == 0


CONFIGS: Sequence[str] = ("web-stomp", "bridged")


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    ws_to_amqp.add_load_options(p)
    args = p.parse_args()
    if args.worker == "clients":
        asyncio.run(stomp_blast(args.port, args.sockets, args.frames, args.queue))
        return
    if not web_stomp_listening():
        sys.exit(f"Web-STOMP is not listening on 127.0.0.1:{STOMP_PORT}; "
                 "see BENCHMARKS.md section 8 for enabling it")
    bench = Bench("peers", args)
    print(f"peers, WS -> AMQP, N={args.n}, {args.procs}x{args.sockets} sockets, "
          f"{args.rounds} rounds")
    bench.rounds({c: partial(measure, args, c) for c in CONFIGS}, args.rounds,
                 lambda r: f"{r['msgs_per_s']:8,.0f} msg/s")
    bench.ratio("bridged / web-stomp", "bridged", "web-stomp", "msgs_per_s")
    bench.report(["msgs_per_s", "server_cpu_us_per_msg"])


if __name__ == "__main__":
    main()
