"""The AMQP transport against the real RabbitMQ: consume, publish, dead letters, reconnects,
the outbox across an unreachable broker, a crash and a SIGKILL."""

from __future__ import annotations

import json
import signal
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest
import trio
import trustme
from amqp_support import (
    Names,
    Proxy,
    amqp_table,
    bodies,
    broker_url,
    close_all_connections,
    notification,
    open_broker,
    update,
)
from ws_support import client, receive
from ws_support import update as ws_update

from bridge import (
    CHAT_EVENT,
    NOTIFICATION,
    Accepted,
    ConfigError,
    ContractError,
    DecodeError,
    Failed,
    Message,
    hookimpl,
)
from bridge.assembly import assemble
from bridge.daemon import Daemon
from bridge.testing import run_bridge, write_config
from bridge_plugins.amqp import AmqpTransport, redact
from bridge_plugins.codecs import media_type
from bridge_plugins.memory import MemoryTransport

HEAD = "[daemon]\nhop_limit = 4\ndrain_timeout_s = 5\n[admin]\nenabled = false\n"


class Hooks:
    """Test-only hooks: a contract check on notifications and a store that fails on cue."""

    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if message.kind == NOTIFICATION and not isinstance(message.body.get("userId"), str):
            raise ContractError("userId: must be a string", field="userId", rule="type")

    @hookimpl
    def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        if any(m.body.get("message") == "explode" for m in messages):
            raise RuntimeError("the store is on fire")


def config(tmp_path: Path, names: Names, url: str, *, amqp: dict[str, Any] | None = None,
           routes: str = "", state: str = "state") -> Path:
    text = (HEAD.replace("[daemon]\n", f'[daemon]\nstate_dir = "{(tmp_path / state).as_posix()}"\n')
            + amqp_table("amqp", names, url, **(amqp or {}))
            + '[transports.chat]\ntype = "memory"\n' + routes)
    return write_config(tmp_path, text, name=f"{state}.toml")


TO_CHAT = '[[routes]]\nname = "notify"\nfrom = "amqp"\nto = ["chat"]\n'
TO_AMQP = '[[routes]]\nname = "archive"\nfrom = "chat"\nto = ["amqp"]\n'


@asynccontextmanager
async def connected_bridge(cfg: Path, *, extra_plugins: Sequence[object] = (),
                           connected: bool = True) -> AsyncIterator[Daemon]:
    """``run_bridge``, and with ``connected`` wait until the AMQP transport is connected
    and consuming: it reports started before it connects (the outbox is open)."""
    async with run_bridge(cfg, extra_plugins=extra_plugins) as daemon:
        if connected:
            await until(amqp_of(daemon), lambda: amqp_of(daemon).health().ready)
        yield daemon


def amqp_of(daemon: Daemon) -> AmqpTransport:
    return cast(AmqpTransport, daemon.transports["amqp"])


def chat_of(daemon: Daemon) -> MemoryTransport:
    return cast(MemoryTransport, daemon.transports["chat"])


async def until(transport: AmqpTransport, predicate: Callable[[], bool],
                within: float = 10.0) -> None:
    with trio.fail_after(within):
        while not predicate():
            await transport.wait_changed()


async def received(chat: MemoryTransport, n: int, within: float = 10.0) -> list[Message]:
    out = []
    with trio.fail_after(within):
        for _ in range(n):
            out.append(await chat.received.receive())
    return out


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(f"bridged_{name}",
                                                     {"transport": "amqp", **labels})
    return value or 0.0


# --------------------------------------------------------------------------- consuming


async def test_notification_reaches_the_chat_and_is_acked(tmp_path: Path) -> None:
    names = Names.make()
    async with open_broker() as broker:
        cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT)
        async with connected_bridge(cfg) as daemon:
            amqp = amqp_of(daemon)
            assert amqp.health().ready, amqp.health().detail
            await broker.publish(names.queue, notification("user-1", "your visit is at 10"),
                                 message_id="n-1")
            packed = msgpack.packb({"userId": "user-2", "message": "packed",
                                    "timestamp": "2026-01-02T03:04:05Z"})
            await broker.publish(names.queue, packed, content_type="application/msgpack")
            first, second = await received(chat_of(daemon), 2)
        assert (first.kind, first.source, first.id, first.hops) == (NOTIFICATION, "amqp",
                                                                     "n-1", 0)
        assert first.body["userId"] == "user-1"
        assert first.body["message"] == "your visit is at 10"
        assert first.meta["routing_key"] == names.queue
        assert second.body["message"] == "packed"
        # acknowledged: nothing is left in the queue once the daemon has closed its channel
        assert await broker.ready(names.queue) == 0
        assert await broker.ready(names.dead) == 0


