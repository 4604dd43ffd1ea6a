"""The cluster's PostgreSQL store: offsets, dedupe, outbox, replay, retention, leadership,
concurrent writers, a server that drops the connection, instances creating the schema at once.

Needs PostgreSQL: ``BRIDGED_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Every test works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from bridge_plugins.cluster.store import (
    EVENT_ID,
    ClusterStore,
    NewEvent,
    StoredEvent,
    StoreUnavailable,
    event_id,
    parse_event_id,
)

DSN = os.environ.get("BRIDGED_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

Make = Callable[..., ClusterStore]


def admin(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a connection of its own (autocommit); its rows, if any."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"test_cluster_{uuid.uuid4().hex[:12]}"
    yield name
    admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def make(schema: str) -> Iterator[Make]:
    """Build stores on the test's schema (closed at the end); settings as keywords."""
    stores: list[ClusterStore] = []

    def build(**kwargs: Any) -> ClusterStore:
        settings: dict[str, Any] = {"retention_count": 1000, "retention_age_s": 3600.0,
                                    "instance": f"t{len(stores)}"}
        settings.update(kwargs)
        store = ClusterStore(DSN, schema, **settings)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


@pytest.fixture
def store(make: Make) -> ClusterStore:
    return make()


def ev(chat: str, n: int = 0, key: str | None = None, outboxes: tuple[str, ...] = (),
       source: str = "websocket") -> NewEvent:
    return NewEvent(chat, {"type": "message", "text": f"m{n}", "eventId": "stale"}, key,
                    outboxes, source)


def offsets(events: list[StoredEvent] | None) -> list[int]:
    assert events is not None
    return [e.offset for e in events]


def backends(application_name: str) -> list[int]:
    return [pid for (pid,) in admin(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,))]


def leads_soon(store: ClusterStore) -> bool:
    """``store.try_lead()``, tried for a few seconds: a closed connection's backend lets go of
    its locks a moment after the client has gone."""
    deadline = time.monotonic() + 5.0
    while not store.try_lead():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_event_ids() -> None:
    eid = event_id(123, 45)
    assert eid == "91230000000000000045"
    assert EVENT_ID.fullmatch(eid)
    assert parse_event_id(eid) == (123, 45)
    assert parse_event_id(event_id(999, 10**16 - 1)) == (999, 10**16 - 1)
    for other in ("17000000000000000000", "9123", "912300000000000000451", "9x230000000000000045",
                  ""):
        assert parse_event_id(other) is None


def test_offsets_are_gapless_and_in_input_order(store: ClusterStore) -> None:
    first = store.append([ev("b", 0), ev("a", 1), ev("b", 2), ev("c", 3), ev("a", 4)])
    assert [(e.chat_id, e.offset) for e in first] == [
        ("b", 1), ("a", 1), ("b", 2), ("c", 1), ("a", 2)]
    second = store.append([ev("a", 5), ev("b", 6)])
    assert [(e.chat_id, e.offset) for e in second] == [("a", 3), ("b", 3)]
    for e in first + second:
        assert not e.duplicate
        assert e.event_id == event_id(e.epoch, e.offset)
        assert e.body["eventId"] == e.event_id
        assert 100 <= e.epoch <= 999
    # one epoch per chat, stored bodies as returned
    assert len({e.epoch for e in first + second if e.chat_id == "a"}) == 1
    assert store.range("a", 1, 3) == [e for e in first + second if e.chat_id == "a"]
    assert store.append([]) == []
    rows = admin(f'SELECT source, source_key, stored_at FROM "{store.schema}".events LIMIT 1')
    assert rows[0][0] == "websocket"
    assert rows[0][1] is None
    assert rows[0][2] is not None


def test_dedupe_across_batches_returns_the_original(store: ClusterStore) -> None:
    (original,) = store.append([ev("a", 1, key="c:1", outboxes=("chat",))])
    again = store.append([ev("a", 2, key="c:1", outboxes=("chat",)), ev("a", 3, key="c:2")])
    assert again[0].duplicate
    assert (again[0].offset, again[0].event_id, again[0].body) == (
        original.offset, original.event_id, original.body)
    assert again[0].body["text"] == "m1"  # the original's body, not the retry's
    assert again[1].offset == 2  # the duplicate took no offset
    assert store.head("a") == (original.epoch, 2)
    assert store.outbox_depth() == 1  # none for the duplicate
    # the same key in another chat is another event
    (other,) = store.append([ev("b", 4, key="c:1")])
    assert not other.duplicate


