"""Built-in plugin `websocket`: the support-chat transport (SPEC §2), on trio-websocket.

``[transports.X] type = "websocket"``. Clients connect to ``ws://host:port/v1/chats/{chat_id}``
(``wss://`` when ``tls_cert`` and ``tls_key`` are set). See docs/websocket.md for the query
parameters, encodings, close codes and resume semantics.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge import TransportType, hookimpl, port_number, positive, setting

from .asyncapi import describe
from .server import WebSocketTransport, new_ssl_context

__all__ = ["WebSocketSettings", "WebSocketTransport"]


@dataclass(frozen=True)
class WebSocketSettings:
    host: str = setting("127.0.0.1", doc="address to listen on")
    port: int = setting(3000, check=port_number, doc="TCP port (0: any free port)")
    reuse_port: bool = setting(False, doc="SO_REUSEPORT: several processes on this host share"
                               " the port (cluster mode, systemd/bridged@.service)")
    tls_cert: Path | None = setting(None, doc="PEM certificate chain; with tls_key: wss")
    tls_key: Path | None = setting(None, doc="PEM private key of tls_cert")
    heartbeat_interval_s: float = setting(5.0, check=positive,
                                          doc="seconds between heartbeats (heartbeat=true)")
    max_message_bytes: int = setting(65536, check=positive,
                                     doc="largest client frame; larger ones close with 1009")
    outbound_queue: int = setting(256, check=positive,
                                  doc="frames queued per socket; a full queue closes with 1013")
    handshake_timeout_s: float = setting(10.0, check=positive,
                                         doc="a handshake not done by then is cut")
    close_timeout_s: float = setting(5.0, check=positive,
                                     doc="time a closing socket gets to finish its close")
    max_connections: int = setting(10000, check=positive,
                                   doc="connections at once; more are refused with 503")
    max_connections_per_address: int = setting(
        64, check=positive, doc="connections at once from one IP address; more get 429")
    allowed_origins: tuple[str, ...] = setting(
        (), doc="browser Origin values allowed ('*': any); empty: not checked")
    rate_limit_per_s: float = setting(20.0, check=positive,
                                      doc="client frames per second per socket (refill rate)")
    rate_burst: int = setting(40, check=positive,
                              doc="frames a socket may send at once; over the limit: 1008")
    max_last: int = setting(100, check=positive,
                            doc="most events a client may ask for with last=N on connect")
    permessage_deflate: bool = setting(
        False, doc="accept permessage-deflate when a client offers it (CPU and memory per"
                   " socket: docs/websocket.md)")

    def __post_init__(self) -> None:
        # Checked here, not when the transport is created: `bridged check` then reports it
        # with file and line, as `bridged run` would.
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")


def _check(name: str, settings: WebSocketSettings) -> Iterator[str]:
    """The TLS pair loads (the files exist, are readable and match), as it must at start."""
    if settings.tls_cert is not None:
        try:
            new_ssl_context(settings)
        except (OSError, ssl.SSLError) as e:
            yield f"tls_cert and tls_key do not load: {e}"


def _create(name: str, settings: Any) -> WebSocketTransport:
    return WebSocketTransport(name, settings)


@hookimpl
def bridge_register_transports(register: Callable[[TransportType], None]) -> None:
    register(TransportType("websocket", WebSocketSettings, _create, describe=describe,
                           check=_check))
