"""One long-lived thread for a plugin's blocking calls (a database connection, say).

``trio.to_thread.run_sync`` takes a thread from a cache for every call. Per call it copies the
context, goes through a capacity limiter, and renames the OS thread twice. On the machine
the benchmarks run on, that costs 160-190 µs of CPU per round trip, against 70-120 µs
for a thread of one's own fed by a queue. A store that writes once per event pays that on
every event (BENCHMARKS.md, scenario 6). :class:`WorkerThread` is that thread of one's own.
Calls run one at a time, in the order they were made. So a ``sqlite3`` connection used only
through one worker needs no lock.

Cancellation does not abandon a call that has been handed over. The caller waits until the
call has finished, and the cancellation is delivered at its next checkpoint, as with
``trio.to_thread.run_sync`` without ``abandon_on_cancel``. A write is therefore never half
done behind the caller's back.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class WorkerThread:
    """Runs blocking callables on one dedicated thread, in order.

    The thread starts on the first :meth:`run` call. :meth:`aclose` lets the queued calls
    finish, then stops the thread. After that, :meth:`run` raises :class:`RuntimeError`.
    Every caller waits for its own call, so the queue holds at most one call per waiting
    task: it is bounded by the callers, as a lock's waiters are.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def _work(self) -> None:  # the worker thread
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, token, deliver = job
            result = outcome.capture(fn)
            with contextlib.suppress(trio.RunFinishedError):  # else nobody is left to tell
                token.run_sync_soon(deliver, result)

    @trio.lowlevel.enable_ki_protection  # nothing may interrupt between "queued" and "parked"
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker thread; its result, or the exception it raised."""
        if self._closed:
            raise RuntimeError(f"worker thread {self.name} is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._thread is None:
            self._start()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[T]) -> None:  # trio thread
            trio.lowlevel.reschedule(task, result)

        self._jobs.put((lambda: fn(*args), trio.lowlevel.current_trio_token(), deliver))
        value: T = await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED)
        return value

    async def aclose(self) -> None:
        """Stop the thread once the calls already queued have run (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._jobs.put(_STOP)  # behind every queued call: their callers get their results
            await trio.to_thread.run_sync(self._thread.join)
