"""Per-chat order on one instance: every chat event reaches the local sockets in offset order,
once, with no gap, whichever way it arrived (this instance's pipeline, the backplane, a read
from PostgreSQL).

A chat has a :class:`_Chat` while it has local sockets: the first socket's ``join`` reads the
chat's head from PostgreSQL and sets ``next`` past it, so the socket gets every event
committed after it joined. Then, for each event offered:

* ``offset < next``: delivered already (a duplicate from the backplane or a repair): dropped;
* ``offset == next``: delivered, with whatever held events follow it without a hole;
* ``offset > next``: held. If the hole is still there after ``gap_wait_s`` (the missing
  event was lost on the backplane, or its writer died between commit and publish), the
  missing range is read from PostgreSQL: a *gap repair*.

A periodic head check reads the heads of every local chat in one query, so a chat that has
gone quiet after a lost event is repaired too (a *head repair*, once the chat is still behind
``gap_wait_s`` later: an event committed a moment ago may be on its way). Events of chats with no
local socket are dropped on arrival, before their body is decoded (the backplane consumer
asks :meth:`Sequencer.wants`).

Nothing here waits on the network while holding the order: delivery to the sockets only
queues frames (each socket's queue is bounded; a full one closes that socket with 1013).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from bridge import Message, StorageUnavailable

from .store import parse_event_id

log = logging.getLogger("bridge.cluster")

#: Held events per chat at most; more repair the gap at once instead of waiting.
MAX_HELD = 1024

Deliver = Callable[[Sequence[Message]], Awaitable[None]]
#: (chat_id, first offset, last offset) -> the stored events in that range, in order
Fetch = Callable[[str, int, int], Awaitable[list[Message]]]
#: chat_id -> (epoch, last offset) of the chat, or None for a chat with no event yet
Head = Callable[[str], Awaitable[tuple[int, int] | None]]
#: chat_ids -> {chat_id: (epoch, last offset)}
Heads = Callable[[Sequence[str]], Awaitable[dict[str, tuple[int, int]]]]


@dataclass
class _Chat:
    epoch: int = 0
    next: int = 0  # the offset the sockets get next; 0 while joining
    held: dict[int, Message] = field(default_factory=dict)
    held_since: float = 0.0  # when the current hole was first seen
    joined: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None  # why the first join could not read the head
    repairing: bool = False


class Sequencer:
    def __init__(self, deliver: Deliver, fetch: Fetch, head: Head, heads: Heads, *,
                 gap_wait_s: float, count: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._deliver = deliver
        self._fetch = fetch
        self._head = head
        self._heads = heads
        self.gap_wait_s = gap_wait_s
        self._count = count or (lambda _metric, _kind: None)
        self._clock = clock
        self._chats: dict[str, _Chat] = {}
        self._lock = trio.Lock()  # one offer at a time: the order is decided and kept
        self._hole = trio.Event()  # set when a chat starts holding events
        self.repairs = {"gap": 0, "head": 0}

    def wants(self, chat_id: str) -> bool:
        """Whether events of ``chat_id`` are wanted here (it has local sockets)."""
        return chat_id in self._chats

    @property
    def chats(self) -> list[str]:
        return list(self._chats)

    # ------------------------------------------------------------------ sockets

    async def join(self, chat_id: str) -> None:
        """A socket of ``chat_id`` registered. The first one reads the chat's head: events
        after it reach the chat's sockets from now on."""
        chat = self._chats.get(chat_id)
        if chat is not None:
            await chat.joined.wait()
            if chat.failed is not None:
                raise StorageUnavailable(f"cluster: chat {chat_id}: {chat.failed}")
            return
        chat = self._chats[chat_id] = _Chat()
        try:
            head = await self._head(chat_id)
            async with self._lock:
                chat.epoch, last = head if head is not None else (0, 0)
                chat.next = last + 1
                early = sorted(chat.held.items())
                chat.held.clear()
                chat.joined.set()
                out = self._accept(chat, (m for _, m in early))
                if out:
                    await self._deliver(out)
        except BaseException as e:  # cancelled too (the handshake's deadline): not joined
            if not chat.joined.is_set():
                chat.failed = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if self._chats.get(chat_id) is chat:
                    del self._chats[chat_id]
                chat.joined.set()  # the sockets waiting for this join are refused
            raise

    def leave(self, chat_id: str) -> None:
        """The last socket of ``chat_id`` has gone."""
        self._chats.pop(chat_id, None)

    # ------------------------------------------------------------------ events

    async def offer(self, messages: Iterable[Message]) -> None:
        """Events stored in PostgreSQL (with their cluster event ids), from anywhere, in any
        order: each reaches the local sockets once, in offset order."""
        async with self._lock:
            out: list[Message] = []
            by_chat: dict[str, list[Message]] = {}
            for m in messages:
                if m.chat_id in self._chats:
                    by_chat.setdefault(m.chat_id, []).append(m)
            for chat_id, events in by_chat.items():
                out += self._accept(self._chats[chat_id], events)
            if out:
                await self._deliver(out)

    def _accept(self, chat: _Chat, events: Iterable[Message]) -> list[Message]:
        """What of ``events`` (and of the held ones) goes out now, in order."""
        if not chat.joined.is_set():  # reading the head: hold everything until it is known
            for m in events:
                parsed = parse_event_id(m.id)
                if parsed is not None and len(chat.held) < MAX_HELD:
                    chat.held[parsed[1]] = m
            return []
        for m in events:
            parsed = parse_event_id(m.id)
            if parsed is None:
                log.warning("cluster: event %s on chat %s has no cluster event id; dropped",
                            m.id, m.chat_id)
                continue
            epoch, offset = parsed
            if epoch != chat.epoch:
                if chat.epoch:  # another epoch (the chat was reset): the head check decides
                    continue
                chat.epoch, chat.next = epoch, 1  # the chat's first events
            if offset >= chat.next:
                chat.held[offset] = m
        while len(chat.held) > MAX_HELD:  # the newest go: the repair reads them again
            del chat.held[max(chat.held)]
        out: list[Message] = []
        while chat.next in chat.held:
            out.append(chat.held.pop(chat.next))
            chat.next += 1
        if chat.held:
            if not chat.held_since or out:
                chat.held_since = self._clock()
            self._hole.set()
        else:
            chat.held_since = 0.0
        return out

    # ------------------------------------------------------------------ repairs

    async def repair_forever(self, head_check_interval_s: float) -> None:
        """Repair holes older than ``gap_wait_s`` and, every ``head_check_interval_s``,
        check every local chat's head; until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._gaps_forever)
            nursery.start_soon(self._heads_forever, head_check_interval_s)

    async def _gaps_forever(self) -> None:
        while True:
            self._hole = trio.Event()
            due = [(c, chat) for c, chat in self._chats.items()
                   if chat.held and chat.joined.is_set()]
            if not due:
                await self._hole.wait()
                continue
            now = self._clock()
            wait = min(chat.held_since + self.gap_wait_s for _, chat in due) - now
            overfull = any(len(chat.held) >= MAX_HELD for _, chat in due)
            if wait > 0 and not overfull:
                await trio.sleep(wait)
                continue
            repaired = False
            for chat_id, chat in due:
                if chat.held and (len(chat.held) >= MAX_HELD
                                  or now - chat.held_since >= self.gap_wait_s):
                    repaired |= await self._repair(chat_id, chat, min(chat.held) - 1, "gap")
            if not repaired:  # a repair of those chats is in flight already: let it finish
                await trio.sleep(min(0.05, self.gap_wait_s))

    async def _heads_forever(self, interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            await self.check_heads()

    async def check_heads(self) -> None:
        """Read the head of every local chat; repair those whose sockets are behind."""
        chats = [c for c, chat in self._chats.items() if chat.joined.is_set()]
        if not chats:
            return
        try:
            heads = await self._heads(chats)
        except Exception as e:
            log.warning("cluster: head check failed: %s", e)
            return
        behind = {c: h for c, h in heads.items() if self._behind(c, h)}
        if not behind:
            return
        # An event committed a moment ago may be on its way still (this instance's pipeline,
        # the backplane): give it gap_wait_s, as a hole gets, before reading it again.
        await trio.sleep(self.gap_wait_s)
        for chat_id, (epoch, last) in behind.items():
            chat = self._chats.get(chat_id)
            if chat is not None and self._behind(chat_id, (epoch, last)):
                if epoch != chat.epoch:  # reset: the sockets go on from the new epoch's start
                    log.warning("cluster: chat %s moved from epoch %d to %d", chat_id,
                                chat.epoch, epoch)
                    async with self._lock:
                        chat.epoch, chat.next = epoch, 1
                        chat.held.clear()
                await self._repair(chat_id, chat, last, "head")

    def _behind(self, chat_id: str, head: tuple[int, int]) -> bool:
        chat = self._chats.get(chat_id)
        return chat is not None and (head[0] != chat.epoch or head[1] >= chat.next)

    async def _repair(self, chat_id: str, chat: _Chat, last: int, kind: str) -> bool:
        """Read offsets ``next..last`` of ``chat_id`` from PostgreSQL and offer them; False
        when a repair of the chat is in flight already."""
        if chat.repairing:
            return False
        chat.repairing = True
        first = chat.next
        try:
            events = await self._fetch(chat_id, first, last)
        except Exception as e:
            log.warning("cluster: repair of chat %s (%d..%d) failed: %s", chat_id, first,
                        last, e)
            chat.held_since = self._clock()
            await trio.sleep(self.gap_wait_s)  # then try again, even with a full buffer
            return True
        finally:
            chat.repairing = False
        self.repairs[kind] += 1
        self._count("cluster_repairs_total", kind)
        log.info("cluster: %s repair of chat %s: read %d events (%d..%d)", kind, chat_id,
                 len(events), first, last)
        async with self._lock:
            chat_now = self._chats.get(chat_id)
            if chat_now is not chat:
                return True
            # offsets no longer kept (pruned) cannot be delivered: skip past them
            kept = [parse_event_id(m.id) for m in events]
            if kept and kept[0] is not None and kept[0][1] > chat.next:
                chat.next = kept[0][1]
            elif not events and chat.held and min(chat.held) - 1 <= last:
                chat.next = min(chat.held)
            out = self._accept(chat, events)
            if out:
                await self._deliver(out)
        return True
