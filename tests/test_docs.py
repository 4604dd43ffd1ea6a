"""Docs enforced by tests: every hook documented with its signature, and exercised by a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from bridge import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
         if name.startswith("bridge_")]


def test_every_hook_has_a_docs_section_with_its_signature() -> None:
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"### {name}({params})" in doc, f"docs/plugins.md lacks a section for {name}"


def test_every_hook_is_implemented_in_a_test() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py")
                        if p.name != "test_docs.py")
    for name in HOOKS:
        assert re.search(rf"def {name}\(", sources), f"no test or built-in implements {name}"
