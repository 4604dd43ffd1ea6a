"""bridge.WorkerThread: blocking calls on one thread of their own, in order."""

from __future__ import annotations

import threading

import pytest
import trio

from bridge import WorkerThread


async def test_calls_run_in_order_on_one_thread_with_results_and_errors() -> None:
    worker = WorkerThread("bridged-test")
    seen: list[tuple[int, int | None]] = []

    def record(n: int) -> int:
        seen.append((n, threading.get_ident()))
        return n * 2

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(worker.run, record, n)
            await trio.testing.wait_all_tasks_blocked()  # queued in this order
    assert [n for n, _ in seen] == list(range(20))
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] != threading.get_ident()
    assert await worker.run(record, 21) == 42
    with pytest.raises(ZeroDivisionError):
        await worker.run(lambda: 1 / 0)
    assert await worker.run(record, 1) == 2  # the thread survives a failed call
    await worker.aclose()


async def test_cancellation_waits_for_the_call_that_runs() -> None:
    worker = WorkerThread("bridged-test")
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []
    caller_scope = trio.CancelScope()
    caught: list[bool] = []

    def slow() -> str:
        started.set()
        release.wait(10)
        finished.append(True)
        return "done"

    async def caller() -> None:
        with caller_scope:
            await worker.run(slow)
            await trio.lowlevel.checkpoint()  # where the deferred cancellation lands
        caught.append(caller_scope.cancelled_caught)

    with trio.fail_after(5):  # well before slow()'s own 10 s: the asserts below ran
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait)
            caller_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not finished  # the caller still waits: the call is not abandoned
            assert not caught
            release.set()
    assert finished == [True]
    assert caught == [True]
    await worker.aclose()


async def test_close_lets_queued_calls_finish_then_refuses_more() -> None:
    worker = WorkerThread("bridged-test")
    gate = threading.Event()
    results: list[int] = []

    def record(n: int) -> None:
        gate.wait(10)
        results.append(n)  # on the worker thread, in the order the calls run

    async def call(n: int) -> None:
        await worker.run(record, n)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(call, n)
            await trio.testing.wait_all_tasks_blocked()  # queued in this order
        nursery.start_soon(worker.aclose)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        await worker.run(int)
    await worker.aclose()  # idempotent
    await WorkerThread("never-started").aclose()
