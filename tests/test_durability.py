"""What must be durable before the sender's echo, and the history and the outbox agreeing
after any crash (docs/architecture.md, "Durability"): route order does not matter, a
failed store publishes nothing, and a SIGKILL between the history's commit and the
outbox's release leaves the event in both."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing
from amqp_support import Names, amqp_table, bodies, broker_url, open_broker
from e2e_support import NAMES, archived, chat, example_config, first_seen, fresh_vhost, running
from ops_support import install_opsplug
from trio_websocket import ConnectionClosed

from bridge import (
    CHAT_EVENT,
    Accepted,
    Failed,
    Message,
    Outcome,
    StorageUnavailable,
    TransportType,
    hookimpl,
)
from bridge.testing import run_bridge, write_config
from bridge_plugins.amqp import AmqpTransport
from bridge_plugins.amqp.outbox import Entry, Spool
from bridge_plugins.memory import MemorySettings, MemoryTransport

# The fan-out route is listed first: the order that once let the echo out before the outbox.
ROUTES = """
[[routes]]
name = "fanout"
from = "chat"
to = ["sink"]
[[routes]]
name = "archive"
from = "chat"
to = ["amqp"]
"""


def config(tmp_path: Path, names: Names, more_routes: str = "") -> Path:
    text = ('[admin]\nenabled = false\n'
            + amqp_table("amqp", names, broker_url(), consume_queue="")
            + '[transports.chat]\ntype = "memory"\n[transports.sink]\ntype = "memory"\n'
            + ROUTES + more_routes)
    return write_config(tmp_path, text)


class FailingStore:
    """A store that refuses one text (as a broken disk would, for that message only)."""

    @hookimpl
    def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        if any(m.body["message"][0]["text"] == "refused" for m in messages):
            raise RuntimeError("this store refuses that one")


async def inject(chat: MemoryTransport, text: str) -> Outcome | None:
    """Submit ``text`` on chat ``c`` as the chat transport would; its outcome."""
    return await chat.inject({"type": "update", "message": [{"type": "message", "text": text}]},
                             kind=CHAT_EVENT, chat_id="c")


def texts(messages: Sequence[Message]) -> list[str]:
    return [m.body["message"][0]["text"] for m in messages]


async def test_the_echo_waits_for_the_outbox_whatever_the_route_order(tmp_path: Path) -> None:
    names = Names.make()
    async with open_broker() as broker:
        await broker.bind_archive(names)
        async with run_bridge(config(tmp_path, names)) as daemon:
            amqp = cast(AmqpTransport, daemon.transports["amqp"])
            chat = cast(MemoryTransport, daemon.transports["chat"])
            sink = cast(MemoryTransport, daemon.transports["sink"])
            spool = amqp.spool
            real_append = spool.append
            let_go = trio.Event()
            appending = trio.Event()

            async def slow_append(entries: Sequence[Entry], *, hold: bool = False
                                  ) -> list[Entry]:
                appending.set()
                await let_go.wait()  # the outbox's disk is slow
                return await real_append(entries, hold=hold)

            spool.append = slow_append  # type: ignore[method-assign]
            outcomes: list[Outcome | None] = []

            async def send() -> None:
                outcomes.append(await inject(chat, "durable first"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await appending.wait()
                await trio.testing.wait_all_tasks_blocked()
                # The outbox has not stored it: the fan-out (the sender's echo) must not
                # have it yet.
                assert sink.received.statistics().current_buffer_used == 0
                assert outcomes == []
                let_go.set()
                with trio.fail_after(10):
                    echoed = await sink.received.receive()
            assert isinstance(outcomes[0], Accepted)
            (published,) = await broker.read(names.archive, 1)
            assert published.message_id == echoed.id


async def test_a_store_that_fails_publishes_nothing_of_that_message(tmp_path: Path) -> None:
    names = Names.make()
    async with open_broker() as broker:
        await broker.bind_archive(names)
        async with run_bridge(config(tmp_path, names), extra_plugins=[FailingStore()]
                              ) as daemon:
            chat = cast(MemoryTransport, daemon.transports["chat"])
            sink = cast(MemoryTransport, daemon.transports["sink"])
            amqp = cast(AmqpTransport, daemon.transports["amqp"])
            outcomes = [await inject(chat, text) for text in ("kept", "refused", "also kept")]
            assert [type(o) for o in outcomes] == [Accepted, Failed, Accepted]
            echoed = [await sink.received.receive() for _ in range(2)]
            assert texts(echoed) == ["kept", "also kept"]
            got = await broker.read(names.archive, 2)
            with trio.fail_after(10):  # the refused event was spooled (held), then dropped
                while amqp.spool.depth:
                    await amqp.wait_changed()
            assert await amqp.spool.held() == []
            assert await broker.ready(names.archive) == 0  # nothing more was published
    assert [b["message"][0]["text"] for b in bodies(got)] == ["kept", "also kept"]


async def test_held_rows_wait_for_commit_and_come_back_held_after_a_crash(
        tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    spool = await Spool.open(path, max_messages=100)
    plain = Entry("chat", "chat.c", "application/json", "a", {}, b"{}")
    await spool.append([plain])
    held = await spool.append([plain, plain, plain], hold=True)
    assert [e.seq for e in await spool.read(0, 10)] == [1]  # the held ones are not readable
    await spool.close()  # as a crash would leave it: never committed

    spool = await Spool.open(path, max_messages=100)
    assert [e.seq for e in await spool.held()] == [e.seq for e in held]
    assert [e.seq for e in await spool.read(0, 10)] == [1]
    await spool.commit(dropped=[held[1].seq])
    assert [e.seq for e in await spool.read(0, 10)] == [1, held[0].seq, held[2].seq]
    assert await spool.held() == []
    assert spool.depth == 3
    await spool.close()


@pytest.mark.parametrize("window", ["after the history", "before the history"])
async def test_sigkill_between_the_history_and_the_outbox_leaves_the_event_in_both(
        tmp_path: Path, window: str) -> None:
    """The real daemon with the example config is SIGKILLed while its persist step stalls,
    either after the history committed the event (a store that runs after the history's)
    or before it did (one that runs first), in both cases after the outbox has spooled and
    held it. After a restart the event is in the history (a resume replays it) and on the
    exchange, once: the two agree (the reconcile at start stores what was held)."""
    stall = tmp_path / "stall"
    key = "stall_persist_file" if window == "after the history" else "stall_first_file"
    site = install_opsplug(tmp_path / "site")
    extra = (f'\n[plugins]\nenable = ["opsplug"]\n[plugins.opsplug]\n'
             f'{key} = "{stall.as_posix()}"\n')
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES)
        config = example_config(tmp_path, vhost.url(), extra=extra)
        async with running(config, pythonpath=site) as daemon, \
                chat(daemon.ws_port, "alice") as alice:
            first = await alice.say("before")
            stall.write_text("")
            await alice.send("in the window")
            # The daemon writes this file once it is stalled: poll it, as e2e_support polls
            # /readyz (another process's file has no event to wait on).
            with trio.fail_after(10):
                while not stall.with_suffix(".stalled").exists():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            daemon.bridged.process.kill()  # SIGKILL: the echo never left
            assert await daemon.bridged.wait() == -signal.SIGKILL
            try:
                frame = await alice.next()
            except ConnectionClosed:
                frame = None
            assert frame is None, "the echo left before everything was durable"
        stall.unlink()

        async with running(config, pythonpath=site, log_name="bridged-2.stderr") as daemon, \
                chat(daemon.ws_port, "alice", f"since={first['eventId']}") as alice:
            replayed = await alice.next()
            assert replayed["message"][0]["text"] == "in the window"  # in the history
            window = replayed["eventId"]
            got = await archived(broker, [first["eventId"], window])
            assert first_seen(got) == [first["eventId"], window]  # and on the exchange
            # once: "before" may come twice (confirmed, not yet removed at the kill: at
            # least once), the event in the window was never published before
            assert [d.message_id for d in got].count(window) == 1
            assert await daemon.stop() == 0
            assert await broker.ready(NAMES.archive) == 0


def named(text: str, client_id: str) -> str:
    return json.dumps({"type": "update", "clientMsgId": client_id,
                       "message": [{"type": "message", "text": text}]})


async def test_a_client_id_held_in_the_outbox_at_a_sigkill_is_known_after_the_restart(
        tmp_path: Path) -> None:
    """An update with a ``clientMsgId`` is spooled and held, then the daemon is SIGKILLed
    before the history stored it; the reconcile at the next start stores it with its client
    id, so a retry with that id gets the original event: no second row in the history, no
    second event on the exchange."""
    stall = tmp_path / "stall"
    site = install_opsplug(tmp_path / "site")
    extra = (f'\n[plugins]\nenable = ["opsplug"]\n[plugins.opsplug]\n'
             f'stall_first_file = "{stall.as_posix()}"\n')
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES)
        config = example_config(tmp_path, vhost.url(), extra=extra)
        async with running(config, pythonpath=site) as daemon, \
                chat(daemon.ws_port, "alice") as alice:
            first = await alice.say("before")
            stall.write_text("")
            await alice.ws.send_message(named("in the window", "w-1"))
            with trio.fail_after(10):  # another process's file: polled (see above)
                while not stall.with_suffix(".stalled").exists():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            daemon.bridged.process.kill()
            assert await daemon.bridged.wait() == -signal.SIGKILL
        stall.unlink()

        async with running(config, pythonpath=site, log_name="bridged-2.stderr") as daemon, \
                chat(daemon.ws_port, "alice", f"since={first['eventId']}") as alice:
            window = (await alice.next())["eventId"]  # replayed: stored by the reconcile
            await alice.ws.send_message(named("in the window, resent", "w-1"))
            again = await alice.next()
            assert (again["eventId"], again["clientMsgId"]) == (window, "w-1")
            assert again["message"][0]["text"] == "in the window"
            got = await archived(broker, [first["eventId"], window])
            assert await daemon.stop() == 0  # the drain publishes what the outbox holds
            while (rest := await broker.conn.get(NAMES.archive)) is not None:
                got.append(rest)
    with sqlite3.connect(tmp_path / "state" / "history.sqlite3") as db:
        rows = db.execute("SELECT event_id FROM events ORDER BY event_id").fetchall()
    assert rows == [(first["eventId"],), (window,)]  # no second event in the history
    assert set(first_seen(got)) == {first["eventId"], window}  # nor on the exchange,
    assert [d.message_id for d in got].count(window) == 1  # where the retry is not routed


async def test_two_legs_to_one_outbox_are_both_dropped_when_the_store_refuses(
        tmp_path: Path) -> None:
    names = Names.make()
    again = '[[routes]]\nname = "archive-again"\nfrom = "chat"\nto = ["amqp"]\n'
    async with open_broker() as broker:
        await broker.bind_archive(names)
        async with run_bridge(config(tmp_path, names, again), extra_plugins=[FailingStore()]
                              ) as daemon:
            chat = cast(MemoryTransport, daemon.transports["chat"])
            amqp = cast(AmqpTransport, daemon.transports["amqp"])
            outcomes = [await inject(chat, t) for t in ("refused", "kept")]
            assert [type(o) for o in outcomes] == [Failed, Accepted]
            got = await broker.read(names.archive, 2)  # "kept", once per route
            with trio.fail_after(10):
                while amqp.spool.depth:
                    await amqp.wait_changed()
            assert await broker.ready(names.archive) == 0  # no copy of "refused"
    assert [b["message"][0]["text"] for b in bodies(got)] == ["kept", "kept"]


class FlakyOutbox(MemoryTransport):
    """A durable destination whose storage refuses the first ``refusals`` batches."""

    refusals = 1

    async def deliver(self, messages: Sequence[Message]) -> None:
        if self.refusals:
            self.refusals -= 1
            raise StorageUnavailable("the outbox's disk is full")
        await super().deliver(messages)

    async def commit(self, kept: Sequence[Message], dropped: Sequence[Message]) -> None:
        return None


class FlakyPlugin:
    @hookimpl
    def bridge_register_transports(self, register: Callable[[TransportType], None]) -> None:
        register(TransportType("flaky", MemorySettings, FlakyOutbox))


async def test_readiness_comes_back_after_an_outbox_refusal_without_a_history(
        tmp_path: Path) -> None:
    text = ('[admin]\nenabled = false\n[plugins]\ndisable = ["history"]\n'
            '[transports.chat]\ntype = "memory"\n[transports.out]\ntype = "flaky"\n'
            '[[routes]]\nname = "r"\nfrom = "chat"\nto = ["out"]\n')
    async with run_bridge(write_config(tmp_path, text), extra_plugins=[FlakyPlugin()]
                          ) as daemon:
        chat = cast(MemoryTransport, daemon.transports["chat"])
        refused = await inject(chat, "refused")
        assert isinstance(refused, Failed)
        assert refused.retry
        assert daemon.pipeline.storage_error == "the outbox's disk is full"
        assert isinstance(await inject(chat, "stored"), Accepted)
        assert daemon.pipeline.storage_error is None  # ready again, with no history at all
