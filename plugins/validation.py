"""Built-in plugin ``validation``: every message checked against its wire contract.

The JSON Schemas come from the project's copies of the two AsyncAPI documents
(``bridge/contracts/``, see docs/contracts.md):

========================  =========  ==========================================================
kind                      stage      schema
========================  =========  ==========================================================
``chat.event``            inbound    ``client_chat`` (a client frame; server-assigned fields
                                     may be present and are ignored); a heartbeat is refused:
                                     it is not a chat event
``chat.event``            outbound   ``event`` (the update without ``socket_sequence``)
``notification``          both       the notification payload (userId, message, timestamp)
anything else             both       not checked (a plugin's own kind)
========================  =========  ==========================================================

Accepting is the hot path: it runs a compiled validator (fastjsonschema, about 5 µs per
message against about 115 µs for jsonschema; ``bench/validation.py``). Only a rejected
message is validated again with jsonschema, to name the field and the rule: for a ``oneOf``
the branch reported is the one whose ``type`` matches the message's ``type``.

``[plugins.validation]``: ``kinds`` (which kinds to check) and ``outbound`` (whether to check
what routes produce as well as what arrives).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import fastjsonschema

from bridge import (
    CHAT_EVENT,
    NOTIFICATION,
    ContractError,
    Message,
    PluginContext,
    hookimpl,
    setting,
)
from bridge.contracts import CHAT, NOTIFICATIONS, load

if TYPE_CHECKING:
    import jsonschema
    from jsonschema.exceptions import ValidationError

# jsonschema only explains a rejection, so it is imported on the first one: it takes about
# 0.1 s to import, which would otherwise be paid at every start-up.

# RFC 3339 section 5.6 `date-time`, checked strictly: full date, "T", time with seconds,
# optional fraction, "Z" or a numeric offset with a colon. fromisoformat then rejects
# impossible dates and times (2024-02-30, 24:00:00). A leap second (:60) is allowed, as RFC
# 3339 allows it; it is checked as :59 because Python cannot represent it.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)


def is_rfc3339(value: object) -> bool:
    """True when ``value`` is a string holding an RFC 3339 date-time (non-strings pass:
    JSON Schema formats only constrain strings)."""
    if not isinstance(value, str):
        return True
    match = _RFC3339.fullmatch(value)
    if not match:
        return False
    if match.group(1) == "60":
        value = value[:match.start(1)] + "59" + value[match.end(1):]
    try:
        datetime.fromisoformat(value.upper())
    except ValueError:
        return False
    return True


@functools.cache
def _format_checker() -> jsonschema.FormatChecker:
    import jsonschema

    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time")(is_rfc3339)
    return checker


class _Schema:
    """One contract schema: a compiled check for the hot path, jsonschema for the reason."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._fast: Callable[[Any], Any] = fastjsonschema.compile(
            copy.deepcopy(dict(schema)), formats={"date-time": is_rfc3339})
        self._schema = schema
        self._explainer: jsonschema.Draft7Validator | None = None  # made on the first rejection

    def check(self, body: Any) -> None:
        """Return if ``body`` is valid, else raise :class:`ContractError`."""
        try:
            self._fast(body)
        except fastjsonschema.JsonSchemaValueException as fast_error:
            raise self._explain(body, fast_error) from None

    def _explain(self, body: Any, fast_error: fastjsonschema.JsonSchemaValueException
                 ) -> ContractError:
        import jsonschema
        from jsonschema.exceptions import relevance

        if self._explainer is None:
            self._explainer = jsonschema.Draft7Validator(self._schema,
                                                         format_checker=_format_checker())
        errors = list(self._explainer.iter_errors(body))
        if not errors:  # the two validators disagree: still reject, with what we know
            name = re.sub(r"\[(\d+)\]", r".\1", fast_error.name or "")  # data.message[0]
            field = name.removeprefix("data").lstrip(".")
            return _contract_error(field, fast_error.rule or "schema", fast_error.message[:80])
        return _describe(max(errors, key=relevance))


