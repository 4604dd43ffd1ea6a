"""The cluster's shared chat history: a log per chat in PostgreSQL (research/cluster.md §3.3, §4).

Synchronous psycopg 3: every method of :class:`ClusterStore` runs on one dedicated worker
thread (the plugin wraps it in a :class:`bridge.WorkerThread`), so this module never touches
trio. The store owns two connections, both in autocommit mode with explicit transactions:
the *main* one for everything but leadership, and a *leader* one that holds nothing but the
session-level advisory lock of :meth:`ClusterStore.try_lead`.

Tables, in the configured schema, created at start-up if absent (under a transaction-level
advisory lock, so that instances starting together do not race on the DDL):

* ``chats(chat_id, epoch, last_offset, pruned_through)``: one counter row per chat. The epoch
  (100..999) is random, chosen when the row is created; ``last_offset`` is the offset of the
  chat's newest event; ``pruned_through`` the greatest offset retention removed (0: none).
* ``events(chat_id, chat_offset, body, source, source_key, stored_at)``: the log. Primary key
  (chat_id, chat_offset); ``source_key`` unique per chat where it is not NULL.
* ``outbox(id, destination, chat_id, chat_offset, queued_at)``: an event still to be published
  to a destination. The row points at its event; retention never removes an event an outbox
  row still points at (see below), so the body is stored once.

Write path (:meth:`ClusterStore.append`), one transaction per batch: the batch's chats are
created if missing (``INSERT .. ON CONFLICT DO NOTHING``), then locked with ``SELECT .. FOR
UPDATE``, both in sorted chat order, so that writers never deadlock. Under the lock the batch
is deduped by ``source_key`` (against the stored events and within the batch), offsets are
given out from ``last_offset + 1`` in input order, and the events, their outbox rows and the
new ``last_offset`` are written with one set-based statement each. A second writer on a chat
waits on the row lock until the first commits, so a chat's offsets are gapless (a rollback
undoes the increment) and commit order is offset order: no reader sees offset N+1 before N.

Retention, per chat, as in the single-process history (plugins/history.py): the newest
``retention_count`` events, pruned in the same transaction as every append that goes over
that count, and the events stored less than ``retention_age_s`` ago, pruned by
:meth:`ClusterStore.prune`. Pruning always removes a prefix of a chat's offsets, so what is
gone is exactly the offsets up to ``pruned_through`` and a chat keeps ``last_offset -
pruned_through`` events. The prefix stops below the oldest event that still has an outbox
row: a destination that is down holds its events (and so, for a while, more than
``retention_count`` of its chat) until they are published. A ``source_key`` dedupes only
against kept events: once its event is pruned, the same key is stored as a new event.

Replay rule (:meth:`ClusterStore.replay`, research/cluster.md §4.5): the kept events after an
offset, or None when the chat cannot be resumed from there: it has another epoch, or some
event after the offset was pruned.

Failures: a lost connection, a server that shuts down or restarts, a statement over its
timeout (any ``psycopg.OperationalError``) raises :class:`StoreUnavailable`. A broken
connection is dropped then, and the next call connects again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

log = logging.getLogger("bridge.cluster.store")

#: cluster event ids: ``9``, the epoch (3 digits), the offset (16 digits); 20 digits in all,
#: as the SPEC wants, and never a single-process id (those are timestamps, not 9...)
EVENT_ID = re.compile(r"9[0-9]{19}", re.ASCII)
#: the epochs a chat row is given, at random
EPOCHS = (100, 999)
#: chats a store remembers as created (a chat row is never deleted), so that an append to them
#: skips the ``INSERT .. ON CONFLICT DO NOTHING``; forgotten all at once when over
KNOWN_CHATS = 65536
#: chats locked per transaction by the age pruning (it holds their row locks until it commits)
PRUNE_CHATS = 512


def event_id(epoch: int, offset: int) -> str:
    """The event id of ``offset`` in a chat of ``epoch``."""
    return f"9{epoch:03d}{offset:016d}"


def parse_event_id(value: str) -> tuple[int, int] | None:
    """``(epoch, offset)`` of a cluster event id; None for anything else (a single-process id)."""
    if not EVENT_ID.fullmatch(value):
        return None
    return int(value[1:4]), int(value[4:])


#: What a database that is down, starting, read-only (a standby, a full disk) or not letting
#: us in raises: the store is unavailable for now, not the write wrong.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.InternalError,
                psycopg.errors.InsufficientPrivilege)


class StoreUnavailable(Exception):
    """PostgreSQL cannot be reached, went away or refused for now (the caller maps this to
    :class:`bridge.StorageUnavailable`). The store connects again on its next call."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append."""

    chat_id: str
    #: the chat event (JSON-able); its ``"eventId"`` is replaced by the store
    body: dict[str, Any]
    #: dedupe key, unique per chat ("c:<clientMsgId>", "n:<amqp message id>"); None: never a
    #: duplicate
    source_key: str | None
    #: destinations the event must still be published to (one outbox row each)
    outboxes: tuple[str, ...]
    #: the transport it came from
    source: str


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored."""

    chat_id: str
    epoch: int
    offset: int
    event_id: str
    #: as stored, with ``body["eventId"] == event_id``
    body: dict[str, Any]
    #: the source key was stored already: this is the original event, nothing was written
    duplicate: bool


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An event still to be published to ``destination``."""

    id: int
    destination: str
    event: StoredEvent
    source: str = ""  # the transport the event came from


