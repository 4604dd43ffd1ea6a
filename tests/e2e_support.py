"""Helpers of the end-to-end tests: config.example.toml rewritten only for isolation, the real
daemon (``python -m bridge run``) as a child process with its ports read from its JSON log,
a vhost per test on the real broker, and a chat client written from SPEC §2.

The building blocks come from the other support modules: the WebSocket client and the seed
schema (ws_support), the broker access and the TCP proxy (amqp_support), the child process,
the notify socket and the HTTP client (ops_support).
"""

from __future__ import annotations

import json
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from amqp_support import BROKER, Broker, Names
from ops_support import REPO, Bridged, NotifySocket, abstract_name, http, start_bridged
from trio_websocket import WebSocketConnection
from ws_support import client, receive, update

from bridge_plugins.amqp.consumer import Delivery

EXAMPLE = REPO / "config.example.toml"
#: The example config's AMQP names, kept as they are (each test has a vhost of its own).
NAMES = Names(queue="notifications", dead="notifications.dead", exchange="chat",
              archive="archive")


# ---------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class Vhost:
    name: str

    def url(self, port: int = BROKER[1]) -> str:
        return f"amqp://guest:guest@{BROKER[0]}:{port}/{self.name}"


async def _rabbitmqctl(*args: str) -> None:
    await trio.run_process(["rabbitmqctl", "-q", *args], capture_stdout=True,
                           capture_stderr=True)


