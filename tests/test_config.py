"""Config loading: every problem reported at once with file, line and key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge import Secret, hookimpl, setting
from bridge.assembly import assemble
from bridge.errors import ConfigError

BASE = """
[transports.a]
type = "memory"

[transports.b]
type = "memory"

[[routes]]
name = "a-to-b"
from = "a"
to = ["b"]
"""


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        assemble(path)
    return info.value.errors


def test_valid_config_loads_typed_frozen(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[daemon]\nstate_dir = \"st\"\nhop_limit = 3\n" + BASE)
    config = assemble(path).config
    assert config.daemon.hop_limit == 3
    assert config.daemon.state_dir == tmp_path / "st"  # relative to the config file
    assert config.routes[0].destinations == ("b",)
    assert config.transports["b"].settings.capacity == 1024
    with pytest.raises(AttributeError):
        config.daemon.hop_limit = 4  # type: ignore[misc]


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "[daemon]\nhop_limt = 3\n" + BASE)
    assert errs == [
        f"{tmp_path / 'c.toml'}:2: daemon.hop_limt: unknown key (did you mean 'hop_limit'?)"
    ]


def test_wrong_type_names_line(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, BASE + '\n[transports.c]\ntype = "memory"\ncapacity = "ten"\n')
    assert len(errs) == 1
    assert errs[0].endswith(":15: transports.c.capacity: must be integer, not str")


def test_bad_value_is_checked(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "[daemon]\ndrain_timeout_s = -1\n" + BASE)
    assert errs[0].endswith(":2: daemon.drain_timeout_s: must be greater than 0")


def test_several_errors_reported_at_once(tmp_path: Path) -> None:
    text = (
        "[daemon]\nhop_limit = \"x\"\nstate_dri = \"s\"\n"
        "[admin]\nport = 70000\n"
        "[surprise]\nx = 1\n" + BASE + "\n[[routes]]\nname = \"r2\"\nfrom = \"zz\"\nto = [\"a\"]\n"
    )
    errs = errors_of(tmp_path, text)
    joined = "\n".join(errs)
    assert ":2: daemon.hop_limit: must be integer" in joined
    assert ":3: daemon.state_dri: unknown key" in joined
    assert ":5: admin.port: must be a port number" in joined
    assert ":6: surprise: unknown table or key" in joined
    assert "routes[1].from: unknown transport 'zz'" in joined
    assert len(errs) == 5


def test_missing_required_values(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, BASE + '\n[[routes]]\nfrom = "a"\n')
    joined = "\n".join(errs)
    assert "routes[1].name: is required" in joined
    assert "routes[1].to: is required" in joined


def test_unknown_transport_type_lists_available(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, '[transports.x]\ntype = "carrier-pigeon"\n')
    assert ":2: transports.x.type: unknown transport type 'carrier-pigeon'; available:" in errs[0]
    assert "memory" in errs[0]


def test_route_loop_is_refused(tmp_path: Path) -> None:
    text = """
[transports.a]
type = "memory"
reflect = true

[transports.b]
type = "memory"
reflect = true

[[routes]]
name = "a-to-b"
from = "a"
to = ["b"]

