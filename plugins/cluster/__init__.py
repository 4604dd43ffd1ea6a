"""Built-in plugin ``cluster`` (opt-in): several bridged instances serve one chat in one order.

Enabled with ``[plugins] enable = ["cluster"]`` and ``disable = ["history"]``
(docs/cluster.md, ``config.cluster.example.toml``). PostgreSQL is the log and RabbitMQ rings
the bell (research/cluster.md §0):

* **Write**: ``bridge_persist_messages`` stores a batch in one transaction. Each chat's row
  is locked, the batch is deduplicated (a client message id, a notification's AMQP message
  id), each event gets the chat's next offset, and its outbox rows (one per durable
  destination: the AMQP ``chat`` exchange) are written. The event id is
  ``9<epoch:3><offset:16>``: 20 digits, so it keeps the seed contract's pattern, greater
  than every single-process id, increasing in the chat's order on every instance. The
  pipeline delivers the stored messages (:mod:`.fronts`), so the sender's echo carries the
  id PostgreSQL gave.
* **Live**: the chat transport's front publishes each stored event on the backplane
  (:mod:`.backplane`) and hands it to the local :mod:`.sequencer`; the other instances'
  sequencers take it from the backplane. Holes are repaired from PostgreSQL.
* **Resume**: ``bridge_replay_messages`` reads PostgreSQL, so ``since`` works on any
  instance. An id of another epoch, or of the single-process format, cannot be resumed
  (:class:`bridge.ReplayGap`: close 4410 / HTTP 410, as for a pruned ``since``).
* **Outbox**: one instance at a time (a PostgreSQL advisory lock) publishes the outbox to
  the AMQP transport with confirms, then deletes it: the spool is never on one instance's
  disk, and an instance that dies leaves its events to the next lock holder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict

from bridge import (
    CHAT_EVENT,
    CLIENT_MSG_ID,
    CLIENT_MSG_RETRY,
    ContractError,
    Message,
    PluginContext,
    ReplayGap,
    Secret,
    StorageUnavailable,
    TransportContext,
    hookimpl,
    positive,
    setting,
)

from .backplane import Backplane
from .db import Database
from .fronts import ChatFront, OutboxFront
from .sequencer import Sequencer
from .store import ClusterStore, NewEvent, OutboxRow, StoredEvent, parse_event_id

log = logging.getLogger("bridge.cluster")

#: ``since`` forms (bridge/hookspecs.py)
LAST = re.compile(r"last:([0-9]{1,6})", re.ASCII)
ANY_EVENT_ID = re.compile(r"[0-9]{20}", re.ASCII)
FIRST_EVENT_ID = "0" * 20
#: how often a draining leader counts the outbox for its gauge (and once it is empty)
DEPTH_EVERY_S = 5.0
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}", re.ASCII)


def _schema_name(v: Any) -> str | None:
    return None if _SCHEMA_NAME.fullmatch(v) else "must be a lower-case SQL identifier"


def _database_url(v: Any) -> str | None:
    """A ``setting`` check: libpq must be able to parse the URL (or key=value string)."""
    try:
        conninfo_to_dict(str(v))
    except psycopg.ProgrammingError as e:
        return f"not a PostgreSQL connection string: {e}"
    return None


@dataclass(frozen=True)
class ClusterSettings:
    database_url: Secret = setting(
        Secret("postgresql://postgres@127.0.0.1:5432/test"), check=_database_url,
        doc="PostgreSQL URL; database_url_file / _env / _credential keep the password out")
    schema: str = setting("bridged", check=_schema_name,
                          doc="the schema of the history tables (created if absent)")
    backplane: str = setting("", doc="the amqp transport whose broker carries the backplane"
                             " (empty: the only amqp transport)")
    exchange: str = setting("bridged.cluster", doc="the backplane's topic exchange")
    backplane_queue_max: int = setting(
        10000, check=positive, doc="backplane messages an instance holds at most; the oldest"
        " are dropped and read again from PostgreSQL")
    gap_wait_s: float = setting(0.3, check=positive,
                                doc="how long a hole in a chat's order waits for its event"
                                " before it is read from PostgreSQL")
    head_check_interval_s: float = setting(
        2.0, check=positive, doc="how often every local chat's head is checked (the bound"
        " on catching up while the backplane is down)")
    outbox_poll_s: float = setting(1.0, check=positive,
                                   doc="how often the outbox is looked at when nothing woke it")
    retention_count: int = setting(1000, check=positive, doc="events kept per chat, newest")
    retention_age_s: float = setting(7 * 24 * 3600.0, check=positive,
                                     doc="events older than this (since stored) are pruned")
    prune_interval_s: float = setting(60.0, check=positive,
                                      doc="how often the age pruning runs")


def _source_key(message: Message, amqp_sources: frozenset[str]) -> str | None:
    """The dedupe key of a chat event, unique per chat: the client's message id, or for an
    event made from a consumed notification its AMQP message id, else a hash of what the
    notification said (so a redelivery to another instance makes no second event)."""
    client_id = message.meta.get(CLIENT_MSG_ID)
    if client_id:
        return f"c:{client_id}"
    source_id = message.meta.get("source_message_id")
    if source_id:
        return f"n:{source_id}"
    if message.source in amqp_sources:
        items = json.dumps(message.body.get("message"), sort_keys=True, default=str)
        return "h:" + hashlib.sha256(items.encode()).hexdigest()
    return None


def _message(event: StoredEvent) -> Message:
    return Message(CHAT_EVENT, event.body, "history", event.event_id, event.chat_id)


class Plugin:
    """Cluster mode of one daemon."""

    def __init__(self) -> None:
        self.settings = ClusterSettings()
        self.instance = ""
        self.chats: dict[str, ChatFront] = {}
        self.outboxes: dict[str, OutboxFront] = {}
        self.writer: Database | None = None
        self.reader: Database | None = None
        self.sequencer = Sequencer(self._deliver_local, self._fetch, self._head, self._heads,
                                   gap_wait_s=self.settings.gap_wait_s, count=self._count)
        self.backplane: Backplane | None = None
        self.leading = False
        self._outbox_woken = trio.Event()
        self._ctx: TransportContext | None = None
        self._depth_due = 0.0  # when the outbox depth gauge is read again

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def bridge_settings_class(self) -> type[ClusterSettings]:
        return ClusterSettings

    @hookimpl
    def bridge_wrap_transport(self, name: str, transport: Any) -> Any | None:
        if callable(getattr(transport, "watch_chats", None)):
            front = self.chats[name] = ChatFront(transport, self)
            return front
        if callable(getattr(transport, "publish_confirmed", None)):
            outbox = self.outboxes[name] = OutboxFront(transport, self)
            return outbox
        return None

    @hookimpl
    async def bridge_startup(self, context: PluginContext) -> None:
        if context.settings is not None:
            self.settings = context.settings
        s = self.settings
        self.instance = context.instance or "bridged"
        self.sequencer.gap_wait_s = s.gap_wait_s
        if len(self.chats) > 1:
            raise ValueError("cluster mode serves one chat transport; configure one"
                             " websocket transport")

        def open_store() -> ClusterStore:
            return ClusterStore(str(s.database_url), s.schema,
                                retention_count=s.retention_count,
                                retention_age_s=s.retention_age_s, instance=self.instance)

        self.writer = Database("writer", open_store, self._observe_db)
        self.reader = Database("reader", open_store, self._observe_db)
        try:
            await self.writer.run(lambda store: None)  # the schema exists before any write
        except StorageUnavailable as e:
            log.warning("cluster: PostgreSQL is not reachable yet (%s); writes are refused"
                        " until it is", e)
        log.info("cluster: instance %s, history in PostgreSQL schema %s", self.instance,
                 s.schema)

    @hookimpl
    async def bridge_shutdown(self, context: PluginContext) -> None:
        for db in (self.writer, self.reader):
            if db is not None:
                await db.aclose()

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message],
                                      destinations: Sequence[tuple[str, ...]]
                                      ) -> list[Message] | None:
        picked = [(i, m) for i, m in enumerate(messages)
                  if m.kind == CHAT_EVENT and m.chat_id and not m.meta.get(CLIENT_MSG_RETRY)]
        if not picked:
            return None
        amqp = frozenset(self.outboxes)
        new = [NewEvent(str(m.chat_id), dict(m.body), _source_key(m, amqp),
                        tuple(d for d in destinations[i] if d in self.outboxes), m.source)
               for i, m in picked]
        stored = await self._writer().run(lambda store: store.append(new))
        out = list(messages)
        for (i, m), event in zip(picked, stored, strict=True):
            meta = {**m.meta, CLIENT_MSG_RETRY: True} if event.duplicate else m.meta
            out[i] = m.evolve(id=event.event_id, body=event.body, meta=meta)
        if any(not e.duplicate and e_new.outboxes for e, e_new in zip(stored, new, strict=True)):
            self.outbox_wake()
        return out

    @hookimpl
    async def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        reader = self._reader()
        last = LAST.fullmatch(since)
        if last is not None:
            n = int(last.group(1))
            return [_message(e) for e in await reader.run(lambda st: st.newest(chat_id, n))]
        if not ANY_EVENT_ID.fullmatch(since):
            raise ContractError("since: must be an eventId of 20 decimal digits (rule: pattern)",
                                field="since", rule="pattern")
        if since == FIRST_EVENT_ID:  # from the start: a gap once anything was pruned
            def from_start(st: ClusterStore) -> list[StoredEvent] | None:
                head = st.head(chat_id)
                return [] if head is None else st.replay(chat_id, head[0], 0)
            rows = await reader.run(from_start)
        else:
            parsed = parse_event_id(since)
            if parsed is None:
                raise ReplayGap(f"chat {chat_id}: {since} is not an event id of this cluster"
                                " (single-process history); reconnect without since")
            epoch, offset = parsed
            rows = await reader.run(lambda st: st.replay(chat_id, epoch, offset))
        if rows is None:
            raise ReplayGap(f"chat {chat_id}: events after {since} are no longer kept;"
                            " reconnect without since to start from the present")
        return [_message(e) for e in rows]

    # ------------------------------------------------------------------ running

    async def run_cluster(self, ctx: TransportContext, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """The cluster's tasks, beside the chat transport (whose metrics they use): the
        backplane, the repairs, the outbox drainer and the pruning."""
        self._ctx = ctx
        s = self.settings
        amqp = self._backplane_transport()
        self.backplane = Backplane(
            instance=f"{self.instance}/{secrets.token_hex(4)}",
            url=str(amqp.settings.url), tls=amqp.tls,
            exchange=s.exchange, max_length=s.backplane_queue_max,
            wants=self.sequencer.wants, arrived=self._arrived,
            connected=self.sequencer.check_heads, count=self._count_plain,
            observe=self._observe)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.backplane.run)
            nursery.start_soon(self.sequencer.repair_forever, s.head_check_interval_s)
            nursery.start_soon(self._drain_outbox_forever)
            nursery.start_soon(self._prune_forever)
            nursery.start_soon(self._probe_forever)
            task_status.started()

    def _backplane_transport(self) -> Any:
        s = self.settings
        if s.backplane:
            if s.backplane not in self.outboxes:
                raise ValueError(f"[plugins.cluster] backplane = {s.backplane!r}: no amqp"
                                 f" transport of that name (have: {', '.join(self.outboxes)})")
            return self.outboxes[s.backplane].inner
        if len(self.outboxes) != 1:
            raise ValueError("[plugins.cluster] backplane: name the amqp transport whose"
                             " broker carries the backplane")
        return next(iter(self.outboxes.values())).inner

    async def stored(self, events: Sequence[Message]) -> None:
        """Events this instance stored, on their way to its sockets: the others get them
        from the backplane."""
        if self.backplane is not None:
            await self.backplane.publish(events)

    async def _arrived(self, events: list[Message]) -> None:
        if self.leading:
            self.outbox_wake()  # another instance stored events: some may be in the outbox
        await self.sequencer.offer(events)

    async def _deliver_local(self, events: Sequence[Message]) -> None:
        for front in self.chats.values():
            await front.inner.deliver(events)

    async def _fetch(self, chat_id: str, first: int, last: int) -> list[Message]:
        rows = await self._reader().run(lambda st: st.range(chat_id, first, last))
        return [_message(e) for e in rows]

    async def _head(self, chat_id: str) -> tuple[int, int] | None:
        return await self._reader().run(lambda st: st.head(chat_id))

    async def _heads(self, chat_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        return await self._reader().run(lambda st: st.heads(chat_ids))

    # ------------------------------------------------------------------ outbox

    def outbox_wake(self) -> None:
        self._outbox_woken.set()

    async def _drain_outbox_forever(self) -> None:
        s = self.settings
        while True:
            was = self.leading
            try:
                self.leading = await self._reader().run(lambda st: st.try_lead())
            except Exception as e:  # the database is away: someone else may lead meanwhile
                log.debug("cluster: outbox lock not checked: %s", e)
                self.leading = False
            if self.leading != was:
                log.info("cluster: this instance %s the outbox",
                         "drains" if self.leading else "no longer drains")
            if not self.leading:
                await trio.sleep(s.outbox_poll_s)
                continue
            try:
                drained = await self._drain_outbox()
            except Exception as e:  # broker or database down: try again shortly
                log.warning("cluster: outbox not drained: %s", e)
                drained = False
                await trio.sleep(s.outbox_poll_s)
            if not drained:
                with trio.move_on_after(s.outbox_poll_s):
                    await self._outbox_woken.wait()
                self._outbox_woken = trio.Event()

    async def _drain_outbox(self) -> bool:
        """Publish one batch of the outbox; whether there was anything."""
        rows = await self._reader().run(lambda st: st.outbox(256))
        now = trio.current_time()
        if self._ctx is not None and (not rows or now >= self._depth_due):
            depth = await self._reader().run(lambda st: st.outbox_depth())  # a count(*)
            self._ctx.gauge("cluster_outbox_depth", depth)
            self._depth_due = now + DEPTH_EVERY_S
        if not rows:
            return False
        done: list[int] = []
        try:
            i = 0
            while i < len(rows):  # runs of one destination, in order
                j = i
                while j < len(rows) and rows[j].destination == rows[i].destination:
                    j += 1
                front = self.outboxes.get(rows[i].destination)
                if front is None:
                    log.error("cluster: outbox rows for %s, which is not configured;"
                              " dropped", rows[i].destination)
                else:
                    await front.inner.publish_confirmed(
                        [self._outgoing(r.event, r) for r in rows[i:j]])
                done += [r.id for r in rows[i:j]]
                i = j
        finally:
            if done:
                await self._reader().run(lambda st: st.outbox_done(done))
        return True

    @staticmethod
    def _outgoing(event: StoredEvent, row: OutboxRow) -> Message:
        """The message an outbox row publishes: its event, from the transport it came from
        (the routing key may name it). The store keeps no hop count: what is published
        carries hop 1, as a client update does in single-process mode."""
        return Message(CHAT_EVENT, event.body, row.source or "cluster", event.event_id,
                       event.chat_id)

    # ------------------------------------------------------------------ upkeep

    async def _prune_forever(self) -> None:
        while True:
            try:
                removed = await self._reader().run(lambda st: st.prune())
                if removed:
                    log.info("cluster: pruned %d events older than %.0f s", removed,
                             self.settings.retention_age_s)
            except Exception as e:
                log.warning("cluster: pruning failed: %s", e)
            await trio.sleep(self.settings.prune_interval_s)

    async def _probe_forever(self) -> None:
        """Ask PostgreSQL every head-check interval, so readiness follows it while idle."""
        while True:
            with contextlib.suppress(StorageUnavailable):  # Database.error tells /readyz
                seconds = await self._writer().run(lambda st: st.ping())
                self._observe("cluster_db_ping_seconds", seconds)
            await trio.sleep(self.settings.head_check_interval_s)

    def problems(self) -> list[str]:
        """What keeps this instance from being ready, for ``/readyz``."""
        out = []
        for db in (self.writer, self.reader):
            if db is not None and db.error is not None:
                out.append(f"cluster: database ({db.name}): {db.error}")
        if self.backplane is not None and not self.backplane.connected:
            out.append(f"cluster: backplane not connected: {self.backplane.last_error}")
        return out

    # ------------------------------------------------------------------ helpers

    def _writer(self) -> Database:
        if self.writer is None:
            raise StorageUnavailable("cluster: not started")
        return self.writer

    def _reader(self) -> Database:
        if self.reader is None:
            raise StorageUnavailable("cluster: not started")
        return self.reader

    def _count(self, metric: str, kind: str) -> None:
        if self._ctx is not None:
            self._ctx.count(metric, kind=kind)

    def _count_plain(self, metric: str, amount: float = 1.0) -> None:
        if self._ctx is not None:
            self._ctx.count(metric, amount)

    def _observe(self, metric: str, value: float) -> None:
        if self._ctx is not None:
            self._ctx.observe(metric, value)

    def _observe_db(self, seconds: float) -> None:
        self._observe("cluster_db_seconds", seconds)
