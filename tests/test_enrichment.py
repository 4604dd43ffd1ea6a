"""The enrichment plugin: event ids, the update shape, and notification -> chat (SPEC §4)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bridge import (
    CHAT_EVENT,
    NOTIFICATION,
    Accepted,
    ContractError,
    Identity,
    Message,
    Rejected,
)
from bridge.testing import run_bridge, write_config
from bridge_plugins.enrichment import (
    EventIds,
    bridge_enrich_message,
    identity_subject,
    is_event_id,
    notification_to_chat,
    rfc3339_seconds,
)


def test_event_ids_are_20_digits_and_strictly_increasing_within_one_millisecond() -> None:
    ids = EventIds(clock=lambda: 1_700_000_000.123)
    got = [ids.next() for _ in range(5)]
    assert [g[0] for g in got] == [f"{1_700_000_000_123_000 + i:020d}" for i in range(5)]
    assert all(ms == 1_700_000_000_123 for _, ms in got)


def test_event_ids_never_go_back_when_the_clock_does() -> None:
    now = [2_000.0]
    ids = EventIds(clock=lambda: now[0])
    first, _ = ids.next()
    now[0] = 1_000.0  # the wall clock jumped back
    second, _ = ids.next()
    assert second > first
    assert int(second) == int(first) + 1


def test_chat_event_gets_the_update_shape_and_server_fields_are_overwritten() -> None:
    before_ms = int(time.time() * 1000)
    inbound = Message(CHAT_EVENT, {
        "type": "update", "eventId": "99999999999999999999", "timestamp": 1,
        "timestampms": 2, "socket_sequence": 7,
        "message": [
            {"type": "message", "text": "hi", "sender": "alice", "send_date": 5, "extra": 1},
            {"type": "message", "text": "no sender, no date"},
        ],
    }, source="chat", chat_id="c1")
    out = bridge_enrich_message(inbound)
    assert out is not None
    body = dict(out.body)
    assert set(body) == {"type", "eventId", "timestamp", "timestampms", "message"}
    assert body["type"] == "update"
    assert is_event_id(body["eventId"])
    assert body["eventId"] != "99999999999999999999"
    assert out.id == body["eventId"]
    assert body["timestampms"] >= before_ms
    assert body["timestamp"] == body["timestampms"] // 1000
    assert body["message"] == [
        {"type": "message", "text": "hi", "sender": "alice", "send_date": 5},
        {"type": "message", "text": "no sender, no date", "sender": "anonymous",
         "send_date": body["timestamp"]},
    ]


@pytest.mark.parametrize("identity", ["bob", {"subject": "bob"}, {"sub": "bob"},
                                      Identity("bob", chats=("*",))])
def test_identity_wins_over_the_sender_a_client_claims(identity: object) -> None:
    inbound = Message(CHAT_EVENT, {"type": "update", "message": [
        {"type": "message", "text": "x", "sender": "the-ceo"}]}, "chat", chat_id="c",
        meta={"identity": identity})
    out = bridge_enrich_message(inbound)
    assert out is not None
    assert out.body["message"][0]["sender"] == "bob"


def test_identity_subject_of_an_object_and_of_nothing() -> None:
    class Who:
        subject = "carol"

    assert identity_subject(Who()) == "carol"
    assert identity_subject(None) is None
    assert identity_subject({"roles": ["x"]}) is None


@pytest.mark.parametrize(("body", "field"), [
    ({"type": "update"}, "message"),
    ({"type": "update", "message": []}, "message"),
    ({"type": "update", "message": ["text"]}, "message.0"),
])
def test_chat_event_without_usable_items_is_a_contract_error(body: dict[str, object],
                                                             field: str) -> None:
    with pytest.raises(ContractError) as e:
        bridge_enrich_message(Message(CHAT_EVENT, body, "chat", chat_id="c"))
    assert e.value.field == field


def test_ids_of_successive_chat_events_increase() -> None:
    msg = Message(CHAT_EVENT, {"message": [{"type": "message", "text": "a"}]}, "chat")
    ids = []
    for _ in range(50):
        out = bridge_enrich_message(msg)
        assert out is not None
        ids.append(out.id)
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


def test_other_kinds_are_left_alone() -> None:
    assert bridge_enrich_message(Message("custom", {"a": 1}, "x")) is None


@pytest.mark.parametrize(("text", "seconds"), [
    ("2024-05-01T10:00:00Z", 1714557600),
    ("2024-05-01t10:00:00z", 1714557600),
    ("2024-05-01T12:00:00+02:00", 1714557600),
    ("2024-05-01T10:00:00.999Z", 1714557600),
    ("2016-12-31T23:59:60Z", 1483228800),
])
def test_rfc3339_to_epoch_seconds(text: str, seconds: int) -> None:
    assert rfc3339_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["2024-05-01T10:00:00", "yesterday", 1714557600, ""])
def test_rfc3339_refuses_what_is_not_a_zoned_date_time(bad: object) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|Invalid isoformat"):
        rfc3339_seconds(bad)


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59",
                                    "9999-12-31T23:59:60Z"])
def test_rfc3339_out_of_range_is_a_value_error_naming_the_range(moment: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        rfc3339_seconds(moment)


def _notification(amqp_id: str = "", **body: object) -> Message:
    base: dict[str, object] = {"userId": "user-42", "message": "Your order shipped",
                               "timestamp": "2024-05-01T10:00:00Z"}
    base.update(body)
    enriched = bridge_enrich_message(Message(NOTIFICATION, base, "amqp", id=amqp_id))
    assert enriched is not None
    return enriched


def test_notification_to_chat_is_the_spec_mapping() -> None:
    note = _notification()
    assert is_event_id(note.id)
    chat = notification_to_chat(note)
    assert chat.kind == CHAT_EVENT
    assert chat.chat_id == "user-42"
    assert chat.id == note.id
    assert chat.body == {
        "type": "update",
        "eventId": note.id,
        "timestamp": note.meta["timestamp_ms"] // 1000,
        "timestampms": note.meta["timestamp_ms"],
        "message": [{"type": "chat_event", "text": "Your order shipped",
                     "sender": "notifications", "send_date": 1714557600}],
    }
    assert "source_message_id" not in chat.meta


def test_notification_with_an_amqp_message_id_gets_a_fresh_event_id() -> None:
    note = _notification(amqp_id="amqp-msg-1")
    assert note.id == "amqp-msg-1"  # enrichment keeps the source's id on the notification
    chat = notification_to_chat(note)
    assert is_event_id(chat.id)
    assert chat.body["eventId"] == chat.id
    assert chat.meta["source_message_id"] == "amqp-msg-1"


def test_notification_to_chat_without_enrichment_still_assigns_an_event_id() -> None:
    chat = notification_to_chat(Message(NOTIFICATION, {
        "userId": "u", "message": "m", "timestamp": "2024-05-01T10:00:00Z"}, "amqp"))
    assert is_event_id(chat.id)
    assert chat.body["timestamp"] == chat.body["timestampms"] // 1000


@pytest.mark.parametrize(("change", "field"), [
    ({"userId": ""}, "userId"),
    ({"message": 5}, "message"),
    ({"timestamp": "not a date"}, "timestamp"),
    ({"timestamp": "0001-01-01T00:00:00+23:59"}, "timestamp"),
])
def test_notification_that_cannot_be_mapped_is_a_contract_error(change: dict[str, Any],
                                                                field: str) -> None:
    with pytest.raises(ContractError) as e:
        notification_to_chat(_notification(**change))
    assert e.value.field == field


CONFIG = """
[transports.notes]
type = "memory"
[transports.out]
type = "memory"

