"""A connection's byte stream, whose writes can be held and then sent as one.

trio-websocket sends every WebSocket message with its own ``send_all``, so each frame costs
one ``send()`` system call. On the development VM a loopback ``send()`` of a small frame
costs about 43 µs, and the same bytes sent 64 frames at a time cost 0.09 µs per frame
(BENCHMARKS.md). A socket's writer with several frames queued therefore frames them all
while the stream is held. The stream gathers what trio-websocket writes and sends it in one
``send_all`` when the writer releases it.

Only the writer holds the stream, and only while it frames what is already queued, with no
waiting in between. Whatever else trio-websocket writes meanwhile (a pong, the reply to a
close) joins the same buffer, in order. While a release is sending, what is written is held
too, and sent by that release when its send is done: two sends never overlap on the inner
stream (trio raises ``BusyResourceError`` when they do). Closing the stream sends what is
held first, then its :attr:`~HeldStream.farewell`, if it has one.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class HeldStream(trio.abc.Stream):
    """Wraps ``inner``: :meth:`hold`, let trio-websocket write, then :meth:`release`."""

    __slots__ = ("_held", "_releasing", "farewell", "held_bytes", "inner")

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.held_bytes = 0  # written since the last hold()
        #: Asked on :meth:`aclose`: the last bytes to send before the stream closes (a close
        #: frame nobody sent yet), or ``b""``.
        self.farewell: Callable[[], bytes] | None = None
        self._held: list[bytes] | None = None
        self._releasing = trio.Lock()  # the writer's release, or the flush of aclose

    def hold(self) -> None:
        """Keep what is written from now on, until :meth:`release`."""
        if self._held is None:
            self._held = []
            self.held_bytes = 0

    async def release(self) -> None:
        """Send what was held, in one ``send_all`` (and what arrives meanwhile, in the next),
        then stop holding."""
        try:
            self._releasing.acquire_nowait()  # free nearly always: no checkpoint then
        except trio.WouldBlock:
            await self._releasing.acquire()
        try:
            while self._held:
                data, self._held = b"".join(self._held), []  # still held while sending
                await self.inner.send_all(data)
        finally:
            self._held = None
            self._releasing.release()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            self._held.append(bytes(data))
            self.held_bytes += len(data)
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        try:
            last = self.farewell() if self.farewell is not None else b""
            if last:
                self.hold()
                assert self._held is not None
                self._held.append(last)  # after what is held or being sent, in order
            if self._held:
                await self.release()  # a close reply written while held still goes out
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone: nothing more can reach it
        finally:
            self._held = None
            await self.inner.aclose()