def _jsonable(value: object) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: built once: ``json.dumps`` with options builds an encoder per call
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_jsonable)


def _ident(name: str) -> str:
    """``name`` quoted as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _lock_key(schema: str, what: str) -> str:
    """The text an advisory lock key of the store is hashed from (``hashtextextended``)."""
    return f"bridged.cluster:{schema}:{what}"


_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.chats (
    chat_id        text PRIMARY KEY,
    epoch          integer NOT NULL,
    last_offset    bigint NOT NULL DEFAULT 0,
    pruned_through bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05,
        autovacuum_vacuum_threshold = 100);
CREATE TABLE IF NOT EXISTS {s}.events (
    chat_id     text NOT NULL,
    chat_offset bigint NOT NULL,
    body        {body} NOT NULL,
    source      text NOT NULL,
    source_key  text,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chat_id, chat_offset)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_source_key ON {s}.events (chat_id, source_key)
    WHERE source_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_stored_at ON {s}.events (stored_at);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    id          bigserial PRIMARY KEY,
    destination text NOT NULL,
    chat_id     text NOT NULL,
    chat_offset bigint NOT NULL,
    queued_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_event ON {s}.outbox (chat_id, chat_offset);
"""
#: The body column holds the JSON text as encoded here: bridged never queries inside a body,
#: and text inserts faster than jsonb (which the server parses) and reads back unchanged.
#: Measured on the 2-vCPU dev box (PG 15, psycopg 3.3.9, a 250-byte body, one transaction
#: per insert including its commit; medians of 7 runs, in ms per insert of 1 / 16 / 256 rows):
#:
#: ==========================================  ======  ======  ======
#: INSERT .. SELECT FROM unnest(arrays)
#:   binary parameters (``%b``), text body     0.46    0.51    2.55
#:   binary parameters (``%b``), jsonb body    0.47    0.60    4.18
#:   text parameters (``%s``), text body       0.52    1.37    16.8
#: executemany (pipeline mode), text body      0.41    0.76    5.24
#: executemany (pipeline mode), jsonb body     0.44    0.81    5.94
#: ==========================================  ======  ======  ======
#:
#: Text-format arrays lose because every JSON string is escaped into an array literal, and
#: parsed back out of it; binary arrays carry each element length-prefixed. So every array
#: parameter here goes binary (``%b``), and events are inserted with one unnest statement.
_BODY_TYPE = "text"


