"""sd_notify over a real unix datagram socket, and the watchdog that a blocked loop stops."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from ops_support import NotifySocket, abstract_name

from bridge import Message, hookimpl, sdnotify
from bridge.assembly import assemble
from bridge.sdnotify import Notifier, socket_address, watchdog_interval
from bridge.service import Service
from bridge.testing import MEMORY_AB, write_config


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))
    yield path
    shutil.rmtree(path)


async def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000"})
    assert not notifier.enabled
    await notifier.ready("x")
    await notifier.reloading()
    await notifier.stopping()
    await notifier.set_status("y")
    with trio.fail_after(1):
        await notifier.watchdog()  # returns at once: nobody to ping


def test_socket_address_abstract_and_path() -> None:
    assert socket_address("@bridged/notify") == b"\0bridged/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
        env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


@pytest.mark.parametrize("kind", ["abstract", "path"])
async def test_state_lines_reach_a_real_datagram_socket(kind: str, short_dir: Path) -> None:
    name = abstract_name() if kind == "abstract" else str(short_dir / "notify")
    listener = await NotifySocket(name).bind()
    notifier = Notifier({"NOTIFY_SOCKET": name})
    with trio.fail_after(5):
        await notifier.ready("serving: a")
        assert await listener.next() == {"READY": "1", "STATUS": "serving: a"}
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        got = await listener.next()
        assert got["RELOADING"] == "1"
        assert before <= int(got["MONOTONIC_USEC"]) <= after
        await notifier.stopping("draining\nnow")
        assert await listener.next() == {"STOPPING": "1", "STATUS": "draining now"}
        await notifier.set_status("draining now")  # unchanged: not sent again
        await notifier.set_status("almost done")
        assert await listener.next() == {"STATUS": "almost done"}
    notifier.close()
    listener.close()


async def test_watchdog_pings_at_half_the_interval() -> None:
    listener = await NotifySocket(abstract_name()).bind()
    notifier = Notifier({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "100000"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.watchdog)
        with trio.fail_after(5):
            assert await listener.next() == {"WATCHDOG": "1"}
            start = trio.current_time()
            for _ in range(3):
                assert await listener.next() == {"WATCHDOG": "1"}
            elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    notifier.close()
    listener.close()
    assert 0.14 <= elapsed < 1.0  # three intervals of 0.05 s (generous under load)


async def test_no_pings_when_the_watchdog_belongs_to_another_pid() -> None:
    listener = await NotifySocket(abstract_name()).bind()
    notifier = Notifier({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "100000",
                         "WATCHDOG_PID": "1"})
    with trio.fail_after(1):
        await notifier.watchdog()
    await notifier.set_status("marker")
    assert await listener.next() == {"STATUS": "marker"}  # the first datagram: no ping
    notifier.close()
    listener.close()


async def test_an_unreachable_socket_warns_once_and_never_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": abstract_name()})  # nobody bound it
    for _ in range(3):
        await notifier.ready("x")
    warnings = [r for r in caplog.records if r.name == "bridge.sdnotify"]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


async def test_a_socket_nobody_reads_never_stalls_the_sender(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT_S", 0.01)
    listener = await NotifySocket(abstract_name()).bind()  # bound, never read
    notifier = Notifier({"NOTIFY_SOCKET": listener.name})
    with trio.fail_after(10):
        for _ in range(2000):  # more than any queue limit (net.unix.max_dgram_qlen)
            await notifier.notify("WATCHDOG=1")
            if caplog.records:
                break
    notifier.close()
    listener.close()
    (warning,) = caplog.records
    assert "nobody reads" in warning.getMessage()


class _Blocker:
    """Blocks the trio loop (as a badly written plugin would) on a message saying "block"."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.blocked: tuple[float, float] | None = None

    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if stage == "inbound" and message.body["message"][0]["text"] == "block":
            start = time.time()  # the clock of the kernel's datagram stamps
            time.sleep(self.seconds)  # the point of the test
            self.blocked = (start, time.time())


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not export it


class _Arrivals:
    """The datagrams a collector thread received, each with the kernel's arrival time
    (CLOCK_REALTIME), and a way for the test to wait until enough pings have arrived."""

    def __init__(self) -> None:
        self.items: list[tuple[float, bytes]] = []
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()

    def add(self, item: tuple[float, bytes]) -> None:
        """From the collector thread; never blocks, even while the trio loop does."""
        self.items.append(item)
        self._token.run_sync_soon(lambda: self._changed.set())

    def pings(self) -> list[float]:
        return [t for t, data in self.items if data == b"WATCHDOG=1"]

    async def wait_for_pings(self, count: int, after: float) -> None:
        with trio.fail_after(10):
            while True:
                self._changed = trio.Event()
                if len([t for t in self.pings() if t >= after]) >= count:
                    return
                await self._changed.wait()


def _collect(sock: socket.socket, out: _Arrivals) -> None:
    """Thread body: every datagram into ``out`` until b"STOP"; kernel stamps stay exact even
    if this thread is scheduled late."""
    while True:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
        if data == b"STOP":
            return
        (_, _, stamp), = ancillary
        sec, nsec = struct.unpack("qq", stamp)
        out.add((sec + nsec / 1e9, data))


async def test_the_watchdog_stops_while_the_loop_is_blocked(tmp_path: Path) -> None:
    name = abstract_name()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name[1:].encode())
    receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    arrivals = _Arrivals()
    thread = threading.Thread(target=_collect, args=(receiver, arrivals), daemon=True)
    thread.start()
    blocker = _Blocker(0.6)
    config = assemble(write_config(tmp_path, """
[admin]
enabled = false
""" + MEMORY_AB), extra_plugins=[blocker])
    service = Service(config,
                      environ={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000"})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.ready.wait()
        await arrivals.wait_for_pings(3, after=0.0)  # some pings on a healthy loop
        a: Any = service.daemon.transports["a"]
        block = {"type": "update", "message": [{"type": "message", "text": "block"}]}
        await a.inject(block, chat_id="c1")  # returns once the message is settled
        assert blocker.blocked is not None
        await arrivals.wait_for_pings(2, after=blocker.blocked[1])  # the pings come back
        await service.stop()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.sendto(b"STOP", b"\0" + name[1:].encode())
    sender.close()
    thread.join(5)
    receiver.close()

    assert blocker.blocked is not None
    start, end = blocker.blocked
    pings = arrivals.pings()
    assert len([t for t in pings if t < start]) >= 3
    assert [t for t in pings if start + 0.05 < t < end] == []  # blocked loop: no pings
    assert len([t for t in pings if t >= end]) >= 2  # and they resume
    assert max(b - a for a, b in itertools.pairwise(pings)) >= 0.55
    assert any(data.startswith(b"READY=1") for _, data in arrivals.items)
