"""Start-up stays light: modules only some daemons need are imported when first used."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from bridge.assembly import assemble
from bridge.daemon import Daemon
daemon = Daemon(assemble(sys.argv[1]))  # every built-in plugin loaded, hooks, transports
print(json.dumps(sorted(m for m in ("jsonschema", "jwt", "cryptography") if m in sys.modules)))
"""


def test_the_example_config_starts_without_jsonschema_or_jwt() -> None:
    """jsonschema only explains rejections, PyJWT only serves [plugins.auth_jwt]: together
    about 0.2 s of start-up (BENCHMARKS.md, scenario 7)."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "config.example.toml")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []



def test_the_plugin_api_imports_no_command_line() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, bridge; print(sorted(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "'bridge.cli'" not in out.stdout
    assert "'bridge.api'" in out.stdout  # Command and PluginContext come from there


def test_config_is_a_leaf_of_the_core() -> None:
    """The binder and the core tables import nothing of the core but its errors."""
    tree = ast.parse((ROOT / "bridge" / "config.py").read_text())
    core = {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0}
    assert core == {"errors"}
