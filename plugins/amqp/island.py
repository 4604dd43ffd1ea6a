"""An asyncio "island": one asyncio event loop in its own thread, driven from trio.

aio-pika is asyncio-only and the daemon is trio. :func:`open_island` runs an asyncio loop
in a dedicated thread for the duration of a block and :class:`Island` lets trio code run
work on it; nothing here knows about AMQP. The rules it follows (from the feasibility
study, docs/amqp.md):

* Hand-offs are batched both ways. Work for asyncio is queued and one
  ``loop.call_soon_threadsafe`` wakes the loop for everything queued meanwhile; results for
  trio are queued and one ``TrioToken.run_sync_soon`` runs them all.
* Callbacks that run on the trio loop never raise (an exception there kills the trio run):
  each one is wrapped and logged.
* :meth:`Island.call` is KeyboardInterrupt-protected between "submitted" and "parked", and
  a trio cancellation waits for the asyncio side to finish (``Abort.FAILED``, rescheduled
  from the asyncio task's done callback), so no asyncio work outlives its trio caller.
* Closing is shielded and bounded; the loop thread is always stopped and joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger("bridge.island")

T = TypeVar("T")


class IslandClosed(RuntimeError):
    """The asyncio loop has stopped; nothing more can run on it."""



# --------------------------------------------------------------------------- the island


class Island:
    """One asyncio event loop running in its own thread, driven from trio.

    Create it with :func:`open_island`. ``post`` and ``call`` are for the trio thread;
    ``to_trio`` is for the asyncio thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken) -> None:
        self.loop = loop
        self._token = token
        self._lock = threading.Lock()
        self._to_aio: list[Callable[[], None]] = []
        self._aio_scheduled = False
        self._to_trio: list[Callable[[], None]] = []
        self._trio_scheduled = False
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()  # asyncio side only

    # ------------------------------------------------------------ trio -> asyncio

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the asyncio loop soon (FIFO with every other ``post``). From trio."""
        with self._lock:
            if self._closed:
                raise IslandClosed("the asyncio loop has stopped")
            self._to_aio.append(fn)
            if self._aio_scheduled:
                return
            self._aio_scheduled = True
        self.loop.call_soon_threadsafe(self._run_aio)

    def _run_aio(self) -> None:
        with self._lock:
            items, self._to_aio = self._to_aio, []
            self._aio_scheduled = False
        for fn in items:
            try:
                fn()
            except Exception:
                log.exception("asyncio-side callback failed")

    # ------------------------------------------------------------ asyncio -> trio

    def to_trio(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the trio loop soon. From the asyncio thread; never raises."""
        with self._lock:
            self._to_trio.append(fn)
            if self._trio_scheduled:
                return
            self._trio_scheduled = True
        try:
            self._token.run_sync_soon(self._run_trio)
        except trio.RunFinishedError:
            log.debug("trio run finished; dropped callbacks from asyncio")

    def _run_trio(self) -> None:
        # Runs as a trio system callback: an exception here would be a TrioInternalError.
        with self._lock:
            items, self._to_trio = self._to_trio, []
            self._trio_scheduled = False
        for fn in items:
            try:
                fn()
            except Exception:
                log.exception("trio-side callback failed")

    # ------------------------------------------------------------ awaiting asyncio work

    @trio.lowlevel.enable_ki_protection
    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine ``fn()`` as an asyncio task and wait for its result.

        A trio cancellation cancels the asyncio task and waits until it has finished, so
        nothing is left running on the island once this returns or raises.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        state = _CallState()

        def resume(result: outcome.Outcome[Any]) -> None:  # trio thread
            if state.resumed:
                return
            state.resumed = True
            trio.lowlevel.reschedule(task, result)

        def done(fut: asyncio.Future[T]) -> None:  # asyncio thread
            self.to_trio(partial(finish, fut))

        def finish(fut: asyncio.Future[T]) -> None:  # trio thread
            if fut.cancelled():
                if state.raise_cancel is not None:
                    resume(outcome.capture(state.raise_cancel))
                else:
                    resume(outcome.Error(IslandClosed("the asyncio loop stopped")))
                return
            exc = fut.exception()
            resume(outcome.Error(exc) if exc is not None else outcome.Value(fut.result()))

        def start() -> None:  # asyncio thread
            try:
                fut = asyncio.ensure_future(fn())
            except Exception as e:
                err = e
                self.to_trio(lambda: resume(outcome.Error(err)))
                return
            state.future = fut
            fut.add_done_callback(done)

        def cancel() -> None:  # asyncio thread
            if state.future is not None:
                state.future.cancel()

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            state.raise_cancel = raise_cancel
            try:
                self.post(cancel)
            except IslandClosed:  # nothing runs any more: give up on the result
                state.resumed = True
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        self.post(start)
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def spawn(self, coro: Callable[[], Awaitable[Any]], what: str,
              on_done: Callable[[asyncio.Future[Any]], None] | None = None
              ) -> asyncio.Future[Any]:
        """Start ``coro()`` as a fire-and-forget asyncio task; ``on_done(task)`` runs when it
        ends, else a failure is only logged. Call on the asyncio thread."""
        fut = asyncio.ensure_future(coro())
        self._tasks.add(fut)  # asyncio holds tasks weakly: keep them until they end
        fut.add_done_callback(self._tasks.discard)
        fut.add_done_callback(on_done or partial(_log_failure, what))
        return fut


@dataclass(slots=True)
class _CallState:
    future: asyncio.Future[Any] | None = None
    raise_cancel: trio.lowlevel.RaiseCancelT | None = None
    resumed: bool = False


def _log_failure(what: str, fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.debug("%s failed: %r", what, exc)


def _loop_thread(loop: asyncio.AbstractEventLoop, island: Island, done: trio.Event,
                 token: trio.lowlevel.TrioToken) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Stopped: cancel what is left and let it finish (cancelling may start more
        # tasks, such as aio-pika's close handlers: repeat), then close the loop.
        for _ in range(10):
            tasks = asyncio.all_tasks(loop)
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    except Exception:
        log.exception("asyncio loop thread failed")
    finally:
        loop.close()
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)


@contextlib.asynccontextmanager
async def open_island(name: str = "island", *, close_timeout: float = 5.0
                      ) -> AsyncIterator[Island]:
    """Start an asyncio loop in a thread for the duration of the block.

    On exit (also on cancellation) the loop is stopped within ``close_timeout``: pending
    asyncio tasks are cancelled and awaited, then the thread is joined.
    """
    token = trio.lowlevel.current_trio_token()
    loop = asyncio.new_event_loop()
    island = Island(loop, token)
    done = trio.Event()
    thread = threading.Thread(target=_loop_thread, args=(loop, island, done, token),
                              name=f"asyncio-{name}", daemon=True)
    thread.start()
    try:
        yield island
    finally:
        with trio.CancelScope(shield=True):
            with island._lock:
                island._closed = True
            loop.call_soon_threadsafe(loop.stop)
            with trio.move_on_after(close_timeout):
                await done.wait()
                await trio.to_thread.run_sync(thread.join)
            if thread.is_alive():
                log.warning("asyncio loop thread %s did not stop within %.1f s",
                            thread.name, close_timeout)
