"""Property tests: client updates through decoding and contract validation, as the
WebSocket transport and the validation plugin see them (JSON and msgpack)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import client_updates, invalid_client_updates, json_values

from bridge import CHAT_EVENT, Codec, ContractError, DecodeError, Message
from bridge_plugins.codecs import JSON, MSGPACK
from bridge_plugins.validation import check
from bridge_plugins.websocket.server import SERVER_FIELDS

CODECS = pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])


def inbound(frame: Any) -> Message:
    """What the transport submits: server-assigned fields dropped."""
    body = {k: v for k, v in frame.items() if k not in SERVER_FIELDS} if isinstance(
        frame, dict) else frame
    return Message(CHAT_EVENT, body, "chat", chat_id="c1")


def verdict(value: Any) -> str:
    """What validation says; any exception other than ContractError escapes (a failure)."""
    try:
        check(inbound(value), "inbound")
    except ContractError as e:
        return "refused, saying why" if (e.field or e.rule) and str(e) else "refused, silent"
    return "accepted"


@CODECS
@given(frame=client_updates())
def test_every_valid_update_is_accepted_after_the_wire(codec: Codec, frame: dict[str, Any]
                                                      ) -> None:
    check(inbound(codec.decode(codec.encode(frame))), "inbound")


@CODECS
@given(case=invalid_client_updates())
def test_a_broken_update_names_the_field(codec: Codec, case: tuple[dict[str, Any], str]) -> None:
    frame, field = case
    with pytest.raises(ContractError) as info:
        check(inbound(codec.decode(codec.encode(frame))), "inbound")
    assert info.value.field == field


@CODECS
@given(body=json_values())
def test_any_decoded_value_gives_accept_or_contract_error(codec: Codec, body: Any) -> None:
    assert verdict(codec.decode(codec.encode(body))) in ("accepted", "refused, saying why")


@CODECS
@given(data=st.binary(max_size=200))
def test_any_bytes_give_decode_error_or_a_verdict(codec: Codec, data: bytes) -> None:
    try:
        value = codec.decode(data)
    except DecodeError:
        return
    assert verdict(value) in ("accepted", "refused, saying why")
