"""The AMQP transport's part of ``bridged asyncapi``: a server (credentials never shown),
the consumed queue with a ``receive`` operation, the dead-letter queue with a ``send``
operation, and, when a route delivers to the transport, the exchange with a ``send``
operation and its routing key; and the component messages those refer to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from bridge import AsyncAPIContext, AsyncAPIFragment

if TYPE_CHECKING:
    from .settings import AmqpSettings

AMQP_BINDING = "0.3.0"
#: the component message describing what an AMQP transport consumes, by ``consume_kind``
CONSUMED_MESSAGES = {"notification": "notification", "chat.event": "chat_event"}


def _messages(context: AsyncAPIContext) -> dict[str, Any]:
    return {
        "chat_event": {
            "name": "chat_event",
            "summary": "A chat event: the update without socket_sequence; its eventId is the"
                       " AMQP message id.",
            "contentType": "application/json",
            "payload": context.ref("components", "schemas", "event"),
        },
        "notification": {
            "name": "notification",
            "summary": "A notification for the user whose id is the chat id. msgpack is"
                       " accepted when the content type says application/msgpack.",
            "contentType": "application/json",
            "payload": context.ref("components", "schemas", "notification"),
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


def describe(name: str, settings: AmqpSettings, context: AsyncAPIContext
             ) -> AsyncAPIFragment:
    url = urlsplit(settings.url)
    secure = url.scheme == "amqps"
    port = url.port or (5671 if secure else 5672)
    vhost = unquote(url.path[1:]) or "/"
    server = context.id(name)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def queue_channel(queue_name: str, message: str, description: str) -> str:
        channel = context.id(name, queue_name)
        channels[channel] = {
            "address": queue_name,
            "description": description,
            "servers": [context.ref("servers", server)],
            "messages": {message: context.ref("components", "messages", message)},
            "bindings": {"amqp": {"is": "queue", "bindingVersion": AMQP_BINDING, "queue": {
                "name": queue_name, "durable": True, "exclusive": False, "autoDelete": False,
                "vhost": vhost}}},
        }
        return channel

    kind = settings.consume_kind
    consumed_message = CONSUMED_MESSAGES.get(kind, "any_message")
    consumed = queue_channel(settings.consume_queue, consumed_message,
                             f"Durable queue of {kind!r} messages (declared if absent),"
                             " consumed with manual acknowledgements.")
    operations[context.id(name, "receiveNotification")] = {
        "action": "receive",
        "channel": context.ref("channels", consumed),
        "summary": "Consume messages; ack once handled (persisted and handed on)",
        "messages": [context.ref("channels", consumed, "messages", consumed_message)],
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
    }
    dead = queue_channel(settings.dead_letter_queue, "dead_notification", "Durable queue of"
                         " the notifications that could not be decoded or broke the"
                         " contract.")
    operations[context.id(name, "sendDeadLetter")] = {
        "action": "send",
        "channel": context.ref("channels", dead),
        "summary": "Dead-letter a notification that cannot be handled, with the reason",
        "messages": [context.ref("channels", dead, "messages", "dead_notification")],
        "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING}},
    }
    if context.destination:
        exchange, routing_key = settings.exchange, settings.routing_key
        channel = context.id(name, exchange)
        channels[channel] = {
            "address": exchange,
            "description": f"Durable {settings.exchange_type} exchange; routing key"
                           f" {routing_key!r}.",
            "servers": [context.ref("servers", server)],
            "messages": {"chat_event": context.ref("components", "messages", "chat_event")},
            "bindings": {"amqp": {"is": "routingKey", "bindingVersion": AMQP_BINDING,
                                  "exchange": {
                "name": exchange, "type": settings.exchange_type, "durable": True,
                "autoDelete": False, "vhost": vhost}}},
        }
        operations[context.id(name, "publishChatEvent")] = {
            "action": "send",
            "channel": context.ref("channels", channel),
            "summary": f"Publish chat events with routing key {routing_key!r}, persistent,"
                       " with publisher confirms",
            "messages": [context.ref("channels", channel, "messages", "chat_event")],
            "bindings": {"amqp": {"cc": [routing_key], "deliveryMode": 2,
                                  "bindingVersion": AMQP_BINDING}},
        }
    notification = context.contract("notifications")["channels"]["notifications"][
        "subscribe"]["message"]["payload"]
    return {
        "servers": {server: {
            "host": f"{url.hostname or '127.0.0.1'}:{port}",  # never the credentials
            "protocol": "amqps" if secure else "amqp",
            "description": f"RabbitMQ transport {name!r}, virtual host {vhost!r}",
        }},
        "channels": channels,
        "operations": operations,
        "schemas": {"notification": notification},
        "messages": _messages(context),
    }
