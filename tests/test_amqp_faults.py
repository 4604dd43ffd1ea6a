"""The AMQP transport under real broker faults, on a private RabbitMQ node of the test's own
(tests/rabbit_node.py) that the test kills and starts again: consuming resumes promptly once
the broker is back, at start and after an outage."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import trio
from amqp_support import Names, amqp_table, notification, open_broker
from rabbit_node import private_node

from bridge.testing import run_bridge, write_config
from bridge_plugins.amqp import AmqpTransport
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
