"""Decode cost of a client frame per codec (the strict checks of bridge_plugins.codecs
included): ``python bench/codec_decode.py``. Prints microseconds per decode, best of 5."""

from __future__ import annotations

import timeit
from functools import partial
from typing import Any

from bridge_plugins.codecs import JSON, MSGPACK

TYPICAL = {"type": "update", "timestamp": 1700000000, "timestampms": 1700000000123,
           "message": [{"type": "message", "text": "Hello, I need help with my order #12345 " * 3,
                        "sender": "alice", "send_date": 1700000000}]}
LARGE = {"type": "update", "message": [
    {"type": "message", "text": "x" * 100, "sender": "alice", "send_date": 1700000000 + i}
    for i in range(200)]}


def main() -> None:
    frames: list[tuple[str, Any, int]] = [("typical", TYPICAL, 20000), ("200 items", LARGE, 500)]
    for name, frame, number in frames:
        for codec in (JSON, MSGPACK):
            data = codec.encode(frame)
            best = min(timeit.repeat(partial(codec.decode, data), number=number,
                                     repeat=5))
            print(f"{name:10} {codec.name:8} {len(data):6} B {best / number * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
