"""The trio <-> asyncio seam (bridge_plugins.amqp: island, connection, publisher,
consumer), against the real RabbitMQ.

The test side uses asyncio only to play the asyncio half of the seam's own contract
(coroutines for ``Island.call``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import trio
from amqp_support import Names, broker_url, close_all_connections, open_broker

from bridge_plugins.amqp.connection import Connection, ConnectionLost
from bridge_plugins.amqp.consumer import Consumer, Delivery, SizeLimit
from bridge_plugins.amqp.island import open_island
from bridge_plugins.amqp.publisher import Confirm, Outgoing, Properties, Publisher


async def test_call_returns_results_and_raises_asyncio_errors() -> None:
    async with open_island("t") as island:
        async def add() -> int:
            await asyncio.sleep(0)
            return threading.get_ident()

        assert await island.call(add) != threading.get_ident()  # it ran on the other thread

        async def fail() -> None:
            raise KeyError("from asyncio")

        with pytest.raises(KeyError, match="from asyncio"):
            await island.call(fail)


async def test_cancellation_waits_for_the_asyncio_side() -> None:
    finished: list[str] = []
    async with open_island("t") as island:
        async def slow() -> None:
            try:
                await asyncio.sleep(30)
            finally:
                await asyncio.sleep(0.05)  # cleanup that takes a while
                finished.append("cleaned up")

        start = time.monotonic()
        with trio.move_on_after(0.05) as scope:
            await island.call(slow)
        assert scope.cancelled_caught
        assert finished == ["cleaned up"]  # before call() gave control back
        assert time.monotonic() - start < 5


async def test_callbacks_that_raise_never_reach_trio(caplog: pytest.LogCaptureFixture) -> None:
    async with open_island("t") as island:
        def boom() -> None:
            raise RuntimeError("bad callback")

        async def schedule() -> None:
            island.to_trio(boom)

        await island.call(schedule)  # boom runs on trio before this call's own result
        await trio.lowlevel.checkpoint()
    assert "trio-side callback failed" in caplog.text


async def test_closing_is_bounded_when_asyncio_work_refuses_to_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    async with open_island("stubborn", close_timeout=0.2) as island:
        async def stubborn() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.6)  # ignores the cancellation for a while

        async def begin() -> None:
            island.spawn(stubborn, "stubborn")
            await asyncio.sleep(0.01)  # stubborn() is now inside its sleep

        await island.call(begin)
    assert time.monotonic() - start < 0.5
    assert "did not stop within" in caplog.text


async def test_a_server_side_close_is_noticed_at_once() -> None:
    async with open_island("t") as island:
        conn = await Connection.open(island, broker_url())
        try:
            await close_all_connections()
            with trio.fail_after(3):  # well before any heartbeat timeout
                await conn.lost.wait()
            with pytest.raises(ConnectionLost):
                await conn.wait_lost()
        finally:
            await conn.close()


async def test_publisher_window_bounds_unconfirmed_messages() -> None:
    names = Names.make()
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue])
        publisher = await broker.conn.open_publisher(4)
        messages = [Outgoing("", names.queue, b"%d" % i, Properties(message_id=str(i)), i)
                    for i in range(10)]
        with trio.move_on_after(0.5) as scope:
            # no one takes confirms: it stops once 2 x 4 are handed over (4 unconfirmed at
            # the broker, 4 waiting for a slot on the asyncio side)
            await publisher.publish(messages)
        assert scope.cancelled_caught
        confirms: list[Confirm] = []
        with trio.fail_after(5):
            while len(confirms) < 8:
                confirms += await publisher.confirms()
        with trio.move_on_after(0.2):  # part of the test: nothing beyond those 8
            confirms += await publisher.confirms()
        assert [c.token for c in confirms] == list(range(8))
        assert all(c.ok for c in confirms)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.publish, messages[8:])  # slots freed by confirms()
                while len(confirms) < 10:
                    confirms += await publisher.confirms()
        assert [c.token for c in confirms] == list(range(10))
        got = await broker.read(names.queue, 10)
        assert [d.message_id for d in got] == [str(i) for i in range(10)]
        assert all(d.delivery_mode == 2 for d in got)
        await broker.conn.queue_delete(names.queue)


async def confirms_for(publisher: Publisher, n: int) -> list[Confirm]:
    out: list[Confirm] = []
    with trio.fail_after(10):
        while len(out) < n:
            out += await publisher.confirms()
    return out


async def test_a_batch_keeps_every_message_whole_and_fails_only_the_bad_one() -> None:
    """A window is written as one batch of frames: bodies larger than a frame are split and
    joined again, properties and order survive, and a message that cannot be sent (routing
    key over 255 bytes, a header pamqp cannot encode) fails alone. Had it taken a delivery
    tag, the broker's acks would land on the wrong messages and the last would never come."""
    names = Names.make()
    big = bytes(range(256)) * 1200  # 300 KB: several body frames at frame_max 128 KB
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue])
        publisher = await broker.conn.open_publisher(64)
        bodies = [b"%d" % i if i != 3 else big for i in range(40)]
        messages = [Outgoing("", names.queue if i != 5 else "k" * 256, body,
                             Properties("application/x-test", f"m{i}", i % 2 == 0,
                                        {"n": i, "nested": {"a": [1, "b"]}}
                                        if i != 9 else {"n": object()}), i)
                    for i, body in enumerate(bodies)]
        await publisher.publish(messages)
        confirms = await confirms_for(publisher, 40)
        assert sorted(c.token for c in confirms) == list(range(40))
        failed = {c.token: c.reason for c in confirms if not c.ok}
        assert sorted(failed) == [5, 9]
        assert "routing key" in failed[5]
        assert "Unknown type" in failed[9]
        got = await broker.read(names.queue, 38)
        expected = [i for i in range(40) if i not in (5, 9)]
        assert [d.message_id for d in got] == [f"m{i}" for i in expected]
        assert [d.body for d in got] == [bodies[i] for i in expected]
        assert [d.delivery_mode for d in got] == [2 if i % 2 == 0 else 1 for i in expected]
        assert all(d.content_type == "application/x-test" for d in got)
        assert [d.headers["n"] for d in got] == expected
        assert got[0].headers["nested"] == {"a": [1, "b"]}
        await broker.conn.queue_delete(names.queue)


