"""Fan-out framing cost: encode the event once per encoding and splice each socket's
``socket_sequence`` in (what the websocket transport does), against encoding the whole frame
once per socket.

    .venv/bin/python bench/ws_framing.py [--sockets 100] [--events 2000]

Prints microseconds per event for each encoding and strategy (median of 5 runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

from bridge import Codec
from bridge_plugins.codecs import JSON, MSGPACK
from bridge_plugins.websocket.framing import Framer, JsonFramer, MsgpackFramer

EVENT = {"type": "update", "eventId": "00001700000000000000", "timestamp": 1700000000,
         "timestampms": 1700000000123,
         "message": [{"type": "message", "text": "Hello, how can I help you today?" * 3,
                      "sender": "support-agent-7", "send_date": 1700000000}]}


def run(label: str, fn: Callable[[], None], events: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) / events * 1e6)
    us = statistics.median(runs)
    print(f"{label:<44} {us:10.1f} us/event")
    return us


def per_socket(codec: Codec, n: int, events: int) -> None:
    for _ in range(events):
        for seq in range(n):
            data = codec.encode({**EVENT, "socket_sequence": seq})
            if not codec.binary:
                data.decode()  # a text frame is a str


def once_and_splice(framer: Framer, n: int, events: int) -> None:
    for _ in range(events):
        prepared = framer.prepare(EVENT)
        for seq in range(n):
            framer.frame(prepared, seq)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    n, events = args.sockets, args.events
    print(f"{n} sockets, {events} events, frame of {len(JSON.encode(EVENT))} bytes (JSON)")
    framers: tuple[tuple[Codec, Framer], ...] = (
        (JSON, JsonFramer(JSON)), (MSGPACK, MsgpackFramer(MSGPACK)))
    for codec, framer in framers:
        full = run(f"{codec.name}: encode per socket", partial(per_socket, codec, n, events),
                   events)
        spliced = run(f"{codec.name}: encode once + splice",
                      partial(once_and_splice, framer, n, events), events)
        print(f"{codec.name}: splice is {full / spliced:.1f}x faster\n")


if __name__ == "__main__":
    main()
