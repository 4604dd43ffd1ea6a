"""Hypothesis strategies for what clients put on the wire (shared by the property tests).

* :func:`json_values` - any value both codecs carry (the message shapes are JSON's);
* :func:`client_updates` - valid client ``update`` frames (SPEC section 2), sometimes with
  the server-assigned fields a client may send and the server ignores;
* :func:`client_frames` - valid updates and heartbeats;
* :func:`invalid_client_updates` - ``(frame, field)``: an update broken in one place, with
  the dotted path of the field a contract error should name (``message.0.type``);
* :func:`encoded` - any of these, encoded by a codec, as the transport receives it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from bridge import Codec

INTEGERS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # msgpack: int64 and uint64
SECONDS = st.integers(min_value=0, max_value=2**40)
ITEM_TYPES = ("message", "chat_event")
ITEM_KEYS = ("type", "text", "sender", "send_date")
SERVER_FIELDS = ("eventId", "timestamp", "timestampms", "socket_sequence")

#: Scalars both codecs round-trip: msgpack integers stop at 64 bits, JSON has no NaN.
scalars = st.one_of(st.none(), st.booleans(), INTEGERS,
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=5),
                                   st.dictionaries(st.text(max_size=10), children, max_size=5)),
        max_leaves=max_leaves)


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    """One ``message`` item as a client sends it: ``type`` and ``text``, maybe more."""
    item: dict[str, Any] = {"type": draw(st.sampled_from(ITEM_TYPES)),
                            "text": draw(st.text(max_size=200))}
    if draw(st.booleans()):
        item["sender"] = draw(st.text(max_size=40))
    if draw(st.booleans()):
        item["send_date"] = draw(SECONDS)
    return item


@st.composite
def client_updates(draw: st.DrawFn) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "update",
                             "message": draw(st.lists(items(), min_size=1, max_size=5))}
    for name in draw(st.lists(st.sampled_from(SERVER_FIELDS), unique=True)):
        frame[name] = draw(st.text(max_size=20)) if name == "eventId" else draw(SECONDS)
    return frame


def heartbeat_frames() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({"type": "heartbeat"}),
                     st.builds(lambda n: {"type": "heartbeat", "socket_sequence": n}, SECONDS))


def client_frames() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(client_updates(), heartbeat_frames())


not_a_string = st.one_of(st.none(), st.booleans(), INTEGERS, st.lists(INTEGERS, max_size=2))
not_an_integer = st.one_of(  # 2.0 is an integer to JSON Schema: only fractions here
    st.none(), st.booleans(), st.text(max_size=5), st.lists(INTEGERS, max_size=2),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()))


@st.composite
def invalid_client_updates(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid update broken in exactly one way, and the field that breaks the contract."""
    frame = draw(client_updates())
    index = draw(st.integers(0, len(frame["message"]) - 1))
    item = frame["message"][index]
    where = f"message.{index}"
    breakage = draw(st.sampled_from((
        "no message", "message not a list", "empty message", "item not an object",
        "no item type", "bad item type", "no text", "text not a string",
        "sender not a string", "send_date not an integer", "unknown item key",
    )))
    if breakage == "no message":
        del frame["message"]
        return frame, "message"
    if breakage == "message not a list":
        frame["message"] = draw(st.one_of(st.text(max_size=5), st.dictionaries(
            st.text(max_size=3), INTEGERS, max_size=2), INTEGERS))
        return frame, "message"
    if breakage == "empty message":
        frame["message"] = []
        return frame, "message"
    if breakage == "item not an object":
        frame["message"][index] = draw(st.one_of(not_a_string, st.text(max_size=5)))
        return frame, where
    if breakage == "no item type":
        del item["type"]
        return frame, f"{where}.type"
    if breakage == "bad item type":
        item["type"] = draw(st.one_of(st.text(max_size=10).filter(lambda t: t not in ITEM_TYPES),
                                      not_a_string))
        return frame, f"{where}.type"
    if breakage == "no text":
        del item["text"]
        return frame, f"{where}.text"
    if breakage == "text not a string":
        item["text"] = draw(not_a_string)
        return frame, f"{where}.text"
    if breakage == "sender not a string":
        item["sender"] = draw(not_a_string)
        return frame, f"{where}.sender"
    if breakage == "send_date not an integer":
        item["send_date"] = draw(not_an_integer)
        return frame, f"{where}.send_date"
    key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in ITEM_KEYS))
    item[key] = draw(scalars)
    return frame, f"{where}.{key}"


def encoded(codec: Codec, frames: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """``frames`` as ``codec`` puts them on the wire."""
    encode: Callable[[Any], bytes] = codec.encode
    return frames.map(encode)
