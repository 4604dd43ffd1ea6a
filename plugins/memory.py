"""The in-memory transport, for tests and local experiments.

``[transports.X] type = "memory"``. Code holding the daemon injects messages with
:meth:`MemoryTransport.inject` and reads what was delivered from
:attr:`MemoryTransport.received` (a bounded channel: when nobody reads, deliveries wait,
which is how backpressure reaches the source).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from bridge import (
    DeliveryError,
    Health,
    Message,
    Outcome,
    TransportContext,
    TransportType,
    hookimpl,
    positive,
    setting,
)

#: Default kind of injected messages: no built-in validates, enriches or stores it, so tests
#: of the core can send any body. Pass ``kind=CHAT_EVENT`` to exercise the chat plugins.
MEMORY_KIND = "memory"


@dataclass(frozen=True)
class MemorySettings:
    capacity: int = setting(1024, check=positive, doc="deliveries held until read")
    reflect: bool = setting(False, doc="deliveries come back in as input (a loopback)")


class MemoryTransport:
    def __init__(self, name: str, settings: MemorySettings) -> None:
        self.name = name
        self.settings = settings
        self._send, self.received = trio.open_memory_channel[Message](settings.capacity)
        self._reflect_send, self._reflect_receive = trio.open_memory_channel[Message](
            settings.capacity)
        self._ctx: TransportContext | None = None
        self.accepting = True

    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        task_status.started()
        async for message in self._reflect_receive:
            await ctx.submit(message.evolve(source=self.name, hops=message.hops + 1),
                             lambda _outcome: None)

    async def inject(self, body: Mapping[str, Any], *, kind: str = MEMORY_KIND,
                     chat_id: str | None = None, id: str = "", hops: int = 0,
                     meta: Mapping[str, Any] | None = None, wait: bool = True) -> Outcome | None:
        """Submit a message as if it had arrived here. With ``wait`` return its outcome."""
        if self._ctx is None or not self.accepting:
            raise RuntimeError(f"transport {self.name} is not accepting input")
        message = Message(kind, body, self.name, id, chat_id, hops, meta or {})
        done = trio.Event()
        box: list[Outcome] = []

        def settle(outcome: Outcome) -> None:
            box.append(outcome)
            done.set()

        await self._ctx.submit(message, settle)
        if not wait:
            return None
        await done.wait()
        return box[0]

    async def deliver(self, messages: Sequence[Message]) -> None:
        for message in messages:
            await self._send.send(message)
            if self.settings.reflect:
                try:
                    self._reflect_send.send_nowait(message)
                except trio.WouldBlock:
                    raise DeliveryError(f"{self.name}: loopback buffer full") from None

    def reconfigure(self, settings: MemorySettings) -> bool:
        """Reload: ``reflect`` applies live; ``capacity`` sizes channels made at start, so
        changing it needs a restart (returns False)."""
        if settings.capacity != self.settings.capacity:
            return False
        self.settings = settings
        return True

    def stop_accepting(self) -> None:
        self.accepting = False

    async def drain(self) -> None:
        return None

    def health(self) -> Health:
        return Health(self._ctx is not None, "" if self._ctx else "not started")


def _create(name: str, settings: Any) -> MemoryTransport:
    return MemoryTransport(name, settings)


@hookimpl
def bridge_register_transports(register: Callable[[TransportType], None]) -> None:
    register(TransportType("memory", MemorySettings, _create,
                           reflects=lambda s: bool(s.reflect)))
