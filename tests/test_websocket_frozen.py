"""Readers that stop reading, against the real server: a raw socket with a small SO_RCVBUF
that never reads, so its TCP window and the server's send buffer fill up. What the client
sees, what the server counts, and that the client can resume afterwards."""

from __future__ import annotations

import json
from pathlib import Path

from ws_support import (
    Bridge,
    MemoryHistory,
    chat_bridge,
    client,
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


async def _resumes(b: Bridge, sent: list[str], got: list[str]) -> None:
    """A client that reconnects with ``since`` the last event it got receives the rest."""
    async with client(b.port, query=f"since={got[-1]}") as resumed:
        rest = [await receive(resumed) for _ in range(len(sent) - len(got))]
    assert [f["eventId"] for f in rest] == sent[len(got):]


async def test_a_frozen_reader_is_cut_after_close_timeout_counted_and_can_resume(
        tmp_path: Path) -> None:
    history = MemoryHistory()
    async with chat_bridge(tmp_path, outbound_queue=4, close_timeout_s=0.5,
                           extra_plugins=[history]) as b, client(b.port) as reader:
        frozen = await raw_upgrade(b.port, rcvbuf=FROZEN_RCVBUF)
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
    async with chat_bridge(tmp_path, outbound_queue=1000, close_timeout_s=0.5,
                           extra_plugins=[history]) as b:
        frozen = await raw_upgrade(b.port, rcvbuf=FROZEN_RCVBUF)
        await eventually(lambda: b.metric("open_sockets") == 1)
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
