"""The drain while clients keep sending (found by bench/lifecycle.py): once the drain has
begun the transport takes no more client frames, so the pipeline can empty and the drain
ends with 1001 closes instead of running out its time while clients keep it busy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing
from ws_support import chat_bridge, client, closed_with, update

from bridge import Message, hookimpl


class Gate:
    """Holds the first persist call until ``release`` is set."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.release = trio.Event()

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        self.started.set()
        await self.release.wait()


async def test_frames_sent_after_the_drain_began_are_not_taken(tmp_path: Path) -> None:
    gate = Gate()
    async with chat_bridge(tmp_path, extra_plugins=[gate]) as b, client(b.port) as ws:
        await ws.send_message(update("before"))
        await gate.started.wait()  # "before" is in the pipeline, held there
        b.daemon.request_stop()
        await trio.testing.wait_all_tasks_blocked()  # the drain has begun
        await ws.send_message(update("after"))
        await trio.testing.wait_all_tasks_blocked()  # and the server has read "after"
        gate.release.set()
        frames, code, _ = await closed_with(ws)
    assert [f["message"][0]["text"] for f in frames] == ["before"]
    assert code == 1001
