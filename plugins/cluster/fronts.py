"""What cluster mode puts in front of the transports (``bridge_wrap_transport``).

* :class:`ChatFront` stands in front of a transport that serves chats (the websocket
  transport: it has ``watch_chats``). What the pipeline delivers to it (events just stored
  in PostgreSQL) goes to the backplane for the other instances and through the sequencer to
  the local sockets; the backplane's events and the repairs join the same sequencer.
* :class:`OutboxFront` stands in front of a durable destination (the AMQP transport: it has
  ``publish_confirmed``). In cluster mode its outbox is the ``outbox`` table in PostgreSQL,
  written in the transaction that stores the event, so the pipeline has nothing left to
  hand it: ``deliver`` only wakes the drainer. One instance at a time, the one that holds
  the outbox lock, publishes the outbox with confirms and deletes what the broker took.

Everything else (running, draining, health, reload) is the wrapped transport's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from bridge import CHAT_EVENT, CLIENT_MSG_RETRY, Health, Message, TransportContext

if TYPE_CHECKING:
    from . import Plugin

log = logging.getLogger("bridge.cluster")

class _Front:
    def __init__(self, inner: Any, plugin: Plugin) -> None:
        self.inner = inner
        self.plugin = plugin

    def __getattr__(self, name: str) -> Any:  # everything not changed is the transport's
        return getattr(self.inner, name)

    def stop_accepting(self) -> None:
        self.inner.stop_accepting()

    async def drain(self) -> None:
        await self.inner.drain()

    def health(self) -> Health:
        health: Health = self.inner.health()
        problems = self.plugin.problems()
        if not problems:
            return health
        detail = "; ".join(([health.detail] if health.detail else []) + problems)
        return Health(False, detail)


class ChatFront(_Front):
    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.inner.watch_chats(self.plugin.sequencer.join, self.plugin.sequencer.leave)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.inner.run, ctx)
            await nursery.start(self.plugin.run_cluster, ctx)
            task_status.started()

    async def deliver(self, messages: Sequence[Message]) -> None:
        events = [m for m in messages if m.kind == CHAT_EVENT and not m.meta.get(CLIENT_MSG_RETRY)]
        retries = [m for m in messages if m.kind == CHAT_EVENT and m.meta.get(CLIENT_MSG_RETRY)]
        if len(events) + len(retries) < len(messages):  # what the transport refuses
            await self.inner.deliver([m for m in messages if m.kind != CHAT_EVENT])
        if events:
            await self.plugin.stored(events)
            await self.plugin.sequencer.offer(events)
        if retries:  # the original event again, for its sender only
            await self.inner.deliver(retries)


class OutboxFront(_Front):
    """Not a durable destination for the pipeline (no ``commit``): the store keeps the
    outbox."""

    async def deliver(self, messages: Sequence[Message]) -> None:
        self.plugin.outbox_wake()

    def __getattr__(self, name: str) -> Any:
        if name == "commit":  # the pipeline must not see this as a durable destination
            raise AttributeError(name)
        return getattr(self.inner, name)
