"""Built-in plugin `validation` (being built; see its issue)."""
