"""Built-in plugin `history` (being built; see its issue)."""
