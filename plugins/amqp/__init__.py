"""Built-in plugin ``amqp``: the AMQP transport (RabbitMQ), ``[transports.X] type = "amqp"``.

One job per module (docs/amqp.md):

* :mod:`.transport`: the transport (decoding, the pipeline's side) and its registration;
* :mod:`.settings`: its settings table and their checks;
* :mod:`.asyncapi`: its part of ``bridged asyncapi``;
* :mod:`.outbox`: the on-disk spool of messages waiting to be published;
* :mod:`.inbox`: the consumed deliveries in hand, the ids settled lately, and the one call
  that settles a delivery (ack, dead letter, or leave it to the broker) with its copies;
* :mod:`.connection`: one broker connection (open, declare, lost, close);
* :mod:`.publisher` and :mod:`.consumer`: publishing and consuming on aiormq 7.2's
  internals;
* :mod:`.island`: the asyncio loop in its own thread that they run on, driven from trio.
"""

from .settings import AmqpSettings, redact
from .transport import TRANSPORT, AmqpTransport, bridge_register_transports

__all__ = ["TRANSPORT", "AmqpSettings", "AmqpTransport", "bridge_register_transports",
           "redact"]