async def test_a_batch_that_meets_a_full_write_queue_is_written_later() -> None:
    """aiormq's write queue holds 10 items; a batch that finds it full waits in the
    publisher's backlog, in order. A writer that has just finished (its done callback not
    yet run) must not keep a new batch from being written."""
    async with open_island("t") as island:
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        channel = types.SimpleNamespace(write_queue=queue, is_closed=False)
        publisher = Publisher(island, channel, 4)  # type: ignore[arg-type]  # only the queue

        async def run() -> list[int]:
            finished = asyncio.get_running_loop().create_future()
            finished.set_result(None)
            publisher._writer = finished  # done, but the callback clearing it has not run
            queue.put_nowait(0)
            publisher._write_aio(1)  # type: ignore[arg-type]  # the queue takes anything
            publisher._write_aio(2)  # type: ignore[arg-type]
            return [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]

        assert await island.call(run) == [0, 1, 2]


async def test_pending_confirmations_fail_when_the_broker_closes_the_channel() -> None:
    """Publishing to an exchange that does not exist makes the broker close the channel:
    every message of the window gets a failed confirmation, none is left waiting."""
    async with open_broker() as broker:
        publisher = await broker.conn.open_publisher(16)
        await publisher.publish([Outgoing("no-such-exchange." + Names.make().queue, "k",
                                          b"x", Properties(), i) for i in range(30)])
        confirms = await confirms_for(publisher, 30)
        assert sorted(c.token for c in confirms) == list(range(30))
        assert not any(c.ok for c in confirms)
        with trio.fail_after(5):
            await broker.conn.lost.wait()  # the closed channel marks the connection lost


