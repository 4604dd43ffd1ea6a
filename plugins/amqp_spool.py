"""The AMQP transport's outbox: an ordered on-disk queue of messages waiting to be published.

SQLite in WAL mode, one file per transport in its state directory. ``append`` returns once
the rows are committed (with ``synchronous=FULL`` the commit is fsynced, so a message
survives a SIGKILL of the daemon and a power loss); the publisher reads rows in order,
publishes them and removes them once the broker has confirmed them. All database work runs
in a worker thread (``trio.to_thread``), one operation at a time.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio

from bridge import DeliveryError

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

    def __init__(self, db: sqlite3.Connection, depth: int, max_messages: int) -> None:
        self._db = db
        self._lock = trio.Lock()
        self.depth = depth
        self.max_messages = max_messages

    @classmethod
    async def open(cls, path: Path, *, max_messages: int,
                   synchronous: Literal["full", "normal"] = "full") -> Spool:
        def run() -> tuple[sqlite3.Connection, int]:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={synchronous.upper()}")
                db.execute(_SCHEMA)
                (depth,) = db.execute("SELECT count(*) FROM outbox").fetchone()
            except BaseException:
                db.close()
                raise
            return db, int(depth)

        db, depth = await trio.to_thread.run_sync(run)
        return cls(db, depth, max_messages)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One explicit transaction: the connection is in autocommit mode (so that the
        PRAGMAs work), where ``with db:`` alone would commit every statement by itself."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def _run(self, fn: Any) -> Any:
        async with self._lock:
            return await trio.to_thread.run_sync(fn)

    async def append(self, entries: Sequence[Entry]) -> None:
        """Store ``entries`` in order, in one transaction. Raises :class:`SpoolFull`."""
        if self.depth + len(entries) > self.max_messages:
            raise SpoolFull(f"the outbox holds {self.depth} messages (max_spool_messages"
                            f" {self.max_messages}); is the broker down?")
        rows = [(e.exchange, e.routing_key, e.content_type, e.message_id,
                 json.dumps(dict(e.headers), separators=(",", ":")), e.body) for e in entries]

        def run() -> None:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO outbox (exchange, routing_key, content_type, message_id,"
                    " headers, body) VALUES (?, ?, ?, ?, ?, ?)", rows)

        await self._run(run)
        self.depth += len(entries)

    async def read(self, after: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with ``seq > after``, oldest first."""

        def run() -> list[Entry]:
            cur = self._db.execute(
                "SELECT seq, exchange, routing_key, content_type, message_id, headers, body"
                " FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
            return [Entry(ex, rk, ct, mid, json.loads(h), bytes(b), seq)
                    for seq, ex, rk, ct, mid, h, b in cur]

        result: list[Entry] = await self._run(run)
        return result

    async def remove(self, seqs: Iterable[int]) -> None:
        """Delete the entries ``seqs`` (published and confirmed)."""
        ranges = _ranges(sorted(seqs))
        if not ranges:
            return

        def run() -> int:
            removed = 0
            with self._transaction():
                for lo, hi in ranges:
                    removed += self._db.execute(
                        "DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount
            return removed

        removed: int = await self._run(run)
        self.depth -= removed

    async def close(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._db.close)


def _ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted integers as inclusive runs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        elif not out or s != out[-1][1]:
            out.append((s, s))
    return out