@asynccontextmanager
async def fresh_vhost() -> AsyncIterator[Vhost]:
    """A vhost for one test (the example's queue and exchange names are fixed), deleted
    afterwards."""
    vhost = Vhost(f"bridged-e2e-{uuid.uuid4().hex[:12]}")
    await _rabbitmqctl("add_vhost", vhost.name)
    await _rabbitmqctl("set_permissions", "-p", vhost.name, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        with trio.CancelScope(shield=True):
            await _rabbitmqctl("delete_vhost", vhost.name)


async def archived(broker: Broker, ids: Iterable[str], within: float = 8.0
                   ) -> list[Delivery]:
    """What the archiver queue holds, read (and acknowledged) until every id of ``ids`` was
    seen; duplicates (a republish after a lost confirm) are returned too."""
    wanted = set(ids)
    consumer = await broker.conn.open_consumer(NAMES.archive, 256)
    got: list[Delivery] = []
    with trio.fail_after(within):
        while not wanted <= {d.message_id for d in got}:
            for d in await consumer.receive():
                consumer.ack(d.tag)
                got.append(d)
    consumer.cancel()
    return got


def first_seen(deliveries: Sequence[Delivery]) -> list[str]:
    """The message ids in the order they first arrived."""
    return list(dict.fromkeys(d.message_id for d in deliveries))


# ---------------------------------------------------------------------------- config


def example_config(directory: Path, amqp_url: str, *, extra: str = "") -> Path:
    """config.example.toml with only what isolation needs changed: both ports 0 (the bound
    ones are read from the log), the state directory in ``directory``, the broker URL (a
    vhost of this test, maybe through a proxy); ``extra`` is appended (plugin tables)."""
    text = EXAMPLE.read_text()
    for old, new in [
        ('state_dir = "state"', f'state_dir = "{(directory / "state").as_posix()}"'),
        ("port = 9100", "port = 0"),
        ("port = 3000", "port = 0"),
        ('url = "amqp://guest:guest@127.0.0.1:5672/"', f'url = "{amqp_url}"'),
    ]:
        assert text.count(old) == 1, f"config.example.toml no longer has {old!r} once"
        text = text.replace(old, new)
    path = directory / "bridged.toml"
    path.write_text(text + extra)
    return path


# ---------------------------------------------------------------------------- daemon


_WS = re.compile(r"chat listening on ws://127\.0\.0\.1:(\d+)/")
_ADMIN = re.compile(r"admin listener on http://127\.0\.0\.1:(\d+) ")


@dataclass
class Running:
    """A started daemon: the child process, its notify socket and the ports it bound."""

    bridged: Bridged
    notify: NotifySocket
    ws_port: int = 0
    admin_port: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def log(self) -> list[dict[str, Any]]:
        """The JSON log records so far."""
        return [json.loads(line) for line in self.bridged.log_lines() if line.startswith("{")]

    def messages(self) -> list[str]:
        return [r["msg"] for r in self.log()]

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, _, body = await http(self.admin_port, "/readyz")
        answer: dict[str, Any] = json.loads(body)
        return status, answer

    async def until_readyz(self, status: int, within: float = 8.0) -> dict[str, Any]:
        """Poll /readyz until it answers ``status``; its body."""
        with trio.fail_after(within):
            while True:
                got, body = await self.readyz()
                if got == status:
                    return body
                await trio.sleep(0.02)

    async def until_metric(self, sample: str, within: float = 5.0) -> str:
        """Poll /metrics until a line reads ``sample`` (name, labels and value); the text."""
        with trio.fail_after(within):
            while True:
                _, _, body = await http(self.admin_port, "/metrics")
                if sample in body.decode().splitlines():
                    return body.decode()
                await trio.sleep(0.02)

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send ``signum`` and wait for the exit code."""
        self.bridged.signal(signum)
        return await self.bridged.wait()


@asynccontextmanager
async def running(config: Path, *, log_name: str = "bridged.stderr",
                  pythonpath: Sequence[Path] = (),
                  extra_env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    """``python -m bridge run -c CONFIG --log-format json``, READY (every transport up)
    before the block; killed at the end if still running. The log is printed afterwards
    (pytest shows it when the test fails)."""
    notify = await NotifySocket(abstract_name()).bind()
    bridged = await start_bridged(config, notify, args=["--log-format", "json"],
                                  log_name=log_name, pythonpath=pythonpath,
                                  extra_env=extra_env)
    daemon = Running(bridged, notify)
    try:
        await _wait_ready(daemon)
        text = "\n".join(daemon.messages())
        ws, admin = _WS.search(text), _ADMIN.search(text)
        assert ws is not None, text
        assert admin is not None, text
        daemon.ws_port, daemon.admin_port = int(ws.group(1)), int(admin.group(1))
        yield daemon
    finally:
        if bridged.process.returncode is None:
            bridged.process.kill()
            with trio.CancelScope(shield=True):
                await bridged.process.wait()
        notify.close()
        print(f"--- {log_name}\n" + "\n".join(bridged.log_lines()))


async def _wait_ready(daemon: Running) -> None:
    async with trio.open_nursery() as nursery:

        async def exited() -> None:
            code = await daemon.bridged.process.wait()
            raise AssertionError(f"bridged exited with {code} before READY=1")

        nursery.start_soon(exited)
        with trio.fail_after(10):
            await daemon.notify.until("READY")
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- chat client


class ChatClient:
    """A chat client as SPEC §2 describes one: it sends ``update`` frames, and checks every
    frame it receives against the seed's schema and its ``socket_sequence`` (0, 1, 2, ...:
    a gap fails the test)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.sequence = 0

    async def send(self, *texts: str, **item: Any) -> None:
        await self.ws.send_message(update(*texts, **item))

    async def next(self) -> dict[str, Any]:
        frame = await receive(self.ws)  # validated against the seed schema
        assert frame["socket_sequence"] == self.sequence, (frame, self.sequence)
        self.sequence += 1
        return frame

    async def say(self, text: str, **item: Any) -> dict[str, Any]:
        """Send one message and return its echo (nobody else writes on this chat)."""
        await self.send(text, **item)
        echo = await self.next()
        assert echo["type"] == "update"
        assert [i["text"] for i in echo["message"]] == [text], echo
        return echo


@asynccontextmanager
async def chat(port: int, chat_id: str, query: str = "", *,
               headers: list[tuple[bytes, bytes]] | None = None
               ) -> AsyncIterator[ChatClient]:
    async with client(port, chat_id, query, headers=headers) as ws:
        yield ChatClient(ws)


def without_sequence(frame: dict[str, Any]) -> dict[str, Any]:
    """An update as published to AMQP: the frame without its per-socket sequence."""
    return {k: v for k, v in frame.items() if k != "socket_sequence"}