class _Queries:
    """The store's statements, for one schema."""

    def __init__(self, schema: str) -> None:
        s = _ident(schema)
        self.ddl = _DDL.format(s=s, body=_BODY_TYPE)
        self.create_chats = (
            f"INSERT INTO {s}.chats (chat_id, epoch)"
            f" SELECT c, {EPOCHS[0]} + floor(random() * {EPOCHS[1] - EPOCHS[0] + 1})::int"
            " FROM unnest(%b::text[]) AS c ORDER BY c ON CONFLICT (chat_id) DO NOTHING")
        self.lock_chats = (
            f"SELECT chat_id, epoch, last_offset, pruned_through FROM {s}.chats"
            " WHERE chat_id = ANY(%b::text[]) ORDER BY chat_id FOR UPDATE")
        self.find_keys = (
            f"SELECT e.chat_id, e.source_key, e.chat_offset, e.body FROM {s}.events e"
            " JOIN unnest(%b::text[], %b::text[]) AS k (chat_id, source_key)"
            " ON e.chat_id = k.chat_id AND e.source_key = k.source_key"
            " WHERE e.source_key IS NOT NULL")
        self.insert_events = (
            f"INSERT INTO {s}.events (chat_id, chat_offset, body, source, source_key)"
            f" SELECT * FROM unnest(%b::text[], %b::bigint[], %b::{_BODY_TYPE}[], %b::text[],"
            " %b::text[])")
        self.insert_outbox = (
            f"INSERT INTO {s}.outbox (destination, chat_id, chat_offset)"
            " SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])")
        # The new last offsets, and, for the chats over their count, the prefix to prune:
        # offsets in (after, through], through stopped below the chat's oldest outbox row.
        self.advance = (
            "WITH v AS ("
            " SELECT v.chat_id, v.last_offset, CASE WHEN v.through > v.after THEN"
            f"  LEAST(v.through, (SELECT coalesce(min(o.chat_offset) - 1, v.through)"
            f"   FROM {s}.outbox o WHERE o.chat_id = v.chat_id))"
            "  ELSE v.after END AS through, v.after"
            " FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[])"
            "  AS v (chat_id, last_offset, after, through)),"
            f" gone AS (DELETE FROM {s}.events e USING v WHERE e.chat_id = v.chat_id"
            "  AND e.chat_offset > v.after AND e.chat_offset <= v.through)"
            f" UPDATE {s}.chats c SET last_offset = v.last_offset,"
            " pruned_through = GREATEST(c.pruned_through, v.through)"
            " FROM v WHERE c.chat_id = v.chat_id")
        self.replay = (
            f"SELECT c.epoch, c.pruned_through, e.chat_offset, e.body FROM {s}.chats c"
            f" LEFT JOIN {s}.events e ON e.chat_id = c.chat_id AND e.chat_offset > %s"
            " WHERE c.chat_id = %s ORDER BY e.chat_offset")
        self.newest = (
            f"SELECT c.epoch, e.chat_offset, e.body FROM {s}.chats c"
            f" JOIN {s}.events e ON e.chat_id = c.chat_id WHERE c.chat_id = %s"
            " ORDER BY e.chat_offset DESC LIMIT %s")
        self.range = (
            f"SELECT c.epoch, e.chat_offset, e.body FROM {s}.chats c"
            f" JOIN {s}.events e ON e.chat_id = c.chat_id WHERE c.chat_id = %s"
            " AND e.chat_offset BETWEEN %s AND %s ORDER BY e.chat_offset")
        self.pruned_through = f"SELECT pruned_through FROM {s}.chats WHERE chat_id = %s"
        self.heads = (f"SELECT chat_id, epoch, last_offset FROM {s}.chats"
                      " WHERE chat_id = ANY(%b::text[])")
        self.outbox = (
            "SELECT o.id, o.destination, o.chat_id, c.epoch, o.chat_offset, e.body, e.source"
            f" FROM {s}.outbox o JOIN {s}.events e"
            " ON e.chat_id = o.chat_id AND e.chat_offset = o.chat_offset"
            f" JOIN {s}.chats c ON c.chat_id = o.chat_id"
            " WHERE o.queued_at <= now() - make_interval(secs => %s)"
            " ORDER BY o.id LIMIT %s")
        self.outbox_done = f"DELETE FROM {s}.outbox WHERE id = ANY(%b::bigint[])"
        self.outbox_depth = f"SELECT count(*) FROM {s}.outbox"
        self.aged = (  # per chat, the newest offset stored before the cutoff
            f"SELECT chat_id, max(chat_offset) FROM {s}.events"
            " WHERE stored_at < coalesce(to_timestamp(%s::float8),"
            "  now() - make_interval(secs => %s))"
            " GROUP BY chat_id ORDER BY chat_id")
        self.lock_pruned = (
            f"SELECT chat_id, pruned_through FROM {s}.chats WHERE chat_id = ANY(%b::text[])"
            " ORDER BY chat_id FOR UPDATE")
        self.prune = (
            "WITH v AS ("
            " SELECT v.chat_id, v.after, LEAST(v.through, (SELECT coalesce("
            f"  min(o.chat_offset) - 1, v.through) FROM {s}.outbox o"
            "  WHERE o.chat_id = v.chat_id)) AS through"
            " FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS v (chat_id, after, through)),"
            f" gone AS (DELETE FROM {s}.events e USING v WHERE e.chat_id = v.chat_id"
            "  AND e.chat_offset > v.after AND e.chat_offset <= v.through RETURNING 1),"
            f" marked AS (UPDATE {s}.chats c SET pruned_through = v.through FROM v"
            "  WHERE c.chat_id = v.chat_id AND v.through > c.pruned_through)"
            " SELECT count(*) FROM gone")