[[routes]]
name = "notifications-to-chat"
from = "notes"
to = ["out"]
kinds = ["notification"]
transforms = ["notification_to_chat"]
"""


async def test_the_transform_runs_in_a_daemon_route(tmp_path: Path) -> None:
    async with run_bridge(write_config(tmp_path, CONFIG)) as daemon:
        notes, out = daemon.transports["notes"], daemon.transports["out"]
        outcome = await notes.inject(  # type: ignore[attr-defined]
            {"userId": "u-1", "message": "hello", "timestamp": "2024-05-01T10:00:00+00:00"},
            kind=NOTIFICATION)
        assert isinstance(outcome, Accepted)
        delivered: Message = await out.received.receive()  # type: ignore[attr-defined]
        assert delivered.kind == CHAT_EVENT
        assert delivered.chat_id == "u-1"
        assert delivered.body["message"] == [{"type": "chat_event", "text": "hello",
                                              "sender": "notifications",
                                              "send_date": 1714557600}]
        bad = await notes.inject(  # type: ignore[attr-defined]
            {"userId": "u-1", "message": "hello", "timestamp": "soon"}, kind=NOTIFICATION)
        assert isinstance(bad, Rejected)
        assert isinstance(bad.error, ContractError)
        assert bad.error.field == "timestamp"
