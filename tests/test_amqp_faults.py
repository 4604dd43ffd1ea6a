"""The AMQP transport under real faults: a private RabbitMQ node of the test's own
(tests/rabbit_node.py) that the test kills and starts again, where consuming resumes
promptly once the broker is back, at start and after an outage; and a flood of huge
notifications into a real `bridged run`, whose memory stays bounded."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import trio
from amqp_support import Names, amqp_table, notification, open_broker
from e2e_support import NAMES, chat, example_config, fresh_vhost, running
from rabbit_node import private_node

from bridge.testing import run_bridge, write_config
from bridge_plugins.amqp import AmqpTransport
from bridge_plugins.amqp.publisher import Outgoing, Properties
from bridge_plugins.memory import MemoryTransport

#: Broker accepting TCP -> the transport consuming again, at most (issue 14, item 10).
RESUME_BOUND_S = 2.0


async def _until(amqp: AmqpTransport, ready: bool, within: float = 30.0) -> float:
    """Wait until the transport's health is ``ready``; the trio time it was seen."""
    with trio.fail_after(within):
        while amqp.health().ready != ready:
            await amqp.wait_changed()
    return trio.current_time()


async def test_consuming_resumes_within_2_s_of_the_broker_coming_back(tmp_path: Path) -> None:
    """A long backoff (reconnect_initial_s = 20: 10-20 s before the next attempt) that the
    broker's return cuts short, at start (the broker down when the daemon starts) and after a
    SIGKILL of the broker while consuming."""
    names = Names.make()
    async with private_node(tmp_path / "node", started=False) as node:
        text = (f'[daemon]\nstate_dir = "{(tmp_path / "state").as_posix()}"\n'
                "[admin]\nenabled = false\n"
                + amqp_table("amqp", names, node.url, reconnect_initial_s=20.0,
                             reconnect_max_s=30.0, connect_timeout_s=5.0)
                + '[transports.chat]\ntype = "memory"\n'
                + '[[routes]]\nname = "notify"\nfrom = "amqp"\nto = ["chat"]\n')
        async with run_bridge(write_config(tmp_path, text)) as daemon:
            amqp = cast(AmqpTransport, daemon.transports["amqp"])
            chat = cast(MemoryTransport, daemon.transports["chat"])
            with trio.fail_after(10):  # the first attempt fails: the port refuses
                while "not connected yet" in amqp.health().detail:
                    await amqp.wait_changed()
            gaps = []
            for round_ in ("at start", "after a SIGKILL"):
                await node.start()
                consuming = await _until(amqp, True)
                gaps.append(consuming - node.accepting_at)
                async with open_broker(node.url) as broker:
                    await broker.publish(names.queue, notification("u", round_),
                                         message_id=round_)
                with trio.fail_after(10):
                    got = await chat.received.receive()
                assert got.id == round_
                if round_ == "at start":
                    await node.kill()
                    await _until(amqp, False)
        print(f"broker accepting -> consuming: {gaps[0]:.2f} s at start,"
              f" {gaps[1]:.2f} s after an outage")
        assert all(gap <= RESUME_BOUND_S for gap in gaps), gaps


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (VmRSS in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


MIB = 1 << 20


async def test_a_flood_of_huge_notifications_keeps_the_daemon_small(tmp_path: Path) -> None:
    """64 notifications of 8 MiB wait in the queue when the daemon starts (the example
    config: prefetch 256, max_message_bytes 1 MiB). Each is dead-lettered TooLarge, unread;
    the daemon's RSS, sampled from /proc, stays within the bound docs/amqp.md gives
    (prefetch x max_message_bytes, plus twice the largest body while it is dead-lettered),
    and the valid notifications published behind them reach the chat."""
    huge, size = 64, 8 * MIB
    body = b"{" * size  # not even JSON: it must never be decoded
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.conn.declare(queues=[NAMES.queue, NAMES.dead])
        publisher = await broker.conn.open_publisher(4)
        with trio.fail_after(120):
            for first in range(0, huge, 4):
                await publisher.publish([
                    Outgoing("", NAMES.queue, body,
                             Properties("application/json", f"huge-{i}"))
                    for i in range(first, first + 4)])
                confirmed = 0
                while confirmed < 4:
                    answers = await publisher.confirms()
                    assert all(a.ok for a in answers), answers
                    confirmed += len(answers)
        async with running(example_config(tmp_path, vhost.url())) as daemon:
            pid = daemon.bridged.process.pid
            baseline = rss_bytes(pid)
            samples = [baseline]
            async with trio.open_nursery() as nursery:

                async def sample() -> None:
                    while True:
                        samples.append(rss_bytes(pid))
                        await trio.sleep(0.02)

                nursery.start_soon(sample)
                async with chat(daemon.ws_port, "u") as client:
                    for i in range(5):
                        await broker.publish(NAMES.queue, notification("u", f"valid {i}"),
                                             message_id=f"valid-{i}")
                    with trio.fail_after(60):
                        texts = [(await client.next())["message"][0]["text"]
                                 for _ in range(5)]
                nursery.cancel_scope.cancel()
            after = rss_bytes(pid)
            assert texts == [f"valid {i}" for i in range(5)]
            assert await broker.ready(NAMES.queue) == 0
            reasons: dict[str, int] = {}
            for _ in range(huge):
                dead = await broker.conn.get(NAMES.dead)
                assert dead is not None
                assert len(dead.body) == size
                reason = dead.headers["x-bridge-reason"]
                reasons[reason] = reasons.get(reason, 0) + 1
            assert await broker.conn.get(NAMES.dead) is None
        peak = max(samples)
        print(f"RSS: {baseline / MIB:.1f} MiB at READY, peak {peak / MIB:.1f} MiB,"
              f" {after / MIB:.1f} MiB after the flood ({len(samples)} samples)")
        assert reasons == {"TooLarge": huge}
        bound = baseline + 256 * MIB + 2 * size  # docs/amqp.md, "Memory"
        assert peak < bound, (peak, bound)
