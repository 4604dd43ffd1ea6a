"""Recent history on open: ``last=N`` opens on the chat's newest N kept events, then live;
with ``marks=true`` replayed updates carry ``"replayed": true`` and a ``replay_end`` frame
marks where live delivery begins, saying whether the replay is all that was asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
from trio_websocket import WebSocketConnection
from ws_support import chat_bridge, client, raw_handshake, receive


async def frame(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame, decoded but not checked against the seed (replay_end is opt-in)."""
    data = await ws.get_message()
    decoded: dict[str, Any] = (json.loads(data) if isinstance(data, str)
                               else msgpack.unpackb(data))
    return decoded


async def test_the_newest_events_then_a_marked_start_of_live(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        ids = [(await b.inject("room", f"old {i}")).id for i in range(5)]
        for encoding in ("json", "msgpack"):
            async with client(b.port, query=f"last=3&marks=true&encoding={encoding}") as ws:
                got = [await frame(ws) for _ in range(4)]
                live = await b.inject("room", f"live {encoding}")
                after = await frame(ws)
            assert [f["eventId"] for f in got[:3]] == ids[2:]
            assert all(f["replayed"] is True for f in got[:3])
            assert got[3] == {"type": "replay_end", "socket_sequence": 3, "replayed": 3,
                              "complete": True, "lastEventId": ids[4]}
            assert (after["eventId"], after["socket_sequence"]) == (live.id, 4)
            assert "replayed" not in after
            ids = [*ids[1:], live.id]


async def test_fewer_events_than_asked_are_complete_unless_pruned(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra="[plugins.history]\nretention_count = 2\n") as b:
        await b.inject("young", "only one")
        async with client(b.port, "young", "last=10&marks=true") as ws:
            await frame(ws)
            end = await frame(ws)
        assert (end["replayed"], end["complete"]) == (1, True)
        for i in range(4):
            await b.inject("pruned", f"event {i}")
        async with client(b.port, "pruned", "last=3&marks=true") as ws:
            texts = [(await frame(ws))["message"][0]["text"] for _ in range(2)]
            end = await frame(ws)
        assert texts == ["event 2", "event 3"]
        assert (end["type"], end["replayed"], end["complete"]) == ("replay_end", 2, False)


async def test_without_marks_the_frames_are_the_seeds(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        first = await b.inject("room", "kept")
        async with client(b.port, query="last=5") as ws:
            replayed = await receive(ws)  # checked against the seed's schema
            live = await b.inject("room", "live")
            assert (await receive(ws))["eventId"] == live.id
        assert replayed["eventId"] == first.id
        assert "replayed" not in replayed
        async with client(b.port, query="marks=true") as ws:  # nothing asked: live begins
            assert await frame(ws) == {"type": "replay_end", "socket_sequence": 0,
                                       "replayed": 0, "complete": True, "lastEventId": None}


async def test_bad_last_is_refused(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, max_last=50) as b:
        for query, says in (("last=51", "last: at most 50 events"),
                            ("last=-1", "last: must be a number"),
                            ("last=2&since=00000000000000000001", "since or last"),
                            ("marks=maybe", "marks:")):
            status, body = await raw_handshake(b.port, f"/v1/chats/room?{query}")
            assert (status, says in body) == (400, True), (query, body)


async def test_hello_tells_the_heartbeat_interval_and_the_limits(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, heartbeat_interval_s=0.2, rate_limit_per_s=4.0,
                           rate_burst=8) as b:
        async with client(b.port, query="hello=true&heartbeat=true&marks=true") as ws:
            hello, end, beat = await frame(ws), await frame(ws), await frame(ws)
        assert hello == {"type": "hello", "socket_sequence": 0, "heartbeatInterval": 0.2,
                         "rateLimit": {"perSecond": 4.0, "burst": 8},
                         "maxMessageBytes": 65536, "maxLast": 100}
        assert (end["type"], end["socket_sequence"]) == ("replay_end", 1)
        assert beat == {"type": "heartbeat", "socket_sequence": 2}
        async with client(b.port, query="hello=true") as ws:
            assert (await frame(ws))["heartbeatInterval"] is None  # none asked for
