"""Client message ids: a client names an update with ``clientMsgId``; the echo (only the
sender's) carries it back, and a retry with the same id, on the same socket, after a
reconnect or after a daemon restart, makes no second event: the sender gets the original
event again. The id -> eventId mapping lives in the history's SQLite, stored with the event."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import trio
from amqp_support import open_broker
from e2e_support import NAMES, archived, chat, example_config, fresh_vhost, running
from ws_support import chat_bridge, client, closed_with, receive


def named(text: str, client_id: Any) -> str:
    return json.dumps({"type": "update", "clientMsgId": client_id,
                       "message": [{"type": "message", "text": text}]})


def stored(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "state" / "history.sqlite3") as db:
        return [(r[0], json.loads(r[1])["message"][0]["text"]) for r in
                db.execute("SELECT event_id, body FROM events ORDER BY event_id")]


async def test_the_echo_carries_the_client_id_and_a_retry_makes_no_second_event(
        tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as watcher, client(b.port) as ws:
        await ws.send_message(named("hello", "m-1"))
        echo = await receive(ws)
        seen = await receive(watcher)
        assert echo["clientMsgId"] == "m-1"
        assert "clientMsgId" not in seen  # opt-in: only the sender's echo has it
        assert seen["eventId"] == echo["eventId"]
        await ws.send_message(named("hello again", "m-1"))  # a retry (the text differs)
        again = await receive(ws)
        assert {k: v for k, v in again.items() if k != "socket_sequence"} == {
            k: v for k, v in echo.items() if k != "socket_sequence"}
        await b.inject("room", "marker")  # the watcher's next frame: no second event
        assert (await receive(watcher))["message"][0]["text"] == "marker"
        assert (await receive(ws))["message"][0]["text"] == "marker"
        async with client(b.port) as after:  # a reconnect: the same answer
            await after.send_message(named("third try", "m-1"))
            assert (await receive(after))["eventId"] == echo["eventId"]
        await ws.send_message(named("other", "m-2"))
        assert (await receive(ws))["clientMsgId"] == "m-2"
    assert [t for _, t in stored(tmp_path)] == ["hello", "marker", "other"]


async def test_a_retry_after_a_restart_gets_the_original_event(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        await ws.send_message(named("before the restart", "abc-123"))
        first = await receive(ws)
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        await ws.send_message(named("after the restart", "abc-123"))
        again = await receive(ws)
    assert (again["eventId"], again["clientMsgId"]) == (first["eventId"], "abc-123")
    assert again["message"][0]["text"] == "before the restart"
    assert [t for _, t in stored(tmp_path)] == ["before the restart"]


async def test_retries_sent_back_to_back_make_one_event(tmp_path: Path) -> None:
    """The second copy arrives while the first is still in the pipeline."""
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        for _ in range(5):
            await ws.send_message(named("same", "burst-1"))
        echoes = [await receive(ws) for _ in range(5)]
    assert {e["eventId"] for e in echoes} == {echoes[0]["eventId"]}
    assert {e["clientMsgId"] for e in echoes} == {"burst-1"}
    assert [t for _, t in stored(tmp_path)] == ["same"]


async def test_a_bad_client_id_is_refused_1008(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        for bad in ("", "x" * 65, "a b", 7):
            async with client(b.port) as ws:
                await ws.send_message(named("x", bad))
                _, code, reason = await closed_with(ws)
                assert (code, reason[:12]) == (1008, "clientMsgId:")


async def test_the_window_is_what_the_history_keeps(tmp_path: Path) -> None:
    """Once the original event is pruned, its id is forgotten with it: a retry is new."""
    async with chat_bridge(tmp_path, extra="[plugins.history]\nretention_count = 1\n") as b, \
            client(b.port) as ws:
        await ws.send_message(named("first", "w-1"))
        first = await receive(ws)
        await b.inject("room", "pushes the first out")
        await receive(ws)
        await ws.send_message(named("first, resent", "w-1"))
        again = await receive(ws)
    assert again["eventId"] > first["eventId"]
    assert again["message"][0]["text"] == "first, resent"
    with sqlite3.connect(tmp_path / "state" / "history.sqlite3") as db:
        assert db.execute("SELECT client_id, event_id FROM client_ids").fetchall() == [
            ("w-1", again["eventId"])]


async def test_a_retry_goes_back_to_its_sender_only_not_to_the_exchange(
        tmp_path: Path) -> None:
    """The example config routes the chat to the AMQP exchange: a consumer there counts one
    publish of the original event and none for the retry (nor does the other socket get
    anything)."""
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES)
        async with running(example_config(tmp_path, vhost.url())) as daemon, \
                chat(daemon.ws_port, "alice") as alice, \
                chat(daemon.ws_port, "alice") as watcher:
            await alice.ws.send_message(named("hello", "r-1"))
            echo = await alice.next()
            assert (await watcher.next())["eventId"] == echo["eventId"]
            await alice.ws.send_message(named("hello again", "r-1"))
            again = await alice.next()
            assert (again["eventId"], again["clientMsgId"]) == (echo["eventId"], "r-1")
            marker = await alice.say("marker")  # after the retry, in every order there is
            assert (await watcher.next())["eventId"] == marker["eventId"]
            got = await archived(broker, [echo["eventId"], marker["eventId"]])
            assert await daemon.stop() == 0  # the drain publishes what the outbox holds
            with trio.fail_after(5):
                while (rest := await broker.conn.get(NAMES.archive)) is not None:
                    got.append(rest)
    assert [d.message_id for d in got] == [echo["eventId"], marker["eventId"]]
