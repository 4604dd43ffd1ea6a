"""permessage-deflate: CPU per event per socket against bytes saved, for the frames a chat
socket sends (realistic updates of varied text, and heartbeats), through wsproto as the
websocket transport uses it.

    .venv/bin/python bench/ws_deflate.py [--events 5000]

For each mode (off; deflate with context takeover, the default a browser offers; deflate
with ``server_no_context_takeover``) it prints the microseconds one socket spends framing
one event (median of 5 runs), the bytes on the wire per event, and the compressor's memory
per socket (tracemalloc of the zlib object). Chromium offers
``permessage-deflate; client_max_window_bits``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import tracemalloc
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request
from wsproto.extensions import PerMessageDeflate

WORDS = (
    'hello', 'my', 'booking', 'is', 'for', 'the', 'flight', 'to', 'lisbon', 'tomorrow',
    'and', 'the', 'seat', 'was', 'not', 'shown', 'please', 'can', 'you', 'check', 'the',
    'reference', 'number', 'again', 'thank', 'you', 'agent', 'support', 'order', 'refund',
    'payment', 'card', 'delivery', 'address', 'changed', 'yesterday', 'evening',
)


def frames(n: int) -> list[str]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        if i % 10 == 9:
            out.append(json.dumps({"socket_sequence": i, "type": "heartbeat"}))
            continue
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        out.append(json.dumps({
            "socket_sequence": i, "type": "update",
            "eventId": f"{1714557600123000 + i * 1000:020d}", "timestamp": 1714557600 + i,
            "timestampms": 1714557600123 + i * 1000,
            "message": [{"type": "message", "text": text, "sender": f"user-{rng.randint(1, 9)}",
                         "send_date": 1714557600 + i}]}, separators=(",", ":")))
    return out


def server(extension: PerMessageDeflate | None) -> WSConnection:
    """A server connection after the handshake, with ``extension`` accepted when given."""
    client, srv = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    srv.receive_data(client.send(Request(
        host="x", target="/v1/chats/room",
        extensions=[PerMessageDeflate(client_max_window_bits=15)] if extension else [])))
    next(srv.events())
    srv.send(AcceptConnection(extensions=[extension] if extension else []))
    return srv


def measure(label: str, make: type[PerMessageDeflate] | None, kwargs: dict[str, Any],
            data: list[str]) -> None:
    runs, wire = [], 0
    for _ in range(5):
        conn = server(make(**kwargs) if make else None)
        start = time.perf_counter()
        wire = sum(len(conn.send(Message(data=d))) for d in data)
        runs.append((time.perf_counter() - start) / len(data) * 1e6)
    tracemalloc.start()
    conn = server(make(**kwargs) if make else None)
    before = tracemalloc.get_traced_memory()[0]
    for d in data[:50]:
        conn.send(Message(data=d))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    raw = sum(len(d) for d in data) / len(data)
    print(f"{label:<34} {statistics.median(runs):7.1f} us/event  {wire / len(data):7.1f} B/event"
          f" (payload {raw:.0f} B)  ~{held / 1024:.0f} KiB/socket traced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    data = frames(args.events)
    measure("off", None, {}, data)
    measure("deflate, context takeover", PerMessageDeflate, {}, data)
    measure("deflate, no context takeover", PerMessageDeflate,
            {"server_no_context_takeover": True}, data)


if __name__ == "__main__":
    main()