[[routes]]
name = "b-to-a"
from = "b"
to = ["a"]
"""
    errs = errors_of(tmp_path, text)
    assert len(errs) == 1
    assert ":10: routes[0]: routes form a loop" in errs[0]
    assert "a-to-b (a -> b) -> b-to-a (b -> a)" in errs[0]


def test_routes_both_ways_without_reflection_are_not_a_loop(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE + '\n[[routes]]\nname = "b-to-a"\nfrom = "b"\nto = ["a"]\n'
                    '\n[[routes]]\nname = "fanout"\nfrom = "a"\nto = ["a"]\n')
    assert len(assemble(path).config.routes) == 3


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "[daemon]\nhop_limit = = 3\n")
    assert errs[0].startswith(f"{tmp_path / 'c.toml'}:2: invalid TOML")


def test_unknown_plugin_in_enable(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, '[plugins]\nenable = ["nope"]\n' + BASE)
    assert ":2: plugins.enable: plugin 'nope' (item 0) is not installed" in errs[0]


def test_secret_from_file_env_and_placeholder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    from dataclasses import dataclass

    from bridge.config import Locator, Problems, build

    @dataclass(frozen=True)
    class S:
        token: Secret

    errors = Problems(tmp_path / "c.toml", Locator(""))
    (tmp_path / "tok").write_text("s3cr3t-value\n")
    from_file = build(S, {"token_file": str(tmp_path / "tok")}, ("x",), errors, tmp_path)
    assert from_file.token == "s3cr3t-value"
    assert "s3cr3t" not in repr(from_file)
    monkeypatch.setenv("BRIDGED_TEST_TOKEN", "from-env")
    from_env = build(S, {"token_env": "BRIDGED_TEST_TOKEN"}, ("x",), errors, tmp_path)
    assert from_env.token == "from-env"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert build(S, {"token_credential": "tok"}, ("x",), errors, tmp_path).token == "s3cr3t-value"
    assert errors.items == []
    assert build(S, {"token": "changeme"}, ("x",), errors, tmp_path) is None
    assert build(S, {"token": "amqp://u:<password>@h/"}, ("x",), errors, tmp_path) is None
    assert build(S, {"token": "a", "token_env": "X"}, ("x",), errors, tmp_path) is None
    assert build(S, {"token_env": "BRIDGED_UNSET_VAR"}, ("x",), errors, tmp_path) is None
    assert [e.split(": ", 2)[2] for e in errors.items] == [
        "is a placeholder; set a real secret",
        "is a placeholder; set a real secret",
        "give either token or token_env, not both",
        "environment variable BRIDGED_UNSET_VAR is not set",
    ]


def test_settings_checks_are_public_and_shared_by_the_built_ins() -> None:
    """``bridge.positive``, ``bridge.not_negative`` and ``bridge.port_number`` are the API a
    plugin's settings use; the built-ins use the same ones rather than private copies."""
    import dataclasses

    import bridge
    from bridge_plugins.auth_jwt import AuthJwtSettings
    from bridge_plugins.history import HistorySettings
    from bridge_plugins.memory import MemorySettings
    from bridge_plugins.websocket import WebSocketSettings

    def check(cls: type[object], name: str) -> object:
        (f,) = [f for f in dataclasses.fields(cls) if f.name == name]  # type: ignore[arg-type]
        return f.metadata["check"]

    assert {"positive", "not_negative", "port_number"} <= set(bridge.__all__)
    assert (bridge.positive(1), bridge.positive(0)) == (None, "must be greater than 0")
    assert (bridge.not_negative(0), bridge.not_negative(-1)) == (None, "must be 0 or more")
    assert bridge.port_number(65536) == "must be a port number 0..65535"
    assert check(WebSocketSettings, "port") is bridge.port_number
    assert check(WebSocketSettings, "heartbeat_interval_s") is bridge.positive
    assert check(HistorySettings, "retention_count") is bridge.positive
    assert check(MemorySettings, "capacity") is bridge.positive
    assert check(AuthJwtSettings, "leeway_s") is bridge.not_negative


class Picky:
    """A plugin given in code whose settings class fails with something else than
    ValueError (a plugin's bug, or a lookup it does in __post_init__)."""

    __name__ = "picky"

    @hookimpl
    def bridge_settings_class(self) -> type[Any]:
        return PickySettings


@dataclass(frozen=True)
class PickySettings:
    mode: str = setting("plain")

    def __post_init__(self) -> None:
        {"plain": 1}[self.mode]  # a KeyError for any other mode


def test_any_exception_from_a_settings_class_is_a_problem_with_file_and_line(
        tmp_path: Path) -> None:
    # Only ValueError was caught: `bridged check` stopped with a KeyError traceback.
    path = tmp_path / "c.toml"
    path.write_text(BASE + '\n[plugins.picky]\nmode = "fancy"\n')
    with pytest.raises(ConfigError) as info:
        assemble(path, extra_plugins=[Picky()])
    assert info.value.errors == [f"{path}:13: plugins.picky: KeyError: 'fancy'"]


def test_a_file_that_is_not_utf8_is_a_problem_with_file_and_line(tmp_path: Path) -> None:
    # read() caught only OSError: a UnicodeDecodeError traceback.
    path = tmp_path / "c.toml"
    path.write_bytes(BASE.encode() + b'\n[daemon]\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        assemble(path)
    assert info.value.errors == [
        f"{path}:14: invalid UTF-8: byte 0xe9 (a config file is UTF-8 text)"]