def _contract_error(field: str, rule: str, what: str) -> ContractError:
    return ContractError(f"{field or 'body'}: {what} (rule: {rule})", field=field, rule=rule)


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def _describe(error: ValidationError) -> ContractError:
    """A :class:`ContractError` naming the field and rule of ``error``. A ``oneOf`` failure is
    explained by the branch whose ``type`` constant matches the instance's ``type``."""
    from jsonschema.exceptions import relevance

    if error.validator in ("oneOf", "anyOf") and error.context:
        branches: dict[int, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(int(sub.relative_schema_path[0]), []).append(sub)
        wrong_type = {i for i, subs in branches.items()
                      if any(_is_type_mismatch(s) for s in subs)}
        matching = [i for i in branches if i not in wrong_type]
        if len(matching) == 1:
            return _describe(max(branches[matching[0]], key=relevance))
        if isinstance(error.instance, Mapping) and (
                not matching or "type" not in error.instance):
            allowed = ", ".join(sorted({repr(t) for t in map(_type_const, error.context) if t}))
            field = _dotted([*error.absolute_path, "type"])
            if "type" not in error.instance:
                return _contract_error(field, "required", f"is required (one of {allowed})")
            return _contract_error(field, error.validator, f"must be one of {allowed}")
    path = list(error.absolute_path)
    rule = str(error.validator)
    value: Any = error.validator_value
    instance = error.instance
    if rule == "required" and isinstance(instance, Mapping):
        missing = next((p for p in value if p not in instance), "?")
        return _contract_error(_dotted([*path, missing]), rule, "is required")
    if rule == "additionalProperties" and isinstance(instance, Mapping):
        known = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
        extra = next((k for k in instance if k not in known), "?")
        return _contract_error(_dotted([*path, extra]), rule, "is not allowed here")
    what = {
        "type": lambda: f"must be of type {value}",
        "enum": lambda: "must be one of " + ", ".join(repr(v) for v in value),
        "const": lambda: f"must be {value!r}",
        "pattern": lambda: f"must match {value}",
        "format": lambda: f"must be an RFC 3339 {value}" if value == "date-time"
        else f"must be a valid {value}",
        "minItems": lambda: f"needs at least {value} item(s)",
        "minimum": lambda: f"must be >= {value}",
    }.get(rule, lambda: error.message[:80])()
    return _contract_error(_dotted(path), rule, what)


def _is_type_mismatch(error: ValidationError) -> bool:
    return error.validator in ("const", "enum") and list(error.relative_path) == ["type"]


def _type_const(error: ValidationError) -> str | None:
    """The ``type`` constant of the ``oneOf`` branch that ``error`` came from, if it shows."""
    if _is_type_mismatch(error) and error.validator == "const":
        return str(error.validator_value)
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    const = schema.get("properties", {}).get("type", {}).get("const")
    return str(const) if const is not None else None


@functools.cache
def chat_schema(name: str) -> _Schema:
    """The chat contract's ``components.schemas.<name>`` as a checker."""
    components = load(CHAT)["components"]
    root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas":
                                                                    components["schemas"]}}
    return _Schema(root)


@functools.cache
def notification_schema() -> _Schema:
    """The notifications contract's payload as a checker."""
    payload = load(NOTIFICATIONS)["channels"]["notifications"]["subscribe"]["message"]["payload"]
    return _Schema(payload)


def check(message: Message, stage: str) -> None:
    """Validate ``message`` at ``stage`` ("inbound" or "outbound") against its contract;
    raise :class:`ContractError` naming the field and the rule it breaks."""
    if message.kind == CHAT_EVENT:
        if stage == "inbound":
            chat_schema("client_chat").check(message.body)
            if message.body.get("type") != "update":
                raise _contract_error("type", "const", "must be 'update' for a chat event "
                                      "(a heartbeat carries no event)")
        else:
            chat_schema("event").check(message.body)
    elif message.kind == NOTIFICATION:
        notification_schema().check(message.body)


def _known_kinds(kinds: tuple[str, ...]) -> str | None:
    unknown = [k for k in kinds if k not in (CHAT_EVENT, NOTIFICATION)]
    return f"unknown kind(s) {unknown}; known: {CHAT_EVENT!r}, {NOTIFICATION!r}" if unknown \
        else None


@dataclass(frozen=True)
class ValidationSettings:
    kinds: tuple[str, ...] = setting((CHAT_EVENT, NOTIFICATION), check=_known_kinds,
                                     doc="message kinds checked against their contract")
    outbound: bool = setting(True, doc="also check what routes produce, before delivery")


class Plugin:
    """Holds the settings of one daemon."""

    def __init__(self) -> None:
        self.settings = ValidationSettings()

    @hookimpl
    def bridge_settings_class(self) -> type[ValidationSettings]:
        return ValidationSettings

    @hookimpl
    def bridge_startup(self, context: PluginContext) -> None:
        if context.settings is not None:
            self.settings = context.settings
        # compile now, not on the first message
        chat_schema("client_chat")
        chat_schema("event")
        notification_schema()

    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if message.kind not in self.settings.kinds:
            return
        if stage == "outbound" and not self.settings.outbound:
            return
        check(message, stage)