def test_dedupe_within_one_batch(store: ClusterStore) -> None:
    got = store.append([ev("a", 1, key="n:x", outboxes=("chat",)),
                        ev("a", 2, key="n:x", outboxes=("chat",)),
                        ev("a", 3, outboxes=("chat",)),
                        ev("a", 4, key="n:x", outboxes=("chat",))])
    assert [(e.offset, e.duplicate) for e in got] == [(1, False), (1, True), (2, False),
                                                       (1, True)]
    assert got[1].body == got[0].body
    assert got[1].body["text"] == "m1"
    assert store.head("a") == (got[0].epoch, 2)
    assert store.outbox_depth() == 2
    assert [r.event.offset for r in store.outbox(10)] == [1, 2]


def test_outbox_rows_per_destination(store: ClusterStore) -> None:
    got = store.append([ev("a", 1, outboxes=("chat", "cluster")), ev("b", 2),
                        ev("a", 3, outboxes=("cluster",))])
    assert store.outbox_depth() == 3
    rows = store.outbox(10)
    assert [(r.destination, r.event.chat_id, r.event.offset) for r in rows] == [
        ("chat", "a", 1), ("cluster", "a", 1), ("cluster", "a", 2)]
    assert rows[0].event == got[0]
    assert rows[0].id < rows[1].id < rows[2].id
    assert [r.id for r in store.outbox(2)] == [rows[0].id, rows[1].id]
    assert store.outbox(10, older_than_s=60.0) == []  # all queued just now
    store.outbox_done([rows[0].id, rows[2].id])
    assert store.outbox_depth() == 1
    assert [r.id for r in store.outbox(10)] == [rows[1].id]
    store.outbox_done([rows[0].id, rows[1].id])  # already gone: ignored
    store.outbox_done([])
    assert store.outbox_depth() == 0
    assert store.outbox(10) == []


def test_replay(store: ClusterStore) -> None:
    got = store.append([ev("a", n) for n in range(5)])
    epoch = got[0].epoch
    assert store.replay("a", epoch, 0) == got
    assert offsets(store.replay("a", epoch, 3)) == [4, 5]
    assert store.replay("a", epoch, 5) == []
    assert store.replay("a", epoch, 99) == []  # never stored: nothing after it
    wrong = 100 if epoch != 100 else 101
    assert store.replay("a", wrong, 3) is None
    assert store.replay("unknown", 555, 7) == []


def test_newest_range_heads(store: ClusterStore) -> None:
    a = store.append([ev("a", n) for n in range(6)])
    b = store.append([ev("b", 0)])
    assert offsets(store.newest("a", 3)) == [4, 5, 6]
    assert store.newest("a", 100) == a
    assert store.newest("a", 0) == []
    assert store.newest("unknown", 5) == []
    assert offsets(store.range("a", 2, 4)) == [2, 3, 4]
    assert offsets(store.range("a", 5, 99)) == [5, 6]
    assert store.range("a", 7, 9) == []
    assert store.heads(["a", "b", "unknown"]) == {"a": (a[0].epoch, 6), "b": (b[0].epoch, 1)}
    assert store.heads([]) == {}
    assert store.head("a") == (a[0].epoch, 6)
    assert store.head("unknown") is None
    assert store.pruned_through("a") == 0
    assert store.pruned_through("unknown") == 0


def test_count_retention(make: Make) -> None:
    store = make(retention_count=3)
    got = store.append([ev("a", n) for n in range(5)])
    epoch = got[0].epoch
    assert store.pruned_through("a") == 2
    assert offsets(store.newest("a", 10)) == [3, 4, 5]
    assert store.replay("a", epoch, 1) is None  # offset 2 is gone
    assert offsets(store.replay("a", epoch, 2)) == [3, 4, 5]
    store.append([ev("a", 5)])
    assert store.pruned_through("a") == 3
    assert offsets(store.newest("a", 10)) == [4, 5, 6]
    assert offsets(store.range("a", 1, 10)) == [4, 5, 6]
    assert store.replay("a", epoch, 2) is None
    assert store.head("a") == (epoch, 6)
    # a pruned event's source key no longer dedupes
    store.append([ev("b", 0, key="k"), ev("b", 1), ev("b", 2), ev("b", 3)])
    assert store.pruned_through("b") == 1
    (again,) = store.append([ev("b", 4, key="k")])
    assert not again.duplicate
    assert again.offset == 5


