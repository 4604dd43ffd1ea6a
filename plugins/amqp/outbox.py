"""The AMQP transport's outbox: an ordered on-disk queue of messages waiting to be published.

SQLite in WAL mode, one file per transport in its state directory. The connection lives on
one :class:`bridge.WorkerThread`, so the trio loop never waits on the disk.

* ``append`` returns once the rows are committed. With ``synchronous=FULL`` the commit is
  fsynced, so a message survives a SIGKILL of the daemon and a power loss.
* ``append(..., hold=True)`` stores rows that are not to be published yet: the pipeline has
  not stored their events in the history yet. :meth:`Spool.commit` then publishes the held
  rows the history has and deletes the others. Held rows are always the newest ones: the
  spool remembers the greatest released seq (table ``released``), and every row after it
  is held. Rows still held when the daemon stopped are reconciled at the next start
  (:meth:`Spool.held`, then :meth:`Spool.commit`), so the history and the outbox agree
  after any crash (docs/architecture.md).
* The publisher reads the rows in order, publishes them and removes them once the broker
  has confirmed them.
* The newest entries are also kept in memory (at most :data:`TAIL_ENTRIES` of them and
  :data:`TAIL_BYTES` in all). A publisher that keeps up reads from there and never from
  the disk. After a restart, or when it falls behind, it reads from the file.
* A removal commits without an fsync, whatever ``synchronous`` says. It becomes durable
  with the next fsynced append, or the next checkpoint. A removal lost to a power cut
  only means that a confirmed message is published again, which at-least-once delivery
  allows. So does a release (a commit of held rows) lost to a power cut: the rows are
  held again at the next start, and reconciled.
* The WAL is checkpointed every :data:`WAL_PAGES` pages and truncated to
  :data:`WAL_LIMIT_BYTES` after each checkpoint, so a small state directory does not fill
  up with the spool's own log (docs/operations.md gives the space the daemon needs).
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

from bridge import DeliveryError, StorageUnavailable, WorkerThread

#: The in-memory tail: this many of the newest entries at most...
TAIL_ENTRIES = 4096
#: ... and this many body bytes at most.
TAIL_BYTES = 16 * 2**20

#: Checkpoint the WAL after this many pages (SQLite's default is 1000, about 4 MB) ...
WAL_PAGES = 128
#: ... and truncate it to this size at each checkpoint (SQLite's default: never).
WAL_LIMIT_BYTES = 512 * 1024

_PRAGMAS = (f"PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint={WAL_PAGES};"
            f" PRAGMA journal_size_limit={WAL_LIMIT_BYTES};")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS released (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    content_type TEXT NOT NULL,
    message_id TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    client_msg_id TEXT
)
"""
#: Outboxes made before client message ids were kept get the column at open.
_ADD_CLIENT_MSG_ID = "ALTER TABLE outbox ADD COLUMN client_msg_id TEXT"


@dataclass(frozen=True, slots=True)
class Entry:
    """One spooled message; ``seq`` orders entries (0 until stored). ``client_msg_id`` is
    the event's client message id (``bridge.CLIENT_MSG_ID``): kept for the reconcile after a
    crash, which stores the event again, and never published."""

    exchange: str
    routing_key: str
    content_type: str
    message_id: str
    headers: Mapping[str, Any]
    body: bytes
    seq: int = 0
    client_msg_id: str | None = None


class SpoolFull(DeliveryError, StorageUnavailable):
    """The spool holds its maximum number of messages (the broker has been away long)."""


class SpoolUnavailable(DeliveryError, StorageUnavailable):
    """The spool's file refuses writes (a full disk)."""


