"""Encode-once framing (the sequence spliced into pre-encoded bytes) and handshake parsing."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_plugins.codecs import JSON, MSGPACK
from bridge_plugins.websocket.framing import JsonFramer, MsgpackFramer
from bridge_plugins.websocket.handshake import Refusal, parse_request

UPDATE = {"type": "update", "eventId": "00001700000000000000", "timestamp": 1700000000,
          "timestampms": 1700000000000, "message": [
              {"type": "message", "text": "héllo \"quoted\" {braces}", "sender": "a",
               "send_date": 1}]}

# Text as it can arrive: decoders refuse lone surrogates (see test_websocket_closes.py).
text = st.text(st.characters(exclude_categories=["Cs"]))
values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | text,
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(text, inner, max_size=3), max_leaves=8)
bodies = st.dictionaries(text, values, max_size=20)


def _json(frame: str | bytes) -> Any:
    assert isinstance(frame, str)
    return json.loads(frame)


def _msgpack(frame: str | bytes) -> Any:
    assert isinstance(frame, bytes)
    return msgpack.unpackb(frame, strict_map_key=False)


@pytest.mark.parametrize(("framer", "decode"), [(JsonFramer(JSON), _json),
                                                (MsgpackFramer(MSGPACK), _msgpack)])
def test_the_spliced_frame_is_the_body_with_its_sequence(framer: Any, decode: Any) -> None:
    prepared = framer.prepare(UPDATE)
    for n in (0, 1, 127, 128, 65536, 2**40):
        assert decode(framer.frame(prepared, n)) == {**UPDATE, "socket_sequence": n}
    assert decode(framer.heartbeat(7)) == {"type": "heartbeat", "socket_sequence": 7}
    # A sequence in the body is the server's to set: the spliced one replaces it.
    assert decode(framer.frame(framer.prepare({**UPDATE, "socket_sequence": 99}), 3)) == {
        **UPDATE, "socket_sequence": 3}
    assert decode(framer.frame(framer.prepare({}), 5)) == {"socket_sequence": 5}


@given(bodies, st.integers(0, 2**53))
def test_json_splice_matches_a_full_encode(body: dict[str, Any], n: int) -> None:
    framer = JsonFramer(JSON)
    expected = {**{k: v for k, v in body.items() if k != "socket_sequence"},
                "socket_sequence": n}
    assert json.loads(framer.frame(framer.prepare(body), n)) == expected


@given(bodies, st.integers(0, 2**53))
def test_msgpack_splice_matches_a_full_encode(body: dict[str, Any], n: int) -> None:
    framer = MsgpackFramer(MSGPACK)
    expected = {**{k: v for k, v in body.items() if k != "socket_sequence"},
                "socket_sequence": n}
    assert msgpack.unpackb(framer.frame(framer.prepare(body), n),
                           strict_map_key=False) == expected


@pytest.mark.parametrize("size", [14, 15, 16, 65534, 65535, 65536])
def test_msgpack_map_headers_grow_across_their_limits(size: int) -> None:
    framer = MsgpackFramer(MSGPACK)
    body = {f"k{i}": i for i in range(size)}
    assert msgpack.unpackb(framer.frame(framer.prepare(body), 9)) == {
        **body, "socket_sequence": 9}


def test_handshake_defaults() -> None:
    r = parse_request("/v1/chats/room")
    assert (r.chat_id, r.heartbeat, r.encoding, r.subprotocol, r.since) == (
        "room", False, "json", None, None)


def test_handshake_reads_every_parameter_and_keeps_unknown_ones_for_plugins() -> None:
    r = parse_request("/v1/chats/a%3Ab?heartbeat=TRUE&encoding=msgpack&since=00000000000000000042"
                      "&token=xyz")
    assert (r.chat_id, r.heartbeat, r.encoding, r.since) == (
        "a:b", True, "msgpack", "00000000000000000042")
    assert r.query["token"] == "xyz"


@pytest.mark.parametrize(("offered", "query", "encoding", "answer"), [
    (["msgpack"], "", "msgpack", "msgpack"),
    (["json"], "", "json", "json"),
    (["chat.v2", "msgpack", "json"], "", "msgpack", "msgpack"),
    (["chat.v2"], "", "json", None),
    (["bearer.eyJhbGciOi.x.y", "msgpack"], "", "msgpack", "msgpack"),  # never the token
    (["json", "msgpack"], "encoding=msgpack", "msgpack", "msgpack"),
    ([], "encoding=msgpack", "msgpack", None),
])
def test_subprotocol_and_encoding(offered: list[str], query: str, encoding: str,
                                  answer: str | None) -> None:
    r = parse_request(f"/v1/chats/room?{query}", offered)
    assert (r.encoding, r.subprotocol) == (encoding, answer)


def test_a_refusal_carries_status_and_reason() -> None:
    with pytest.raises(Refusal) as e:
        parse_request("/v1/chats/room?encoding=msgpack", ["json"])
    assert (e.value.status, e.value.reason) == (
        400, "encoding: msgpack conflicts with the subprotocol json")
