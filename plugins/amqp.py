"""Built-in plugin `amqp` (being built; see its issue)."""
