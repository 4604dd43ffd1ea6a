"""History write cost: one durable batch per call, synchronous NORMAL vs FULL.

    .venv/bin/python bench/history.py [--dir DIR] [-n 2000]

Persists ``n`` chat events through the plugin's ``bridge_persist_messages`` in batches of 1
and of 64, on one chat, and prints the mean latency per batch call and the events per second.
``--dir`` picks the file system (the default is a fresh temporary folder).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Literal

import trio

from bridge import CHAT_EVENT, Message, PluginContext
from bridge_plugins.history import HistorySettings, Plugin


def events(n: int) -> list[Message]:
    base = 1_700_000_000_000_000
    return [Message(CHAT_EVENT, {"type": "update", "eventId": f"{base + i:020d}",
                                 "timestamp": 1700000000, "timestampms": 1700000000000,
                                 "message": [{"type": "message", "text": "x" * 60}]},
                    "bench", f"{base + i:020d}", "chat-1") for i in range(n)]


async def run(directory: Path, synchronous: Literal["normal", "full"], batch: int, n: int
              ) -> str:
    plugin = Plugin()
    async with trio.open_nursery() as nursery:
        settings = HistorySettings(synchronous=synchronous, retention_count=n)
        context = PluginContext("history", settings, directory, nursery)
        await plugin.bridge_startup(context)
        todo = events(n)
        start = time.perf_counter()
        for i in range(0, n, batch):
            await plugin.bridge_persist_messages(todo[i:i + batch])
        elapsed = time.perf_counter() - start
        await plugin.bridge_shutdown(context)
        nursery.cancel_scope.cancel()
    calls = -(-n // batch)
    return (f"synchronous={synchronous:6} batch={batch:3}: {elapsed / calls * 1e3:7.3f} ms/batch"
            f"  {n / elapsed:9.0f} events/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path)
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    modes: tuple[Literal["normal", "full"], ...] = ("normal", "full")
    for synchronous in modes:
        for batch in (1, 64):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                print(trio.run(run, Path(tmp), synchronous, batch, args.n))


if __name__ == "__main__":
    main()
