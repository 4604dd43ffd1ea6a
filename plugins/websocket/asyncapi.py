"""The WebSocket transport's part of ``bridged asyncapi``: a server (``ws``, or ``wss``
when ``tls_cert`` and ``tls_key`` are set), the chat channel ``/v1/chats/{chat_id}`` with
its query bindings (``heartbeat``, ``since``, ``encoding``), a ``send`` operation (updates
and heartbeats) and a ``receive`` operation (client frames). The messages are the chat
contract's ``chat_data`` and ``client_data``, which the core's document always holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge import AsyncAPIContext, AsyncAPIFragment

if TYPE_CHECKING:
    from . import WebSocketSettings

CHAT_ADDRESS = "/v1/chats/{chat_id}"


def describe(name: str, settings: WebSocketSettings, context: AsyncAPIContext
             ) -> AsyncAPIFragment:
    tls = bool(settings.tls_cert and settings.tls_key)
    seed_channel = context.contract("chat")["channels"]["chat_data"]
    bindings = seed_channel["bindings"]
    heartbeat = bindings["ws"]["query"]["properties"]["heartbeat"]
    heartbeat["description"] = (
        f"true: the server sends a heartbeat frame every {settings.heartbeat_interval_s:g} s.")
    server, channel = context.id(name), context.id(name, "chat")
    channels: dict[str, Any] = {channel: {
        "address": CHAT_ADDRESS,
        "title": "Support chat",
        "servers": [context.ref("servers", server)],
        "parameters": seed_channel["parameters"],
        "messages": {
            "chat_data": context.ref("components", "messages", "chat_data"),
            "client_data": context.ref("components", "messages", "client_data"),
        },
        "bindings": bindings,
    }}
    return {
        "servers": {server: {
            "host": f"{settings.host}:{settings.port}",
            "protocol": "wss" if tls else "ws",
            "description": f"WebSocket transport {name!r}" + (" (TLS)" if tls else ""),
        }},
        "channels": channels,
        "operations": {
            context.id(name, "sendChatData"): {
                "action": "send",
                "channel": context.ref("channels", channel),
                "summary": "Send chat updates and heartbeats to the client",
                "messages": [context.ref("channels", channel, "messages", "chat_data")],
            },
            context.id(name, "receiveChatData"): {
                "action": "receive",
                "channel": context.ref("channels", channel),
                "summary": "Receive chat updates from the client",
                "messages": [context.ref("channels", channel, "messages", "client_data")],
            },
        },
    }