async def test_bad_notifications_are_dead_lettered_with_reasons(tmp_path: Path) -> None:
    names = Names.make()
    async with open_broker() as broker:
        cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT)
        async with connected_bridge(cfg, extra_plugins=[Hooks()]) as daemon:
            await broker.publish(names.queue, b"{not json", message_id="bad-json")
            await broker.publish(names.queue, b"[1, 2]", message_id="not-object")
            await broker.publish(names.queue, b"\x93\x01", content_type="text/x-unknown",
                                 message_id="unknown-type")
            await broker.publish(names.queue, json.dumps({"message": "no user"}).encode(),
                                 message_id="no-user")
            await broker.publish(names.queue, notification("u", "looping"),
                                 headers={"x-bridge-hops": 9}, message_id="loop")
            await broker.publish(names.queue, notification("u", "explode"), message_id="boom")
            await broker.publish(names.queue, notification("u", "fine"), message_id="ok")
            (good,) = await received(chat_of(daemon), 1)
            assert good.body["message"] == "fine"
            dead = await broker.read(names.dead, 6)
            assert metric(daemon, "dead_letters_total", reason="DecodeError") == 3
        reasons = {d.message_id: d.headers["x-bridge-reason"] for d in dead}
        assert reasons == {"bad-json": "DecodeError", "not-object": "DecodeError",
                           "unknown-type": "DecodeError", "no-user": "ContractError",
                           "loop": "HopLimitExceeded", "boom": "Failed"}
        by_id = {d.message_id: d for d in dead}
        assert "not valid JSON" in by_id["bad-json"].headers["x-bridge-error"]
        assert "userId" in by_id["no-user"].headers["x-bridge-error"]
        assert by_id["bad-json"].body == b"{not json"  # the original body, untouched
        assert by_id["loop"].headers["x-bridge-original-queue"] == names.queue
        assert by_id["loop"].headers["x-bridge-original-routing-key"] == names.queue
        assert by_id["boom"].delivery_mode == 2
        assert await broker.ready(names.queue) == 0  # every original was acknowledged
        assert await broker.ready(names.dead) == 0


TO_CHAT_MAPPED = TO_CHAT + 'transforms = ["notification_to_chat"]\n'


async def test_content_types_are_media_types_and_bad_moments_are_contract_errors(
        tmp_path: Path) -> None:
    names = Names.make()
    packed = msgpack.packb({"userId": "u", "message": "msgpack, upper case",
                            "timestamp": "2026-01-02T03:04:05Z"})
    valid = [("application/json; charset=utf-8", notification("u", "with a charset")),
             ("Application/JSON", notification("u", "upper case")),
             ('application/json;charset="UTF-8"', notification("u", "quoted charset")),
             ("Application/X-MsgPack", packed)]
    async with open_broker() as broker:
        cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT_MAPPED)
        async with connected_bridge(cfg) as daemon:
            for i, (content_type, body) in enumerate(valid):
                await broker.publish(names.queue, body, content_type=content_type,
                                     message_id=f"valid-{i}")
            await broker.publish(names.queue, notification("u", "latin"),
                                 content_type="application/json; charset=iso-8859-1",
                                 message_id="latin-1")
            for i, moment in enumerate(["0001-01-01T00:00:00+23:59",
                                        "9999-12-31T23:59:59-23:59"]):
                body = json.dumps({"userId": "u", "message": "when?", "timestamp": moment})
                await broker.publish(names.queue, body.encode(), message_id=f"moment-{i}")
            await broker.publish(names.queue, notification("u", "last"), message_id="last")
            got = await received(chat_of(daemon), len(valid) + 1)
            dead = await broker.read(names.dead, 3)
        assert [m.body["message"][0]["text"] for m in got] == [
            "with a charset", "upper case", "quoted charset", "msgpack, upper case", "last"]
        by_id = {d.message_id: d.headers for d in dead}
        assert by_id["latin-1"]["x-bridge-reason"] == "DecodeError"
        assert "charset 'iso-8859-1'" in by_id["latin-1"]["x-bridge-error"]
        for i in range(2):
            assert by_id[f"moment-{i}"]["x-bridge-reason"] == "ContractError"
            assert "out of range" in by_id[f"moment-{i}"]["x-bridge-error"]
        assert await broker.ready(names.queue) == 0
        assert await broker.ready(names.dead) == 0


