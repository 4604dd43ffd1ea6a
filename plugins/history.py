"""Built-in plugin ``history``: chat events kept in SQLite, replayed behind ``since=<eventId>``.

The database is ``<state_dir>/history.sqlite3`` in WAL mode. Its one connection lives on one
:class:`bridge.WorkerThread`, so the trio loop never blocks on the disk.
``bridge_persist_messages`` stores a whole batch in one transaction and returns only after
the commit. With ``synchronous = "normal"`` the commit survives a crash of the process; with
``"full"`` (the default) it also survives a power loss.

Retention, per chat: the newest ``retention_count`` events, pruned in the same transaction as
every write that goes over that count, and the events stored less than ``retention_age_s``
ago, pruned at start-up and by a background task every ``prune_interval_s``. The store
counts each chat's events in memory, so a write only looks at the oldest events it removes.
Pruning always removes a chat's oldest events, so what is gone is exactly the events with ids
up to the chat's *low-water mark*: the greatest pruned id, kept in the ``chats`` table.

Replay rule (``bridge_replay_messages(chat_id, since)``), see docs/history.md:

* ``since`` is not 20 decimal digits: :class:`bridge.ContractError` (``field="since"``);
* some event after ``since`` was pruned (``since`` < the chat's low-water mark):
  :class:`bridge.ReplayGap`;
* otherwise every kept event with an id greater than ``since``, oldest first (an empty list
  for an unknown chat; ``since`` need not be an id that was ever stored);
* ``since`` = ``last:N``: the newest N events kept, oldest first (never a gap).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

from bridge import (
    CHAT_EVENT,
    CLIENT_MSG_ID,
    CLIENT_MSG_RETRY,
    ContractError,
    Message,
    PluginContext,
    ReplayGap,
    StorageUnavailable,
    WorkerThread,
    hookimpl,
    positive,
    setting,
)

log = logging.getLogger("bridge.history")

T = TypeVar("T")

EVENT_ID = re.compile(r"[0-9]{20}", re.ASCII)
#: ``since`` of the form ``last:N``: the newest N events kept (bridge/hookspecs.py)
LAST = re.compile(r"last:([0-9]{1,6})", re.ASCII)
DB_NAME = "history.sqlite3"
#: Chats whose event count the store remembers; a chat it forgot is counted again (one query).
COUNTED_CHATS = 65536
_NOT_OPEN = "history: the store is not open (not started, or shut down)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    chat_id   TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    body      TEXT NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (chat_id, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_stored_at ON events (stored_at);
CREATE TABLE IF NOT EXISTS chats (
    chat_id        TEXT PRIMARY KEY,
    pruned_through TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS client_ids (
    chat_id   TEXT NOT NULL,
    client_id TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (chat_id, client_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_ids_event ON client_ids (chat_id, event_id);
"""
#: ``Message.meta`` key of the mark a retry the history recognised gets: the message is the
#: original event (the client message id itself is under :data:`bridge.CLIENT_MSG_ID`).
RETRY_OF = CLIENT_MSG_RETRY


@dataclass(frozen=True)
class HistorySettings:
    retention_count: int = setting(1000, check=positive, doc="events kept per chat, newest")
    retention_age_s: float = setting(7 * 24 * 3600.0, check=positive,
                                     doc="events older than this (since stored) are pruned")
    prune_interval_s: float = setting(60.0, check=positive,
                                      doc="how often the age pruning runs")
    synchronous: Literal["normal", "full"] = setting(
        "full", doc="normal: durable across a process crash; full: across a power loss too")


#: Rows per INSERT statement at most (``daemon.batch_max`` by default; fewer where SQLite
#: allows fewer than 4 x 256 bound variables, as before 3.32). sqlite3 lets go of the GIL
#: for every statement step and must win it back from the trio and asyncio threads after
#: each one; on a busy daemon each such wait took about 1 ms at the median.
INSERT_ROWS = 256
#: Checkpoint the WAL after this many pages (SQLite's default is 1000, about 4 MB), and
#: truncate it to WAL_LIMIT_BYTES at each checkpoint (SQLite's default: never), so that a
#: small state directory does not fill up with the WAL (docs/operations.md, disk space).
WAL_PAGES = 128
WAL_LIMIT_BYTES = 512 * 1024


@functools.cache
def _insert(rows: int) -> str:
    """``INSERT OR IGNORE`` of ``rows`` events in one statement (cached per row count)."""
    return ("INSERT OR IGNORE INTO events (chat_id, event_id, body, stored_at) VALUES "
            + ",".join(["(?,?,?,?)"] * rows))


