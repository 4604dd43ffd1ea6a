"""The AMQP transport's outbox: an ordered on-disk queue of messages waiting to be published.

SQLite in WAL mode, one file per transport in its state directory. The connection lives on
one :class:`bridge.WorkerThread`, so the trio loop never waits on the disk.

* ``append`` returns once the rows are committed. With ``synchronous=FULL`` the commit is
  fsynced, so a message survives a SIGKILL of the daemon and a power loss.
* The publisher reads the rows in order, publishes them and removes them once the broker
  has confirmed them.
* The newest entries are also kept in memory (at most :data:`TAIL_ENTRIES` of them and
  :data:`TAIL_BYTES` in all). A publisher that keeps up reads from there and never from
  the disk. After a restart, or when it falls behind, it reads from the file.
* A removal commits without an fsync, whatever ``synchronous`` says. It becomes durable
  with the next fsynced append, or the next checkpoint. A removal lost to a power cut
  only means that a confirmed message is published again, which at-least-once delivery
  allows.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from bridge import DeliveryError, WorkerThread

#: The in-memory tail: this many of the newest entries at most...
TAIL_ENTRIES = 4096
#: ... and this many body bytes at most.
TAIL_BYTES = 16 * 2**20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    content_type TEXT NOT NULL,
    message_id TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One spooled message; ``seq`` orders entries (0 until stored)."""

    exchange: str
    routing_key: str
    content_type: str
    message_id: str
    headers: Mapping[str, Any]
    body: bytes
    seq: int = 0


class SpoolFull(DeliveryError):
    """The spool holds its maximum number of messages."""


class Spool:
    """Open with :meth:`open`, close with :meth:`close`. :attr:`depth` is the row count."""

    def __init__(self, worker: WorkerThread, db: sqlite3.Connection, depth: int, last_seq: int,
                 max_messages: int, synchronous: str) -> None:
        self._worker = worker
        self._db = db
        self._sync = synchronous.upper()
        self.depth = depth
        self.max_messages = max_messages
        self._last_seq = last_seq  # the greatest seq ever stored (worker thread only)
        self._tail: deque[Entry] = deque()  # the newest entries, seqs without a gap
        self._tail_bytes = 0

    @classmethod
    async def open(cls, path: Path, *, max_messages: int,
                   synchronous: Literal["full", "normal"] = "full") -> Spool:
        def run() -> tuple[sqlite3.Connection, int, int]:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={synchronous.upper()}")
                db.execute(_SCHEMA)
                (depth,) = db.execute("SELECT count(*) FROM outbox").fetchone()
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
                                 ).fetchone()  # AUTOINCREMENT: seqs are never reused
            except BaseException:
                db.close()
                raise
            return db, int(depth), int(row[0]) if row else 0

        worker = WorkerThread(f"bridged-outbox-{path.parent.name}")
        opened = False
        try:
            db, depth, last_seq = await worker.run(run)
            opened = True
        finally:
            if not opened:  # failed or cancelled: the thread goes too
                await worker.aclose()
        return cls(worker, db, depth, last_seq, max_messages, synchronous)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One explicit transaction: the connection is in autocommit mode (so that the
        PRAGMAs work), where ``with db:`` alone would commit every statement by itself."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        finally:  # a failed statement or COMMIT must not leave the transaction open
            if self._db.in_transaction:
                self._db.rollback()

    async def append(self, entries: Sequence[Entry]) -> None:
        """Store ``entries`` in order, in one transaction. Raises :class:`SpoolFull`."""
        if self.depth + len(entries) > self.max_messages:
            raise SpoolFull(f"the outbox holds {self.depth} messages (max_spool_messages"
                            f" {self.max_messages}); is the broker down?")
        headers = [json.dumps(dict(e.headers), separators=(",", ":")) for e in entries]

        def run() -> list[Entry]:  # seqs are handed out here, one call after the other
            first = self._last_seq + 1
            stored = [Entry(e.exchange, e.routing_key, e.content_type, e.message_id,
                            e.headers, e.body, seq) for seq, e in enumerate(entries, first)]
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO outbox (seq, exchange, routing_key, content_type, message_id,"
                    " headers, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(e.seq, e.exchange, e.routing_key, e.content_type, e.message_id, h, e.body)
                     for e, h in zip(stored, headers, strict=True)])
            self._last_seq = stored[-1].seq
            return stored

        if not entries:
            return
        stored: list[Entry] = await self._worker.run(run)
        self.depth += len(stored)
        self._remember(stored)

    def _remember(self, stored: list[Entry]) -> None:
        """Keep the newest entries in memory, within the tail's bounds."""
        if self._tail and self._tail[-1].seq + 1 != stored[0].seq:
            self._forget()  # cannot happen (seqs are handed out in order); stay correct
        self._tail.extend(stored)
        self._tail_bytes += sum(len(e.body) for e in stored)
        while self._tail and (len(self._tail) > TAIL_ENTRIES or self._tail_bytes > TAIL_BYTES):
            self._tail_bytes -= len(self._tail.popleft().body)

    def _forget(self) -> None:
        self._tail.clear()
        self._tail_bytes = 0

    async def read(self, after: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with ``seq > after``, oldest first."""
        tail = self._tail
        if tail and tail[0].seq <= after + 1:  # every entry after `after` is in memory
            skip = max(after + 1 - tail[0].seq, 0)
            return list(islice(tail, skip, skip + limit))

        def run() -> list[Entry]:
            cur = self._db.execute(
                "SELECT seq, exchange, routing_key, content_type, message_id, headers, body"
                " FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
            return [Entry(ex, rk, ct, mid, json.loads(h), bytes(b), seq)
                    for seq, ex, rk, ct, mid, h, b in cur]

        result: list[Entry] = await self._worker.run(run)
        return result

    async def remove(self, seqs: Iterable[int]) -> None:
        """Delete the entries ``seqs`` (published and confirmed)."""
        ranges = _ranges(sorted(seqs))
        if not ranges:
            return

        def run() -> int:
            removed = 0
            self._db.execute("PRAGMA synchronous=NORMAL")  # no fsync for this commit
            try:
                with self._transaction():
                    for lo, hi in ranges:
                        removed += self._db.execute(
                            "DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount
            finally:
                self._db.execute(f"PRAGMA synchronous={self._sync}")
            return removed

        removed: int = await self._worker.run(run)
        self.depth -= removed
        tail = self._tail
        for lo, hi in ranges:  # confirmed entries: nobody reads them again
            while tail and lo <= tail[0].seq <= hi:
                self._tail_bytes -= len(tail.popleft().body)
        if tail and any(lo <= tail[-1].seq and hi >= tail[0].seq for lo, hi in ranges):
            self._forget()  # a hole in the tail (removed out of order): read the file

    async def close(self) -> None:
        try:
            await self._worker.run(self._db.close)
        finally:
            await self._worker.aclose()


def _ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted integers as inclusive runs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        elif not out or s != out[-1][1]:
            out.append((s, s))
    return out
