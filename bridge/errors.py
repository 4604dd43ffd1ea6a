"""The errors a plugin author raises or catches.

Each error says who is at fault: a :class:`DecodeError` or :class:`ContractError` is the
sender's, and a transport turns it into a clear answer (a close code, a dead letter); any
other exception out of a plugin is the plugin's, and the pipeline logs it with the route and
message id and carries on with the next message.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error bridged raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is not usable. ``errors`` holds every problem found, each one
    already formatted as ``file:line: key: what is wrong``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class DecodeError(BridgeError):
    """A payload is not valid for its encoding (not JSON, not msgpack, not UTF-8...)."""


class ContractError(BridgeError):
    """A decoded message breaks its contract. ``field`` names the offending field as a
    dotted path (``message.0.type``), ``rule`` the rule it broke (``required``, ``enum``)."""

    def __init__(self, reason: str, *, field: str = "", rule: str = "") -> None:
        self.reason = reason
        self.field = field
        self.rule = rule
        super().__init__(reason)


class HopLimitExceeded(BridgeError):
    """A message has crossed more bridges than ``daemon.hop_limit`` allows: a loop."""


class DeliveryError(BridgeError):
    """A destination could not take a message."""


class StorageUnavailable(BridgeError):
    """Storage cannot take writes for now (a full disk, a database that is down). Raised by a
    persist hook or a durable destination (an outbox): the message is not failed for good
    but held with its source (AMQP keeps the delivery and submits it again after a pause;
    the chat closes the socket with 1013, try again later), and ``/readyz`` is not ready
    until a write succeeds again."""


class ReplayGap(BridgeError):
    """A replay was asked from a point older than the history still kept."""


class AuthError(BridgeError):
    """A handshake is refused. ``status`` is 401 (no or bad credentials) or 403 (not
    allowed on this chat)."""

    def __init__(self, reason: str, *, status: int = 401) -> None:
        self.status = status
        super().__init__(reason)
