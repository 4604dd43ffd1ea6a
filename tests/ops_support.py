"""Helpers of the service tests: a systemd notify socket, an HTTP client, the test plugin,
and the real daemon as a subprocess."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import h11
import pluggy
import pytest
import trio

from bridge.assembly import Assembly
from bridge.service import Service

OPSPLUG_DIR = Path(__file__).parent / "opsplug"
REPO = Path(__file__).parent.parent


def install_opsplug(directory: Path) -> list[Path]:
    """Make ``bridged_opsplug`` an installed distribution with the entry point
    ``bridge: opsplug`` for whoever puts the returned paths on ``sys.path``."""
    info = directory / "bridged_opsplug-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bridged-opsplug\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[bridge]\nopsplug = bridged_opsplug\n")
    return [directory, OPSPLUG_DIR]


def use_opsplug(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Install the test plugin for this process, for the duration of one test."""
    for path in install_opsplug(directory):
        monkeypatch.syspath_prepend(str(path))


def count_plugin_managers(monkeypatch: pytest.MonkeyPatch) -> list[pluggy.PluginManager]:
    """The plugin managers this process builds from now on (for the rest of the test)."""
    built: list[pluggy.PluginManager] = []
    init = pluggy.PluginManager.__init__

    def counted(self: pluggy.PluginManager, project_name: str) -> None:
        built.append(self)
        init(self, project_name)

    monkeypatch.setattr(pluggy.PluginManager, "__init__", counted)
    return built


@asynccontextmanager
async def running_service(assembly: Assembly, *,
                          environ: Mapping[str, str] | None = None,
                          wait_ready: bool = True) -> AsyncIterator[Service]:
    """A :class:`Service` in this process (no signals); drained on exit."""
    service = Service(assembly, environ=environ or {})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        if wait_ready:
            with trio.fail_after(5):
                await service.ready.wait()
        try:
            yield service
        finally:
            await service.stop()


# ---------------------------------------------------------------------------- sd_notify


def abstract_name() -> str:
    return f"@bridged-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class NotifySocket:
    """The receiving end of ``$NOTIFY_SOCKET``: a real unix datagram socket."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.received: list[dict[str, str]] = []

    async def bind(self) -> NotifySocket:
        await self.sock.bind(b"\0" + self.name[1:].encode() if self.name.startswith("@")
                             else self.name)
        return self

    async def next(self) -> dict[str, str]:
        data = await self.sock.recv(65536)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append(fields)
        return fields

    async def until(self, key: str, value: str = "1") -> list[dict[str, str]]:
        """Datagrams up to and including the first with ``key=value``."""
        seen = []
        while True:
            fields = await self.next()
            seen.append(fields)
            if fields.get(key) == value:
                return seen

    def pending(self) -> bool:
        """Whether a datagram is waiting (without waiting for one)."""
        return bool(select.select([self.sock.fileno()], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()


def states(datagrams: list[dict[str, str]]) -> list[str]:
    """The state changes in order (READY, RELOADING, STOPPING), watchdog pings left out."""
    return [k for d in datagrams for k in d if k in ("READY", "RELOADING", "STOPPING")]


# ---------------------------------------------------------------------------- HTTP


async def http(port: int, path: str, method: str = "GET", *, host: str = "127.0.0.1"
               ) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(
            method=method, target=path, headers=[("host", f"{host}:{port}")])) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return await read_response(conn, stream)


async def read_response(conn: h11.Connection, stream: trio.abc.Stream
                        ) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, headers, body


# ---------------------------------------------------------------------------- subprocess


class Bridged:
    """``python -m bridge run -c CONFIG`` as a child process."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        with trio.fail_after(15):
            return await self.process.wait()

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()


@contextmanager
def _log_file(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


async def start_bridged(config: Path, notify: NotifySocket, *,
                        extra_env: dict[str, str] | None = None,
                        pythonpath: Sequence[Path] = (), args: Sequence[str] = (),
                        log_name: str = "bridged.stderr",
                        preexec: Callable[[], None] | None = None) -> Bridged:
    """Start the daemon; ``args`` are appended to ``run -c CONFIG``, its stderr goes to
    ``log_name`` beside the config; ``preexec`` runs in the child before the exec."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = notify.name
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    env.update(extra_env or {})
    log_path = config.parent / log_name
    with _log_file(log_path) as fd:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bridge", "run", "-c", str(config), *args],
            env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd=str(config.parent),
            preexec_fn=preexec)
    return Bridged(process, log_path)