class Spool:
    """Open with :meth:`open`, close with :meth:`close`. :attr:`depth` is the row count."""

    def __init__(self, worker: WorkerThread, db: sqlite3.Connection, depth: int, last_seq: int,
                 released: int, max_messages: int, synchronous: str) -> None:
        self._worker = worker
        self._db = db
        self._sync = synchronous.upper()
        self.depth = depth
        self.max_messages = max_messages
        self._last_seq = last_seq  # the greatest seq ever stored (worker thread only)
        self._through = released  # the released seq in the file (worker thread only)
        #: rows up to this seq may be published; the ones after it are held
        self.released = released
        self._tail: deque[Entry] = deque()  # the newest entries, seqs without a gap
        self._tail_bytes = 0

    @classmethod
    async def open(cls, path: Path, *, max_messages: int,
                   synchronous: Literal["full", "normal"] = "full") -> Spool:
        def run() -> tuple[sqlite3.Connection, int, int, int]:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.executescript(_PRAGMAS)
                db.execute(f"PRAGMA synchronous={synchronous.upper()}")
                new = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'released'"
                                 ).fetchone() == (0,)
                db.executescript(_SCHEMA)
                columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
                if "client_msg_id" not in columns:
                    db.execute(_ADD_CLIENT_MSG_ID)
                (depth,) = db.execute("SELECT count(*) FROM outbox").fetchone()
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
                                 ).fetchone()  # AUTOINCREMENT: seqs are never reused
                last_seq = int(row[0]) if row else 0
                if new:  # an outbox of a version that held nothing: every row is released
                    db.execute("INSERT INTO released (one, through) VALUES (1, ?)", (last_seq,))
                (released,) = db.execute("SELECT through FROM released").fetchone()
            except BaseException:
                db.close()
                raise
            return db, int(depth), last_seq, int(released)

        worker = WorkerThread(f"bridged-outbox-{path.parent.name}")
        opened = False
        try:
            db, depth, last_seq, released = await worker.run(run)
            opened = True
        finally:
            if not opened:  # failed or cancelled: the thread goes too
                await worker.aclose()
        return cls(worker, db, depth, last_seq, released, max_messages, synchronous)

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

    async def append(self, entries: Sequence[Entry], *, hold: bool = False) -> list[Entry]:
        """Store ``entries`` in order, in one transaction; the stored entries (with their
        seqs). With ``hold``, they are not published before :meth:`commit` releases them.
        Raises :class:`SpoolFull`, or :class:`SpoolUnavailable` when the file refuses the
        write (a full disk)."""
        if self.depth + len(entries) > self.max_messages:
            raise SpoolFull(f"the outbox holds {self.depth} messages (max_spool_messages"
                            f" {self.max_messages}); is the broker down?")
        headers = [json.dumps(dict(e.headers), separators=(",", ":")) for e in entries]

        def run() -> tuple[list[Entry], int]:  # seqs are handed out here, one after another
            first = self._last_seq + 1
            stored = [Entry(e.exchange, e.routing_key, e.content_type, e.message_id,
                            e.headers, e.body, seq, e.client_msg_id)
                      for seq, e in enumerate(entries, first)]
            try:
                with self._transaction():
                    self._db.executemany(
                        "INSERT INTO outbox (seq, exchange, routing_key, content_type,"
                        " message_id, headers, body, client_msg_id)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(e.seq, e.exchange, e.routing_key, e.content_type, e.message_id, h,
                          e.body, e.client_msg_id)
                         for e, h in zip(stored, headers, strict=True)])
                    release = not hold and self._through == first - 1  # nothing held
                    if release:
                        self._db.execute("UPDATE released SET through = ?", (stored[-1].seq,))
            except sqlite3.OperationalError as e:  # a full disk, an I/O error
                self._checkpoint_after_failure()
                raise SpoolUnavailable(f"the outbox cannot store messages: {e}") from e
            self._last_seq = stored[-1].seq
            if release:
                self._through = stored[-1].seq
            return stored, self._through

        if not entries:
            return []
        stored, through = await self._worker.run(run)
        self.depth += len(stored)
        self.released = max(self.released, through)
        self._remember(stored)
        return stored

    def _checkpoint_after_failure(self) -> None:  # worker thread
        """After a failed write, give the WAL's space back if the disk lets us (the
        checkpoint copies it into the database file, then truncates it)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def held(self) -> list[Entry]:
        """The held entries (appended with ``hold`` and not committed yet), oldest first."""
        result: list[Entry] = []
        after = self.released
        while True:
            batch = await self._read_file(after, 1024)
            if not batch:
                return result
            result.extend(batch)
            after = batch[-1].seq

    async def commit(self, dropped: Iterable[int] = ()) -> None:
        """Resolve every held entry: delete the ``dropped`` seqs (their events were not
        stored) and release the rest for publishing. The release commits without an fsync:
        lost to a power cut, the rows are held again at the next start and reconciled."""
        gone = sorted(dropped)

        def run() -> tuple[int, int]:
            through = self._last_seq
            if through == self._through:
                return 0, through
            try:
                removed = self._delete(
                    _ranges([s for s in gone if self._through < s <= through]), through)
            except sqlite3.OperationalError as e:
                self._checkpoint_after_failure()
                raise SpoolUnavailable(f"the outbox cannot release messages: {e}") from e
            self._through = through
            return removed, through

        removed, through = await self._worker.run(run)
        self.depth -= removed
        self.released = max(self.released, through)
        if removed:
            self._forget()  # a hole in the tail: read the file

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
        """Up to ``limit`` released entries with ``seq > after``, oldest first."""
        limit = min(limit, max(self.released - after, 0))
        if limit == 0:
            return []
        tail = self._tail
        if tail and tail[0].seq <= after + 1:  # every entry after `after` is in memory
            skip = max(after + 1 - tail[0].seq, 0)
            return [e for e in islice(tail, skip, skip + limit) if e.seq <= self.released]
        return [e for e in await self._read_file(after, limit) if e.seq <= self.released]

    async def _read_file(self, after: int, limit: int) -> list[Entry]:
        def run() -> list[Entry]:
            cur = self._db.execute(
                "SELECT seq, exchange, routing_key, content_type, message_id, headers, body,"
                " client_msg_id FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
            return [Entry(ex, rk, ct, mid, json.loads(h), bytes(b), seq, cid)
                    for seq, ex, rk, ct, mid, h, b, cid in cur]

        result: list[Entry] = await self._worker.run(run)
        return result

    async def remove(self, seqs: Iterable[int]) -> None:
        """Delete the entries ``seqs`` (published and confirmed)."""
        ranges = _ranges(sorted(seqs))
        if not ranges:
            return

        removed: int = await self._worker.run(self._delete, ranges)
        self.depth -= removed
        tail = self._tail
        for lo, hi in ranges:  # confirmed entries: nobody reads them again
            while tail and lo <= tail[0].seq <= hi:
                self._tail_bytes -= len(tail.popleft().body)
        if tail and any(lo <= tail[-1].seq and hi >= tail[0].seq for lo, hi in ranges):
            self._forget()  # a hole in the tail (removed out of order): read the file

    def _delete(self, ranges: Sequence[tuple[int, int]], release: int | None = None) -> int:
        """Delete the seqs in ``ranges`` (and mark rows up to ``release`` released) in one
        transaction without an fsync; how many rows went (worker thread)."""
        removed = 0
        self._db.execute("PRAGMA synchronous=NORMAL")  # no fsync for this commit
        try:
            with self._transaction():
                for lo, hi in ranges:
                    removed += self._db.execute(
                        "DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount
                if release is not None:
                    self._db.execute("UPDATE released SET through = ?", (release,))
        finally:
            self._db.execute(f"PRAGMA synchronous={self._sync}")
        return removed

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
