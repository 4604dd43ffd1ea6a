"""The example config's daemon through its life as a process: killed right after an echo
(history and outbox survive), reloaded with SIGHUP under a live socket, drained by SIGTERM
while clients send."""

from __future__ import annotations

import signal
from pathlib import Path

import trio
from amqp_support import open_broker
from e2e_support import (
    NAMES,
    ChatClient,
    archived,
    chat,
    example_config,
    first_seen,
    fresh_vhost,
    running,
)
from ops_support import states
from trio_websocket import ConnectionClosed


async def test_an_echoed_event_survives_sigkill_and_is_replayed_after_restart(
        tmp_path: Path) -> None:
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES)
        config = example_config(tmp_path, vhost.url())
        async with running(config) as daemon, chat(daemon.ws_port, "alice") as alice:
            first = await alice.say("before")
            echo = await alice.say("confirmed, so it must survive")
            daemon.bridged.process.kill()  # SIGKILL: no drain, no shutdown hook
            assert await daemon.bridged.wait() == -signal.SIGKILL

        async with running(config, log_name="bridged-2.stderr") as daemon, \
                chat(daemon.ws_port, "alice", f"since={first['eventId']}") as alice:
            replayed = await alice.next()
            assert replayed == {**echo, "socket_sequence": 0}  # the history survived
            after = await alice.say("after the restart")  # live, after the replay
            assert after["eventId"] > echo["eventId"]
            # the outbox survived too: every echoed event reaches the archiver, in order
            got = await archived(broker, [first["eventId"], echo["eventId"], after["eventId"]])
            assert first_seen(got) == [first["eventId"], echo["eventId"], after["eventId"]]
            assert await daemon.stop() == 0


async def test_a_live_socket_survives_a_good_and_a_bad_sighup_reload(tmp_path: Path) -> None:
    async with fresh_vhost() as vhost:
        config = example_config(tmp_path, vhost.url())
        async with running(config) as daemon, chat(daemon.ws_port, "alice") as alice:
            await alice.say("before the reload")

            config.write_text(config.read_text().replace(
                "heartbeat_interval_s = 5.0", "heartbeat_interval_s = 2.5"))
            daemon.bridged.signal(signal.SIGHUP)
            with trio.fail_after(5):
                good = await daemon.notify.until("READY")
            assert states(good) == ["RELOADING", "READY"]
            assert "refused" not in good[-1]["STATUS"]
            await alice.say("after a good reload")  # same socket, sequence unbroken

            config.write_text(config.read_text().replace("[transports.chat]",
                                                         "[transports.chat]\nprot = 1"))
            daemon.bridged.signal(signal.SIGHUP)
            with trio.fail_after(5):
                bad = await daemon.notify.until("READY")
            assert "refused" in bad[-1]["STATUS"]
            await alice.say("after a bad reload")
            async with chat(daemon.ws_port, "bob") as bob:  # and the listener still accepts
                await bob.say("new socket")
            assert alice.sequence == 3

            messages = daemon.messages()
            assert any(m.startswith("reload: applied:") for m in messages), messages
            assert "reload refused: 1 error(s); the previous config keeps running" in messages
            assert await daemon.stop() == 0


async def test_sigterm_drains_sending_clients_with_1001_and_loses_no_echoed_event(
        tmp_path: Path) -> None:
    clients = 3
    echoed: list[list[str]] = [[] for _ in range(clients)]
    codes: list[int] = []
    clients_: dict[int, ChatClient] = {}
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES)
        config = example_config(tmp_path, vhost.url())
        async with running(config) as daemon:
            enough = trio.Event()

            async def talk(n: int) -> None:
                async with chat(daemon.ws_port, f"room-{n}") as client:
                    clients_[n] = client
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send_until_closed, client, n)
                        try:
                            while True:
                                echoed[n].append((await client.next())["eventId"])
                                if min(map(len, echoed)) >= 5:
                                    enough.set()
                        except ConnectionClosed as e:
                            codes.append(e.reason.code if e.reason else 0)
                        nursery.cancel_scope.cancel()

            with trio.fail_after(8):
                async with trio.open_nursery() as nursery:
                    for n in range(clients):
                        nursery.start_soon(talk, n)
                    await enough.wait()
                    for client in clients_.values():  # within the rate limit's burst
                        for i in range(15):
                            await client.send(f"burst {i}")
                    daemon.bridged.signal(signal.SIGTERM)  # with frames in flight
                    before = sum(map(len, echoed))
                    signalled = trio.current_time()
                    assert await daemon.bridged.wait() == 0
                    drain_took = trio.current_time() - signalled
            assert drain_took < 10.0  # the example's drain_timeout_s
            assert codes == [1001] * clients
            assert "drained" in daemon.messages()
            print(f"{sum(map(len, echoed)) - before} events echoed after SIGTERM")

        ids = [i for per_client in echoed for i in per_client]
        published = await broker.ready(NAMES.archive)  # the daemon is gone: all are in
        if published < len(ids):  # what the drain could not publish waits in the outbox
            async with running(config, log_name="bridged-2.stderr") as daemon:
                got = await archived(broker, ids)
                assert await daemon.stop() == 0
        else:
            got = await archived(broker, ids)
        for per_client in echoed:  # none lost, and each chat's events in order
            assert [i for i in first_seen(got) if i in per_client] == per_client


async def send_until_closed(client: ChatClient, n: int) -> None:
    """Send at about 16 frames a second (under the example's 20/s rate limit) until the
    server closes the socket."""
    i = 0
    try:
        while True:
            await client.send(f"client {n} message {i}")
            i += 1
            await trio.sleep(0.06)
    except ConnectionClosed:
        pass
