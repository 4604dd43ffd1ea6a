"""The command line as a user runs it: real processes, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bridged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True,
                          timeout=60)


def test_check_ok_exits_0(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text('[transports.a]\ntype = "memory"\n')
    result = bridged("check", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_typo_prints_file_line_key_and_exits_1(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text('[transports.a]\ntype = "memory"\ncapacty = 5\n')
    result = bridged("check", "-c", str(cfg))
    assert result.returncode == 1
    assert f"{cfg}:3: transports.a.capacty: unknown key (did you mean 'capacity'?)" in result.stderr


HALF_TLS = """\
[admin]
enabled = false
[transports.chat]
type = "websocket"
port = 0
tls_cert = "cert.pem"
[transports.b]
type = "memory"
[[routes]]
name = "x"
from = "chat"
to = ["b"]
"""


def test_check_refuses_what_run_refuses_a_certificate_without_its_key(tmp_path: Path) -> None:
    # The transport checked the pair only when it was created, inside the running daemon:
    # `check` said ok (exit 0) and `run` stopped with a traceback (exit 3).
    cfg = tmp_path / "half-tls.toml"
    cfg.write_text(HALF_TLS)
    problem = f"{cfg}:3: transports.chat: set both tls_cert and tls_key, or neither"
    checked = bridged("check", "-c", str(cfg))
    assert (checked.returncode, checked.stdout) == (1, "")
    assert problem in checked.stderr.splitlines()
    ran = bridged("run", "-c", str(cfg))
    assert ran.returncode == 1
    assert problem in ran.stderr
    assert "Traceback" not in ran.stderr


def test_check_missing_file_exits_1(tmp_path: Path) -> None:
    result = bridged("check", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_usage_error_exits_2() -> None:
    assert bridged("frobnicate").returncode == 2


def test_example_config_checks() -> None:
    result = bridged("check", "-c", str(ROOT / "config.example.toml"))
    assert result.returncode == 0, result.stderr


def test_cluster_example_config_checks_and_its_keys_are_checked(tmp_path: Path) -> None:
    example = (ROOT / "config.cluster.example.toml").read_text()
    result = bridged("check", "-c", str(ROOT / "config.cluster.example.toml"))
    assert result.returncode == 0, result.stderr
    keeps_history = tmp_path / "history.toml"
    keeps_history.write_text(example.replace('disable = ["history"]', "disable = []"))
    result = bridged("check", "-c", str(keeps_history))
    assert result.returncode == 1
    assert f"{keeps_history}:" in result.stderr
    assert 'plugins.enable: cluster mode keeps the history in PostgreSQL' in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(example.replace('schema = "bridged"', 'schema = "Bad-Name"\ngap_wait_s = -1'))
    result = bridged("check", "-c", str(bad))
    assert result.returncode == 1
    assert "plugins.cluster.schema: must be a lower-case SQL identifier" in result.stderr
    assert "plugins.cluster.gap_wait_s: must be greater than 0" in result.stderr


def test_wheel_has_no_bare_plugins_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = tmp_path.glob("bridged-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "plugins" not in tops
    assert {"bridge", "bridge_plugins"} <= tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "bridge_plugins/memory.py" in names
    assert "bridge/py.typed" in names


def test_a_third_party_plugin_offers_a_subcommand_where_the_config_enables_it(
        tmp_path: Path) -> None:
    # Only the built-in plugins were asked for subcommands: "invalid choice: 'greet'".
    from ops_support import install_opsplug

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*map(str, install_opsplug(tmp_path / "site")), os.environ.get("PYTHONPATH", "")])}
    base = '[transports.a]\ntype = "memory"\n'
    enabled = tmp_path / "enabled.toml"
    enabled.write_text('[plugins]\nenable = ["opsplug"]\n[plugins.opsplug]\ngreeting = "hi"\n'
                       + base)
    greet = subprocess.run([sys.executable, "-m", "bridge", "greet", "-c", str(enabled)],
                           capture_output=True, text=True, timeout=60, env=env, check=False)
    assert (greet.returncode, greet.stdout) == (0, "hi\n"), greet.stderr
    plain = tmp_path / "plain.toml"
    plain.write_text(base)
    refused = subprocess.run([sys.executable, "-m", "bridge", "greet", "-c", str(plain)],
                             capture_output=True, text=True, timeout=60, env=env, check=False)
    assert refused.returncode == 2
    assert "invalid choice: 'greet'" in refused.stderr


def test_check_refuses_what_run_refuses_tls_files_that_do_not_load(tmp_path: Path) -> None:
    # The pair was loaded only when the transport started listening: `check` said ok and
    # `run` stopped with a traceback (exit 3).
    cfg = tmp_path / "missing-tls.toml"
    cfg.write_text(HALF_TLS.replace('tls_cert = "cert.pem"\n',
                                    'tls_cert = "cert.pem"\ntls_key = "key.pem"\n'))
    prefix = f"{cfg}:3: transports.chat: tls_cert and tls_key do not load: "
    checked = bridged("check", "-c", str(cfg))
    assert (checked.returncode, checked.stdout) == (1, ""), checked.stderr
    assert [line for line in checked.stderr.splitlines() if line.startswith(prefix)], \
        checked.stderr
    ran = bridged("run", "-c", str(cfg))
    assert ran.returncode == 1
    assert prefix in ran.stderr
    assert "Traceback" not in ran.stderr


RAISING_FACTORY = """\
import sys
from dataclasses import dataclass
from bridge import TransportType, hookimpl
from bridge.cli import main

@dataclass(frozen=True)
class Settings:
    pass

def create(name, settings):
    raise RuntimeError("no such device")

class Plugin:
    @hookimpl
    def bridge_register_transports(self, register):
        register(TransportType("fragile", Settings, create))

sys.exit(main(["run", "-c", sys.argv[1]], extra_plugins=[Plugin()]))
"""


def test_run_names_a_transport_whose_factory_raises_and_exits_1(tmp_path: Path) -> None:
    # `check` does not create transports (a factory may open files, sockets); `run` did,
    # and stopped with a traceback and exit 3.
    cfg = tmp_path / "fragile.toml"
    cfg.write_text('[admin]\nenabled = false\n[transports.dev]\ntype = "fragile"\n')
    script = tmp_path / "fragile.py"
    script.write_text(RAISING_FACTORY)
    ran = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert ran.returncode == 1, ran.stderr
    assert (f"{cfg}: transports.dev: cannot create the fragile transport: RuntimeError:"
            " no such device") in ran.stderr
    assert "Traceback" not in ran.stderr
