"""A private RabbitMQ node for fault tests: a test can kill it and start it again without
touching the shared broker on 5672.

The node is all the test's own: its name (``RABBITMQ_NODENAME``), its AMQP port and its
distribution port (both free ports of 127.0.0.1), its mnesia and log directories, its config
file (which pins the listener, since the system's pins 5672), an empty environment file, an
empty plugin list, and ``HOME`` (so its own Erlang cookie) under the test's directory. It is
started as ``rabbitmq-server`` from RabbitMQ's own bin directory and stopped, or killed with
SIGKILL, by the PIDs of its own processes only. Starting one takes a few seconds: use it for
the few tests that need a broker to die.

    async with private_node(tmp_path) as node:
        url = node.url          # amqp://guest:guest@127.0.0.1:<port>/
        await node.kill()       # SIGKILL, like a crash; returns once the port refuses
        await node.start()      # returns once the port accepts; node.accepting_at
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import trio

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
#: Bound on a node's start (the boot takes 3-6 s on the development VM).
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    try:
        with trio.fail_after(1):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError):
        return False
    await stream.aclose()
    return True


class RabbitNode:
    """One private node (see the module's docstring). Not started until :meth:`start`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.name = f"bridged-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.process: trio.Process | None = None
        self.accepting_at = 0.0  # trio.current_time() when the port first accepted
        home = directory / "home"
        for d in (home, directory / "mnesia", directory / "log"):
            d.mkdir(parents=True, exist_ok=True)
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n")
        (directory / "rabbitmq-env.conf").write_text("")
        (directory / "enabled_plugins").write_text("[].\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "",
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "node.pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        """Start the node; return once its AMQP port accepts (``accepting_at`` is then the
        moment it first did, found by polling every 10 ms)."""
        assert self.process is None, "already started"
        with suppress(FileNotFoundError):
            (self.dir / "node.pid").unlink()
        log = (self.dir / "server.out").open("ab")
        self.process = await trio.lowlevel.open_process(
            [str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        with trio.fail_after(START_TIMEOUT_S):
            while not await accepts(self.port):
                if self.process.returncode is not None:
                    raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode};"
                                       f" see {self.dir / 'server.out'}")
                await trio.sleep(0.01)
        self.accepting_at = trio.current_time()

    def _beam_pid(self) -> int | None:
        try:
            return int((self.dir / "node.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    async def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash would; return once the port refuses."""
        assert self.process is not None, "not started"
        pid = self._beam_pid()
        assert pid is not None, "the node has written no PID file"
        os.kill(pid, signal.SIGKILL)
        await self._reap()

    async def stop(self) -> None:
        """Stop the node gracefully (SIGTERM to the node's own server script), or kill it
        after 30 s."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await self.process.wait()
            if self.process.returncode is None and (pid := self._beam_pid()) is not None:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> None:
        assert self.process is not None
        with trio.fail_after(30):
            await self.process.wait()
            while True:  # bounded polling of the port, the real signal
                if not await accepts(self.port):
                    break
                await trio.sleep(0.01)
        self.process = None


@asynccontextmanager
async def private_node(directory: Path, *, started: bool = True) -> AsyncIterator[RabbitNode]:
    """A :class:`RabbitNode` in ``directory``, started unless ``started`` is false, and
    stopped at the end whatever happened."""
    node = RabbitNode(directory)
    try:
        if started:
            await node.start()
        yield node
    finally:
        with trio.CancelScope(shield=True):
            await node.stop()
