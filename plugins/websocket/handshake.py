"""The opening handshake: which chat a client asks for, and how it wants to talk.

``GET /v1/chats/{chat_id}?heartbeat=true|false&encoding=json|msgpack&since=<eventId>
&refusals=http|close``, with an optional ``Sec-WebSocket-Protocol`` of ``json`` or ``msgpack``.
A refusal carries the HTTP status, a short reason for the response body, and what kind of
refusal it is (the ``reason`` label of ``handshake_refusals_by_reason_total``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

CHAT_PATH = re.compile(r"/v1/chats/([^/]*)")
CHAT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: An eventId: 20 decimal digits (bridge/contracts/chat.asyncapi.yaml).
SINCE = re.compile(r"[0-9]{20}")
ENCODINGS = ("json", "msgpack")
KNOWN_KEYS = ("heartbeat", "encoding", "since", "refusals", "last", "marks", "hello")
#: ``refusals=close``: refusals reach the client as a close code it can read (4000 + the HTTP
#: status) after an accepted upgrade, since browsers hide the status of a refused handshake.
READABLE = "close"
#: The close code that carries a refusal of HTTP status ``status`` (docs/websocket.md).
REFUSAL_CODE_BASE = 4000


class Refusal(Exception):
    """Refuse the handshake with HTTP ``status``; ``reason`` is the response body."""

    def __init__(self, status: int, reason: str, kind: str = "request") -> None:
        self.status = status
        self.reason = reason
        self.kind = kind  # path, request, since, since_gone, last, origin, token, ...
        super().__init__(f"{status} {reason}")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    path: str
    chat_id: str
    heartbeat: bool
    encoding: str  # one of ENCODINGS
    subprotocol: str | None  # the subprotocol to answer with, when the client offered one
    since: str | None
    last: int | None  # last=N: open on the newest N events of the chat
    marks: bool  # marks=true: replayed frames say so, and a replay_end frame follows them
    hello: bool  # hello=true: the first frame tells the socket's heartbeat and limits
    query: dict[str, str]  # every query parameter (plugins may read their own, e.g. a token)


def parse_request(target: str, subprotocols: Sequence[str] = ()) -> ChatRequest:
    """What the request target and offered subprotocols ask for; raises :class:`Refusal`."""
    parts = urlsplit(target)
    m = CHAT_PATH.fullmatch(parts.path)
    if m is None:
        raise Refusal(404, f"no such path {parts.path[:80]!r}: connect to /v1/chats/{{chat_id}}",
                      "path")
    chat_id = unquote(m.group(1))
    if not CHAT_ID.fullmatch(chat_id):
        raise Refusal(400, "chat_id: must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in query and key in KNOWN_KEYS:
            raise Refusal(400, f"{key}: given more than once")
        query.setdefault(key, value)

    heartbeat = query.get("heartbeat", "false").lower()
    if heartbeat not in ("true", "false"):
        raise Refusal(400, f"heartbeat: must be true or false, not {heartbeat[:20]!r}")
    since = query.get("since")
    if since is not None and not SINCE.fullmatch(since):
        raise Refusal(400, "since: must be an eventId (20 decimal digits)", "since")
    last_text = query.get("last")
    last = None
    if last_text is not None:
        if not last_text.isascii() or not last_text.isdigit() or len(last_text) > 6:
            raise Refusal(400, "last: must be a number of events (0 or more)")
        if since is not None:
            raise Refusal(400, "last: give since or last, not both")
        last = int(last_text)
    marks = query.get("marks", "false").lower()
    if marks not in ("true", "false"):
        raise Refusal(400, f"marks: must be true or false, not {marks[:20]!r}")
    hello = query.get("hello", "false").lower()
    if hello not in ("true", "false"):
        raise Refusal(400, f"hello: must be true or false, not {hello[:20]!r}")
    refusals = query.get("refusals", "http")
    if refusals not in ("http", READABLE):
        raise Refusal(400, f"refusals: must be http or close, not {refusals[:20]!r}")

    offered = [p for p in subprotocols if p in ENCODINGS]
    encoding = query.get("encoding")
    if encoding is None:
        encoding = offered[0] if offered else "json"
    elif encoding not in ENCODINGS:
        raise Refusal(400, f"encoding: must be json or msgpack, not {encoding[:20]!r}")
    elif offered and encoding not in offered:
        raise Refusal(400, f"encoding: {encoding} conflicts with the subprotocol {offered[0]}")
    subprotocol = encoding if encoding in offered else None
    return ChatRequest(parts.path, chat_id, heartbeat == "true", encoding, subprotocol, since,
                       last, marks == "true", hello == "true", query)


def wants_readable_refusals(target: str) -> bool:
    """Whether the request asks for refusals as close codes (``refusals=close``), read
    leniently: it is asked before anything else is checked, so a bad path or query can be
    answered the way the client reads."""
    query = urlsplit(target).query
    return ("refusals", READABLE) in parse_qsl(query, keep_blank_values=True)
