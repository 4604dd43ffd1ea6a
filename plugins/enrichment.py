"""Built-in plugin `enrichment` (being built; see its issue)."""