async def test_a_body_over_max_message_bytes_is_dead_lettered_whole_and_unread(
        tmp_path: Path) -> None:
    names = Names.make()
    big = bytes(range(256)) * 1200  # 307,200 bytes: three body frames of 128 KiB
    async with open_broker() as broker:
        cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT,
                     amqp={"max_message_bytes": 100_000})
        async with connected_bridge(cfg) as daemon:
            await broker.publish(names.queue, notification("u", "before"), message_id="a")
            await broker.publish(names.queue, big, message_id="big",
                                 headers={"x-custom": "kept"})
            await broker.publish(names.queue, b"x" * 100_000,
                                 message_id="at-limit")  # not JSON, but not too large
            await broker.publish(names.queue, notification("u", "after"), message_id="b")
            got = await received(chat_of(daemon), 2)
            dead = await broker.read(names.dead, 2)
            assert metric(daemon, "dead_letters_total", reason="TooLarge") == 1
        assert [m.id for m in got] == ["a", "b"]
        by_id = {d.message_id: d for d in dead}
        assert by_id["at-limit"].headers["x-bridge-reason"] == "DecodeError"
        too_large = by_id["big"]
        assert too_large.body == big  # the original body, whole
        assert too_large.headers["x-bridge-reason"] == "TooLarge"
        assert too_large.headers["x-bridge-error"] == (
            "the body is 307200 bytes, over max_message_bytes (100000); not decoded")
        assert too_large.headers["x-custom"] == "kept"
        assert too_large.headers["x-bridge-original-queue"] == names.queue
        assert too_large.delivery_mode == 2
        assert await broker.ready(names.queue) == 0
        assert await broker.ready(names.dead) == 0


@pytest.mark.parametrize(("content_type", "media", "params"), [
    ("application/json", "application/json", {}),
    ("Application/JSON; Charset=UTF-8", "application/json", {"charset": "UTF-8"}),
    ('application/json;charset="utf-8";x=1', "application/json", {"charset": "utf-8", "x": "1"}),
    ('a/b; q="say \\"hi\\""', "a/b", {"q": 'say "hi"'}),
])
def test_content_types_parse_as_media_types(content_type: str, media: str,
                                            params: dict[str, str]) -> None:
    assert media_type(content_type) == (media, params)


@pytest.mark.parametrize("content_type", ["json", "application/", "/json", "a/b;", "a/b; c",
                                          "a/b; c = d", 'a/b; c="open', "a b/c"])
def test_what_is_not_a_media_type_is_a_decode_error(content_type: str) -> None:
    with pytest.raises(DecodeError, match=r"media type|malformed parameter"):
        media_type(content_type)


async def test_a_redelivered_message_id_is_not_a_second_event(tmp_path: Path) -> None:
    names = Names.make()
    async with open_broker() as broker:
        cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT)
        async with connected_bridge(cfg) as daemon:
            for text in ("once", "once again", "twice"):
                await broker.publish(names.queue, notification("u", text),
                                     message_id="same" if text != "twice" else "other")
            got = await received(chat_of(daemon), 2)
            assert [m.body["message"] for m in got] == ["once", "twice"]
            with trio.move_on_after(0.3):  # nothing more arrives
                extra = await chat_of(daemon).received.receive()
                pytest.fail(f"duplicate delivered: {extra}")
            assert metric(daemon, "duplicates_total") == 1
        assert await broker.ready(names.queue) == 0


