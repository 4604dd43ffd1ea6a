"""Every configuration key of the core, of every transport type and of every built-in
plugin is documented in docs/configuration.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bridge.config import AdminSettings, DaemonSettings, LogSettings, RouteTable
from bridge.plugins import Registry, build_plugin_manager

DOC = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + 1)
    nxt = DOC.find("\n### ", start + 1)
    ends = [e for e in (end, nxt) if e != -1]
    return DOC[start:min(ends)] if ends else DOC[start:]


def test_core_tables_documented() -> None:
    for title, cls in (("## [daemon]", DaemonSettings), ("## [log]", LogSettings),
                       ("## [admin]", AdminSettings), ("## [[routes]]", RouteTable)):
        section = _section(title)
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in section, f"{title}: `{f.name}` is not documented"


def test_transport_and_plugin_settings_documented() -> None:
    registry = Registry.collect(build_plugin_manager())
    for name, tt in registry.transports.items():
        section = _section(f'### type = "{name}"')
        for f in dataclasses.fields(tt.settings):
            assert f"`{f.name}`" in section, f'type = "{name}": `{f.name}` is not documented'
    for name, cls in registry.settings_classes.items():
        section = _section(f"## [plugins.{name}]")
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in section, f"[plugins.{name}]: `{f.name}` is not documented"
