"""The consumed side's ledger: which deliveries are in hand, and one call that settles one.

The broker may deliver a message again: after a reconnect (what was unacknowledged on the
old channel is requeued) or because a producer sent it twice. The inbox drops such copies
by message id (AMQP's ``message_id``; a delivery without one is never a duplicate):

* a copy of a message settled lately (the last ``dedupe_window`` ids) is acknowledged at
  once;
* a copy of a message still in hand (in the pipeline, or parked for a retry) is held, and
  settled with the first copy: acknowledged once that one is acknowledged, handed back to
  the broker (requeued) if that one is left to the broker.

:meth:`Inbox.settle` is the only way a delivery that was handled leaves the inbox: it
acknowledges the delivery, dead-letters it or leaves it to the broker, settles the held
copies and records the id, so the transport decides and this module does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from .consumer import Delivery
from .publisher import Properties


class Settles(Protocol):
    """What the inbox asks of a consumer (:class:`.consumer.Consumer` is one)."""

    def ack(self, tag: int) -> None: ...

    def requeue(self, tag: int) -> None: ...

    def dead_letter(self, tag: int, queue: str, body: bytes, properties: Properties,
                    on_done: Callable[[bool], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Settle by publishing the delivery's body to ``queue`` (default exchange) with
    ``properties``, and acknowledging it once the broker confirms. ``done(ok)`` runs on trio
    afterwards; if the publish failed (``ok`` false), the delivery stays with the broker."""

    queue: str
    properties: Properties
    done: Callable[[bool], None]


#: Settle by acknowledging the delivery.
ACK: Literal["ack"] = "ack"
#: Settle by leaving the delivery unacknowledged: the broker delivers it again (its consumer
#: is gone, or the daemon is stopping).
LEAVE: Literal["leave"] = "leave"

Verdict = Literal["ack", "leave"] | DeadLetter


class Inbox:
    """The ids settled lately and the copies held behind deliveries in hand."""

    def __init__(self, dedupe_window: int) -> None:
        self._window = dedupe_window
        self._seen: dict[str, None] = {}  # recently settled message ids, oldest first
        #: message id in hand -> the copies of it held meanwhile (their consumer and tag)
        self._in_hand: dict[str, list[tuple[Settles, int]]] = {}

    def duplicate(self, consumer: Settles, d: Delivery) -> bool:
        """Whether ``d`` copies a message settled lately (then it is acknowledged now) or in
        hand (then it is held and settled with that one)."""
        mid = d.message_id
        if not mid:
            return False
        if mid in self._seen:
            consumer.ack(d.tag)
            return True
        held = self._in_hand.get(mid)
        if held is not None:
            held.append((consumer, d.tag))
            return True
        return False

    def handling(self, d: Delivery) -> None:
        """``d`` goes to the pipeline: until it is settled, copies of it are held."""
        if d.message_id:
            self._in_hand[d.message_id] = []

    def settle(self, consumer: Settles, d: Delivery, verdict: Verdict) -> None:
        """Settle delivery ``d`` of ``consumer`` as ``verdict`` says, and its held copies
        with it."""
        if isinstance(verdict, DeadLetter):
            dead = verdict

            def done(ok: bool) -> None:
                dead.done(ok)
                self._settled(d.message_id, ok)

            consumer.dead_letter(d.tag, dead.queue, d.body, dead.properties, done)
        elif verdict == ACK:
            consumer.ack(d.tag)
            self._settled(d.message_id, True)
        else:
            self._settled(d.message_id, False)

    def _settled(self, mid: str, final: bool) -> None:
        """Delivery with id ``mid`` is acknowledged (``final``) or left for redelivery."""
        if not mid:
            return
        held = self._in_hand.pop(mid, [])
        if not final:  # the first copy stays unsettled: let the held copies be handled
            for consumer, tag in held:
                consumer.requeue(tag)
            return
        self._seen[mid] = None
        if len(self._seen) > self._window:
            del self._seen[next(iter(self._seen))]
        for consumer, tag in held:
            consumer.ack(tag)
