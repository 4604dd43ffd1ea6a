"""Contract validation: both directions, errors that name the field and the rule."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from bridge import CHAT_EVENT, NOTIFICATION, Accepted, ContractError, Message, Rejected
from bridge.testing import MEMORY_AB, run_bridge, write_config
from bridge_plugins.validation import (
    Plugin,
    ValidationSettings,
    chat_schema,
    check,
    is_rfc3339,
)

ITEM: dict[str, Any] = {"type": "message", "text": "Hello"}
EVENT: dict[str, Any] = {
    "type": "update", "eventId": "00001700000000000000", "timestamp": 1700000000,
    "timestampms": 1700000000000, "message": [{**ITEM, "sender": "a", "send_date": 1}]}
NOTE: dict[str, Any] = {"userId": "chat-1", "message": "Your appointment is at 10:00",
        "timestamp": "2024-05-01T08:00:00Z"}


def reject(body: Any, kind: str = CHAT_EVENT, stage: str = "inbound") -> ContractError:
    with pytest.raises(ContractError) as info:
        check(Message(kind, body, "test", chat_id="chat-1"), stage)
    return info.value


@pytest.mark.parametrize("body", [
    {"type": "update", "message": [ITEM]},
    {"type": "update", "message": [ITEM, {**ITEM, "type": "chat_event", "sender": "me",
                                          "send_date": 5}]},
    # server-assigned fields are ignored: allowed, whatever they hold, and not required
    {"type": "update", "message": [ITEM], "eventId": 7, "timestamp": "x", "timestampms": None,
     "socket_sequence": -1},
])
def test_client_update_accepted(body: dict[str, Any]) -> None:
    check(Message(CHAT_EVENT, body, "ws", chat_id="c"), "inbound")


@pytest.mark.parametrize(("body", "field", "rule"), [
    ({"type": "update", "message": [{"type": "note", "text": "x"}]}, "message.0.type", "enum"),
    ({"type": "update", "message": [ITEM, {"type": "message"}]}, "message.1.text", "required"),
    ({"type": "update", "message": [{**ITEM, "color": "red"}]}, "message.0.color",
     "additionalProperties"),
    ({"type": "update", "message": [{**ITEM, "send_date": "today"}]}, "message.0.send_date",
     "type"),
    ({"type": "update", "message": []}, "message", "minItems"),
    ({"type": "update"}, "message", "required"),
    ({"type": "update", "message": [ITEM], "extra": 1}, "extra", "additionalProperties"),
    ({"message": [ITEM]}, "type", "required"),
    ({"type": "updates", "message": [ITEM]}, "type", "oneOf"),
])
def test_client_update_rejected_names_field_and_rule(body: dict[str, Any], field: str,
                                                     rule: str) -> None:
    error = reject(body)
    assert (error.field, error.rule) == (field, rule)
    assert error.reason.startswith(f"{field}: ")
    assert f"(rule: {rule})" in error.reason


def test_one_of_reports_the_branch_matching_the_type() -> None:
    # An update with a bad item breaks both branches of the client frame's oneOf; the
    # heartbeat branch would blame `type` or `message`, the update branch blames the item.
    error = reject({"type": "update", "message": [{"type": "message", "text": 5}]})
    assert (error.field, error.rule) == ("message.0.text", "type")
    assert error.reason == "message.0.text: must be of type string (rule: type)"
    # and the heartbeat branch when the frame says heartbeat
    error = reject({"type": "heartbeat", "message": [ITEM]})
    assert (error.field, error.rule) == ("message", "additionalProperties")


def test_unknown_type_lists_the_branches() -> None:
    error = reject({"type": "hello"})
    assert error.reason == "type: must be one of 'heartbeat', 'update' (rule: oneOf)"


def test_heartbeat_is_a_valid_frame_but_not_a_chat_event() -> None:
    error = reject({"type": "heartbeat"})
    assert (error.field, error.rule) == ("type", "const")


def test_non_object_body() -> None:
    error = reject(["update"])
    assert (error.field, error.rule) == ("", "type")
    assert error.reason.startswith("body: ")


def test_outbound_event_shape() -> None:
    check(Message(CHAT_EVENT, EVENT, "x", id=EVENT["eventId"], chat_id="c"), "outbound")
    error = reject({**EVENT, "socket_sequence": 3}, stage="outbound")
    assert (error.field, error.rule) == ("socket_sequence", "additionalProperties")
    error = reject({k: v for k, v in EVENT.items() if k != "eventId"}, stage="outbound")
    assert (error.field, error.rule) == ("eventId", "required")
    error = reject({**EVENT, "eventId": "17"}, stage="outbound")
    assert (error.field, error.rule) == ("eventId", "pattern")
    error = reject({**EVENT, "timestamp": 1.5}, stage="outbound")
    assert (error.field, error.rule) == ("timestamp", "type")
    error = reject({**EVENT, "timestampms": "1700000000000"}, stage="outbound")
    assert (error.field, error.rule) == ("timestampms", "type")
    error = reject({**EVENT, "message": [{"type": "message"}]}, stage="outbound")
    assert (error.field, error.rule) == ("message.0.text", "required")


def test_notification() -> None:
    for stage in ("inbound", "outbound"):
        check(Message(NOTIFICATION, NOTE, "amqp"), stage)
    for missing in ("userId", "message", "timestamp"):
        error = reject({k: v for k, v in NOTE.items() if k != missing}, NOTIFICATION)
        assert (error.field, error.rule) == (missing, "required")
    error = reject({**NOTE, "userId": 42}, NOTIFICATION)
    assert (error.field, error.rule) == ("userId", "type")
    error = reject({**NOTE, "timestamp": "yesterday"}, NOTIFICATION)
    assert (error.field, error.rule) == ("timestamp", "format")
    assert error.reason == "timestamp: must be an RFC 3339 date-time (rule: format)"


@pytest.mark.parametrize(("value", "ok"), [
    ("2024-05-01T08:00:00Z", True),
    ("2024-05-01t08:00:00.123456z", True),
    ("2024-05-01T08:00:00+02:00", True),
    ("2024-05-01T08:00:00.5-11:30", True),
    ("2016-12-31T23:59:60Z", True),  # a leap second
    ("2016-12-31T23:59:61Z", False),
    ("2024-05-01", False),  # a date alone
    ("2024-05-01T08:00:00", False),  # no offset
    ("2024-05-01 08:00:00Z", False),  # RFC 3339's ABNF wants the T
    ("2024-05-01T08:00Z", False),  # no seconds
    ("2024-05-01T08:00:00+0200", False),  # offset without colon
    ("2024-02-30T08:00:00Z", False),  # no such day
    ("2024-05-01T24:00:00Z", False),
    ("20240501T080000Z", False),  # ISO 8601 basic format is not RFC 3339
    ("\uff12\uff10\uff12\uff14-05-01T08:00:00Z", False),  # non-ASCII (fullwidth) digits
])
def test_rfc3339(value: str, ok: bool) -> None:
    assert is_rfc3339(value) is ok


def test_other_kinds_and_settings() -> None:
    plugin = Plugin()
    plugin.bridge_validate_message(Message("custom.kind", {"anything": 1}, "x"), "inbound")
    bad = Message(CHAT_EVENT, {"type": "update", "message": []}, "x", chat_id="c")
    with pytest.raises(ContractError):
        plugin.bridge_validate_message(bad, "inbound")
    plugin.settings = ValidationSettings(kinds=(NOTIFICATION,))
    plugin.bridge_validate_message(bad, "inbound")
    plugin.settings = ValidationSettings(outbound=False)
    plugin.bridge_validate_message(bad, "outbound")
    with pytest.raises(ContractError):
        plugin.bridge_validate_message(bad, "inbound")


# history is off: without the enrichment plugin's eventId it would refuse to store the events
CONFIG = """
[plugins]
disable = ["history"]
""" + MEMORY_AB


async def test_daemon_rejects_with_the_field(tmp_path: Any) -> None:
    async with run_bridge(write_config(tmp_path, CONFIG)) as daemon:
        client = daemon.transports["a"]
        outcome = await client.inject(  # type: ignore[attr-defined]
            {"type": "update", "message": [{"type": "message", "txt": "hi"}]},
            kind=CHAT_EVENT, chat_id="c1")
        assert isinstance(outcome, Rejected)
        assert isinstance(outcome.error, ContractError)
        assert outcome.error.field == "message.0.txt"
        assert outcome.error.rule == "additionalProperties"
        outcome = await client.inject(  # type: ignore[attr-defined]
            {"type": "update", "message": [ITEM]}, kind=CHAT_EVENT, chat_id="c1")
        assert isinstance(outcome, Accepted), outcome
        delivered = daemon.transports["b"].received.receive_nowait()  # type: ignore[attr-defined]
        assert delivered.body["message"][0]["text"] == ITEM["text"]


async def test_daemon_settings_select_kinds(tmp_path: Any) -> None:
    config = CONFIG.replace("[transports.a]",
                            '[plugins.validation]\nkinds = ["notification"]\n[transports.a]')
    async with run_bridge(write_config(tmp_path, config)) as daemon:
        outcome = await daemon.transports["a"].inject(  # type: ignore[attr-defined]
            {"type": "update", "message": [ITEM], "extra": 1}, kind=CHAT_EVENT, chat_id="c1")
        assert isinstance(outcome, Accepted), outcome


def test_rejects_even_when_the_explainer_finds_nothing() -> None:
    # fastjsonschema decides; jsonschema only explains. Should they ever disagree, the
    # message is still rejected, with the compiled validator's field and rule.
    schema = chat_schema("event")
    explainer = schema._explainer
    schema._explainer = jsonschema.Draft7Validator({})  # finds nothing wrong
    try:
        with pytest.raises(ContractError) as info:
            schema.check({**EVENT, "message": [{"type": "note", "text": "x"}]})
    finally:
        schema._explainer = explainer
    assert (info.value.field, info.value.rule) == ("message.0.type", "enum")
