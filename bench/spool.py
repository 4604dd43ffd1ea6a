"""Benchmark: the AMQP outbox (bridge_plugins.amqp.outbox) append and drain cost.

For each batch size and sync mode: append N entries (one transaction per batch, as the
pipeline does with one deliver() call per batch), then read and remove them in pages of
256, as the publisher does. A raw append-only file with one fsync per batch is measured
for comparison (the floor any durable spool pays). Results are printed and written as
JSON to bench/results/.

    python bench/spool.py            # N=5000 per configuration
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import trio

from bridge_plugins.amqp.outbox import Entry, Spool

RESULTS = Path(__file__).parent / "results"
BODY = json.dumps({"type": "update", "eventId": "0" * 20, "message": [
    {"type": "message", "text": "x" * 100, "sender": "s", "send_date": 0}]}).encode()


def _entry(i: int) -> Entry:
    return Entry("chat", "chat.room", "application/json", f"{i:020d}",
                 {"x-bridge-hops": 1, "x-bridge-chat-id": "room"}, BODY)


async def sqlite_run(directory: Path, n: int, batch: int, sync: Literal["full", "normal"]
                     ) -> dict[str, float]:
    spool = await Spool.open(directory / f"s-{batch}-{sync}.sqlite3", max_messages=n * 2,
                             synchronous=sync)
    try:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await spool.append([_entry(i) for i in range(start, min(start + batch, n))])
        append_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cursor = 0
        while entries := await spool.read(cursor, 256):
            cursor = entries[-1].seq
            await spool.remove(e.seq for e in entries)
        drain_s = time.perf_counter() - t0
        assert spool.depth == 0
    finally:
        await spool.close()
    return {"append_msgs_per_s": n / append_s, "drain_msgs_per_s": n / drain_s}


def file_run(directory: Path, n: int, batch: int) -> dict[str, float]:
    record = len(BODY) + 100
    with open(directory / f"f-{batch}.log", "ab") as f:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            f.write(b"x" * record * (min(start + batch, n) - start))
            f.flush()
            os.fsync(f.fileno())
        return {"append_msgs_per_s": n / (time.perf_counter() - t0)}


async def main(args: argparse.Namespace) -> None:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        for batch in (1, 16, 256):
            for sync in ("full", "normal"):
                r = await sqlite_run(directory, args.n, batch, sync)
                results.append({"store": f"sqlite-{sync}", "batch": batch, **r})
            results.append({"store": "file+fsync", "batch": batch,
                            **file_run(directory, args.n, batch)})
    for r in results:
        drain = f", drain {r['drain_msgs_per_s']:8.0f} msg/s" if "drain_msgs_per_s" in r else ""
        print(f"{r['store']:12} batch {r['batch']:3}: append {r['append_msgs_per_s']:8.0f}"
              f" msg/s{drain}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"spool-{stamp}.json"
    path.write_text(json.dumps({"command": "python bench/spool.py", "n": args.n,
                                "results": results}, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dir", default=None, help="where to put the files (default: /tmp)")
    trio.run(main, parser.parse_args())
