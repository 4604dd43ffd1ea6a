"""bridged: a plugin-based message bridge daemon on trio.

The public API for plugin authors is what this module exports; everything else is internal.
"""

from __future__ import annotations

import pluggy

from .api import Command, PluginContext
from .config import Secret, not_negative, port_number, positive, setting
from .errors import (
    AuthError,
    BridgeError,
    ConfigError,
    ContractError,
    DecodeError,
    DeliveryError,
    HopLimitExceeded,
    ReplayGap,
    StorageUnavailable,
)
from .identity import Identity
from .message import CHAT_EVENT, CLIENT_MSG_ID, CLIENT_MSG_RETRY, NOTIFICATION, Message
from .transport import (
    Accepted,
    AsyncAPIContext,
    AsyncAPIFragment,
    Codec,
    Failed,
    Health,
    Outcome,
    Rejected,
    Settle,
    Transform,
    Transport,
    TransportContext,
    TransportType,
)
from .worker import WorkerThread

hookimpl = pluggy.HookimplMarker("bridge")

__all__ = [
    "CHAT_EVENT",
    "CLIENT_MSG_ID",
    "CLIENT_MSG_RETRY",
    "NOTIFICATION",
    "Accepted",
    "AsyncAPIContext",
    "AsyncAPIFragment",
    "AuthError",
    "BridgeError",
    "Codec",
    "Command",
    "ConfigError",
    "ContractError",
    "DecodeError",
    "DeliveryError",
    "Failed",
    "Health",
    "HopLimitExceeded",
    "Identity",
    "Message",
    "Outcome",
    "PluginContext",
    "Rejected",
    "ReplayGap",
    "Secret",
    "Settle",
    "StorageUnavailable",
    "Transform",
    "Transport",
    "TransportContext",
    "TransportType",
    "WorkerThread",
    "hookimpl",
    "not_negative",
    "port_number",
    "positive",
    "setting",
]
