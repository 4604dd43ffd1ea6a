"""The PostgreSQL store, from trio: each :class:`Database` is one connection on one worker
thread (psycopg 3 has no trio support; its sync API on a thread of its own never blocks the
trio loop). The plugin keeps two: one that writes (the pipeline's batches, in order) and one
that reads (replays, repairs, head checks, the outbox), so a long replay never delays a
write. A store that cannot reach PostgreSQL is opened again on the next call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from bridge import StorageUnavailable, WorkerThread

from .store import ClusterStore, StoreUnavailable

log = logging.getLogger("bridge.cluster")

T = TypeVar("T")


class Database:
    def __init__(self, name: str, open_store: Callable[[], ClusterStore],
                 observe: Callable[[float], None] | None = None) -> None:
        self.name = name
        self._open_store = open_store
        self._store: ClusterStore | None = None
        self._worker = WorkerThread(f"bridged-cluster-{name}")
        self._observe = observe
        #: why the last call failed; None while PostgreSQL answers
        self.error: str | None = None

    async def run(self, fn: Callable[[ClusterStore], T]) -> T:
        """``fn(store)`` on this connection's thread. A store that cannot reach PostgreSQL
        raises :class:`bridge.StorageUnavailable`."""
        start = time.perf_counter()
        try:
            result: T = await self._worker.run(self._call, fn)
        except StorageUnavailable as e:
            if self.error is None:
                log.warning("cluster: PostgreSQL unavailable (%s): %s", self.name, e)
            self.error = str(e)
            raise
        if self.error is not None:
            log.warning("cluster: PostgreSQL available again (%s)", self.name)
            self.error = None
        if self._observe is not None:
            self._observe(time.perf_counter() - start)
        return result

    def _call(self, fn: Callable[[ClusterStore], T]) -> T:  # the worker thread
        try:
            if self._store is None:
                self._store = self._open_store()
            return fn(self._store)
        except StoreUnavailable as e:
            raise StorageUnavailable(f"cluster: PostgreSQL: {e}") from e

    async def aclose(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            try:
                await self._worker.run(store.close)
            except Exception as e:  # closing a dead connection: nothing to keep
                log.debug("cluster: closing the %s connection: %r", self.name, e)
        await self._worker.aclose()
