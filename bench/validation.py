"""Validation cost per message: jsonschema vs fastjsonschema (compiled), and the plugin.

    .venv/bin/python bench/validation.py [-n 20000]

Prints microseconds per message for three payloads (a client update, an outbound chat event,
a notification) through: jsonschema ``Draft7Validator.is_valid`` (with the date-time format
checker), fastjsonschema's compiled function, and the validation plugin's ``check`` (the
compiled function on the accept path); and the cost of a rejection with its explained error
(jsonschema walks the message again to name the field and the rule).
"""

from __future__ import annotations

import argparse
import copy
import platform
import timeit
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import fastjsonschema
import jsonschema

from bridge import CHAT_EVENT, NOTIFICATION, ContractError, Message
from bridge.contracts import CHAT, NOTIFICATIONS, load
from bridge_plugins.validation import check, is_rfc3339

ITEM = {"type": "message", "text": "Hello, I need help with my booking", "sender": "client"}
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("client update (inbound)", CHAT_EVENT, "inbound", {"type": "update", "message": [ITEM]}),
    ("chat event (outbound)", CHAT_EVENT, "outbound", {
        "type": "update", "eventId": "00001700000000000000", "timestamp": 1700000000,
        "timestampms": 1700000000000, "message": [{**ITEM, "send_date": 1700000000}]}),
    ("notification", NOTIFICATION, "inbound", {
        "userId": "chat-1", "message": "Your appointment is tomorrow at 10:00",
        "timestamp": "2024-05-01T08:00:00Z"}),
]


def schema_for(kind: str, stage: str) -> dict[str, Any]:
    if kind == NOTIFICATION:
        return copy.deepcopy(
            load(NOTIFICATIONS)["channels"]["notifications"]["subscribe"]["message"]["payload"])
    name = "client_chat" if stage == "inbound" else "event"
    return {"$ref": f"#/components/schemas/{name}",
            "components": {"schemas": copy.deepcopy(load(CHAT)["components"]["schemas"])}}


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6


def reject(message: Message, stage: str) -> None:
    try:
        check(message, stage)
    except ContractError:
        return
    raise AssertionError("accepted a bad message")


def measure(label: str, kind: str, stage: str, body: dict[str, Any], n: int,
            checker: jsonschema.FormatChecker) -> str:
    schema = schema_for(kind, stage)
    slow = jsonschema.Draft7Validator(schema, format_checker=checker)
    fast = fastjsonschema.compile(schema, formats={"date-time": is_rfc3339})
    message = Message(kind, body, "bench", chat_id="chat-1")
    assert slow.is_valid(body)
    bad = message.evolve(body={**body, "unexpected": 1} if kind == CHAT_EVENT
                         else {**body, "timestamp": "soon"})
    return (f"{label:26} {per_call_us(lambda: slow.is_valid(body), n):9.1f}us"
            f" {per_call_us(lambda: fast(body), n):13.2f}us"
            f" {per_call_us(lambda: check(message, stage), n):11.2f}us"
            f" {per_call_us(lambda: reject(bad, stage), max(n // 10, 1)):13.1f}us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    n = ap.parse_args().n
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time")(is_rfc3339)
    print(f"python {platform.python_version()}, jsonschema {version('jsonschema')}, "
          f"fastjsonschema {version('fastjsonschema')}, n={n}")
    print(f"{'payload':26} {'jsonschema':>11} {'fastjsonschema':>15} {'plugin check':>13}"
          f" {'reject+explain':>15}")
    for label, kind, stage, body in CASES:
        print(measure(label, kind, stage, body, n, checker))


if __name__ == "__main__":
    main()
