"""Readers that stop reading, or read slowly, against the real server: a raw socket with a
small SO_RCVBUF, so its TCP window and the server's send buffer fill up. What the client
sees, what the server counts, and that the client can resume afterwards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from ws_support import (
    Bridge,
    MemoryHistory,
    chat_bridge,
    client,
    client_frame,
    eventually,
    raw_upgrade,
    receive,
    server_frames,
)

FROZEN_RCVBUF = 4096


def _ids(frames: list[bytes]) -> list[str]:
    """The eventIds of the whole update frames the frozen reader got (the last one may
    have been cut in half: it is not among them)."""
    return [json.loads(f)["eventId"] for f in frames]


@asynccontextmanager
async def _bridge(tmp_path: Path, history: MemoryHistory, **settings: Any
                  ) -> AsyncIterator[tuple[Bridge, trio.SocketStream]]:
    """A daemon with ``history`` and a raw reader on chat `room` with a 4 KB SO_RCVBUF, open
    and registered for delivery. The caller closes the reader."""
    async with chat_bridge(tmp_path, extra_plugins=[history], **settings) as b:
        reader = await raw_upgrade(b.port, rcvbuf=FROZEN_RCVBUF)
        await eventually(lambda: b.metric("open_sockets") == 1)
        yield b, reader


async def _resumes(b: Bridge, sent: list[str], got: list[str]) -> None:
    """A client that reconnects with ``since`` the last event it got receives the rest."""
    async with client(b.port, query=f"since={got[-1]}") as resumed:
        rest = [await receive(resumed) for _ in range(len(sent) - len(got))]
    assert [f["eventId"] for f in rest] == sent[len(got):]


async def test_a_frozen_reader_is_cut_after_close_timeout_counted_and_can_resume(
        tmp_path: Path) -> None:
    history = MemoryHistory()
    async with _bridge(tmp_path, history, outbound_queue=4, close_timeout_s=0.5) as (
            b, frozen), client(b.port) as reader:
        async with frozen:
            await eventually(lambda: b.metric("open_sockets") == 2)
            sent: list[str] = []
            while b.metric("slow_client_closes_total") == 0:
                assert len(sent) < 2000, "the frozen reader was never closed"
                sent.append((await b.inject("room", "f" * 20_000)).id)
                assert (await receive(reader))["eventId"] == sent[-1]
            # The 1013 frame cannot leave a full TCP buffer: the close is cut, and counted.
            await eventually(lambda: b.metric("socket_closes_cut_total", code="1013") == 1)
            assert b.metric("socket_closes_total", code="1013") == 1
            assert b.metric("connections_cut_total") == 1
            assert b.metric("open_sockets") == 1
            frames, code, _ = await server_frames(frozen)  # it reads at last
        assert code is None  # EOF, no close frame: a WebSocket client reports 1006
        got = _ids(frames)
        assert got == sent[:len(got)]
        assert 0 < len(got) < len(sent)
        await _resumes(b, sent, got)
        assert b.metric("socket_closes_cut_total", code="1000") == 0  # clean closes are not


async def test_a_frozen_reader_at_shutdown_is_cut_counted_and_resumes_after_the_restart(
        tmp_path: Path) -> None:
    history = MemoryHistory()
    async with _bridge(tmp_path, history, outbound_queue=1000, close_timeout_s=0.5) as (
            b, frozen):
        # 6 MB queued for it: more than its TCP window and the server's send buffer
        # (net.ipv4.tcp_wmem allows 4 MB) can hold.
        sent = [(await b.inject("room", "s" * 20_000)).id for _ in range(300)]
        b.daemon.request_stop()  # SIGTERM: 1001 after what is queued, which cannot leave
        await eventually(lambda: b.metric("socket_closes_cut_total", code="1001") == 1)
        assert b.metric("socket_closes_total", code="1001") == 1
    async with frozen:
        frames, code, _ = await server_frames(frozen)
    assert code is None  # EOF, no 1001 frame
    got = _ids(frames)
    assert got == sent[:len(got)]
    assert 0 < len(got) < len(sent)
    async with chat_bridge(tmp_path, extra_plugins=[history]) as b:
        await _resumes(b, sent, got)



class Trickle(trio.abc.ReceiveStream):
    """A reader that drains ``inner`` slowly: at most ``chunk`` bytes every ``pause`` s."""

    def __init__(self, inner: trio.abc.ReceiveStream, chunk: int, pause: float) -> None:
        self.inner, self.chunk, self.pause = inner, chunk, pause

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep(self.pause)  # the slowness under test, not a wait for readiness
        return await self.inner.receive_some(self.chunk)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_slow_reader_still_gets_its_1013_frame_and_answers_it(tmp_path: Path) -> None:
    """A client that reads at most 100 KB/s, in a chat whose events come in bursts. Its
    1013 frame waits behind one write of at most 16 KB (WRITE_BATCH_BYTES) and what the
    kernel holds, which it drains within close_timeout_s. (When a write could hold 64 queued
    frames, the burst queued while it was not reading, 40 x 16 KB here, went out as one
    write, the close frame could not get past it in time, and the client saw 1006.)"""
    history = MemoryHistory()
    async with _bridge(tmp_path, history, outbound_queue=64, close_timeout_s=3) as (b, slow):
        # A burst while it does not read: a few frames fill its TCP window, the rest queue.
        sent = [(await b.inject("room", "s" * 16_000)).id for _ in range(40)]
        seen: list[tuple[list[bytes], int | None, str]] = []

        async def read() -> None:
            seen.append(await server_frames(Trickle(slow, 2000, 0.02)))

        async with slow, trio.open_nursery() as nursery:
            nursery.start_soon(read)  # it reads again, slowly, while the chat goes on
            while not seen:
                assert len(sent) < 2000, "the slow reader was never closed"
                sent.append((await b.inject("room", "s" * 16_000)).id)
                await trio.sleep(0.01)  # 1.6 MB/s, far more than it reads
            frames, code, reason = seen[0]
            assert code == 1013, (code, len(frames))
            await slow.send_all(client_frame(0x8, (1013).to_bytes(2, "big")))  # its answer
            assert await slow.receive_some() == b""  # then the server closes TCP
        assert "since" in reason
        await eventually(lambda: b.metric("socket_closes_total", code="1013") == 1)
        assert b.metric("socket_closes_cut_total", code="1013") == 0  # the close finished
        got = _ids(frames)
        assert got == sent[:len(got)]
        await _resumes(b, sent, got)
