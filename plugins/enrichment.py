"""Built-in plugin `enrichment`: event ids, timestamps, and the notification -> chat mapping.

Chat events (kind ``chat.event``, from any source) leave enrichment in the SPEC §2 ``update``
shape without ``socket_sequence``::

    {"type": "update", "eventId": "00017...", "timestamp": 1700000000,
     "timestampms": 1700000000123, "message": [{"type", "text", "sender", "send_date"}, ...]}

Whatever server-assigned fields the sender put in (``eventId``, ``timestamp``,
``timestampms``, ``socket_sequence``) are overwritten or dropped, and every item keeps only
``type``, ``text``, ``sender`` and ``send_date``. ``sender`` is the authenticated identity's
subject when the handshake produced one (a client cannot speak as someone else), else what
the client sent, else ``"anonymous"``; a missing ``send_date`` is the event's timestamp.

Event ids: a 20-digit zero-padded decimal string of ``unix_ms * 1000 + counter``, strictly
increasing within the process, so string order, numeric order and time order agree.

Notifications (kind ``notification``) get an event id reserved in ``meta["event_id"]`` (and
as ``message.id`` when they came without one) plus ``meta["timestamp_ms"]``; the route
transform ``notification_to_chat`` turns them into chat events (SPEC §4).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge import CHAT_EVENT, NOTIFICATION, ContractError, Message, Transform, hookimpl

ITEM_KEYS = ("type", "text", "sender", "send_date")
ANONYMOUS = "anonymous"
NOTIFICATIONS_SENDER = "notifications"
_EVENT_ID = re.compile(r"[0-9]{20}")


class EventIds:
    """Strictly increasing event ids: ``max(now_ms * 1000, last + 1)``, 20 digits."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def next(self) -> tuple[str, int]:
        """A fresh event id and its millisecond timestamp."""
        value = max(int(self._clock() * 1000) * 1000, self._last + 1)
        self._last = value
        return f"{value:020d}", value // 1000


#: One generator per process: ids stay ordered even across several daemons in one process.
EVENT_IDS = EventIds()


def is_event_id(value: object) -> bool:
    return isinstance(value, str) and _EVENT_ID.fullmatch(value) is not None


def identity_subject(identity: object) -> str | None:
    """The subject of an authenticated identity: the string itself, a mapping's
    ``subject``/``sub``, or an object's ``subject`` attribute."""
    if isinstance(identity, str):
        return identity or None
    if isinstance(identity, Mapping):
        subject = identity.get("subject", identity.get("sub"))
    else:
        subject = getattr(identity, "subject", None)
    return subject if isinstance(subject, str) and subject else None


def _items(body: Mapping[str, Any], sender: str | None, timestamp: int) -> list[dict[str, Any]]:
    items = body.get("message")
    if not isinstance(items, list) or not items:
        raise ContractError("message: must be a non-empty array of items", field="message",
                            rule="type")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ContractError(f"message.{i}: must be an object", field=f"message.{i}",
                                rule="type")
        clean = {k: item[k] for k in ITEM_KEYS if k in item}
        clean["sender"] = sender or clean.get("sender") or ANONYMOUS
        clean.setdefault("send_date", timestamp)
        out.append(clean)
    return out


def enrich_chat_event(message: Message, ids: EventIds = EVENT_IDS) -> Message:
    event_id, ms = ids.next()
    seconds = ms // 1000
    sender = identity_subject(message.meta.get("identity"))
    body = {
        "type": "update",
        "eventId": event_id,
        "timestamp": seconds,
        "timestampms": ms,
        "message": _items(message.body, sender, seconds),
    }
    return message.evolve(id=event_id, body=body)


def enrich_notification(message: Message, ids: EventIds = EVENT_IDS) -> Message:
    event_id, ms = ids.next()
    meta = {**message.meta, "event_id": event_id, "timestamp_ms": ms}
    return message.evolve(id=message.id or event_id, meta=meta)


@hookimpl
def bridge_enrich_message(message: Message) -> Message | None:
    if message.kind == CHAT_EVENT:
        return enrich_chat_event(message)
    if message.kind == NOTIFICATION:
        return enrich_notification(message)
    return None


def rfc3339_seconds(value: object) -> int:
    """Epoch seconds of an RFC 3339 date-time (``Z`` or an offset; a leap second counts as
    the next second). Raises ValueError, also for a moment outside years 1-9999 in UTC."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string")
    text = value.strip().upper()
    leap = re.match(r"(.*[T ]\d\d:\d\d:)60(.*)", text)
    if leap:
        text = leap.group(1) + "59" + leap.group(2)
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("must be an RFC 3339 date-time with a time zone offset")
    try:
        if leap:
            when += timedelta(seconds=1)
        return int(when.astimezone(UTC).timestamp())
    except OverflowError:  # the offset or the leap second leaves years 1-9999
        raise ValueError(f"{value!r} is out of range (years 1 to 9999 in UTC)") from None


def notification_to_chat(message: Message) -> Message:
    """``{userId, message, timestamp}`` -> an update on chat ``userId`` with one
    ``chat_event`` item from ``notifications`` (SPEC §4)."""
    body = message.body
    user_id, text = body.get("userId"), body.get("message")
    if not isinstance(user_id, str) or not user_id:
        raise ContractError("userId: must be a non-empty string", field="userId", rule="type")
    if not isinstance(text, str):
        raise ContractError("message: must be a string", field="message", rule="type")
    try:
        send_date = rfc3339_seconds(body.get("timestamp"))
    except ValueError as e:
        raise ContractError(f"timestamp: {e}", field="timestamp", rule="format") from None
    event_id, ms = message.meta.get("event_id"), message.meta.get("timestamp_ms")
    if not is_event_id(event_id) or not isinstance(ms, int):
        event_id, ms = EVENT_IDS.next()  # not enriched (plugin disabled?): assign here
    meta = dict(message.meta)
    if message.id and message.id != event_id:
        meta["source_message_id"] = message.id
    chat_body = {
        "type": "update",
        "eventId": event_id,
        "timestamp": ms // 1000,
        "timestampms": ms,
        "message": [{"type": "chat_event", "text": text, "sender": NOTIFICATIONS_SENDER,
                     "send_date": send_date}],
    }
    return message.evolve(kind=CHAT_EVENT, chat_id=user_id, id=event_id, body=chat_body,
                          meta=meta)


@hookimpl
def bridge_register_transforms(register: Callable[[str, Transform], None]) -> None:
    register("notification_to_chat", notification_to_chat)
