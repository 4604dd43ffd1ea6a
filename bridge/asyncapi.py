"""``bridged asyncapi``: the AsyncAPI 3.0 document of the topology a config would run.

What the document holds, per configured transport:

* ``type = "websocket"``: a server (``ws`` or ``wss`` when ``tls_cert`` and ``tls_key`` are
  set), the chat channel ``/v1/chats/{chat_id}`` with its query bindings (``heartbeat``,
  ``since``, ``encoding``), a ``send`` operation (updates and heartbeats) and a ``receive``
  operation (client frames);
* ``type = "amqp"``: a server (credentials never shown), the consumed queue with a
  ``receive`` operation, the dead-letter queue with a ``send`` operation, and, when a route
  delivers to it, the exchange with a ``send`` operation and its routing key.

Message schemas come from the contracts in ``bridge/contracts`` (see docs/contracts.md);
the routes are listed under ``info.x-bridged-routes``. Transport settings are read by name
with defaults (``getattr``), so a transport plugin only has to use the documented names.
Other transport types (``memory``) have no wire and are left out.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from .api import Config
from .contracts import CHAT, NOTIFICATIONS, load

AMQP_BINDING = "0.3.0"
WS_BINDING = "0.1.0"
CHAT_ADDRESS = "/v1/chats/{chat_id}"
#: the component message describing what an AMQP transport consumes, by ``consume_kind``
CONSUMED_MESSAGES = {"notification": "notification", "chat.event": "chat_event"}


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)}


def _id(*parts: str) -> str:
    """A channel, operation or server id: AsyncAPI allows letters, digits, ``.-_``."""
    return ".".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts)


def _components() -> dict[str, Any]:
    chat = copy.deepcopy(load(CHAT)["components"])
    notification = copy.deepcopy(
        load(NOTIFICATIONS)["channels"]["notifications"]["subscribe"]["message"]["payload"])
    schemas = {**chat["schemas"], "notification": notification}
    messages = {
        **chat["messages"],
        "chat_event": {
            "name": "chat_event",
            "summary": "A chat event: the update without socket_sequence; its eventId is the"
                       " AMQP message id.",
            "contentType": "application/json",
            "payload": _ref("components", "schemas", "event"),
        },
        "notification": {
            "name": "notification",
            "summary": "A notification for the user whose id is the chat id. msgpack is"
                       " accepted when the content type says application/msgpack.",
            "contentType": "application/json",
            "payload": _ref("components", "schemas", "notification"),
        },
        "any_message": {
            "name": "any_message",
            "summary": "A message of a kind no contract describes (a plugin's own).",
            "payload": {},
        },
        "dead_notification": {
            "name": "dead_notification",
            "summary": "A notification that could not be decoded or broke its contract: the"
                       " original body and properties, unchanged, with the reason added to"
                       " the headers.",
            "headers": {"type": "object", "description": "The original headers plus the"
                        " reason the message was dead-lettered."},
            "payload": {"description": "The original body, as received (it may not be valid"
                        " JSON)."},
        },
    }
    return {"schemas": schemas, "messages": messages}


def _websocket(name: str, settings: Any, doc: dict[str, Any]) -> None:
    host = getattr(settings, "host", "127.0.0.1")
    port = getattr(settings, "port", 3000)
    tls = bool(getattr(settings, "tls_cert", None) and getattr(settings, "tls_key", None))
    interval = getattr(settings, "heartbeat_interval_s", 5.0)
    seed_channel = load(CHAT)["channels"]["chat_data"]
    bindings = copy.deepcopy(seed_channel["bindings"])
    heartbeat = bindings["ws"]["query"]["properties"]["heartbeat"]
    heartbeat["description"] = (f"true: the server sends a heartbeat frame every {interval:g} s.")
    doc["servers"][_id(name)] = {
        "host": f"{host}:{port}",
        "protocol": "wss" if tls else "ws",
        "description": f"WebSocket transport {name!r}" + (" (TLS)" if tls else ""),
    }
    channel = _id(name, "chat")
    doc["channels"][channel] = {
        "address": CHAT_ADDRESS,
        "title": "Support chat",
        "servers": [_ref("servers", _id(name))],
        "parameters": copy.deepcopy(seed_channel["parameters"]),
        "messages": {
            "chat_data": _ref("components", "messages", "chat_data"),
            "client_data": _ref("components", "messages", "client_data"),
        },
        "bindings": bindings,
    }
    doc["operations"][_id(name, "sendChatData")] = {
        "action": "send",
        "channel": _ref("channels", channel),
        "summary": "Send chat updates and heartbeats to the client",
        "messages": [_ref("channels", channel, "messages", "chat_data")],
    }
    doc["operations"][_id(name, "receiveChatData")] = {
        "action": "receive",
        "channel": _ref("channels", channel),
        "summary": "Receive chat updates from the client",
        "messages": [_ref("channels", channel, "messages", "client_data")],
    }


def _amqp(name: str, settings: Any, publishes: bool, doc: dict[str, Any]) -> None:
    url = urlsplit(str(getattr(settings, "url", "amqp://127.0.0.1:5672/")))
    secure = url.scheme == "amqps"
    host = url.hostname or "127.0.0.1"
    port = url.port or (5671 if secure else 5672)
    vhost = unquote(url.path[1:]) or "/"
    queue = getattr(settings, "consume_queue", "notifications")
    dead = getattr(settings, "dead_letter_queue", "notifications.dead")
    consume_kind = getattr(settings, "consume_kind", "notification")
    exchange = getattr(settings, "exchange", "chat")
    exchange_type = getattr(settings, "exchange_type", "topic")
    routing_key = getattr(settings, "routing_key", "chat.{chat_id}")
    server = _id(name)
    doc["servers"][server] = {
        "host": f"{host}:{port}",  # never the credentials
        "protocol": "amqps" if secure else "amqp",
        "description": f"RabbitMQ transport {name!r}, virtual host {vhost!r}",
    }

    def queue_channel(queue_name: str, message: str, description: str) -> str:
        channel = _id(name, queue_name)
        doc["channels"][channel] = {
            "address": queue_name,
            "description": description,
            "servers": [_ref("servers", server)],
            "messages": {message: _ref("components", "messages", message)},
            "bindings": {"amqp": {"is": "queue", "bindingVersion": AMQP_BINDING, "queue": {
                "name": queue_name, "durable": True, "exclusive": False, "autoDelete": False,
                "vhost": vhost}}},
        }
        return channel

    consumed_message = CONSUMED_MESSAGES.get(consume_kind, "any_message")
    consumed = queue_channel(queue, consumed_message, f"Durable queue of {consume_kind!r}"
                             " messages (declared if absent), consumed with manual"
                             " acknowledgements.")
    doc["operations"][_id(name, "receiveNotification")] = {
        "action": "receive",
        "channel": _ref("channels", consumed),
        "summary": "Consume messages; ack once handled (persisted and handed on)",
        "messages": [_ref("channels", consumed, "messages", consumed_message)],
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
    }
    dead_channel = queue_channel(dead, "dead_notification", "Durable queue of the"
                                 " notifications that could not be decoded or broke the"
                                 " contract.")
    doc["operations"][_id(name, "sendDeadLetter")] = {
        "action": "send",
        "channel": _ref("channels", dead_channel),
        "summary": "Dead-letter a notification that cannot be handled, with the reason",
        "messages": [_ref("channels", dead_channel, "messages", "dead_notification")],
        "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING}},
    }
    if not publishes:
        return
    channel = _id(name, exchange)
    doc["channels"][channel] = {
        "address": exchange,
        "description": f"Durable {exchange_type} exchange; routing key {routing_key!r}.",
        "servers": [_ref("servers", server)],
        "messages": {"chat_event": _ref("components", "messages", "chat_event")},
        "bindings": {"amqp": {"is": "routingKey", "bindingVersion": AMQP_BINDING, "exchange": {
            "name": exchange, "type": exchange_type, "durable": True, "autoDelete": False,
            "vhost": vhost}}},
    }
    doc["operations"][_id(name, "publishChatEvent")] = {
        "action": "send",
        "channel": _ref("channels", channel),
        "summary": f"Publish chat events with routing key {routing_key!r}, persistent, with"
                   " publisher confirms",
        "messages": [_ref("channels", channel, "messages", "chat_event")],
        "bindings": {"amqp": {"cc": [routing_key], "deliveryMode": 2,
                              "bindingVersion": AMQP_BINDING}},
    }


def build_document(config: Config) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of what ``config`` would run."""
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"bridged: {config.path.name}",
            "version": _version(),
            "description": "The wire interfaces a bridged daemon runs with this configuration.",
            "x-bridged-routes": [
                {"name": r.name, "from": r.source, "to": list(r.destinations),
                 "kinds": list(r.kinds), "chat_ids": list(r.chat_ids),
                 "transforms": list(r.transforms)}
                for r in config.routes
            ],
        },
        "defaultContentType": "application/json",
        "servers": {},
        "channels": {},
        "operations": {},
        "components": _components(),
    }
    destinations = {d for r in config.routes for d in r.destinations}
    for name, transport in config.transports.items():
        if transport.type == "websocket":
            _websocket(name, transport.settings, doc)
        elif transport.type == "amqp":
            _amqp(name, transport.settings, name in destinations, doc)
    return doc


def render(document: dict[str, Any], fmt: str = "yaml") -> str:
    """``document`` as YAML (the default) or JSON text."""
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    import yaml

    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100))


def _version() -> str:
    from importlib.metadata import version  # not at import: ~0.1 s at every start-up

    return version("bridged")
