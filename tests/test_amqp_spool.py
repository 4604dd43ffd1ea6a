"""The AMQP outbox: order, the in-memory tail, removals, reopening."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge_plugins.amqp import outbox as amqp_spool
from bridge_plugins.amqp.outbox import Entry, Spool, SpoolFull


def entry(n: int) -> Entry:
    return Entry("chat", f"chat.c{n % 3}", "application/json", f"id-{n}",
                 {"x-bridge-hops": 1, "n": n}, b'{"n":%d}' % n)


def on_disk(path: Path, after: int, limit: int) -> list[tuple[int, str, bytes]]:
    """What the file holds after ``after``, read by a connection of the test's own."""
    with sqlite3.connect(path) as db:
        return [(seq, mid, bytes(body)) for seq, mid, body in db.execute(
            "SELECT seq, message_id, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit))]


def seen(entries: list[Entry]) -> list[tuple[int, str, bytes]]:
    return [(e.seq, e.message_id, e.body) for e in entries]


async def test_entries_come_back_in_order_before_and_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    spool = await Spool.open(path, max_messages=100)
    await spool.append([entry(n) for n in range(5)])
    await spool.append([entry(5)])
    live = await spool.read(0, 10)
    assert [e.message_id for e in live] == [f"id-{n}" for n in range(6)]
    assert [e.seq for e in live] == [1, 2, 3, 4, 5, 6]
    assert live[2].headers == {"x-bridge-hops": 1, "n": 2}
    assert seen(await spool.read(3, 2)) == seen(live[3:5])
    await spool.remove([1, 2])
    assert spool.depth == 4
    await spool.close()

    spool = await Spool.open(path, max_messages=100)
    assert spool.depth == 4
    again = await spool.read(0, 10)  # from the file now
    assert again == live[2:]
    await spool.remove(e.seq for e in again)
    await spool.append([entry(9)])  # seqs are never reused, across removals and reopening
    assert [e.seq for e in await spool.read(0, 10)] == [7]
    await spool.close()


async def test_a_full_outbox_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "o.sqlite3", max_messages=3)
    await spool.append([entry(1), entry(2)])
    with pytest.raises(SpoolFull):
        await spool.append([entry(3), entry(4)])
    assert [e.message_id for e in await spool.read(0, 10)] == ["id-1", "id-2"]
    await spool.close()


async def test_removals_commit_without_fsync_and_appends_keep_it(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "o.sqlite3", max_messages=10)
    await spool.append([entry(1), entry(2)])
    await spool.remove([1])
    # synchronous is FULL (2) again for the appends that follow the removal
    assert await spool._worker.run(
        lambda: spool._db.execute("PRAGMA synchronous").fetchone()[0]) == 2
    await spool.close()


async def test_reads_always_equal_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """Whatever mix of appends, in-order and out-of-order removals and reads: ``read``
    (from the in-memory tail or from the file) returns what the file holds."""
    monkeypatch.setattr(amqp_spool, "TAIL_ENTRIES", 8)  # small: trimmed all the time
    rng = random.Random(1234)
    path = tmp_path / "outbox.sqlite3"
    spool = await Spool.open(path, max_messages=10_000)
    n = 0
    for step in range(400):
        op = rng.random()
        if op < 0.4:
            k = rng.randint(1, 12)
            await spool.append([entry(n + i) for i in range(k)])
            n += k
        elif op < 0.7:  # the publisher's way: a prefix of what is left is confirmed
            head = await spool.read(0, rng.randint(1, 10))
            await spool.remove(e.seq for e in head)
        elif op < 0.75 and spool.depth:  # a nack: something in the middle goes
            rows = on_disk(path, 0, 10_000)
            await spool.remove([rng.choice(rows)[0]])
        elif op < 0.78:
            await spool.close()
            spool = await Spool.open(path, max_messages=10_000)
        rows = on_disk(path, 0, 10_000)
        assert spool.depth == len(rows), step
        after = rng.choice([0, *(seq for seq, _, _ in rows[-10:])]) if rows else 0
        limit = rng.randint(1, 20)
        assert seen(await spool.read(after, limit)) == on_disk(path, after, limit), step
    await spool.close()


class FailingCommit:
    """The outbox's connection, but its next COMMIT fails (a disk error, say)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail:
            self.fail = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


async def test_a_failed_commit_leaves_the_outbox_usable(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "o.sqlite3", max_messages=10)
    await spool.append([entry(1), entry(2)])
    real = spool._db
    spool._db = FailingCommit(real)  # type: ignore[assignment]  # a stand-in connection
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        await spool.remove([1])
    spool._db = real
    state = await spool._worker.run(
        lambda: (real.in_transaction, real.execute("PRAGMA synchronous").fetchone()[0]))
    assert state == (False, 2)  # rolled back, and FULL again for the appends
    await spool.remove([1])
    await spool.append([entry(3)])
    assert [e.message_id for e in await spool.read(0, 10)] == ["id-2", "id-3"]
    await spool.close()


async def test_concurrent_appends_get_their_own_seqs(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "o.sqlite3", max_messages=100)
    async with trio.open_nursery() as nursery:
        for start in (0, 10, 20):
            nursery.start_soon(spool.append, [entry(start + i) for i in range(5)])
    got = await spool.read(0, 100)
    assert [e.seq for e in got] == list(range(1, 16))
    assert sorted(e.message_id for e in got) == sorted(
        f"id-{s + i}" for s in (0, 10, 20) for i in range(5))
    await spool.close()


async def test_an_outbox_of_an_older_version_gets_the_client_id_column(tmp_path: Path) -> None:
    """A file made before client message ids were kept: its rows come back without one, and
    new rows keep theirs (held, as the reconcile after a crash reads them)."""
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE released (one INTEGER PRIMARY KEY CHECK (one = 1),
                                   through INTEGER NOT NULL);
            CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, exchange TEXT NOT NULL,
                routing_key TEXT NOT NULL, content_type TEXT NOT NULL,
                message_id TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL);
            INSERT INTO released VALUES (1, 0);
            INSERT INTO outbox (exchange, routing_key, content_type, message_id, headers, body)
                VALUES ('chat', 'chat.c', 'application/json', 'old', '{}', x'7b7d');""")
    spool = await Spool.open(path, max_messages=100)
    named = Entry("chat", "chat.c", "application/json", "new", {}, b"{}", client_msg_id="m-1")
    await spool.append([named], hold=True)
    await spool.close()
    spool = await Spool.open(path, max_messages=100)
    held = await spool.held()
    assert [(e.message_id, e.client_msg_id) for e in held] == [("old", None), ("new", "m-1")]
    await spool.close()
