"""Frames that are queued together leave in one write (plugins/websocket/stream.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from ws_support import chat_bridge, client, receive

from bridge import hookimpl
from bridge_plugins.websocket.server import WRITE_BATCH_BYTES
from bridge_plugins.websocket.stream import HeldStream


class Recording(trio.abc.Stream):
    """A stream that records each ``send_all``."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return b""

    async def aclose(self) -> None:
        self.closed = True


async def test_held_writes_leave_as_one_and_a_close_sends_what_is_held() -> None:
    inner = Recording()
    stream = HeldStream(inner)
    await stream.send_all(b"a")  # not held: at once
    stream.hold()
    for part in (b"b", b"c", bytearray(b"d")):
        await stream.send_all(part)
    assert inner.writes == [b"a"]
    await stream.release()
    await stream.release()  # nothing held: nothing sent
    assert inner.writes == [b"a", b"bcd"]
    stream.hold()
    await stream.send_all(b"close frame")
    await stream.aclose()  # a reply written while held still goes out, then the close
    assert inner.writes == [b"a", b"bcd", b"close frame"]
    assert inner.closed


async def test_closing_a_held_stream_whose_peer_is_gone_does_not_raise() -> None:
    inner = Recording()
    stream = HeldStream(inner)
    stream.hold()
    await stream.send_all(b"x")
    inner.closed = True
    await stream.aclose()
    assert inner.writes == []


async def test_a_write_during_a_release_waits_its_turn() -> None:
    """While a release is sending to a slow peer, trio-websocket's reader may write (a pong,
    a close reply). That write is held and follows the release; sent at once, it would
    overlap the release's send (BusyResourceError) and abort the connection."""
    sender, receiver = trio.testing.lockstep_stream_pair()  # send_all waits for the reader
    stream = HeldStream(sender)
    stream.hold()
    await stream.send_all(b"frames")
    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.release)
        await trio.testing.wait_all_tasks_blocked()  # the release waits in send_all
        await stream.send_all(b"pong")
        while len(got) < len(b"framespong"):
            got += await receiver.receive_some()
    assert got == b"framespong"
    async with trio.open_nursery() as nursery:  # not held any more: straight through
        nursery.start_soon(stream.send_all, b"after")
        assert await receiver.receive_some() == b"after"


async def test_a_burst_arrives_whole_in_few_writes(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """200 events delivered together to a JSON and a msgpack socket: both get every event,
    in order, with a gapless sequence, and the writers send them many frames per write."""
    frames_per_write: list[int] = []
    release = HeldStream.release

    async def counting_release(self: HeldStream) -> None:
        frames_per_write.append(len(self._held or ()))
        await release(self)

    monkeypatch.setattr(HeldStream, "release", counting_release)
    async with chat_bridge(tmp_path) as b, client(b.port, "burst") as ws_json, \
            client(b.port, "burst", "encoding=msgpack") as ws_msgpack:
        async with trio.open_nursery() as nursery:  # concurrently: the pipeline batches
            for i in range(200):
                nursery.start_soon(b.inject, "burst", f"n{i}")
        for ws in (ws_json, ws_msgpack):
            frames = [await receive(ws) for _ in range(200)]
            assert [f["socket_sequence"] for f in frames] == list(range(200))
            ids = [f["eventId"] for f in frames]
            assert ids == sorted(ids)
            assert len(set(ids)) == 200
            assert sorted(f["message"][0]["text"] for f in frames) == sorted(
                f"n{i}" for i in range(200))
    assert sum(frames_per_write) >= 400
    assert max(frames_per_write) > 1  # queued frames went out together
    assert max(frames_per_write) <= 64  # WRITE_BATCH


async def test_a_write_holds_at_most_write_batch_bytes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of 3 KB events goes out many frames per write, but no write holds more than
    WRITE_BATCH_BYTES and the frame that crossed it: a close frame never waits behind more
    (docs/websocket.md, slow clients)."""
    writes: list[list[bytes]] = []
    release = HeldStream.release

    async def recording_release(self: HeldStream) -> None:
        if self._held:
            writes.append(list(self._held))
        await release(self)

    monkeypatch.setattr(HeldStream, "release", recording_release)
    async with chat_bridge(tmp_path) as b, client(b.port, "burst", message_queue_size=0) as ws:
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(b.inject, "burst", f"{i:03d}" + "b" * 3000)
        frames = [await receive(ws) for _ in range(100)]
    assert [f["socket_sequence"] for f in frames] == list(range(100))
    largest = max(len(frame) for write in writes for frame in write)
    assert max(len(write) for write in writes) > 1  # still batched
    assert max(sum(map(len, write)) for write in writes) < WRITE_BATCH_BYTES + largest


class RecordRemote:
    def __init__(self) -> None:
        self.remotes: list[str] = []

    @hookimpl
    def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> None:
        self.remotes.append(request["remote"])


async def test_the_handshake_hook_sees_the_client_endpoint(tmp_path: Path) -> None:
    auth = RecordRemote()
    async with chat_bridge(tmp_path, extra_plugins=[auth]) as b, client(b.port) as ws:
        host, port = cast(trio.SocketStream, ws._stream).socket.getsockname()[:2]
    assert auth.remotes == [f'Endpoint(address="{host}", port={port}, is_ssl=False)']