def test_count_retention_spares_events_in_the_outbox(make: Make) -> None:
    store = make(retention_count=2)
    store.append([ev("a", 0), ev("a", 1, outboxes=("chat",)), ev("a", 2)])
    store.append([ev("a", 3), ev("a", 4)])
    assert store.pruned_through("a") == 1  # offset 2 waits for its publication
    assert offsets(store.newest("a", 10)) == [2, 3, 4, 5]
    (row,) = store.outbox(10)
    assert row.event.offset == 2
    store.outbox_done([row.id])
    store.append([ev("a", 5)])
    assert store.pruned_through("a") == 4
    assert offsets(store.newest("a", 10)) == [5, 6]


def test_age_prune(make: Make) -> None:
    store = make(retention_age_s=60.0)
    store.append([ev("a", n) for n in range(3)] + [ev("b", 0, outboxes=("chat",)), ev("b", 1)])
    now = time.time()
    assert store.prune(now) == 0
    assert store.prune() == 0  # by the server's clock
    # a's first two events, and b's both, were stored two minutes ago
    admin(f'UPDATE "{store.schema}".events SET stored_at = now() - interval \'120 s\''
          " WHERE (chat_id = 'a' AND chat_offset <= 2) OR chat_id = 'b'")
    assert store.prune() == 2  # b's first event is in the outbox: b keeps both
    assert store.pruned_through("a") == 2
    assert store.pruned_through("b") == 0
    assert offsets(store.newest("a", 10)) == [3]
    epoch = store.head("a")
    assert epoch is not None
    assert store.replay("a", epoch[0], 1) is None
    store.outbox_done([r.id for r in store.outbox(10)])
    assert store.prune(now) == 2  # by the caller's clock: b's are 120 s old
    assert store.pruned_through("b") == 2
    assert store.prune(now + 3600) == 1  # an hour on, a's last one is old too
    assert store.newest("a", 10) == []
    assert store.pruned_through("a") == 3
    assert store.head("a") == (epoch[0], 3)
    # the offsets go on where they were
    assert offsets(store.append([ev("a", 9)])) == [4]


def test_one_leader_at_a_time(make: Make) -> None:
    first, second = make(instance="one"), make(instance="two")
    assert first.try_lead()
    assert not second.try_lead()
    assert first.try_lead()  # still held (and the connection pinged)
    assert not second.try_lead()
    first.close()
    assert leads_soon(second)
    assert second.try_lead()
    third = make(instance="three")
    assert not third.try_lead()


def test_leadership_ends_with_its_connection(make: Make) -> None:
    first, second = make(instance="one"), make(instance="two")
    assert first.try_lead()
    (pid,) = backends("bridged-one-leader")
    admin("SELECT pg_terminate_backend(%s)", (pid,))
    assert not first.try_lead()  # the ping found it dead
    assert leads_soon(second)
    assert not first.try_lead()  # connected again; the lock is taken
    second.close()
    assert leads_soon(first)


def test_other_schemas_have_their_own_leader(make: Make) -> None:
    here = make()
    other_schema = f"test_cluster_{uuid.uuid4().hex[:12]}"
    there = ClusterStore(DSN, other_schema, retention_count=10, retention_age_s=60.0,
                         instance="there")
    try:
        assert here.try_lead()
        assert there.try_lead()
    finally:
        there.close()
        admin(f'DROP SCHEMA "{other_schema}" CASCADE')