def _body(raw: Any) -> dict[str, Any]:
    """A body as read back (jsonb arrives decoded, text as JSON)."""
    if isinstance(raw, str):
        loaded: dict[str, Any] = json.loads(raw)
        return loaded
    return dict(raw)


class ClusterStore:
    """The PostgreSQL side, synchronous: every method runs on the cluster plugin's worker thread.

    ``dsn`` is a libpq connection string or URI; ``schema`` holds the tables (created if
    absent); ``instance`` names this daemon in ``pg_stat_activity`` (``application_name``).
    ``statement_timeout_s`` bounds every statement (the worker thread cannot be cancelled),
    ``connect_timeout_s`` every connection attempt.
    """

    def __init__(self, dsn: str, schema: str, *, retention_count: int,
                 retention_age_s: float, instance: str, statement_timeout_s: float = 10.0,
                 connect_timeout_s: float = 5.0) -> None:
        if retention_count < 1 or retention_age_s <= 0:
            raise ValueError("cluster store: retention_count and retention_age_s must be > 0")
        self.dsn = dsn
        self.schema = schema
        self.retention_count = retention_count
        self.retention_age_s = retention_age_s
        self.instance = instance
        self.statement_timeout_s = statement_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._q = _Queries(schema)
        self._conn: psycopg.Connection[Any] | None = None
        self._leader: psycopg.Connection[Any] | None = None
        self._leading = False
        self._closed = False
        #: chats whose rows exist (committed): an append to them only locks them
        self._known: set[str] = set()
        with self._guard() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         (_lock_key(schema, "ddl"),))
            conn.execute(self._q.ddl)

    # -- connections --------------------------------------------------------------------------

    def _connect(self, purpose: str) -> psycopg.Connection[Any]:
        extra: dict[str, Any] = {}
        if purpose == "leader":  # a dead peer's lock goes when its socket is found dead
            extra = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                     "keepalives_count": 3}
        conn = psycopg.connect(self.dsn, autocommit=True,
                               connect_timeout=max(1, round(self.connect_timeout_s)),
                               application_name=f"bridged-{self.instance}-{purpose}"[:63],
                               **extra)
        try:
            conn.execute("SELECT set_config('statement_timeout', %s, false)",
                         (f"{round(self.statement_timeout_s * 1000)}ms",))
            if purpose == "leader":  # the server's side of the same keepalives
                conn.execute("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;"
                             " SET tcp_keepalives_count = 3")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _guard(self) -> Iterator[psycopg.Connection[Any]]:
        """The main connection (connected if need be); a database failure inside raises
        :class:`StoreUnavailable`, dropping the connection if it is broken."""
        if self._closed:
            raise RuntimeError("cluster store: closed")
        try:
            if self._conn is None:
                self._conn = self._connect("main")
            yield self._conn
        except _UNAVAILABLE as e:
            conn, self._conn = self._conn, None
            if conn is not None and not conn.closed and not conn.broken:
                self._conn = conn  # a timeout or a rollback: the connection is fine
            elif conn is not None:
                conn.close()
            raise StoreUnavailable(f"cluster store: {type(e).__name__}: {e}".strip()) from e

    def close(self) -> None:
        """Close both connections (the leadership goes with its connection)."""
        self._closed = True
        for conn in (self._conn, self._leader):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self._conn = self._leader = None
        self._leading = False

    # -- writes -------------------------------------------------------------------------------

    def append(self, events: Sequence[NewEvent]) -> list[StoredEvent]:
        """Store ``events`` in one transaction; the stored events, aligned with ``events``,
        after the commit. An event whose ``source_key`` its chat holds already (stored
        earlier, or earlier in this batch) is not written: its result is the original event
        with ``duplicate=True``, and it gets no outbox rows."""
        if not events:
            return []
        q = self._q
        chat_ids = sorted({e.chat_id for e in events})
        with self._guard() as conn, conn.transaction():
            if not self._known.issuperset(chat_ids):
                conn.execute(q.create_chats, (chat_ids,))
            chats = {c: (epoch, last, pruned) for c, epoch, last, pruned
                     in conn.execute(q.lock_chats, (chat_ids,))}
            if len(chats) < len(chat_ids):  # remembered, but gone (the tables were reset)
                self._known.clear()
                conn.execute(q.create_chats, (chat_ids,))
                chats = {c: (epoch, last, pruned) for c, epoch, last, pruned
                         in conn.execute(q.lock_chats, (chat_ids,))}
            # the lock is held: nobody else can store these keys until we commit
            keyed = [(e.chat_id, e.source_key) for e in events if e.source_key is not None]
            seen: dict[tuple[str, str], StoredEvent] = {}
            if keyed:
                for c, key, offset, raw in conn.execute(
                        q.find_keys, ([c for c, _ in keyed], [k for _, k in keyed])):
                    seen[c, key] = StoredEvent(c, chats[c][0], offset,
                                               event_id(chats[c][0], offset), _body(raw),
                                               duplicate=True)
            last = {c: v[1] for c, v in chats.items()}
            results: list[StoredEvent] = []
            new: list[tuple[NewEvent, StoredEvent]] = []
            for e in events:
                if e.source_key is not None and (e.chat_id, e.source_key) in seen:
                    results.append(seen[e.chat_id, e.source_key])
                    continue
                epoch = chats[e.chat_id][0]
                offset = last[e.chat_id] = last[e.chat_id] + 1
                eid = event_id(epoch, offset)
                stored = StoredEvent(e.chat_id, epoch, offset, eid, {**e.body, "eventId": eid},
                                     duplicate=False)
                results.append(stored)
                new.append((e, stored))
                if e.source_key is not None:
                    seen[e.chat_id, e.source_key] = dataclasses.replace(stored, duplicate=True)
            if new:
                conn.execute(q.insert_events, (
                    [s.chat_id for _, s in new], [s.offset for _, s in new],
                    [_ENCODER.encode(s.body) for _, s in new], [e.source for e, _ in new],
                    [e.source_key for e, _ in new]))
            boxes = [(d, s.chat_id, s.offset) for e, s in new for d in e.outboxes]
            if boxes:
                conn.execute(q.insert_outbox, ([d for d, _, _ in boxes],
                                               [c for _, c, _ in boxes],
                                               [o for _, _, o in boxes]))
            grown = [c for c in chat_ids if last[c] != chats[c][1]]
            if grown:
                keep = self.retention_count
                conn.execute(q.advance, (
                    grown, [last[c] for c in grown], [chats[c][2] for c in grown],
                    [max(chats[c][2], last[c] - keep) for c in grown]))
        self._known.update(chat_ids)  # committed
        if len(self._known) > KNOWN_CHATS:
            self._known.clear()
        return results

    def prune(self, now: float | None = None) -> int:
        """Age retention: prune, in every chat, the events stored more than
        ``retention_age_s`` before ``now`` (Unix time; None: the server's clock), with
        every older offset, except those still in the outbox and what follows them. The
        number of events removed."""
        with self._guard() as conn:
            cutoff = None if now is None else now - self.retention_age_s
            aged = conn.execute(self._q.aged, (cutoff, self.retention_age_s)).fetchall()
        removed = 0
        for i in range(0, len(aged), PRUNE_CHATS):
            chunk = dict(aged[i:i + PRUNE_CHATS])
            with self._guard() as conn, conn.transaction():
                locked = conn.execute(self._q.lock_pruned, (list(chunk),)).fetchall()
                todo = [(c, after) for c, after in locked if chunk[c] > after]
                if todo:
                    row = conn.execute(self._q.prune, (
                        [c for c, _ in todo], [a for _, a in todo],
                        [chunk[c] for c, _ in todo])).fetchone()
                    removed += int(row[0]) if row else 0
        return removed

    # -- reads --------------------------------------------------------------------------------

    def replay(self, chat_id: str, epoch: int, after: int) -> list[StoredEvent] | None:
        """The kept events of ``chat_id`` with offsets above ``after``, oldest first; None
        when the chat cannot be resumed from ``(epoch, after)``: it exists with another
        epoch, or some event after ``after`` was pruned. An unknown chat: [] (any epoch).
        One statement, so one snapshot for the chat row and its events."""
        with self._guard() as conn:
            rows = conn.execute(self._q.replay, (after, chat_id)).fetchall()
        if not rows:
            return []
        chat_epoch, pruned = rows[0][0], rows[0][1]
        if chat_epoch != epoch or after < pruned:
            return None
        return [StoredEvent(chat_id, chat_epoch, offset, event_id(chat_epoch, offset),
                            _body(raw), duplicate=False)
                for _, _, offset, raw in rows if offset is not None]

    def newest(self, chat_id: str, n: int) -> list[StoredEvent]:
        """The newest ``n`` kept events of ``chat_id``, oldest first."""
        with self._guard() as conn:
            rows = conn.execute(self._q.newest, (chat_id, max(n, 0))).fetchall()
        return [StoredEvent(chat_id, epoch, offset, event_id(epoch, offset), _body(raw),
                            duplicate=False) for epoch, offset, raw in reversed(rows)]

    def range(self, chat_id: str, first: int, last: int) -> list[StoredEvent]:
        """The kept events of ``chat_id`` with offsets ``first`` through ``last``, in order
        (a live-path gap fill)."""
        with self._guard() as conn:
            rows = conn.execute(self._q.range, (chat_id, first, last)).fetchall()
        return [StoredEvent(chat_id, epoch, offset, event_id(epoch, offset), _body(raw),
                            duplicate=False) for epoch, offset, raw in rows]

    def pruned_through(self, chat_id: str) -> int:
        """The greatest offset of ``chat_id`` retention removed; 0 when none (or no chat)."""
        with self._guard() as conn:
            row = conn.execute(self._q.pruned_through, (chat_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def heads(self, chat_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``(epoch, last_offset)`` per chat, in one query; unknown chats are left out."""
        if not chat_ids:
            return {}
        with self._guard() as conn:
            rows = conn.execute(self._q.heads, (list(chat_ids),)).fetchall()
        return {c: (epoch, last) for c, epoch, last in rows}

    def head(self, chat_id: str) -> tuple[int, int] | None:
        """``(epoch, last_offset)`` of ``chat_id``; None for an unknown chat."""
        return self.heads([chat_id]).get(chat_id)

    # -- outbox -------------------------------------------------------------------------------

    def outbox(self, limit: int, *, older_than_s: float = 0.0) -> list[OutboxRow]:
        """Up to ``limit`` outbox rows queued at least ``older_than_s`` ago (by the server's
        clock, at the start of their transaction), oldest first. The order is by id, which
        is not quite commit order; the sweeper takes whatever is left, so that is fine."""
        with self._guard() as conn:
            rows = conn.execute(self._q.outbox, (older_than_s, limit)).fetchall()
        return [OutboxRow(i, destination, StoredEvent(c, epoch, offset,
                                                      event_id(epoch, offset), _body(raw),
                                                      duplicate=False), source or "")
                for i, destination, c, epoch, offset, raw, source in rows]

    def outbox_done(self, ids: Sequence[int]) -> None:
        """Remove the outbox rows ``ids`` (published); ids already gone are ignored."""
        if ids:
            with self._guard() as conn:
                conn.execute(self._q.outbox_done, (list(ids),))

    def outbox_depth(self) -> int:
        """The number of outbox rows."""
        with self._guard() as conn:
            row = conn.execute(self._q.outbox_depth).fetchone()
        return 0 if row is None else int(row[0])

    # -- leadership and health ----------------------------------------------------------------

    def try_lead(self) -> bool:
        """Whether this store is the leader: it holds the session-level advisory lock of
        the schema on its leader connection, so the lock dies with that connection (or this
        process). Takes the lock when it is free; while it is held, checks that the
        connection is alive (a ``SELECT 1``). A connection that died, or cannot be made, is
        dropped and False returned; the next call connects again."""
        if self._closed:
            raise RuntimeError("cluster store: closed")
        try:
            if self._leader is None:
                self._leading = False
                self._leader = self._connect("leader")
            if self._leading:
                self._leader.execute("SELECT 1")
            else:
                row = self._leader.execute(
                    "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                    (_lock_key(self.schema, "leader"),)).fetchone()
                self._leading = bool(row and row[0])
        except psycopg.Error as e:
            if self._leading:
                log.warning("cluster store: leadership lost: %s", e)
            self._drop_leader()
            return False
        return self._leading

    def _drop_leader(self) -> None:
        conn, self._leader, self._leading = self._leader, None, False
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def ping(self) -> float:
        """Seconds a ``SELECT 1`` takes on the main connection (a readiness probe)."""
        with self._guard() as conn:
            start = time.perf_counter()
            conn.execute("SELECT 1")
            return time.perf_counter() - start
