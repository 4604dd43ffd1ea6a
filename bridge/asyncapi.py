"""``bridged asyncapi``: the AsyncAPI 3.0 document of the topology a config would run.

The core writes the frame: ``info`` (with the routes under ``info.x-bridged-routes``) and
the components of the chat contract in ``bridge/contracts`` (see docs/contracts.md). Each
configured transport whose type has a ``describe`` adds its own servers, channels,
operations and any further component schemas and messages (see
:class:`bridge.TransportType`); the core knows no transport by name. A transport type
without ``describe`` has no wire to show and is left out.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .api import Config
from .contracts import CHAT, NOTIFICATIONS, load
from .transport import AsyncAPIFragment, TransportType

#: What a fragment may hold, and where in the document it goes.
SECTIONS = {"servers": ("servers",), "channels": ("channels",),
            "operations": ("operations",), "schemas": ("components", "schemas"),
            "messages": ("components", "messages")}
CONTRACTS = {"chat": CHAT, "notifications": NOTIFICATIONS}


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)}


def _id(*parts: str) -> str:
    """A channel, operation or server id: AsyncAPI allows letters, digits, ``.-_``."""
    return ".".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts)


@dataclass(frozen=True)
class _Context:
    """The :class:`bridge.transport.AsyncAPIContext` a transport's ``describe`` gets."""

    destination: bool

    def ref(self, *parts: str) -> dict[str, str]:
        return _ref(*parts)

    def id(self, *parts: str) -> str:
        return _id(*parts)

    def contract(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(load(CONTRACTS[name]))


def _merge(doc: dict[str, Any], transport: str, fragment: AsyncAPIFragment) -> None:
    unknown = set(fragment) - set(SECTIONS)
    if unknown:
        raise ValueError(f"transport {transport!r}: describe returned {sorted(unknown)}")
    for key, entries in fragment.items():
        section = doc
        for part in SECTIONS[key]:
            section = section[part]
        for entry_id, entry in entries.items():
            # a component two transports both describe (the same message) is kept once
            if key in ("servers", "channels", "operations") and entry_id in section:
                raise ValueError(f"transport {transport!r}: {key} id {entry_id!r} is taken")
            section.setdefault(entry_id, entry)


def build_document(config: Config,
                   transport_types: Mapping[str, TransportType] | None = None
                   ) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of what ``config`` would run. ``transport_types`` by
    name; by default those the plugins ``config`` enables register."""
    if transport_types is None:
        from .plugins import Registry, build_plugin_manager

        transport_types = Registry.collect(build_plugin_manager(
            config.plugins.enable, config.plugins.disable)).transports
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
        "components": copy.deepcopy(
            {key: load(CHAT)["components"][key] for key in ("schemas", "messages")}),
    }
    destinations = {d for r in config.routes for d in r.destinations}
    for name, transport in config.transports.items():
        transport_type = transport_types.get(transport.type)
        if transport_type is not None and transport_type.describe is not None:
            _merge(doc, name, transport_type.describe(
                name, transport.settings, _Context(destination=name in destinations)))
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
