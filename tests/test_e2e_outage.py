"""A broker outage under a live chat: the example config's daemon reaches RabbitMQ through a
TCP proxy that the test cuts and restores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from amqp_support import Broker, Proxy, open_broker
from e2e_support import NAMES, archived, chat, example_config, first_seen, fresh_vhost, running


@asynccontextmanager
async def behind_a_proxy(tmp_path: Path) -> AsyncIterator[tuple[Broker, Proxy, Path]]:
    """An archiver on a vhost of this test, a proxy to the broker, and the example config
    whose broker URL goes through the proxy."""
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker, \
            trio.open_nursery() as nursery:
        await broker.bind_archive(NAMES)
        proxy: Proxy = await nursery.start(Proxy().run)
        yield broker, proxy, example_config(tmp_path, vhost.url(proxy.port))
        nursery.cancel_scope.cancel()


async def test_chat_keeps_working_through_a_broker_outage_and_nothing_is_lost(
        tmp_path: Path) -> None:
    async with behind_a_proxy(tmp_path) as (broker, proxy, config), \
            running(config) as daemon, chat(daemon.ws_port, "alice") as alice:
        echoes = [(await alice.say(f"before {i}"))["eventId"] for i in range(3)]

        for i in range(10):  # in flight when the connection goes
            await alice.send(f"burst {i}")
        proxy.cut()
        echoes += [(await alice.next())["eventId"] for _ in range(10)]
        down = await daemon.until_readyz(503)
        assert list(down["not_ready"]) == ["rabbit"], down
        assert "not connected to the broker" in down["not_ready"]["rabbit"]
        assert down["state"] == "degraded"
        for i in range(5):  # the chat does not notice
            echoes.append((await alice.say(f"during {i}"))["eventId"])
        async with chat(daemon.ws_port, "bob") as bob:  # nor do new sockets
            echoes.append((await bob.say("bob, during the outage"))["eventId"])
        assert proxy.accepted == 1  # no connection got through the cut

        proxy.restore()
        up = await daemon.until_readyz(200)
        assert up["not_ready"] == {}
        echoes.append((await alice.say("after"))["eventId"])

        got = await archived(broker, echoes)
        assert first_seen(got) == echoes  # every one, in order
        print(f"{len(got) - len(echoes)} republished after the reconnect")
        assert proxy.accepted >= 2
        connected = [m for m in daemon.messages() if m.startswith("rabbit: connected to")]
        assert len(connected) == 2, connected  # the first connection and the reconnect
        assert any(m.startswith("rabbit: broker connection lost") for m in daemon.messages())
        assert await daemon.stop() == 0


async def test_sigterm_during_an_outage_keeps_the_outbox_for_the_next_start(
        tmp_path: Path) -> None:
    async with behind_a_proxy(tmp_path) as (broker, proxy, config):
        async with running(config) as daemon:
            async with chat(daemon.ws_port, "alice") as alice:
                echoes = [(await alice.say("before"))["eventId"]]
                proxy.cut()
                await daemon.until_readyz(503)
                echoes += [(await alice.say(f"during {i}"))["eventId"] for i in range(5)]
                signalled = trio.current_time()
                assert await daemon.stop() == 0  # the broker is away: no waiting for it
            assert trio.current_time() - signalled < 10.0
            assert "drained" in daemon.messages()
        assert await broker.ready(NAMES.archive) < len(echoes)  # some wait in the outbox

        proxy.restore()
        async with running(config, log_name="bridged-2.stderr") as daemon:
            assert any("messages wait in the outbox" in m for m in daemon.messages())
            got = await archived(broker, echoes)
            assert first_seen(got) == echoes
            assert await daemon.stop() == 0
