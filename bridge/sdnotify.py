"""systemd's notify protocol (sd_notify(3)) over ``$NOTIFY_SOCKET``, on trio.

A :class:`Notifier` sends state lines (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``STATUS=...``, ``WATCHDOG=1``) as datagrams to the socket systemd named in the
environment; a name starting with ``@`` is a Linux abstract socket. Without
``NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is a no-op.

The watchdog (:meth:`Notifier.watchdog`) is a trio task: it pings at half of
``$WATCHDOG_USEC``, so a loop that is blocked (a plugin calling ``time.sleep``, a busy CPU
loop) stops the pings and systemd restarts the service after ``WatchdogSec=``. As in
``sd_watchdog_enabled(3)``, the watchdog is ours only when ``$WATCHDOG_PID`` is unset or
equals our own pid (a child that inherited the environment must not ping for its parent).

A notification that cannot be sent (no socket, or nobody reading it for
:data:`SEND_TIMEOUT_S`) is dropped with one warning: losing a status line must never stop
the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("bridge.sdnotify")

#: A notification waits at most this long for room in the socket's queue, then is dropped:
#: a manager that does not read must not stall the daemon (its stop path included).
SEND_TIMEOUT_S = 1.0


def socket_address(name: str) -> str | bytes:
    """The ``connect`` address of a ``$NOTIFY_SOCKET`` value (``@name`` is abstract)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None when systemd
    expects none from this process."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid and wpid.strip() != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; watchdog disabled", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None


class Notifier:
    """Sends sd_notify state lines. ``environ`` defaults to ``os.environ``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = watchdog_interval(env)
        self._sock: trio.socket.SocketType | None = None
        self._warned = False
        self.status = ""  # the last STATUS= sent, for logs and tests

    @property
    def enabled(self) -> bool:
        return self._address is not None

    async def notify(self, *lines: str) -> None:
        """Send ``lines`` (``KEY=value`` each) as one datagram."""
        if self._address is None:
            return
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = self._connect(self._address)
            with trio.move_on_after(SEND_TIMEOUT_S) as scope:
                await self._sock.send(payload)
            if scope.cancelled_caught:
                self._warn(f"nobody reads {self._address}; dropped {lines[0]}")
        except OSError as e:
            self._warn(f"cannot notify systemd at {self._address}: "
                       f"{e.strerror or errno.errorcode.get(e.errno or 0, str(e))}")
            self.close()

    def _warn(self, problem: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (further notify problems are not logged)", problem)

    async def ready(self, status: str = "") -> None:
        await self.notify("READY=1", *self._status_line(status))

    async def reloading(self, status: str = "reloading the config") -> None:
        # MONOTONIC_USEC makes the message valid for Type=notify-reload (systemd >= 253).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_line(status))

    async def stopping(self, status: str = "draining") -> None:
        await self.notify("STOPPING=1", *self._status_line(status))

    async def set_status(self, status: str) -> None:
        """Send ``STATUS=`` if it differs from the last one sent."""
        if " ".join(status.split()) != self.status:
            await self.notify(*self._status_line(status))

    def _status_line(self, status: str) -> tuple[str, ...]:
        if not status:
            return ()
        self.status = status = " ".join(status.split())  # one line
        return (f"STATUS={status}",)

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC`` until cancelled; returns at once
        when systemd expects no pings."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        log.info("watchdog: keep-alive every %.3f s", interval)
        while True:
            await self.notify("WATCHDOG=1")
            await trio.sleep(interval)

    @staticmethod
    def _connect(address: str) -> trio.socket.SocketType:
        # Connected without a checkpoint, so that two tasks never race to connect; a unix
        # datagram connect does not block.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(socket_address(address))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return trio.socket.from_stdlib_socket(sock)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
