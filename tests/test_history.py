"""SQLite history: batched durable writes, retention, replay rule, restart survival."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge import (
    CHAT_EVENT,
    NOTIFICATION,
    Accepted,
    ContractError,
    Message,
    PluginContext,
    ReplayGap,
)
from bridge.testing import MEMORY_AB, run_bridge, write_config
from bridge_plugins.history import DB_NAME, HistorySettings, HistoryStore, Plugin

BASE_MS = 1_700_000_000_000


def eid(n: int) -> str:
    return f"{(BASE_MS + n) * 1000:020d}"


ZERO = "0" * 20


def event(n: int, chat_id: str = "c1", text: str = "") -> Message:
    body = {"type": "update", "eventId": eid(n), "timestamp": (BASE_MS + n) // 1000,
            "timestampms": BASE_MS + n, "message": [{"type": "message", "text": text or f"#{n}"}]}
    return Message(CHAT_EVENT, body, "client", eid(n), chat_id)


@asynccontextmanager
async def history(state_dir: Path, **settings: Any) -> AsyncIterator[Plugin]:
    """The plugin started on ``state_dir`` as the daemon would, shut down on exit."""
    plugin = Plugin()
    async with trio.open_nursery() as nursery:
        ctx = PluginContext("history", HistorySettings(**settings), state_dir, nursery)
        await plugin.bridge_startup(ctx)
        try:
            yield plugin
        finally:
            await plugin.bridge_shutdown(ctx)
            nursery.cancel_scope.cancel()


def ids(messages: Any) -> list[str]:
    return [m.id for m in messages]


async def test_batch_is_stored_and_replayed_in_id_order(tmp_path: Path) -> None:
    async with history(tmp_path) as h:
        # one batch, out of id order, two chats, one non-chat message, one event twice
        await h.bridge_persist_messages([event(3), event(1), event(2, "c2"), event(1),
                                         Message(NOTIFICATION, {"userId": "c1"}, "amqp")])
        await h.bridge_persist_messages([event(4)])
        replayed = await h.bridge_replay_messages("c1", ZERO)
        assert ids(replayed) == [eid(1), eid(3), eid(4)]
        assert replayed[0] == Message(CHAT_EVENT, event(1).body, "history", eid(1), "c1")
        assert ids(await h.bridge_replay_messages("c1", eid(1))) == [eid(3), eid(4)]
        assert ids(await h.bridge_replay_messages("c1", eid(4))) == []
        # since need not be a stored id: replay what is after it
        assert ids(await h.bridge_replay_messages("c1", eid(2))) == [eid(3), eid(4)]
        assert ids(await h.bridge_replay_messages("c2", ZERO)) == [eid(2)]
        assert ids(await h.bridge_replay_messages("unknown", ZERO)) == []
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (4,)


async def test_malformed_since_and_event_ids(tmp_path: Path) -> None:
    async with history(tmp_path) as h:
        for since in ("", "123", "1" * 21, "0000000000000000000a", "-" + "1" * 19):
            with pytest.raises(ContractError) as info:
                await h.bridge_replay_messages("c1", since)
            assert (info.value.field, info.value.rule) == ("since", "pattern")
        with pytest.raises(ValueError, match="no valid eventId"):
            await h.bridge_persist_messages([event(1).evolve(id="", body={"type": "update"})])
        with pytest.raises(ValueError, match="no chat id"):
            await h.bridge_persist_messages([event(1).evolve(chat_id=None)])
        assert ids(await h.bridge_replay_messages("c1", ZERO)) == []


async def test_retention_by_count_and_replay_gap(tmp_path: Path) -> None:
    async with history(tmp_path, retention_count=3) as h:
        await h.bridge_persist_messages([event(n) for n in range(1, 5)])
        await h.bridge_persist_messages([event(5), event(1, "other")])
        # kept: 3, 4, 5; pruned through 2
        assert ids(await h.bridge_replay_messages("c1", eid(2))) == [eid(3), eid(4), eid(5)]
        assert ids(await h.bridge_replay_messages("c1", eid(3))) == [eid(4), eid(5)]
        for since in (ZERO, eid(1)):  # event 2 (at least) was after since and is gone
            with pytest.raises(ReplayGap):
                await h.bridge_replay_messages("c1", since)
        assert ids(await h.bridge_replay_messages("other", ZERO)) == [eid(1)]


def rows_of(state_dir: Path, chat_id: str) -> list[str]:
    with sqlite3.connect(state_dir / DB_NAME) as db:
        return [r[0] for r in db.execute(
            "SELECT event_id FROM events WHERE chat_id = ? ORDER BY event_id", (chat_id,))]


async def test_retention_count_stays_exact_over_many_writes(tmp_path: Path) -> None:
    """The store counts events in memory: duplicates, a restart (nothing counted yet) and an
    age pruning in between (counts forgotten) must all leave exactly the newest events."""
    now = [time.time()]  # the start-up pruning of the second run uses the real clock
    async with history(tmp_path, retention_count=3, retention_age_s=100.0) as h:
        h.clock = lambda: now[0]
        for n in range(1, 8):  # one at a time: every write from the 4th on prunes one
            await h.bridge_persist_messages([event(n)])
            assert rows_of(tmp_path, "c1") == [eid(k) for k in range(max(1, n - 2), n + 1)]
        await h.bridge_persist_messages([event(6), event(7), event(8)])  # 6, 7 are stored
        assert rows_of(tmp_path, "c1") == [eid(6), eid(7), eid(8)]
    async with history(tmp_path, retention_count=3, retention_age_s=100.0) as h:
        h.clock = lambda: now[0]
        await h.bridge_persist_messages([event(9), event(10)])  # counted afresh after restart
        assert rows_of(tmp_path, "c1") == [eid(8), eid(9), eid(10)]
        now[0] += 50.0
        await h.bridge_persist_messages([event(11)])  # 8 goes by count
        now[0] += 51.0  # 9 and 10 are over 100 s old; 11 is not
        assert await h.prune() == 2
        assert rows_of(tmp_path, "c1") == [eid(11)]
        await h.bridge_persist_messages([event(n) for n in range(12, 16)])  # one batch
        assert rows_of(tmp_path, "c1") == [eid(13), eid(14), eid(15)]
        with pytest.raises(ReplayGap):
            await h.bridge_replay_messages("c1", eid(11))
        assert ids(await h.bridge_replay_messages("c1", eid(12))) == [eid(13), eid(14), eid(15)]


async def test_counts_stay_exact_on_the_one_statement_path(tmp_path: Path) -> None:
    """Below the retention count a batch is one autocommitted INSERT; a batch holding an id
    already stored must not be counted as new."""
    async with history(tmp_path, retention_count=10) as h:
        await h.bridge_persist_messages([event(n) for n in (1, 2, 3)])  # counted: 3
        await h.bridge_persist_messages([event(4), event(5)])  # one statement: 5
        await h.bridge_persist_messages([event(5), event(6)])  # 5 is stored: 6, not 7
        await h.bridge_persist_messages([event(n) for n in range(7, 13)])  # 12: prune 2
        assert rows_of(tmp_path, "c1") == [eid(n) for n in range(3, 13)]
        await h.bridge_persist_messages([event(13)])
        assert rows_of(tmp_path, "c1") == [eid(n) for n in range(4, 14)]


def test_a_batch_over_sqlites_variable_limit_is_split(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / DB_NAME, "normal")
    store.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 9)  # two rows per INSERT
    rows = [("c1", eid(n), "{}") for n in range(7)]
    store.store(rows[:3], 0.0, 5)  # first write to c1: counted
    store.store(rows[3:5], 0.0, 5)  # 5 of 5: one autocommitted INSERT
    store.store(rows[2:], 0.0, 5)  # three INSERTs, 2 rows new, 2 pruned
    store.close()
    assert rows_of(tmp_path, "c1") == [eid(n) for n in range(2, 7)]


def test_counts_stay_exact_under_random_batches(tmp_path: Path) -> None:
    """Random batches over three chats, with duplicates, small bound-variable limits (so
    statements are split and padded) and age pruning: each chat keeps at most ``keep``
    events, and the count the store remembers is the count in the file."""
    rnd = random.Random(1)
    for trial in range(30):
        store = HistoryStore(tmp_path / f"h{trial}.db", "normal")
        if trial % 2:
            store.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, rnd.choice([4, 9, 17, 40]))
        keep = rnd.randint(1, 12)
        stored: dict[str, list[str]] = {c: [] for c in "abc"}
        next_id = 0
        for step in range(200):
            rows = []
            for _ in range(rnd.randint(1, 10)):
                chat = rnd.choice("abc")
                if rnd.random() < 0.25 and stored[chat]:
                    event_id = rnd.choice(stored[chat])  # a duplicate
                else:
                    next_id += 1
                    event_id = f"{next_id:020d}"
                rows.append((chat, event_id, "{}"))
            store.store(rows, float(step), keep)
            if rnd.random() < 0.05:
                store.prune_older_than(step - 3.0)
            for chat in "abc":
                stored[chat] = [e for (e,) in store.conn.execute(
                    "SELECT event_id FROM events WHERE chat_id = ?", (chat,))]
                assert len(stored[chat]) <= keep
                assert store._counts.get(chat, len(stored[chat])) == len(stored[chat])
        store.close()


async def test_retention_by_age(tmp_path: Path) -> None:
    now = [1000.0]
    async with history(tmp_path, retention_age_s=100.0) as h:
        h.clock = lambda: now[0]
        await h.bridge_persist_messages([event(1), event(2), event(1, "c2")])
        now[0] = 1050.0
        await h.bridge_persist_messages([event(3)])
        now[0] = 1100.5  # events 1 and 2 (both chats) are now over 100 s old, 3 is not
        assert await h.prune() == 3
        assert ids(await h.bridge_replay_messages("c1", eid(2))) == [eid(3)]
        with pytest.raises(ReplayGap):
            await h.bridge_replay_messages("c1", eid(1))
        assert ids(await h.bridge_replay_messages("c2", eid(1))) == []
        with pytest.raises(ReplayGap):
            await h.bridge_replay_messages("c2", ZERO)
        assert await h.prune() == 0


async def test_background_pruning(tmp_path: Path) -> None:
    async with history(tmp_path, retention_age_s=0.05, prune_interval_s=0.02) as h:
        await h.bridge_persist_messages([event(1), event(2)])
        with trio.fail_after(5):  # waiting out the retention age is what is tested
            while True:
                try:
                    await h.bridge_replay_messages("c1", ZERO)
                except ReplayGap:
                    break
                await trio.sleep(0.02)
        assert ids(await h.bridge_replay_messages("c1", eid(2))) == []


async def test_survives_restart_of_the_plugin(tmp_path: Path) -> None:
    async with history(tmp_path, retention_count=2) as h:
        await h.bridge_persist_messages([event(1), event(2), event(3)])
    async with history(tmp_path, retention_count=2) as h:
        assert ids(await h.bridge_replay_messages("c1", eid(1))) == [eid(2), eid(3)]
        with pytest.raises(ReplayGap):  # the low-water mark survives too
            await h.bridge_replay_messages("c1", ZERO)
        await h.bridge_shutdown(None)  # type: ignore[arg-type]  # the context is not used
        with pytest.raises(RuntimeError, match="not open"):  # nothing is used after shutdown
            await h.bridge_replay_messages("c1", ZERO)


async def test_survives_restart_of_the_daemon(tmp_path: Path) -> None:
    config = write_config(tmp_path, MEMORY_AB)
    async with run_bridge(config) as daemon:
        for n in (1, 2):
            outcome = await daemon.transports["a"].inject(  # type: ignore[attr-defined]
                {"type": "update", "message": [{"type": "message", "text": f"#{n}"}]},
                kind=CHAT_EVENT, chat_id="c1", id=eid(n))
            assert isinstance(outcome, Accepted), outcome
    assert (tmp_path / "state" / DB_NAME).exists()
    async with run_bridge(config) as daemon:
        replayed = await daemon.hooks.replay("c1", ZERO)
        assert replayed is not None
        # (the enrichment plugin, when present, assigns fresh ids: compare order, not ids)
        assert [m.body["message"][0]["text"] for m in replayed] == ["#1", "#2"]
        assert ids(replayed) == sorted(ids(replayed))
        assert len(set(ids(replayed))) == 2
        assert {m.source for m in replayed} == {"history"}


KILLED_WRITER = textwrap.dedent("""
    import sys, trio
    from pathlib import Path
    from bridge import CHAT_EVENT, Message, PluginContext
    from bridge_plugins.history import HistorySettings, Plugin

    async def main():
        plugin = Plugin()
        async with trio.open_nursery() as nursery:
            settings = HistorySettings(synchronous=sys.argv[2])
            await plugin.bridge_startup(PluginContext("history", settings, Path(sys.argv[1]),
                                                      nursery))
            eid = "00000000000000000042"
            await plugin.bridge_persist_messages([Message(
                CHAT_EVENT, {"type": "update", "eventId": eid}, "ws", eid, "c1")])
            print("stored", flush=True)  # the echo would go out now
            await trio.sleep_forever()

    trio.run(main)
""")


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_stored_event_survives_sigkill(tmp_path: Path, synchronous: str) -> None:
    with subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), synchronous],
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "stored\n"
        proc.kill()  # SIGKILL right after the write returned: no shutdown, no close
    assert proc.returncode == -9
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        rows = db.execute("SELECT chat_id, event_id FROM events").fetchall()
    assert rows == [("c1", "00000000000000000042")]
