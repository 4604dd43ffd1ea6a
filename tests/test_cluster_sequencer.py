"""The cluster sequencer alone: order, duplicates, holes repaired from the store, joins.
The store here is a dict of the events "committed" (what PostgreSQL would answer); the
end-to-end tests (tests/test_cluster*.py) run it against the real one."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

from bridge import CHAT_EVENT, Message
from bridge_plugins.cluster.sequencer import Sequencer
from bridge_plugins.cluster.store import event_id

EPOCH = 123


def ev(offset: int, chat: str = "c", epoch: int = EPOCH) -> Message:
    return Message(CHAT_EVENT, {"n": offset}, "test", event_id(epoch, offset), chat)


class Committed:
    """What the store holds: per chat, offsets 1..N committed."""

    def __init__(self) -> None:
        self.events: dict[str, list[Message]] = {}
        self.fetches: list[tuple[str, int, int]] = []
        self.delivered: list[str] = []
        self._more = trio.Event()

    def commit(self, chat: str, n: int) -> list[Message]:
        have = self.events.setdefault(chat, [])
        new = [ev(len(have) + i + 1, chat) for i in range(n)]
        have += new
        return new

    async def deliver(self, messages: Sequence[Message]) -> None:
        self.delivered += [f"{m.chat_id}:{m.body['n']}" for m in messages]
        self._more.set()

    async def until(self, n: int) -> None:
        """Wait until ``n`` events were delivered."""
        while len(self.delivered) < n:
            self._more = trio.Event()
            await self._more.wait()

    async def fetch(self, chat: str, first: int, last: int) -> list[Message]:
        await trio.lowlevel.checkpoint()
        self.fetches.append((chat, first, last))
        return [m for m in self.events.get(chat, []) if first <= m.body["n"] <= last]

    async def head(self, chat: str) -> tuple[int, int] | None:
        await trio.lowlevel.checkpoint()
        have = self.events.get(chat)
        return (EPOCH, len(have)) if have else None

    async def heads(self, chats: Sequence[str]) -> dict[str, tuple[int, int]]:
        await trio.lowlevel.checkpoint()
        return {c: (EPOCH, len(self.events[c])) for c in chats if self.events.get(c)}


def sequencer(store: Committed, gap_wait_s: float = 0.05) -> Sequencer:
    return Sequencer(store.deliver, store.fetch, store.head, store.heads,
                     gap_wait_s=gap_wait_s)


async def test_in_order_duplicates_and_reorder() -> None:
    store = Committed()
    seq = sequencer(store)
    await seq.join("c")
    e = store.commit("c", 4)
    await seq.offer([e[1]])          # 2 before 1: held
    assert store.delivered == []
    await seq.offer([e[0], e[0]])    # 1 (twice): 1 and the held 2 go out
    await seq.offer([e[1], e[3], e[2]])  # 2 again (dropped), 4 held, then 3
    assert store.delivered == ["c:1", "c:2", "c:3", "c:4"]
    assert store.fetches == []


async def test_join_starts_after_the_head_and_holds_early_events() -> None:
    store = Committed()
    old = store.commit("c", 3)
    seq = sequencer(store)
    await seq.join("c")
    await seq.offer(old)  # before the socket joined: not for it
    new = store.commit("c", 2)
    await seq.offer(new)
    assert store.delivered == ["c:4", "c:5"]
    assert not seq.wants("other")


async def test_a_hole_is_repaired_from_the_store() -> None:
    store = Committed()
    seq = sequencer(store)
    await seq.join("c")
    e = store.commit("c", 5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(seq.repair_forever, 60.0)
        await seq.offer([e[0], e[3], e[4]])  # 2 and 3 lost on the way
        with trio.fail_after(5):
            await store.until(5)
        nursery.cancel_scope.cancel()
    assert store.delivered == ["c:1", "c:2", "c:3", "c:4", "c:5"]
    assert store.fetches == [("c", 2, 3)]
    assert seq.repairs == {"gap": 1, "head": 0}


async def test_a_quiet_chat_is_repaired_by_the_head_check() -> None:
    store = Committed()
    seq = sequencer(store)
    await seq.join("c")
    e = store.commit("c", 3)
    await seq.offer(e[:1])  # 2 and 3 never arrive, nothing after them either
    await seq.check_heads()
    assert store.delivered == ["c:1", "c:2", "c:3"]
    assert seq.repairs == {"gap": 0, "head": 1}
    await seq.check_heads()  # up to date: nothing read
    assert store.fetches == [("c", 2, 3)]


async def test_events_of_chats_without_sockets_are_dropped_and_leave_forgets() -> None:
    store = Committed()
    seq = sequencer(store)
    await seq.join("c")
    await seq.offer(store.commit("x", 2))
    seq.leave("c")
    await seq.offer(store.commit("c", 1))
    assert store.delivered == []


async def test_concurrent_joins_read_the_head_once() -> None:
    store = Committed()
    store.commit("c", 2)
    seq = sequencer(store)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(seq.join, "c")
    await seq.offer(store.commit("c", 1))
    assert store.delivered == ["c:3"]


async def test_a_join_that_cannot_read_the_head_fails_and_is_forgotten() -> None:
    store = Committed()
    seq = sequencer(store)

    async def broken(chat: str) -> tuple[int, int] | None:
        await trio.lowlevel.checkpoint()
        raise ConnectionError("database down")

    seq._head = broken
    with pytest.raises(ConnectionError):
        await seq.join("c")
    assert not seq.wants("c")
    seq._head = store.head
    await seq.join("c")
    assert seq.wants("c")


async def test_a_join_cancelled_while_reading_the_head_is_forgotten() -> None:
    """A handshake's deadline cancels the first join of a chat: the chat is not left half
    joined (waiters refused, events held without end), the next join starts afresh."""
    store = Committed()
    seq = sequencer(store)
    release = trio.Event()

    async def slow(chat: str) -> tuple[int, int] | None:
        await release.wait()
        return await store.head(chat)

    seq._head = slow
    refused: list[str] = []

    async def second() -> None:
        try:
            await seq.join("c")
        except Exception as e:
            refused.append(type(e).__name__)

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.05):
            nursery.start_soon(second)
            await seq.join("c")
    assert refused == ["StorageUnavailable"]
    assert not seq.wants("c")
    await seq.offer(store.commit("c", 1))  # nobody holds it
    seq._head = store.head
    await seq.join("c")
    await seq.offer(store.commit("c", 1))
    assert store.delivered == ["c:2"]


async def test_events_of_another_epoch_wait_for_the_head_check() -> None:
    store = Committed()
    seq = sequencer(store)
    await seq.join("c")
    await seq.offer(store.commit("c", 1))
    await seq.offer([ev(1, epoch=EPOCH + 1)])  # a late message of a reset chat: ignored
    await seq.offer(store.commit("c", 1))
    assert store.delivered == ["c:1", "c:2"]