class Gate:
    """A store that holds every batch until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.open = trio.Event()

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        self.entered.set()
        await self.open.wait()


async def test_redeliveries_after_a_reconnect_are_not_second_events(tmp_path: Path) -> None:
    names = Names.make()
    gate = Gate()
    cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT)
    async with connected_bridge(cfg, extra_plugins=[gate]) as daemon:
        amqp, chat = amqp_of(daemon), chat_of(daemon)
        async with open_broker() as broker:
            for text in ("a", "b", "c"):
                await broker.publish(names.queue, notification("u", text), message_id=text)
        await gate.entered.wait()  # "a" is in the pipeline, unacknowledged
        await close_all_connections()  # the broker requeues what was unacknowledged
        await until(amqp, lambda: not amqp.health().ready, within=3)
        # the redelivery of "a" arrives while "a" is still in the pipeline: it is held
        await until(amqp, lambda: metric(daemon, "duplicates_total") >= 1)
        gate.open.set()
        got = await received(chat, 3)
        assert [m.body["message"] for m in got] == ["a", "b", "c"]
        with trio.move_on_after(0.3):  # part of the test: no second event arrives
            extra = await chat.received.receive()
            pytest.fail(f"a redelivery became a second event: {extra}")
    async with open_broker() as broker:  # everything, redeliveries included, was acked
        assert await broker.ready(names.queue) == 0


async def test_consuming_resumes_after_the_broker_closes_every_connection(
        tmp_path: Path) -> None:
    names = Names.make()
    async with connected_bridge(config(tmp_path, names, broker_url(), routes=TO_CHAT)) as daemon:
        amqp = amqp_of(daemon)
        async with open_broker() as broker:
            await broker.publish(names.queue, notification("u", "before the close"))
            (msg,) = await received(chat_of(daemon), 1)
            assert msg.body["message"] == "before the close"
        await close_all_connections()
        # noticed at once through the close callbacks, not after missed heartbeats
        await until(amqp, lambda: not amqp.health().ready, within=3)
        async with open_broker() as broker:
            await broker.publish(names.queue, notification("u", "after the close"))
            (msg,) = await received(chat_of(daemon), 1)
            assert msg.body["message"] == "after the close"
            await until(amqp, lambda: amqp.health().ready)
            assert (await broker.conn.queue_info(names.queue))[1] == 1  # one consumer: us
        assert metric(daemon, "amqp_reconnects_total") >= 1


# --------------------------------------------------------------------------- publishing


async def test_chat_events_are_published_with_key_id_and_persistence(tmp_path: Path) -> None:
    names = Names.make()
    async with open_broker() as broker:
        await broker.bind_archive(names)
        async with connected_bridge(config(tmp_path, names, broker_url(), routes=TO_AMQP,
                                     amqp={"consume_queue": ""})) as daemon:
            amqp = amqp_of(daemon)
            assert amqp.health().ready
            outcome = await chat_of(daemon).inject(update("hello"), chat_id="room.1",
                                                   id="00000000000000000001")
            assert isinstance(outcome, Accepted)
            (d,) = await broker.read(names.archive, 1)
            await until(amqp, lambda: amqp.spool_depth == 0)
            assert metric(daemon, "published_total") == 1
        assert d.routing_key == "chat.room.1"
        assert d.exchange == names.exchange
        assert d.message_id == "00000000000000000001"
        assert d.delivery_mode == 2
        assert d.content_type == "application/json"
        assert d.headers["x-bridge-hops"] == 1
        assert d.headers["x-bridge-chat-id"] == "room.1"
        assert json.loads(d.body) == outcome.message.body


async def test_drain_publishes_the_outbox_before_exit(tmp_path: Path) -> None:
    names = Names.make()
    n = 300
    async with open_broker() as broker:
        await broker.bind_archive(names)
        cfg = config(tmp_path, names, broker_url(), routes=TO_AMQP)
        async with connected_bridge(cfg) as daemon:
            chat = chat_of(daemon)
            for i in range(n):
                await chat.inject(update(f"m{i}"), chat_id="c", wait=False)
        # run_bridge drained on exit: everything accepted was published before it returned
        assert await broker.ready(names.archive) == n
        got = await broker.read(names.archive, n)
    assert [b["message"][0]["text"] for b in bodies(got)] == [f"m{i}" for i in range(n)]
    db = sqlite3.connect(tmp_path / "state" / "amqp" / "outbox.sqlite3")
    try:
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    finally:
        db.close()


async def test_a_chat_event_without_chat_id_fails_cleanly(tmp_path: Path) -> None:
    names = Names.make()
    async with connected_bridge(config(tmp_path, names, broker_url(), routes=TO_AMQP)) as daemon:
        outcome = await chat_of(daemon).inject(update("nowhere"), chat_id=None)
        assert isinstance(outcome, Failed)
        ok = await chat_of(daemon).inject(update("somewhere"), chat_id="c")
        assert isinstance(ok, Accepted)


async def test_a_routing_key_over_255_bytes_fails_that_message_only(tmp_path: Path) -> None:
    names = Names.make()
    cfg = config(tmp_path, names, broker_url(), routes=TO_AMQP,
                 amqp={"routing_key": "chat.{chat_id}.{chat_id}"})
    async with connected_bridge(cfg) as daemon:
        outcome = await chat_of(daemon).inject(update("long"), chat_id="x" * 128)
        assert isinstance(outcome, Failed)  # never spooled, so it cannot block the outbox
        ok = await chat_of(daemon).inject(update("short"), chat_id="c")
        assert isinstance(ok, Accepted)
        with trio.fail_after(10):  # the next one is published and confirmed
            while amqp_of(daemon).spool_depth:
                await amqp_of(daemon).wait_changed()


async def test_chat_keeps_working_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    names = Names.make()
    n = 60
    async with open_broker() as broker, trio.open_nursery() as nursery:
        await broker.bind_archive(names)
        proxy: Proxy = await nursery.start(Proxy().run)
        routes = TO_AMQP + '[[routes]]\nname = "echo"\nfrom = "chat"\nto = ["chat"]\n'
        async with connected_bridge(config(tmp_path, names, proxy.url, routes=routes)) as daemon:
            amqp, chat = amqp_of(daemon), chat_of(daemon)
            await until(amqp, lambda: amqp.health().ready)
            proxy.cut()
            await until(amqp, lambda: not amqp.health().ready, within=3)
            assert "not connected" in amqp.health().detail
            for i in range(n):  # the chat works: every message is accepted and echoed
                outcome = await chat.inject(update(f"m{i}"), chat_id="c1")
                assert isinstance(outcome, Accepted)
            echoed = await received(chat, n)
            assert [m.body["message"][0]["text"] for m in echoed] == [f"m{i}" for i in range(n)]
            assert amqp.spool_depth == n
            assert await broker.ready(names.archive) == 0
            proxy.restore()
            got = await broker.read(names.archive, n)
            await until(amqp, lambda: amqp.spool_depth == 0 and amqp.health().ready)
        nursery.cancel_scope.cancel()
    assert [b["message"][0]["text"] for b in bodies(got)] == [f"m{i}" for i in range(n)]


async def test_spooled_messages_survive_a_crash(tmp_path: Path) -> None:
    """A daemon that dies without draining (its scope cancelled) loses nothing it accepted."""
    names = Names.make()
    n = 40
    with trio.socket.socket() as dead_port:  # bound, not listening: connections are refused
        await dead_port.bind(("127.0.0.1", 0))
        unreachable = broker_url(port=dead_port.getsockname()[1])
        cfg = assemble(config(tmp_path, names, unreachable, routes=TO_AMQP))
        daemon = Daemon(cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            for i in range(n):
                assert isinstance(await chat_of(daemon).inject(update(f"m{i}"), chat_id="c"),
                                  Accepted)
            assert amqp_of(daemon).spool_depth == n
            nursery.cancel_scope.cancel()  # no drain: a crash, as far as the spool knows
    async with open_broker() as broker:
        await broker.bind_archive(names)
        async with connected_bridge(config(tmp_path, names, broker_url(), routes=TO_AMQP)):
            got = await broker.read(names.archive, n)
    assert [b["message"][0]["text"] for b in bodies(got)] == [f"m{i}" for i in range(n)]


async def test_spooled_messages_survive_sigkill(tmp_path: Path) -> None:
    """A real `bridged run` process is SIGKILLed while its outbox holds messages."""
    names, inbound, echo = Names.make(), Names.make(), Names.make()
    n = 30
    with trio.socket.socket() as dead_port:
        await dead_port.bind(("127.0.0.1", 0))
        unreachable = broker_url(port=dead_port.getsockname()[1])
        state = (tmp_path / "state").as_posix()
        text = (f'[daemon]\nstate_dir = "{state}"\n[admin]\nenabled = false\n'
                + amqp_table("src", inbound, broker_url(), consume_kind=CHAT_EVENT,
                             exchange="")
                + amqp_table("amqp", names, unreachable, consume_queue="")
                + amqp_table("echo", echo, broker_url(), consume_queue="")
                + '[[routes]]\nname = "out"\nfrom = "src"\nto = ["amqp", "echo"]\n')
        cfg = write_config(tmp_path, text, name="killed.toml")
        async with open_broker() as broker:
            await broker.bind_archive(echo)
            await broker.conn.declare(queues=[inbound.queue])
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bridge", "run", "-c", str(cfg)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for i in range(n):
                    await broker.publish(inbound.queue, json.dumps(update(f"m{i}")).encode(),
                                         headers={"x-bridge-chat-id": "c"})
                # `echo` is delivered after `amqp` in each batch: once the echo copies are
                # out, every message is in the unreachable transport's outbox.
                echoed = await broker.read(echo.archive, n, within=30)
                assert len(echoed) == n
            finally:
                proc.send_signal(signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL
    assert (tmp_path / "state" / "amqp" / "outbox.sqlite3").stat().st_size > 0
    async with open_broker() as broker:
        await broker.bind_archive(names)
        cfg = config(tmp_path, names, broker_url(), routes=TO_AMQP)
        async with connected_bridge(cfg) as daemon:
            got = await broker.read(names.archive, n)
            await until(amqp_of(daemon), lambda: amqp_of(daemon).spool_depth == 0)
    assert [b["message"][0]["text"] for b in bodies(got)] == [f"m{i}" for i in range(n)]
    assert {d.headers["x-bridge-chat-id"] for d in got} == {"c"}


async def test_amqps_with_a_private_ca(tmp_path: Path) -> None:
    """TLS to the broker: a TLS-terminating proxy with a certificate from a test CA."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    names = Names.make()
    async with open_broker() as broker, trio.open_nursery() as nursery:
        proxy: Proxy = await nursery.start(Proxy(tls=server_ctx).run)
        assert proxy.url.startswith("amqps://")
        trusted = config(tmp_path, names, proxy.url, routes=TO_CHAT,
                         amqp={"tls_ca_file": str(ca_file)})
        async with connected_bridge(trusted) as daemon:
            await until(amqp_of(daemon), lambda: amqp_of(daemon).health().ready)
            await broker.publish(names.queue, notification("u", "over tls"))
            (msg,) = await received(chat_of(daemon), 1)
            assert msg.body["message"] == "over tls"
        untrusted = config(tmp_path, names, proxy.url, routes=TO_CHAT, state="untrusted")
        async with connected_bridge(untrusted, connected=False) as daemon:
            amqp = amqp_of(daemon)
            await until(amqp, lambda: "CERTIFICATE" in amqp.health().detail)
            health = amqp.health()
            assert not health.ready
            assert "CERTIFICATE_VERIFY_FAILED" in health.detail
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- lifecycle


