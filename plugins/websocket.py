"""Built-in plugin `websocket` (being built; see its issue)."""