def _statement(values: list[str | float]) -> tuple[str, list[str | float]]:
    """One INSERT of the rows in ``values`` (4 per row), padded to a power of two rows with
    copies of the last row, which ``OR IGNORE`` skips. So a connection prepares at most 9
    statement sizes: one per batch size would hold about 17 MB of prepared statements."""
    rows = len(values) // 4
    size = 1 << (rows - 1).bit_length()
    return _insert(size), values + values[-4:] * (size - rows)


class HistoryStore:
    """The SQLite side, synchronous: every method runs on the plugin's worker thread."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.executescript(f"PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint={WAL_PAGES};"
                                f" PRAGMA journal_size_limit={WAL_LIMIT_BYTES};")
        self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.conn.executescript(_SCHEMA)
        #: events per chat as committed, for the chats written to lately (LRU order)
        self._counts: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        self.conn.close()

    def store(self, rows: Sequence[tuple[str, str, str]], now: float, keep: int,
              client_ids: Sequence[tuple[str, str, str]] = ()) -> None:
        """Insert ``(chat_id, event_id, body_json)`` rows in one transaction, and prune each
        touched chat down to its newest ``keep`` events in the same transaction. Ids that are
        already stored are left as they are. ``client_ids`` are ``(chat_id, client_id,
        event_id)`` rows stored in the same transaction (the first event of a client id
        wins).

        When no chat needs pruning and the rows fit one statement, that statement is the
        whole transaction (autocommit): one step, so one hand-over of the GIL, where BEGIN,
        INSERT and COMMIT take three (see :data:`INSERT_ROWS`)."""
        most = min(INSERT_ROWS, self.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 4)
        per_insert = 1 << (max(most, 1).bit_length() - 1)  # a power of two (_statement)
        per_chat = Counter(c for c, _, _ in rows)
        if not client_ids and len(rows) <= per_insert and all(
                self._counts.get(c, keep) + n <= keep for c, n in per_chat.items()):
            inserted = self.conn.execute(
                *_statement([v for c, e, b in rows for v in (c, e, b, now)])).rowcount
            for chat_id, n in per_chat.items():
                if inserted == len(rows):  # every row new: the counts are known
                    self._counts[chat_id] += n
                    self._counts.move_to_end(chat_id)
                else:  # some ids were stored already: count again on the next write
                    del self._counts[chat_id]
            return
        by_chat: dict[str, list[str | float]] = {}
        for c, e, b in rows:
            by_chat.setdefault(c, []).extend((c, e, b, now))
        counts = {}
        with self._transaction() as cur:
            for chat_id, values in by_chat.items():
                inserted = 0
                for i in range(0, len(values), 4 * per_insert):
                    chunk = values[i:i + 4 * per_insert]
                    inserted += cur.execute(*_statement(chunk)).rowcount
                known = self._counts.get(chat_id)
                count = self._count(cur, chat_id) if known is None else known + inserted
                counts[chat_id] = self._prune_to(cur, chat_id, count, keep)
            cur.executemany("INSERT OR IGNORE INTO client_ids (chat_id, client_id, event_id)"
                            " VALUES (?, ?, ?)", client_ids)
        for chat_id, count in counts.items():  # committed: remember
            self._counts[chat_id] = count
            self._counts.move_to_end(chat_id)
        while len(self._counts) > COUNTED_CHATS:
            self._counts.popitem(last=False)

    def store_or_refuse(self, rows: Sequence[tuple[str, str, str]], now: float,
                        keep: int, client_ids: Sequence[tuple[str, str, str]] = ()) -> None:
        """:meth:`store`, with a write the disk refuses (full, I/O error, locked) raised as
        :class:`bridge.StorageUnavailable`: the pipeline then holds the messages with their
        sources and tries again, instead of failing them for good. After such a failure the
        WAL is checkpointed and truncated where the disk lets us, so the space it held comes
        back as soon as there is room for the checkpoint."""
        try:
            self.store(rows, now, keep, client_ids)
        except sqlite3.OperationalError as e:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            raise StorageUnavailable(f"history: cannot store events: {e}") from e

    @staticmethod
    def _count(cur: sqlite3.Cursor, chat_id: str) -> int:
        (n,) = cur.execute("SELECT count(*) FROM events WHERE chat_id = ?",
                           (chat_id,)).fetchone()
        return int(n)

    def _prune_to(self, cur: sqlite3.Cursor, chat_id: str, count: int, keep: int) -> int:
        """Prune ``chat_id``, which holds ``count`` events, to its newest ``keep``; the count
        afterwards."""
        if count <= keep:
            return count
        row = cur.execute(  # the newest of the events to remove: near the oldest end
            "SELECT event_id FROM events WHERE chat_id = ? ORDER BY event_id"
            " LIMIT 1 OFFSET ?", (chat_id, count - keep - 1)).fetchone()
        if row is None:  # the count was off (cannot happen while only this store writes)
            return self._prune_to(cur, chat_id, self._count(cur, chat_id), keep)
        return count - self._prune_through(cur, chat_id, row[0])

    def prune_older_than(self, cutoff: float) -> int:
        """Prune, in every chat, the events stored before ``cutoff`` (and any older id)."""
        with self._transaction() as cur:
            marks = cur.execute(
                "SELECT chat_id, MAX(event_id) FROM events WHERE stored_at < ?"
                " GROUP BY chat_id", (cutoff,)).fetchall()
            removed = sum(self._prune_through(cur, chat_id, mark) for chat_id, mark in marks)
        if removed:
            self._counts.clear()  # counted again on the next write to each chat
        return removed

    @staticmethod
    def _prune_through(cur: sqlite3.Cursor, chat_id: str, event_id: str) -> int:
        deleted = cur.execute("DELETE FROM events WHERE chat_id = ? AND event_id <= ?",
                              (chat_id, event_id)).rowcount
        cur.execute("DELETE FROM client_ids WHERE chat_id = ? AND event_id <= ?",
                    (chat_id, event_id))
        cur.execute(
            "INSERT INTO chats (chat_id, pruned_through) VALUES (?, ?) ON CONFLICT (chat_id)"
            " DO UPDATE SET pruned_through = MAX(pruned_through, excluded.pruned_through)",
            (chat_id, event_id))
        return int(deleted)

    def replay(self, chat_id: str, since: str) -> list[tuple[str, str]] | None:
        """``(event_id, body_json)`` after ``since``, oldest first; None for a gap."""
        cur = self.conn.cursor()
        try:
            cur.execute("BEGIN")  # one snapshot for the mark and the events
            mark = cur.execute("SELECT pruned_through FROM chats WHERE chat_id = ?",
                               (chat_id,)).fetchone()
            if mark is not None and since < mark[0]:
                return None
            return cur.execute(
                "SELECT event_id, body FROM events WHERE chat_id = ? AND event_id > ?"
                " ORDER BY event_id", (chat_id, since)).fetchall()
        finally:
            cur.execute("COMMIT")

    def newest(self, chat_id: str, n: int) -> list[tuple[str, str]]:
        """The newest ``n`` kept events of ``chat_id``, oldest first."""
        rows = self.conn.execute(
            "SELECT event_id, body FROM events WHERE chat_id = ? ORDER BY event_id DESC"
            " LIMIT ?", (chat_id, n)).fetchall()
        return [(str(e), str(b)) for e, b in reversed(rows)]

    def find_client_id(self, chat_id: str, client_id: str) -> tuple[str, str] | None:
        """``(event_id, body_json)`` of the kept event stored for ``client_id``, if any."""
        row = self.conn.execute(
            "SELECT e.event_id, e.body FROM client_ids c JOIN events e"
            " ON e.chat_id = c.chat_id AND e.event_id = c.event_id"
            " WHERE c.chat_id = ? AND c.client_id = ?", (chat_id, client_id)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.cur = conn.cursor()

    def __enter__(self) -> sqlite3.Cursor:
        self.cur.execute("BEGIN IMMEDIATE")
        return self.cur

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.cur.execute("COMMIT")
        finally:  # a failed statement or COMMIT must not leave the transaction open
            if self.conn.in_transaction:
                self.conn.rollback()


def _jsonable(value: object) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: built once: ``json.dumps`` with options builds an encoder per call
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_jsonable)


def _event_row(message: Message) -> tuple[str, str, str]:
    event_id = message.id or str(message.body.get("eventId", ""))
    if not message.chat_id or not EVENT_ID.fullmatch(event_id):
        raise ValueError(f"history: chat event {event_id or '-'} on chat "
                         f"{message.chat_id or '-'} has no chat id or no valid eventId")
    return message.chat_id, event_id, _ENCODER.encode(message.body)


class Plugin:
    """The history of one daemon."""

    def __init__(self) -> None:
        self.settings = HistorySettings()
        self.store: HistoryStore | None = None
        self._worker = WorkerThread("bridged-history")  # the connection's only thread
        #: the wall clock, replaceable in tests
        self.clock: Callable[[], float] = time.time

    async def _run(self, fn: Callable[[HistoryStore], T]) -> T:
        """``fn(store)`` on the worker thread; the trio loop waits without blocking."""
        if self.store is None:
            raise RuntimeError(_NOT_OPEN)
        return await self._worker.run(self._call, fn)

    def _call(self, fn: Callable[[HistoryStore], T]) -> T:
        if self.store is None:
            raise RuntimeError(_NOT_OPEN)
        return fn(self.store)

    def _close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    @hookimpl
    def bridge_settings_class(self) -> type[HistorySettings]:
        return HistorySettings

    @hookimpl
    async def bridge_startup(self, context: PluginContext) -> None:
        if context.settings is not None:
            self.settings = context.settings
        path = context.state_dir / DB_NAME
        await self._worker.aclose()  # a plugin started again gets a fresh thread
        self._worker = WorkerThread("bridged-history")
        self.store = await self._worker.run(HistoryStore, path, self.settings.synchronous)
        log.info("history in %s (keep %d events per chat, %.0f s)", path,
                 self.settings.retention_count, self.settings.retention_age_s)
        await self.prune()
        context.nursery.start_soon(self._prune_forever)

    @hookimpl
    async def bridge_shutdown(self, context: PluginContext) -> None:
        if self.store is not None:
            await self._worker.run(self._close)
        await self._worker.aclose()

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        events = [m for m in messages if m.kind == CHAT_EVENT and not m.meta.get(RETRY_OF)]
        rows = [_event_row(m) for m in events]
        client_ids = [(r[0], str(m.meta[CLIENT_MSG_ID]), r[1])
                      for m, r in zip(events, rows, strict=True) if m.meta.get(CLIENT_MSG_ID)]
        if rows:
            now, keep = self.clock(), self.settings.retention_count
            await self._run(lambda store: store.store_or_refuse(rows, now, keep, client_ids))

    @hookimpl(trylast=True)
    async def bridge_enrich_message(self, message: Message) -> Message | None:
        """A chat event whose client message id (``meta["client_msg_id"]``) is stored
        already becomes that original event again, marked ``meta["client_msg_retry"]``: it
        is not stored again, and the websocket transport echoes it to its sender only. Runs
        after the other enrichers (``trylast``), so it replaces the id they gave."""
        client_id = message.meta.get(CLIENT_MSG_ID)
        if message.kind != CHAT_EVENT or not client_id or not message.chat_id:
            return None
        chat_id = message.chat_id
        found = await self._run(lambda store: store.find_client_id(chat_id, str(client_id)))
        if found is None:
            return None
        event_id, body = found
        return message.evolve(id=event_id, body=json.loads(body),
                              meta={**message.meta, RETRY_OF: True})

    @hookimpl
    async def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        last = LAST.fullmatch(since)
        if last is not None:
            n = int(last.group(1))
            newest = await self._run(lambda store: store.newest(chat_id, n))
            return [Message(CHAT_EVENT, json.loads(body), "history", event_id, chat_id)
                    for event_id, body in newest]
        if not EVENT_ID.fullmatch(since):
            raise ContractError("since: must be an eventId of 20 decimal digits (rule: pattern)",
                                field="since", rule="pattern")
        rows = await self._run(lambda store: store.replay(chat_id, since))
        if rows is None:
            raise ReplayGap(f"chat {chat_id}: events after {since} are no longer kept;"
                            " reconnect without since to start from the present")
        return [Message(CHAT_EVENT, json.loads(body), "history", event_id, chat_id)
                for event_id, body in rows]

    async def prune(self) -> int:
        """Remove the events older than ``retention_age_s``; how many were removed."""
        cutoff = self.clock() - self.settings.retention_age_s
        removed = await self._run(lambda store: store.prune_older_than(cutoff))
        if removed:
            log.info("history: pruned %d events older than %.0f s", removed,
                     self.settings.retention_age_s)
        return removed

    async def _prune_forever(self) -> None:
        while self.store is not None:
            await trio.sleep(self.settings.prune_interval_s)
            if self.store is None:
                return
            try:
                await self.prune()
            except Exception:  # keep pruning later; a failed round loses nothing
                log.exception("history: pruning failed")