class SilentBroker:
    """A TCP listener that accepts connections and never says a word (a hung broker)."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[SilentBroker] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._hold, listeners)

    async def _hold(self, stream: trio.SocketStream) -> None:
        self.accepted.set()
        async with stream:
            await trio.sleep_forever()


async def test_a_broker_that_refuses_the_login_gets_the_whole_backoff(tmp_path: Path) -> None:
    """Its port accepts TCP, so the reconnect backoff is not cut short by the probe that
    speeds up a return from an outage: the broker is not hammered."""
    names = Names.make()
    url = broker_url().replace("guest:guest@", "guest:not-the-password@")
    cfg = config(tmp_path, names, url, amqp={"reconnect_initial_s": 8.0,
                                             "reconnect_max_s": 8.0})
    async with connected_bridge(cfg, connected=False) as daemon:
        amqp = amqp_of(daemon)
        await until(amqp, lambda: "ACCESS_REFUSED" in amqp.health().detail)
        await trio.sleep(2.0)  # within the first pause (4-8 s): no second attempt
        assert metric(daemon, "amqp_reconnects_total") == 0
        assert not amqp.health().ready


async def test_a_broker_that_never_answers_does_not_hold_up_the_chat(tmp_path: Path) -> None:
    """The AMQP transport is listed first and its broker accepts TCP but never speaks: the
    chat listens, echoes and spools while that first connection attempt still hangs."""
    names = Names.make()
    async with trio.open_nursery() as nursery:
        silent: SilentBroker = await nursery.start(SilentBroker().run)
        text = (HEAD.replace("[daemon]\n", f'[daemon]\nstate_dir = "{tmp_path.as_posix()}/s"\n')
                + amqp_table("rabbit", names, broker_url(port=silent.port),
                             connect_timeout_s=30.0)
                + '[transports.chat]\ntype = "websocket"\nhost = "127.0.0.1"\nport = 0\n'
                + '[[routes]]\nname = "chat-to-amqp"\nfrom = "chat"\nto = ["rabbit"]\n'
                + '[[routes]]\nname = "chat-fanout"\nfrom = "chat"\nto = ["chat"]\n')
        # Well under connect_timeout_s: before the fix the daemon started only after it.
        with trio.fail_after(15):
            async with run_bridge(write_config(tmp_path, text)) as daemon:
                rabbit = cast(AmqpTransport, daemon.transports["rabbit"])
                port = daemon.transports["chat"].port  # type: ignore[attr-defined]
                async with client(port, "room") as ws:
                    await ws.send_message(ws_update("first"))
                    echo = await receive(ws)
                    assert echo["message"][0]["text"] == "first"
                    await silent.accepted.wait()
                    # The order: the echo came while the first attempt still hangs.
                    assert rabbit.health().detail == "not connected to the broker: not" \
                                                     " connected yet"
                    assert rabbit.spool_depth == 1  # and the event is in the outbox
        nursery.cancel_scope.cancel()



async def test_health_and_stop_accepting(tmp_path: Path) -> None:
    names = Names.make()
    cfg = config(tmp_path, names, broker_url(), routes=TO_CHAT)
    async with open_broker() as broker, connected_bridge(cfg) as daemon:
            amqp = amqp_of(daemon)
            assert amqp.health().ready
            assert (await broker.conn.queue_info(names.queue))[1] == 1
            amqp.stop_accepting()
            assert not amqp.health().ready
            assert "stopped consuming" in amqp.health().detail
            with trio.fail_after(5):
                await amqp.drain()  # waits for the broker's basic.cancel-ok
            assert (await broker.conn.queue_info(names.queue))[1] == 0
            await broker.publish(names.queue, notification("u", "after stop"))
            assert await broker.ready(names.queue) == 1  # left for the next daemon


def test_loopback_binding_is_a_route_loop(tmp_path: Path) -> None:
    names = Names.make()
    path = config(tmp_path, names, broker_url(),
                  amqp={"bind_consume_queue_to_exchange": ["chat.#"]},
                  routes='[[routes]]\nname = "back"\nfrom = "amqp"\nto = ["amqp"]\n')
    with pytest.raises(ConfigError, match="loop"):
        assemble(path)


def test_settings_are_checked(tmp_path: Path) -> None:
    names = Names.make()
    path = config(tmp_path, names, "http://nope/", amqp={"routing_key": "chat.{room}",
                                                         "prefetch": 0})
    with pytest.raises(ConfigError) as err:
        assemble(path)
    text = str(err.value)
    assert "url: must be an amqp:// or amqps:// URL" in text
    assert "unknown placeholder {room}" in text
    assert "prefetch: must be greater than 0" in text
    no_dead_letters = config(tmp_path, names, broker_url(), amqp={"dead_letter_queue": ""})
    with pytest.raises(ConfigError, match="dead_letter_queue must be set when consume_queue is"):
        assemble(no_dead_letters)


def test_url_is_redacted() -> None:
    assert redact("amqp://user:s3cret@host:5672/v") == "amqp://user:***@host:5672/v"
    assert redact("amqp://host/") == "amqp://host/"
