"""Bad input and bad peers: each close code, slow readers, vanishing clients, slowloris,
drain. In every case the other sockets and the daemon carry on."""

from __future__ import annotations

import json
import statistics
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from ws_support import (
    MemoryHistory,
    chat_bridge,
    client,
    client_frame,
    closed_with,
    eventually,
    raw_handshake,
    raw_upgrade,
    receive,
    server_frames,
    update,
    vanish,
)

from bridge import CHAT_EVENT, ContractError, Message, hookimpl


async def _still_serves(port: int) -> None:
    async with client(port, "after") as ws:
        await ws.send_message(update("still here"))
        assert (await receive(ws))["message"][0]["text"] == "still here"


async def test_invalid_json_closes_1007(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        async with client(b.port) as bad, client(b.port) as good:
            await bad.send_message('{"type": "update", "message": [')
            frames, code, reason = await closed_with(bad)
            await good.send_message(update("unaffected"))
            assert (await receive(good))["message"][0]["text"] == "unaffected"
        await _still_serves(b.port)
    assert (frames, code) == ([], 1007)
    assert "not valid JSON" in reason


async def test_a_lone_surrogate_escape_closes_1007_and_a_pair_is_a_character(
        tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        frame = r'{"type":"update","message":[{"type":"message","text":"TEXT"}]}'
        await ws.send_message(frame.replace("TEXT", r"\ud83d\ude00"))
        assert (await receive(ws))["message"][0]["text"] == "\U0001F600"
        await ws.send_message(frame.replace("TEXT", r"\ud800"))
        _, code, reason = await closed_with(ws)
    assert code == 1007
    assert "surrogate" in reason


async def test_invalid_utf8_in_a_binary_json_frame_closes_1007(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        await ws.send_message(b'{"type": "\xff"}')
        _, code, reason = await closed_with(ws)
    assert code == 1007
    assert "UTF-8" in reason


async def test_invalid_msgpack_closes_1007(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port, query="encoding=msgpack") as ws:
        await ws.send_message(b"\xc1\x00")  # 0xc1 is never used in msgpack
        _, code, reason = await closed_with(ws)
    assert code == 1007
    assert "msgpack" in reason


# Frames that break RFC 6455 itself, which wsproto finds before the transport sees a message.
BAD_FRAMES = {
    "unmasked": (client_frame(0x1, b'{"type": "heartbeat"}', masked=False), 1002),
    "RSV1 set": (client_frame(0x1, b'{"type": "heartbeat"}', rsv1=True), 1002),
    "opcode 3": (client_frame(0x3, b"x"), 1002),
    "200-byte ping": (client_frame(0x9, b"p" * 200), 1002),
    "leading continuation": (client_frame(0x0, b"x"), 1002),
    "close code 999": (client_frame(0x8, struct.pack("!H", 999) + b"bye"), 1002),
    "invalid UTF-8 in a text frame": (client_frame(0x1, b'{"type": "\xff"}'), 1007),
}


@pytest.mark.parametrize("kind", BAD_FRAMES)
async def test_a_protocol_error_gets_its_close_frame_before_the_tcp_close(
        tmp_path: Path, kind: str) -> None:
    frame, expected = BAD_FRAMES[kind]
    async with chat_bridge(tmp_path) as b, client(b.port) as good:
        for round_ in range(3):  # the same every time, and the server carries on
            bad = await raw_upgrade(b.port)
            async with bad:
                await bad.send_all(frame)
                frames, code, reason = await server_frames(bad)
                assert await bad.receive_some() == b""  # then the server closes TCP
            assert (frames, code) == ([], expected), (kind, frames, code, reason)
            assert reason  # wsproto's words, e.g. "Received an unmasked frame from client"
            closes = round_ + 1
            await eventually(lambda: b.metric("socket_closes_total", code=str(expected))
                             == closes)  # noqa: B023  (awaited here, in the same round)
        await good.send_message(update("unaffected"))
        assert (await receive(good))["message"][0]["text"] == "unaffected"


async def test_a_frame_that_is_not_an_object_closes_1008(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        await ws.send_message(json.dumps(["update"]))
        _, code, reason = await closed_with(ws)
    assert code == 1008
    assert reason.startswith("frame:")


class ItemTypes:
    """A stand-in for the validation plugin: the item type enum of the contract."""

    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if message.kind != CHAT_EVENT:
            return
        for i, item in enumerate(message.body.get("message", [])):
            if item.get("type") not in ("message", "chat_event"):
                raise ContractError(f"{item.get('type')!r} is not one of message, chat_event",
                                    field=f"message.{i}.type", rule="enum")


async def test_a_contract_violation_closes_1008_naming_the_field(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[ItemTypes()]) as b, \
            client(b.port) as bad, client(b.port) as good:
        await bad.send_message(json.dumps({"type": "update", "message": [
            {"type": "message", "text": "fine"}, {"type": "shout", "text": "HEY"}]}))
        frames, code, reason = await closed_with(bad)
        await good.send_message(update("unaffected"))
        assert (await receive(good))["message"][0]["text"] == "unaffected"
        await eventually(lambda: b.metric("socket_closes_total", code="1008") == 1)
    assert frames == []  # the rejected update went nowhere
    assert code == 1008
    assert reason.startswith("message.1.type: ")


async def test_an_update_the_enrichment_cannot_shape_closes_1008(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        await ws.send_message(json.dumps({"type": "update", "message": "not a list"}))
        _, code, reason = await closed_with(ws)
    assert code == 1008
    assert reason.startswith("message:")


async def test_a_frame_over_max_message_bytes_closes_1009(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, max_message_bytes=1024) as b:
        async with client(b.port) as ws:
            await ws.send_message(update("x" * 2000))
            _, code, _ = await closed_with(ws)
        assert code == 1009
        # The limit is in bytes: 600 two-byte characters are 1200 bytes.
        async with client(b.port) as ws:
            await ws.send_message(update("é" * 600))
            _, code, reason = await closed_with(ws)
        assert code == 1009
        assert "over the limit of 1024" in reason
        async with client(b.port) as ws:  # just under the limit goes through
            await ws.send_message(update("y" * 900))
            assert (await receive(ws))["message"][0]["text"] == "y" * 900


class BrokenStore:
    """A persistence plugin whose disk is gone."""

    @hookimpl
    def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        raise OSError("disk on fire")


async def test_a_bridge_failure_closes_1011(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[BrokenStore()]) as b, \
            client(b.port) as ws:
        await ws.send_message(update("will not be stored"))
        frames, code, reason = await closed_with(ws)
    assert (frames, code) == ([], 1011)
    assert reason == "could not store the message"


async def test_a_stalled_reader_is_closed_1013_others_keep_their_latency_and_it_resumes(
        tmp_path: Path) -> None:
    history = MemoryHistory()
    big = "z" * 60_000
    async with chat_bridge(tmp_path, outbound_queue=4, extra_plugins=[history]) as b, \
            client(b.port, message_queue_size=0) as stalled, client(b.port) as reader:
        latencies: list[float] = []
        sent: list[str] = []
        while b.metric("slow_client_closes_total") == 0:
            assert len(sent) < 2000, "the stalled reader was never closed"
            start = trio.current_time()
            sent.append((await b.inject("room", big)).id)
            assert (await receive(reader))["eventId"] == sent[-1]
            latencies.append(trio.current_time() - start)
        for _ in range(5):  # the other socket carries on
            sent.append((await b.inject("room", "after")).id)
            assert (await receive(reader))["eventId"] == sent[-1]
        # The stalled client reads again: what was sent, in order, then 1013.
        frames, code, reason = await closed_with(stalled)
        assert code == 1013
        assert "since" in reason
        got = [f["eventId"] for f in frames]
        assert got == sent[:len(got)]
        assert [f["socket_sequence"] for f in frames] == list(range(len(frames)))
        # ... and resumes from the last event it has, missing nothing.
        async with client(b.port, query=f"since={got[-1]}") as resumed:
            rest = [await receive(resumed) for _ in range(len(sent) - len(got))]
        assert [f["eventId"] for f in rest] == sent[len(got):]
    assert len(sent) > 5
    assert max(latencies) < 0.5
    assert statistics.median(latencies) < 0.05


async def test_clients_vanishing_mid_frame_and_mid_delivery_harm_no_one(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as watcher:
        # One sends half a frame (header says 1000 bytes, 10 arrive) and resets.
        half = await raw_upgrade(b.port)
        await half.send_all(b"\x81\xfe\x03\xe8" + b"\x00\x00\x00\x00" + b"0123456789")
        # Another never reads while events pile up towards it, then resets.
        deaf = await raw_upgrade(b.port)
        await eventually(lambda: b.metric("open_sockets") == 3)
        for i in range(50):
            await b.inject("room", f"event {i} " + "p" * 10_000)
        vanish(half)
        vanish(deaf)
        for i in range(50):
            assert (await receive(watcher))["message"][0]["text"].startswith(f"event {i} ")
        await eventually(lambda: b.metric("open_sockets") == 1)
        await watcher.send_message(update("still fine"))
        assert (await receive(watcher))["message"][0]["text"] == "still fine"
        await _still_serves(b.port)


async def test_slow_handshakes_are_cut(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, handshake_timeout_s=0.2) as b:
        async with await trio.open_tcp_stream("127.0.0.1", b.port) as silent, \
                await trio.open_tcp_stream("127.0.0.1", b.port) as trickle:
            await trickle.send_all(b"GET /v1/chats/room HTTP/1.1\r\nHost: x\r\n")  # no end
            start = trio.current_time()
            with trio.fail_after(3):
                assert await silent.receive_some() == b""
                assert await trickle.receive_some() == b""
            waited = trio.current_time() - start
            await _still_serves(b.port)
        assert b.metric("connections_cut_total") == 2
    assert 0.15 <= waited < 1.5


async def test_drain_flushes_and_closes_1001(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        ids = [(await b.inject("room", f"before stop {i}")).id for i in range(3)]
        b.daemon.request_stop()
        frames, code, reason = await closed_with(ws)
    assert [f["eventId"] for f in frames] == ids
    assert code == 1001
    assert "since" in reason


async def test_connections_over_the_limit_are_refused_503(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, max_connections=2) as b, client(b.port), client(b.port):
        status, body = await raw_handshake(b.port, "/v1/chats/room")
        assert status == 503
        assert "too many connections" in body


async def test_a_msgpack_client_gets_msgpack_close_reasons_too(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[ItemTypes()]) as b, \
            client(b.port, query="encoding=msgpack") as ws:
        await ws.send_message(msgpack.packb({"type": "update", "message": [{"type": "x"}]}))
        _, code, reason = await closed_with(ws)
    assert code == 1008
    assert reason.startswith("message.0.type")


class SlowAuth:
    """Holds every handshake in authentication until ``release`` is set."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.release = trio.Event()

    @hookimpl
    async def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Any:
        self.started.set()
        await self.release.wait()
        return None


async def test_a_handshake_under_way_when_the_drain_begins_is_refused_503(
        tmp_path: Path) -> None:
    auth = SlowAuth()
    async with chat_bridge(tmp_path, extra_plugins=[auth]) as b:
        answer: list[tuple[int, str]] = []

        async def connect() -> None:
            answer.append(await raw_handshake(b.port, "/v1/chats/room"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await auth.started.wait()
            b.daemon.transports["chat"].stop_accepting()
            auth.release.set()
    assert answer == [(503, "the server is shutting down; try again later\n")]