async def test_consumer_prefetch_and_acks_in_any_order(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = []

    async def per_delivery_task(self: Consumer, message: object) -> None:
        tasks.append(message)
        self._on_message_aio(message)  # type: ignore[arg-type]

    # deliveries are queued inline, not through aiormq's asyncio task per delivery
    monkeypatch.setattr(Consumer, "_on_delivery_task", per_delivery_task)
    names = Names.make()
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue])
        publisher = await broker.conn.open_publisher(64)
        await publisher.publish([Outgoing("", names.queue, b"%d" % i, Properties(), i)
                                 for i in range(30)])
        async with open_island("c") as island:
            conn = await Connection.open(island, broker_url())
            consumer = await conn.open_consumer(names.queue, 10)
            held = []
            with trio.move_on_after(0.3):  # part of the test: nothing beyond the prefetch
                while True:
                    held += await consumer.receive()
            assert len(held) == 10
            for d in reversed(held):  # out of order: acked one by one
                consumer.ack(d.tag)
            rest: list[Delivery] = []
            with trio.fail_after(5):
                while len(rest) < 20:
                    batch = await consumer.receive()
                    rest += batch
                    for d in batch:  # in order: one multiple ack per batch
                        consumer.ack(d.tag)
            assert sorted(int(d.body) for d in held + rest) == list(range(30))
            assert tasks == []
            await conn.close()
        # every ack reached the broker: nothing was requeued when the connection closed
        assert await broker.ready(names.queue) == 0
        await broker.conn.queue_delete(names.queue)


async def test_requeue_hands_a_delivery_back() -> None:
    names = Names.make()
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue])
        await broker.publish(names.queue, b"again", message_id="r1")
        consumer = await broker.conn.open_consumer(names.queue, 5)
        with trio.fail_after(5):
            (first,) = await consumer.receive()
            consumer.requeue(first.tag)
            (second,) = await consumer.receive()
        assert (first.redelivered, second.redelivered) == (False, True)
        assert second.message_id == "r1"
        consumer.ack(second.tag)
        await broker.conn.close()  # flushes the ack
    async with open_broker() as broker:
        assert await broker.ready(names.queue) == 0


async def test_dead_letter_is_confirmed_before_the_ack() -> None:
    names = Names.make()
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue, names.dead])
        await broker.publish(names.queue, b"poison", message_id="p1")
        async with open_island("c") as island:
            conn = await Connection.open(island, broker_url())
            consumer = await conn.open_consumer(names.queue, 5)
            (d,) = await consumer.receive()
            done = trio.Event()
            results: list[bool] = []

            def on_done(ok: bool) -> None:
                results.append(ok)
                done.set()

            consumer.dead_letter(d.tag, names.dead,
                                 d.body, Properties("text/plain", "p1", True,
                                                    {"x-bridge-reason": "DecodeError"}),
                                 on_done)
            with trio.fail_after(5):
                await done.wait()
            await conn.close()
        assert results == [True]
        assert await broker.ready(names.queue) == 0
        (dead,) = await broker.read(names.dead, 1)
        assert (dead.body, dead.message_id) == (b"poison", "p1")
        assert dead.headers["x-bridge-reason"] == "DecodeError"


def test_no_asyncio_loop_thread_is_left_behind() -> None:
    async def main() -> None:
        async with open_island("leak-check"):
            pass

    trio.run(main)
    assert not [t for t in threading.enumerate() if t.name == "asyncio-leak-check"]