def test_concurrent_writers_keep_offsets_gapless(make: Make) -> None:
    writers, per_writer, chats = 4, 500, ("x", "y", "z")
    stores = [make(instance=f"w{i}", retention_count=10_000) for i in range(writers)]
    start = threading.Barrier(writers)
    results: list[list[StoredEvent]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        rng = random.Random(i)
        try:
            start.wait()
            sent = 0
            while sent < per_writer:
                n = min(rng.randint(1, 20), per_writer - sent)
                batch = [ev(rng.choice(chats), sent + j, key=f"w{i}:{sent + j}",
                            outboxes=("chat",)) for j in range(n)]
                results[i].extend(stores[i].append(batch))
                sent += n
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a writer hung (a deadlock?)"
    assert errors == []
    stored = [e for r in results for e in r]
    assert len(stored) == writers * per_writer
    assert not any(e.duplicate for e in stored)
    heads = stores[0].heads(list(chats))
    for chat in chats:
        mine = sorted(e.offset for e in stored if e.chat_id == chat)
        assert mine == list(range(1, len(mine) + 1)), chat
        assert heads[chat][1] == len(mine)
        assert {e.epoch for e in stored if e.chat_id == chat} == {heads[chat][0]}
        kept = stores[0].replay(chat, heads[chat][0], 0)
        assert kept is not None
        assert [e.offset for e in kept] == mine
        assert {e.body["text"] for e in kept} == {e.body["text"] for e in stored
                                                  if e.chat_id == chat}
    # each writer saw its own events of a chat in increasing offsets (input order)
    for r in results:
        for chat in chats:
            seen = [e.offset for e in r if e.chat_id == chat]
            assert seen == sorted(seen)
    assert stores[0].outbox_depth() == writers * per_writer


def test_reconnects_after_the_connection_is_killed(make: Make) -> None:
    store = make(instance="victim")
    (first,) = store.append([ev("a", 0)])
    (pid,) = backends("bridged-victim-main")
    admin("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StoreUnavailable):
        store.append([ev("a", 1)])
    (second,) = store.append([ev("a", 2)])  # connected again
    assert second.offset == 2  # the failed append wrote nothing
    assert second.epoch == first.epoch
    assert backends("bridged-victim-main") not in ([], [pid])
    # a read fails the same way, then works
    (pid,) = backends("bridged-victim-main")
    admin("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StoreUnavailable):
        store.head("a")
    assert store.head("a") == (first.epoch, 2)
    assert store.ping() > 0


def test_unreachable_server_is_unavailable(schema: str) -> None:
    with pytest.raises(StoreUnavailable):
        ClusterStore("postgresql://postgres@127.0.0.1:1/test", schema, retention_count=10,
                     retention_age_s=60.0, instance="nowhere", connect_timeout_s=1.0)


def test_statement_timeout_is_unavailable_and_keeps_the_connection(make: Make) -> None:
    store = make(instance="slow", statement_timeout_s=0.2)
    store.append([ev("a", 0)])
    with psycopg.connect(DSN) as blocker:  # holds the chat row's lock
        blocker.execute(f'SELECT 1 FROM "{store.schema}".chats WHERE chat_id = %s FOR UPDATE',
                        ("a",))
        with pytest.raises(StoreUnavailable):
            store.append([ev("a", 1)])
        (pid,) = backends("bridged-slow-main")
        blocker.rollback()
    assert offsets(store.append([ev("a", 2)])) == [2]
    assert backends("bridged-slow-main") == [pid]  # same connection


def test_instances_create_the_schema_at_once(schema: str) -> None:
    stores: list[ClusterStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def build(i: int) -> None:
        try:
            start.wait()
            stores.append(ClusterStore(DSN, schema, retention_count=10, retention_age_s=60.0,
                                       instance=f"ddl{i}"))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert errors == []
        assert len(stores) == 3
        got = [s.append([ev("a", i)])[0].offset for i, s in enumerate(stores)]
        assert got == [1, 2, 3]
    finally:
        for s in stores:
            s.close()


def test_closed_store_refuses(store: ClusterStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError):
        store.append([ev("a", 0)])
    with pytest.raises(RuntimeError):
        store.try_lead()


def test_chat_rows_deleted_under_the_store(store: ClusterStore) -> None:
    (first,) = store.append([ev("a", 0)])
    admin(f'TRUNCATE "{store.schema}".chats, "{store.schema}".events')
    (again,) = store.append([ev("a", 1)])  # the chat is created again: a new log
    assert again.offset == 1
    assert store.head("a") == (again.epoch, 1)
    assert first.offset == 1
