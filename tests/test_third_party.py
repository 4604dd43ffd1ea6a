"""A real third-party distribution (examples/bridge-profanity), installed into the test
environment, found through the `bridge` entry-point group and enabled by config."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import cast

from bridge import CHAT_EVENT, Accepted, ContractError, Rejected
from bridge.assembly import Assembly
from bridge.plugins import available_plugins, build_plugin_manager, describe_plugins
from bridge.testing import run_bridge
from bridge_plugins.memory import MemoryTransport

CONFIG = """
[plugins]
enable = ["profanity"]

[plugins.profanity]
words = ["darn"]

[transports.a]
type = "memory"

[transports.b]
type = "memory"

[[routes]]
name = "a-to-b"
from = "a"
to = ["b"]
"""


def test_installed_distribution_is_discovered_through_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="bridge") if ep.name == "profanity"]
    assert ep.dist is not None
    assert ep.dist.name == "bridge-profanity"
    assert available_plugins()["profanity"] == "bridge-profanity"
    assert build_plugin_manager().get_plugin("profanity") is None  # opt-in only
    pm = build_plugin_manager(enable=["profanity"])
    (info,) = [i for i in describe_plugins(pm) if i.name == "profanity"]
    assert (info.version, info.enabled) == ("1.0.0", True)
    assert "bridge_validate_message" in info.hooks


async def test_enabled_plugin_rejects_a_message(bridge_config: Callable[[str], Assembly]) -> None:
    async with run_bridge(bridge_config(CONFIG)) as daemon:
        a = cast(MemoryTransport, daemon.transports["a"])
        clean = await a.inject({"type": "update", "message": [{"type": "message", "text": "hi"}]},
                               kind=CHAT_EVENT, chat_id="c1")
        dirty = await a.inject({"type": "update", "message": [
            {"type": "message", "text": "ok"}, {"type": "message", "text": "Darn it"}]},
            kind=CHAT_EVENT, chat_id="c1")
    assert isinstance(clean, Accepted)
    assert isinstance(dirty, Rejected)
    assert isinstance(dirty.error, ContractError)
    assert dirty.error.field == "message.1.text"


def test_bridged_plugins_lists_it_with_version_and_hooks() -> None:
    out = subprocess.run([sys.executable, "-m", "bridge", "plugins"], check=True,
                         capture_output=True, text=True).stdout
    assert "profanity 1.0.0 (bridge-profanity, disabled)" in out
    assert "memory" in out
    assert "codecs" in out