@pytest.fixture(autouse=True)
def _quiet_aiormq(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


KI_CHILD = r"""
import asyncio, signal, sys, trio
from bridge_plugins.amqp.island import open_island

signal.signal(signal.SIGINT, signal.default_int_handler)

async def main():
    async with open_island("ki") as island:
        async def tick():
            await asyncio.sleep(0)
        print("ready", flush=True)
        while True:  # KeyboardInterrupt must never land between submit and park
            await island.call(tick)

try:
    trio.run(main)
except* KeyboardInterrupt:
    sys.exit(130)
"""


#: What CPython prints when a KeyboardInterrupt lands in a weakref callback or a __del__
#: (for example while the garbage collector runs): it drops the exception.
SWALLOWED_KI = b"Exception ignored in"


async def test_ctrl_c_during_heavy_traffic_exits_cleanly() -> None:
    for attempt in range(10):
        proc = await trio.lowlevel.open_process([sys.executable, "-c", KI_CHILD],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            with trio.fail_after(10):
                assert (await proc.stdout.receive_some(6)).startswith(b"ready")
            await trio.sleep(0.005 * attempt)  # part of the test: land at varying moments
            proc.send_signal(signal.SIGINT)
            stderr = b""
            with trio.move_on_after(2):
                await proc.wait()
            if proc.returncode is None:
                with trio.move_on_after(0.5):  # what the child has written, all of it
                    while chunk := await proc.stderr.receive_some():
                        stderr += chunk
                # CPython itself dropped the interrupt, in a weakref callback or a __del__
                # that is not the seam's: a second Ctrl-C is what a person would press.
                assert SWALLOWED_KI in stderr, stderr
                assert b"KeyboardInterrupt" in stderr, stderr
                assert b"/amqp/" not in stderr, stderr
                proc.send_signal(signal.SIGINT)
            with trio.fail_after(5):  # a hang here is the bug this guards against
                assert await proc.wait() == 130
        finally:
            proc.kill()
            await proc.wait()
            await proc.stdout.aclose()
            await proc.stderr.aclose()


async def test_cancelling_while_too_large_deliveries_are_dead_lettered_does_not_wedge() -> None:
    """The consumer channel's reader writes an oversize body's dead letter itself. On the
    consumer's own channel that write waited for the channel lock, which basic.cancel holds
    until the reader delivers its CancelOk: a deadlock that wedged the whole connection.
    Dead letters now have a channel of their own."""
    names = Names.make()
    n = 30
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue, names.dead])
        publisher = await broker.conn.open_publisher(64)
        await publisher.publish([Outgoing("", names.queue, b"x" * (2 << 20),
                                          Properties("text/plain", f"big{i}", True, {}), i)
                                 for i in range(n)])
        confirmed = 0
        while confirmed < n:
            confirmed += len(await publisher.confirms())
        first = trio.Event()
        done: list[bool] = []

        def dead_lettered(d: Delivery, size: int, ok: bool) -> None:
            done.append(ok)
            first.set()

        limit = SizeLimit(1024, names.dead, lambda d, size: Properties(
            "text/plain", d.message_id, True, {}), dead_lettered)
        async with open_island("c") as island:
            conn = await Connection.open(island, broker_url())
            consumer = await conn.open_consumer(names.queue, 10, size_limit=limit)
            with trio.fail_after(10):
                await first.wait()
            consumer.cancel()
            with trio.fail_after(10):
                await consumer.cancel_done.wait()  # answered: the reader is not stuck
                other = await conn.open_publisher(1)  # and the connection still works
                await other.publish([Outgoing("", names.dead, b"after",
                                              Properties("text/plain", "after", True, {}), 0)])
                (ok,) = await other.confirms()
            assert ok.ok
            await conn.close()
        # every body is either dead-lettered (and acked) or back in its queue, never both
        assert await broker.ready(names.queue) + await broker.ready(names.dead) == n + 1


async def test_a_close_right_after_a_dead_letter_sends_its_ack() -> None:
    """The close waits for the dead letter's confirm and then for the ack it leads to: the
    delivery is not left to the broker to redeliver (a second dead letter)."""
    names = Names.make()
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue, names.dead])
        for i in range(20):
            await broker.publish(names.queue, b"poison", message_id=f"p{i}")
        results: list[bool] = []
        async with open_island("c") as island:
            conn = await Connection.open(island, broker_url())
            consumer = await conn.open_consumer(names.queue, 20)
            held: list[Delivery] = []
            with trio.fail_after(5):
                while len(held) < 20:
                    held += await consumer.receive()
            for d in held:
                consumer.dead_letter(d.tag, names.dead, d.body,
                                     Properties("text/plain", d.message_id, True, {}),
                                     results.append)
            await conn.close()  # at once: the confirms are still on their way
        assert results == [True] * 20
        assert await broker.ready(names.queue) == 0
        assert len(await broker.read(names.dead, 20)) == 20
        assert await broker.ready(names.dead) == 0


async def test_a_close_while_too_large_deliveries_are_dead_lettered_acks_each() -> None:
    """Each body over the size limit ends in the dead-letter queue or stays in its queue,
    never in both: a close waits for the confirms of the dead letters written, then for
    their acks."""
    names = Names.make()
    async with open_broker() as broker:
        await broker.conn.declare(queues=[names.queue, names.dead])
        for i in range(10):
            await broker.publish(names.queue, b"x" * 300_000, message_id=f"big{i}")
        first = trio.Event()
        limit = SizeLimit(1000, names.dead, lambda d, size: Properties(
            "text/plain", d.message_id, True, {}), lambda d, size, ok: first.set())
        async with open_island("c") as island:
            conn = await Connection.open(island, broker_url())
            await conn.open_consumer(names.queue, 10, size_limit=limit)
            with trio.fail_after(5):
                await first.wait()
            await conn.close()  # while the others are being dead-lettered
        assert await broker.ready(names.queue) + await broker.ready(names.dead) == 10


