"""The AMQP transport's settings: ``[transports.X] type = "amqp"`` (docs/amqp.md)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from bridge import Secret, not_negative, positive, setting

_TEMPLATE_FIELDS = frozenset({"chat_id", "kind", "source"})


def _amqp_url(v: str) -> str | None:
    scheme = urlsplit(v).scheme
    return None if scheme in ("amqp", "amqps") else "must be an amqp:// or amqps:// URL"


def _template(v: str) -> str | None:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
    except ValueError as e:
        return f"is not a valid template: {e}"
    unknown = names - _TEMPLATE_FIELDS
    if unknown:
        return (f"unknown placeholder {{{sorted(unknown)[0]}}};"
                f" use {', '.join('{' + f + '}' for f in sorted(_TEMPLATE_FIELDS))}")
    return None


@dataclass(frozen=True)
class AmqpSettings:
    url: Secret = setting(Secret("amqp://guest:guest@127.0.0.1:5672/"), check=_amqp_url,
                          doc="broker URL; url_file / url_env / url_credential keep the"
                              " password out of the config")
    consume_queue: str = setting("notifications",
                                 doc="durable queue consumed; empty: do not consume")
    consume_kind: str = setting("notification", doc="message kind of what is consumed")
    dead_letter_queue: str = setting("notifications.dead",
                                     doc="durable queue for what cannot be handled")
    exchange: str = setting("chat", doc="durable exchange that deliveries are published to")
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = setting("topic")
    routing_key: str = setting("chat.{chat_id}", check=_template,
                               doc="routing key template: {chat_id}, {kind}, {source}")
    bind_consume_queue_to_exchange: tuple[str, ...] = setting(
        (), doc="binding keys from the exchange to the consumed queue (a loopback)")
    prefetch: int = setting(256, check=positive, doc="unacknowledged deliveries at most")
    max_message_bytes: int = setting(
        1 << 20, check=positive,
        doc="largest consumed body; a larger one is dead-lettered unread (TooLarge)")
    publish_window: int = setting(256, check=positive, doc="unconfirmed publishes at most")
    heartbeat_s: int = setting(30, check=not_negative, doc="AMQP heartbeat; 0 disables")
    connect_timeout_s: float = setting(10.0, check=positive)
    close_timeout_s: float = setting(5.0, check=positive, doc="bound on closing")
    reconnect_initial_s: float = setting(0.5, check=positive, doc="first retry delay")
    reconnect_max_s: float = setting(30.0, check=positive, doc="longest retry delay")
    dedupe_window: int = setting(65536, check=positive,
                                 doc="message ids remembered to drop redeliveries")
    max_spool_messages: int = setting(1_000_000, check=positive,
                                      doc="outbox size at most; beyond it delivery fails")
    spool_sync: Literal["full", "normal"] = setting(
        "full", doc="full: every spool commit is fsynced (survives power loss)")
    tls_ca_file: Path | None = setting(None, doc="CA bundle for amqps (default: system)")
    tls_cert_file: Path | None = setting(None, doc="client certificate for amqps")
    tls_key_file: Path | None = setting(None, doc="client key for amqps")
    tls_verify: bool = setting(True, doc="verify the broker's certificate and name")

    def __post_init__(self) -> None:
        if self.consume_queue and not self.dead_letter_queue:
            # Reported by the config loader with file and line.
            raise ValueError("dead_letter_queue must be set when consume_queue is: a message"
                             " that cannot be handled is dead-lettered, never dropped")


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
