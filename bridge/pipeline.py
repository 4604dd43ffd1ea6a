"""The one straight way every message walks.

transport in (decoded by the transport) -> validate inbound -> enrich -> route (select and
transform) -> validate outbound -> persist -> deliver to destinations -> settle the source.

The pipeline takes inbound messages from a bounded channel in batches: all messages that
are waiting (up to ``batch_max``) are validated and enriched one by one, persisted in one
hook call, and delivered with one call per destination, in arrival order. A failure is
contained: a batch call that raises is retried one message at a time, so only the message
that fails is reported failed; the others flow.

Two tasks share the work, handing batches over a channel without a buffer: one prepares
(validates, enriches, routes) a batch while the other persists, delivers and settles the
batch before it. Persisting waits for the disk (the history's fsynced commit) without
holding the GIL, so the next batch's preparing runs meanwhile. Order is kept: each task
takes the batches in turn. Beyond the inbound channel, two batches are held at most: one
being prepared (or waiting to be handed over) and one being finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from .errors import ContractError, DecodeError, HopLimitExceeded, StorageUnavailable
from .logs import RateLimited
from .message import CLIENT_MSG_RETRY, Message
from .metrics import Metrics
from .plugins import Hooks
from .routing import Leg, Router
from .transport import Accepted, Failed, Outcome, Rejected, Settle, Transport

log = logging.getLogger("bridge.pipeline")


@dataclass(slots=True)
class Work:
    """One inbound message on its way through a batch."""

    inbound: Message
    settle: Settle
    message: Message | None = None  # after enrichment
    legs: list[Leg] = field(default_factory=list)
    outcome: Outcome | None = None

    def fail(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome


def settle_safely(settle: Settle, outcome: Outcome, message_id: str) -> None:
    try:
        settle(outcome)
    except Exception:
        log.exception("settle callback failed for message %s", message_id)


class Pipeline:
    def __init__(
        self,
        hooks: Hooks,
        router: Callable[[], Router],
        destinations: Mapping[str, Transport],
        metrics: Metrics,
        *,
        hop_limit: int,
        queue_size: int,
        batch_max: int,
    ) -> None:
        self._hooks = hooks
        self._router = router  # a callable: a reload swaps the router between batches
        self._destinations = destinations
        #: destinations that store what they take and hold it until ``commit``: outboxes
        self._durable = frozenset(n for n, t in destinations.items() if _is_durable(t))
        self._metrics = metrics
        self._hop_limit = hop_limit
        self._batch_max = batch_max
        self._send, self._receive = trio.open_memory_channel[Work](queue_size)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self.open = trio.Event()  # set by the daemon once every transport has started
        #: why the last write to storage failed; None while storage takes writes
        self.storage_error: str | None = None
        self._storage_log = RateLimited(interval_s=10.0)
        self._stored = self._refused = False  # in the batch being finished

    @property
    def pending(self) -> int:
        """Messages submitted and not yet settled."""
        return self._pending

    async def submit(self, message: Message, settle: Settle) -> None:
        """Queue ``message``; wait only while the pipeline is full.

        With room in the queue this returns without yielding to the scheduler: a transport
        that hands over a burst (an AMQP batch of deliveries) queues all of it before the
        pipeline task runs, so the pipeline sees one batch. Each yield costs an ``epoll``
        call and a scheduler pass, about 9 µs of CPU on the development VM. The callers'
        loops checkpoint on their own reads (a socket's next frame, the next deliveries).
        """
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1
        work = Work(message, settle)
        queued = False
        try:
            try:
                self._send.send_nowait(work)
            except trio.WouldBlock:
                await self._send.send(work)
            queued = True
        finally:
            if not queued:  # closed, or cancelled while waiting: it will never be settled
                self._done(1)

    def _done(self, n: int) -> None:
        self._pending -= n
        if self._pending == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once every submitted message has been settled."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.open.wait()
        hand_over, prepared = trio.open_memory_channel[list[Work]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._finish_batches, prepared)
            async with hand_over, self._receive:
                while True:
                    batch = [await self._receive.receive()]
                    while len(batch) < self._batch_max:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    handed = False
                    try:
                        await self._prepare_batch(batch)
                        await hand_over.send(batch)  # waits while the batch before finishes
                        handed = True
                    finally:
                        if not handed:  # cancelled: it was neither stored nor delivered
                            self._settle(batch, finished=False)

    async def _finish_batches(self, prepared: trio.MemoryReceiveChannel[list[Work]]) -> None:
        async with prepared:
            async for batch in prepared:
                finished = False
                try:
                    await self._finish(batch)
                    finished = True
                finally:
                    self._settle(batch, finished=finished)

    # ------------------------------------------------------------------ stages

    async def _prepare_batch(self, batch: list[Work]) -> None:
        router = self._router()
        for work in batch:
            await self._prepare(work, router)

    async def _finish(self, batch: list[Work]) -> None:
        """Durable destinations (outboxes) take the batch first and hold it, then it is
        persisted, then the other destinations (the chat's sockets: the sender's echo) get
        it, and last the outboxes learn which of what they hold was stored. So an echo never
        leaves before every durable copy of its event exists, whatever the routes' order,
        and an event is either in the history and every outbox or in none
        (docs/architecture.md). The release comes after the echo: the held copies are
        durable already, it only lets the publisher send them."""
        ready = [w for w in batch if w.outcome is None]
        self._stored = self._refused = False
        try:
            await self._finish_ready(ready)
        finally:
            if self._stored and not self._refused:
                self._storage_recovered()

    async def _finish_ready(self, ready: list[Work]) -> None:
        durable = self._durable
        if durable:
            await self._deliver(ready, lambda dest: dest in durable)
        await self._persist([w for w in ready if w.outcome is None])
        await self._deliver([w for w in ready if w.outcome is None],
                            lambda dest: dest not in durable)
        if durable:  # after the echo: what is held is durable already, this only releases
            await self._commit(ready, durable)

    async def _prepare(self, work: Work, router: Router) -> None:
        msg = work.inbound
        self._metrics.count("messages_in_total", transport=msg.source)
        try:
            if msg.hops > self._hop_limit:
                raise HopLimitExceeded(
                    f"hop count {msg.hops} is over the limit {self._hop_limit}: a routing loop?")
            await self._hooks.validate(msg, "inbound")
            msg = await self._hooks.enrich(msg)
            work.message = msg
            legs = router.route(msg)
            if msg.meta.get(CLIENT_MSG_RETRY):
                legs = _back_to_source(legs, msg.source)
            for leg in legs:
                if leg.message is not msg:
                    await self._hooks.validate(leg.message, "outbound")
            work.legs = legs
        except (ContractError, DecodeError, HopLimitExceeded) as e:
            self._metrics.count("rejected_total", transport=msg.source, reason=type(e).__name__)
            log.info("rejected message %s from %s: %s", msg.id or "-", msg.source, e)
            work.fail(Rejected(e))
        except Exception as e:
            self._metrics.count("failed_total", transport=msg.source, stage="prepare")
            log.exception("plugin failed on message %s from %s", msg.id or "-", msg.source)
            work.fail(Failed(f"internal error while processing: {type(e).__name__}"))

    async def _persist(self, ready: list[Work]) -> None:
        if not ready or not self._hooks.has("bridge_persist_messages"):
            return
        try:
            await self._persist_works(ready)
        except Exception as e:
            if len(ready) == 1 or isinstance(e, StorageUnavailable):
                for work in ready:  # storage is down: every message of the batch waits
                    self._persist_failed(work, e)
                return
        else:
            self._storage_ok()
            return
        for work in ready:  # isolate the message that fails
            try:
                await self._persist_works([work])
            except Exception as e:
                self._persist_failed(work, e)
            else:
                self._storage_ok()

    async def _persist_works(self, works: list[Work]) -> None:
        """Persist the legs' messages (each object once, with every destination it goes
        to). A store that assigned the ids returns the messages as stored: the legs then
        carry those."""
        destinations: dict[int, tuple[str, ...]] = {}
        messages: list[Message] = []
        for work in works:
            for leg in work.legs:
                known = destinations.get(id(leg.message))
                if known is None:
                    messages.append(leg.message)
                    destinations[id(leg.message)] = leg.destinations
                else:
                    destinations[id(leg.message)] = known + tuple(
                        d for d in leg.destinations if d not in known)
        stored = await self._hooks.persist(messages, [destinations[id(m)] for m in messages])
        if stored is None:
            return
        replaced = {id(old): new for old, new in zip(messages, stored, strict=True)}
        for work in works:
            work.legs = [Leg(leg.route, replaced.get(id(leg.message), leg.message),
                             leg.destinations) for leg in work.legs]
            if work.message is not None:
                work.message = replaced.get(id(work.message), work.message)

    def _persist_failed(self, work: Work, error: Exception) -> None:
        assert work.message is not None
        source = work.inbound.source
        if isinstance(error, StorageUnavailable):
            self._storage_failed(error)
            self._metrics.count("failed_total", transport=source, stage="persist")
            work.fail(Failed("could not store the message; try again later", retry=True))
            return
        log.error("persist failed for message %s", work.message.id, exc_info=error)
        self._metrics.count("failed_total", transport=source, stage="persist")
        work.fail(Failed("could not store the message"))

    def _storage_failed(self, error: StorageUnavailable) -> None:
        """Storage refuses writes: not ready, and one log line per kind of failure."""
        self._refused = True
        if self.storage_error is None:
            self._metrics.gauge("storage_ready", 0)
        self.storage_error = str(error) or type(error).__name__
        self._storage_log.warning(log, self.storage_error, "storage unavailable: %s",
                                  self.storage_error)

    def _storage_ok(self) -> None:
        """A write to storage succeeded (counted at the end of the batch)."""
        self._stored = True

    def _storage_recovered(self) -> None:
        """A batch wrote to storage and nothing refused: storage takes writes again."""
        if self.storage_error is not None:
            log.warning("storage available again (was: %s)", self.storage_error)
            self.storage_error = None
            self._metrics.gauge("storage_ready", 1)

    async def _commit(self, ready: list[Work], durable: frozenset[str]) -> None:
        """Tell each durable destination which of the messages it holds were stored."""
        for dest in durable:
            kept: list[Message] = []
            dropped: list[Message] = []
            for work in ready:
                for leg in work.legs:
                    if dest in leg.destinations:
                        (kept if work.outcome is None else dropped).append(leg.message)
            if not kept and not dropped:
                continue
            try:
                await self._destinations[dest].commit(kept, dropped)  # type: ignore[attr-defined]
            except StorageUnavailable as e:  # it holds them and releases them later
                self._storage_failed(e)
            except Exception:  # it holds them: they are sent after its next start
                log.exception("commit to %s failed for %d messages", dest, len(kept))
            else:
                self._storage_ok()

    async def _deliver(self, ready: list[Work], wanted: Callable[[str], bool]) -> None:
        per_dest: dict[str, list[tuple[Work, Leg]]] = {}
        for work in ready:
            for leg in work.legs:
                for dest in leg.destinations:
                    if wanted(dest):
                        per_dest.setdefault(dest, []).append((work, leg))
        for dest, items in per_dest.items():
            transport = self._destinations[dest]
            try:
                await transport.deliver([leg.message for _, leg in items])
            except Exception as e:
                if len(items) == 1 or isinstance(e, StorageUnavailable):
                    for work, leg in items:
                        self._deliver_failed(dest, work, leg, e)
                    continue
                for work, leg in items:
                    try:
                        await transport.deliver([leg.message])
                    except Exception as e:
                        self._deliver_failed(dest, work, leg, e)
                        continue
                    self._metrics.count("messages_out_total", transport=dest, route=leg.route)
                continue
            if dest in self._durable:
                self._storage_ok()
            for _, leg in items:
                self._metrics.count("messages_out_total", transport=dest, route=leg.route)

    def _deliver_failed(self, dest: str, work: Work, leg: Leg, error: Exception) -> None:
        self._metrics.count("failed_total", transport=dest, stage="deliver")
        if isinstance(error, StorageUnavailable):
            self._storage_failed(error)
            work.fail(Failed(f"delivery to {dest} failed: {error}; try again later",
                             retry=True))
            return
        log.error("delivery to %s failed on route %s for message %s", dest, leg.route,
                  leg.message.id, exc_info=error)
        work.fail(Failed(f"delivery to {dest} failed"))

    def _settle(self, batch: Sequence[Work], *, finished: bool = True) -> None:
        """Tell each message's source its outcome. When the batch was not ``finished``
        (the pipeline was cancelled: a drain that timed out, a second signal), a message
        without an outcome yet is not settled at all: it may not have been stored or
        delivered, so it must not be acknowledged; a broker redelivers it."""
        for work in batch:
            outcome = work.outcome
            if outcome is None:
                if not finished:
                    continue
                outcome = Accepted(work.message or work.inbound)
            settle_safely(work.settle, outcome, (work.message or work.inbound).id)
        self._done(len(batch))


def _is_durable(transport: Transport) -> bool:
    """Whether ``transport`` is a durable destination (it has ``commit``: an outbox)."""
    return callable(getattr(transport, "commit", None))


def _back_to_source(legs: list[Leg], source: str) -> list[Leg]:
    """The legs of a retry a store recognised (``meta[CLIENT_MSG_RETRY]``): it is an event
    every destination had already, so it goes back to its source only (the sender's echo);
    routing it on would publish the event a second time."""
    return [Leg(leg.route, leg.message, (source,)) for leg in legs
            if source in leg.destinations]

