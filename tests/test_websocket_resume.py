"""Resume with ``since=<eventId>``: replay in order, then live, with no gap and no duplicate
at the seam; refusals when the history cannot serve the request. The history here is
ws_support.MemoryHistory, a minimal persistence plugin (the SQLite one has its own tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed
from ws_support import (
    MemoryHistory,
    chat_bridge,
    client,
    eventually,
    raw_handshake,
    receive,
    update,
)

from bridge import CHAT_EVENT, Message, hookimpl


async def test_resume_replays_what_came_after_since_then_goes_live(tmp_path: Path) -> None:
    history = MemoryHistory()
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b:
        async with client(b.port) as ws:
            for i in range(5):
                await ws.send_message(update(f"mine {i}"))
            ids = [(await receive(ws))["eventId"] for _ in range(5)]
        ids += [(await b.inject("room", f"while away {i}")).id for i in range(3)]
        await b.inject("other-room", "not for this chat")
        async with client(b.port, query=f"since={ids[1]}") as ws:
            replayed = [await receive(ws) for _ in range(6)]
            live = await b.inject("room", "live")
            after = await receive(ws)
    assert [f["eventId"] for f in replayed] == ids[2:]
    assert [f["message"][0]["text"] for f in replayed] == [
        "mine 2", "mine 3", "mine 4", "while away 0", "while away 1", "while away 2"]
    assert [f["socket_sequence"] for f in replayed] == list(range(6))
    assert (after["eventId"], after["socket_sequence"]) == (live.id, 6)


async def test_no_gap_and_no_duplicate_at_the_seam(tmp_path: Path) -> None:
    history = MemoryHistory(gated=True)
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b:
        since = (await b.inject("room", "seen")).id
        expected = [(await b.inject("room", f"stored {i}")).id for i in range(3)]
        got: list[dict[str, Any]] = []
        connected = trio.Event()

        async def resume() -> None:
            async with client(b.port, query=f"since={since}") as ws:
                connected.set()
                for _ in range(13):  # 3 stored, 3 + 3 during the replay, 3 after, 1 final
                    got.append(await receive(ws))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume)
            await history.replay_started.wait()
            # Before the store is read: in the replay AND queued live (sent once).
            expected += [(await b.inject("room", f"before read {i}")).id for i in range(3)]
            history.read_gate.set()
            await history.read_done.wait()
            # After the store is read, before the replay returns: only queued live.
            expected += [(await b.inject("room", f"after read {i}")).id for i in range(3)]
            history.return_gate.set()
            await connected.wait()
            expected += [(await b.inject("room", f"live {i}")).id for i in range(3)]
            expected.append((await b.inject("room", "final")).id)
    assert [f["message"][0]["text"] for f in got][-1] == "final"  # nothing came twice
    assert [f["eventId"] for f in got] == expected
    assert [f["socket_sequence"] for f in got] == list(range(len(expected)))


async def test_since_older_than_what_is_kept_is_refused_410(tmp_path: Path) -> None:
    history = MemoryHistory(oldest="00000000000000000500")
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b:
        status, body = await raw_handshake(b.port, "/v1/chats/room?since=00000000000000000100")
    assert status == 410
    assert "no longer kept" in body
    assert "reconnect without since" in body


async def test_an_unknown_since_is_refused_400(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[MemoryHistory()]) as b:
        status, body = await raw_handshake(b.port, "/v1/chats/room?since=99999999999999999999")
    assert status == 400
    assert body.startswith("since: unknown eventId")


async def test_since_without_a_history_plugin_is_refused_400(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, disable=["history"]) as b:
        status, body = await raw_handshake(b.port, "/v1/chats/room?since=00000000000000000001")
    assert status == 400
    assert "no history is kept" in body


class BrokenReplay:
    @hookimpl
    def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        raise RuntimeError("index corrupted")


async def test_a_failing_replay_hook_refuses_500_and_the_server_carries_on(
        tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[BrokenReplay()]) as b:
        status, body = await raw_handshake(b.port, "/v1/chats/room?since=00000000000000000001")
        async with client(b.port) as ws:
            await ws.send_message(update("fine"))
            assert (await receive(ws))["message"][0]["text"] == "fine"
    assert status == 500
    assert "replay failed" in body


class UnsendableReplay:
    """Returns an event whose body cannot be encoded: the writer task raises."""

    @hookimpl
    def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        return [Message(CHAT_EVENT, {"type": "update", "message": {1, 2}}, "history",
                        "00000000000000000002", chat_id)]


async def test_an_exception_inside_one_connection_ends_only_that_connection(
        tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[UnsendableReplay()]) as b, \
            client(b.port, "room") as bystander:
        async with client(b.port, "room", "since=00000000000000000001") as doomed:
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await doomed.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1006  # cut, no close frame
        await bystander.send_message(update("carry on"))
        assert (await receive(bystander))["message"][0]["text"] == "carry on"
        await eventually(lambda: b.metric("open_sockets") == 1)
        assert b.daemon.health()["chat"].ready


async def test_resume_across_a_restart_of_the_daemon(tmp_path: Path) -> None:
    history = MemoryHistory()  # outlives both daemons, like a file on disk
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b, client(b.port) as ws:
        for i in range(3):
            await ws.send_message(update(f"before restart {i}"))
        before = [(await receive(ws))["eventId"] for _ in range(3)]
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b:
        after = [(await b.inject("room", f"after restart {i}")).id for i in range(2)]
        async with client(b.port, query=f"since={before[0]}") as ws:
            frames = [await receive(ws) for _ in range(4)]
    assert [f["eventId"] for f in frames] == before[1:] + after
    assert after[0] > before[-1]  # ids keep increasing across the restart


async def test_resume_across_a_restart_with_the_built_in_sqlite_history(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        for i in range(3):
            await ws.send_message(update(f"before restart {i}"))
        before = [(await receive(ws))["eventId"] for _ in range(3)]
    async with chat_bridge(tmp_path) as b:  # the same state directory
        after = [(await b.inject("room", f"after restart {i}")).id for i in range(2)]
        async with client(b.port, query=f"since={before[0]}") as ws:
            frames = [await receive(ws) for _ in range(4)]
            live = await b.inject("room", "live")
            assert (await receive(ws))["eventId"] == live.id
    assert [f["eventId"] for f in frames] == before[1:] + after
    assert [f["message"][0]["text"] for f in frames] == [
        "before restart 1", "before restart 2", "after restart 0", "after restart 1"]


async def test_since_older_than_the_sqlite_retention_is_refused_410(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra="[plugins.history]\nretention_count = 2\n") as b:
        ids = [(await b.inject("room", f"event {i}")).id for i in range(4)]
        status, body = await raw_handshake(b.port, f"/v1/chats/room?since={ids[0]}")
        async with client(b.port, query=f"since={ids[1]}") as ws:  # still kept: fine
            assert [(await receive(ws))["eventId"] for _ in range(2)] == ids[2:]
    assert status == 410
    assert "no longer kept" in body


async def test_live_events_up_to_since_are_not_sent_again(tmp_path: Path) -> None:
    """A socket that resumes with ``since`` and gets nothing replayed (it is up to date)
    does not get a live copy of an event up to ``since``: in cluster mode the live path of
    this instance may still bring an event the client saw on another one."""
    history = MemoryHistory()
    seen = Message(CHAT_EVENT, {"type": "update", "eventId": "00000000000000000500",
                                "timestamp": 1, "timestampms": 1000,
                                "message": [{"type": "message", "text": "seen"}]},
                   "test", "00000000000000000500", "room")
    history.events.append(seen)
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b, \
            client(b.port, "room", "since=00000000000000000500") as ws:
        chat = b.daemon.transports["chat"]
        newer = seen.evolve(id="00000000000000000600",
                            body={**seen.body, "eventId": "00000000000000000600"})
        await chat.deliver([seen, newer])  # the late copy of what it saw, then a new one
        frame = await receive(ws)
        assert (frame["eventId"], frame["socket_sequence"]) == ("00000000000000000600", 0)
