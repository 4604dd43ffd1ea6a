"""The consumed side's ledger (bridge_plugins.amqp.inbox): copies dropped by message id, and
one call that settles a delivery with the copies held behind it. The broker side of each
verdict (acks, requeues, dead letters) is tested against RabbitMQ in test_amqp_seam.py and
test_amqp.py; here the consumer records what it is asked to do."""

from __future__ import annotations

from collections.abc import Callable

from bridge_plugins.amqp.consumer import Delivery
from bridge_plugins.amqp.inbox import ACK, LEAVE, DeadLetter, Inbox
from bridge_plugins.amqp.publisher import Properties


class Recorder:
    """A consumer that records what the inbox asks of it; dead letters wait for ``confirm``."""

    def __init__(self) -> None:
        self.done: list[tuple[str, int]] = []
        self.pending: list[Callable[[bool], None]] = []

    def ack(self, tag: int) -> None:
        self.done.append(("ack", tag))

    def requeue(self, tag: int) -> None:
        self.done.append(("requeue", tag))

    def dead_letter(self, tag: int, queue: str, body: bytes, properties: Properties,
                    on_done: Callable[[bool], None]) -> None:
        self.done.append((f"dead-letter to {queue}", tag))
        self.pending.append(on_done)

    def confirm(self, ok: bool) -> None:
        self.pending.pop(0)(ok)


def delivery(tag: int, mid: str) -> Delivery:
    return Delivery(tag, b"{}", "key", "", False, "application/json", mid, {}, 2)


def test_a_copy_of_a_settled_message_is_acknowledged_at_once() -> None:
    inbox, c = Inbox(10), Recorder()
    first = delivery(1, "m")
    assert not inbox.duplicate(c, first)
    inbox.handling(first)
    inbox.settle(c, first, ACK)
    assert inbox.duplicate(c, delivery(2, "m"))
    assert c.done == [("ack", 1), ("ack", 2)]


def test_copies_held_behind_a_delivery_in_hand_are_settled_with_it() -> None:
    inbox, old, new = Inbox(10), Recorder(), Recorder()
    first = delivery(1, "m")
    inbox.handling(first)
    assert inbox.duplicate(new, delivery(7, "m"))  # redelivered on the next connection
    assert inbox.duplicate(new, delivery(8, "m"))
    assert new.done == []  # held: nothing is settled yet
    inbox.settle(old, first, ACK)
    assert old.done == [("ack", 1)]
    assert new.done == [("ack", 7), ("ack", 8)]


def test_leaving_a_delivery_to_the_broker_requeues_its_copies_and_records_nothing() -> None:
    inbox, c = Inbox(10), Recorder()
    first = delivery(1, "m")
    inbox.handling(first)
    assert inbox.duplicate(c, delivery(2, "m"))
    inbox.settle(c, first, LEAVE)
    assert c.done == [("requeue", 2)]  # the first copy stays unacknowledged
    assert not inbox.duplicate(c, delivery(3, "m"))  # its redelivery is handled again


def test_a_dead_letter_settles_the_copies_once_the_broker_answers() -> None:
    inbox, c = Inbox(10), Recorder()
    answers: list[bool] = []
    for mid, ok in (("ok", True), ("refused", False)):
        first = delivery(1, mid)
        inbox.handling(first)
        assert inbox.duplicate(c, delivery(2, mid))
        inbox.settle(c, first, DeadLetter("dead", Properties(), answers.append))
        assert c.done == [("dead-letter to dead", 1)]  # the copy waits for the confirm
        c.confirm(ok)
        assert answers[-1] is ok
        assert c.done[1:] == [("ack" if ok else "requeue", 2)]
        assert inbox.duplicate(c, delivery(3, mid)) is ok
        c.done.clear()


def test_ids_are_remembered_up_to_the_window_and_deliveries_without_one_never_repeat() -> None:
    inbox, c = Inbox(2), Recorder()
    for tag, mid in enumerate(("a", "b", "c"), 1):
        inbox.settle(c, delivery(tag, mid), ACK)
    assert not inbox.duplicate(c, delivery(4, "a"))  # the oldest id was forgotten
    assert inbox.duplicate(c, delivery(5, "c"))
    inbox.settle(c, delivery(6, ""), ACK)
    assert not inbox.duplicate(c, delivery(7, ""))
