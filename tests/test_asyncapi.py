"""``bridged asyncapi``: the export validates with the reference parser, @asyncapi/parser.

The parser runs from tools/asyncapi-check (``npm ci --prefix tools/asyncapi-check`` first;
see its README).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import AsyncAPIContext, AsyncAPIFragment, TransportType
from bridge.api import Config
from bridge.asyncapi import build_document, render
from bridge.cli import main
from bridge.config import (
    AdminSettings,
    DaemonSettings,
    LogSettings,
    PluginsConfig,
    TransportConfig,
)
from bridge.contracts import CHAT, NOTIFICATIONS, load
from bridge.plugins import Registry, build_plugin_manager
from bridge.routing import RouteConfig
from bridge.testing import MEMORY_AB

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / "tools" / "asyncapi-check"


def parse(*files: Path) -> list[dict[str, Any]]:
    """Run the reference parser on ``files``; its report, one entry per file."""
    if not (CHECKER / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail("the AsyncAPI parser is not installed: npm ci --prefix tools/asyncapi-check")
    done = subprocess.run(["node", str(CHECKER / "check.mjs"), *map(str, files)],
                          capture_output=True, text=True, timeout=60, check=False)
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == len(files), done.stderr
    assert done.returncode == (0 if all(r["valid"] for r in reports) else 1)
    return reports


def errors(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in report["diagnostics"] if d["severity"] in ("error", "warning")]


# Stand-ins with the settings names the websocket and amqp transports use: their describe
# functions read only these.
@dataclass(frozen=True)
class WebSocketSettings:
    host: str = "127.0.0.1"
    port: int = 3000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    heartbeat_interval_s: float = 5.0


@dataclass(frozen=True)
class AmqpSettings:
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    consume_queue: str = "notifications"
    dead_letter_queue: str = "notifications.dead"
    exchange: str = "chat"
    routing_key: str = "chat.{chat_id}"
    consume_kind: str = "notification"
    exchange_type: str = "topic"


def example_config(tmp_path: Path, *, tls: bool = False) -> Config:
    """The example config's topology: notifications -> chat, chat -> AMQP, chat -> chat."""
    ws = WebSocketSettings(tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem") \
        if tls else WebSocketSettings()
    return Config(
        path=tmp_path / "bridged.toml",
        daemon=DaemonSettings(), log=LogSettings(), admin=AdminSettings(),
        plugins=PluginsConfig(),
        transports={
            "chat": TransportConfig("chat", "websocket", ws),
            "rabbit": TransportConfig("rabbit", "amqp", AmqpSettings()),
        },
        routes=(
            RouteConfig("notifications-to-chat", "rabbit", ("chat",), ("notification",), (),
                        ("notification_to_chat",)),
            RouteConfig("chat-to-amqp", "chat", ("rabbit",), ("chat.event",)),
            RouteConfig("chat-fanout", "chat", ("chat",), ("chat.event",)),
        ),
    )


def test_export_validates_with_the_reference_parser(tmp_path: Path) -> None:
    doc = build_document(example_config(tmp_path, tls=True))
    (tmp_path / "doc.json").write_text(render(doc, "json"))
    (tmp_path / "doc.yaml").write_text(render(doc, "yaml"))
    assert yaml.safe_load((tmp_path / "doc.yaml").read_text()) == doc
    for report in parse(tmp_path / "doc.json", tmp_path / "doc.yaml"):
        assert report["valid"], report
        assert errors(report) == []

    assert doc["asyncapi"] == "3.0.0"
    assert doc["servers"]["chat"] == {"host": "127.0.0.1:3000", "protocol": "wss",
                                      "description": "WebSocket transport 'chat' (TLS)"}
    assert doc["servers"]["rabbit"]["host"] == "127.0.0.1:5672"
    assert "guest" not in json.dumps(doc)  # no credentials
    chat = doc["channels"]["chat.chat"]
    assert chat["address"] == "/v1/chats/{chat_id}"
    assert set(chat["bindings"]["ws"]["query"]["properties"]) == {"heartbeat", "since",
                                                                  "encoding", "refusals",
                                                                  "last", "marks", "hello"}
    assert {c["address"] for c in doc["channels"].values()} == {
        "/v1/chats/{chat_id}", "notifications", "notifications.dead", "chat"}
    ops = doc["operations"]
    assert {(k, v["action"]) for k, v in ops.items()} == {
        ("chat.sendChatData", "send"), ("chat.receiveChatData", "receive"),
        ("rabbit.receiveNotification", "receive"), ("rabbit.sendDeadLetter", "send"),
        ("rabbit.publishChatEvent", "send")}
    assert ops["rabbit.publishChatEvent"]["bindings"]["amqp"]["cc"] == ["chat.{chat_id}"]
    assert doc["components"]["schemas"]["eventId"]["type"] == "string"
    for schema in ("client_update", "update"):  # opt-in keys (docs/websocket.md)
        assert "clientMsgId" in doc["components"]["schemas"][schema]["properties"]
    assert "replayed" in doc["components"]["schemas"]["update"]["properties"]
    for frame in ("replay_end", "hello"):
        assert doc["components"]["schemas"][frame]["required"][0] == "type"
    assert [r["name"] for r in doc["info"]["x-bridged-routes"]] == [
        "notifications-to-chat", "chat-to-amqp", "chat-fanout"]


def test_topology_follows_the_config(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    doc = build_document(config)
    assert doc["servers"]["chat"]["protocol"] == "ws"
    # no route delivers to AMQP: no exchange, no publish operation
    config = Config(**{**vars(config), "routes": config.routes[:1]})
    doc = build_document(config)
    assert "rabbit.publishChatEvent" not in doc["operations"]
    assert "rabbit.chat" not in doc["channels"]


def test_checker_is_not_a_no_op(tmp_path: Path) -> None:
    doc = build_document(example_config(tmp_path))
    doc["operations"]["chat.sendChatData"]["action"] = "publish"  # an AsyncAPI 2 verb
    (tmp_path / "bad.json").write_text(render(doc, "json"))
    (report,) = parse(tmp_path / "bad.json")
    assert not report["valid"]
    assert any(d["severity"] == "error" for d in report["diagnostics"])


def test_contract_copies_validate(tmp_path: Path) -> None:
    for name in (CHAT, NOTIFICATIONS):
        (tmp_path / name).write_text(json.dumps(load(name)))
    for report in parse(tmp_path / CHAT, tmp_path / NOTIFICATIONS):
        assert report["valid"], report


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bridged.toml"
    path.write_text(MEMORY_AB)
    assert main(["asyncapi", "-c", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["info"]["title"] == "bridged: bridged.toml"
    assert doc["channels"] == {}  # memory transports have no wire
    assert main(["asyncapi", "-c", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == doc
    path.write_text(MEMORY_AB.replace('["b"]', '["nowhere"]'))
    assert main(["asyncapi", "-c", str(path)]) == 1
    assert "unknown transport 'nowhere'" in capsys.readouterr().err


def test_export_of_the_example_config_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    """tests/asyncapi_example.yaml is ``bridged asyncapi -c config.example.toml`` as it was
    when the core still wrote every transport's part itself (only the version differs), with
    the chat contract's opt-in query keys and frames of issue 15 added since."""
    assert main(["asyncapi", "-c", str(ROOT / "config.example.toml")]) == 0
    expected = (ROOT / "tests" / "asyncapi_example.yaml").read_text()
    expected = expected.replace("  version: 0.1.0\n", f"  version: {version('bridged')}\n", 1)
    assert capsys.readouterr().out == expected


def test_the_core_names_no_transport() -> None:
    """Each transport type describes itself; asyncapi.py knows none of them by name."""
    source = (ROOT / "bridge" / "asyncapi.py").read_text().lower()
    names = Registry.collect(build_plugin_manager()).transports
    assert {"websocket", "amqp", "memory"} <= set(names)
    assert [name for name in names if name in source] == []
    assert "rabbitmq" not in source


@dataclass(frozen=True)
class PigeonSettings:
    loft: str = "north"


def describe_pigeon(name: str, settings: PigeonSettings, context: AsyncAPIContext
                    ) -> AsyncAPIFragment:
    return {"servers": {context.id(name): {"host": settings.loft, "protocol": "pigeon"}},
            "channels": {context.id(name, "in"): {
                "address": None, "servers": [context.ref("servers", context.id(name))],
                "x-destination": context.destination}}}


def test_a_plugin_transport_describes_itself(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    config = Config(**{**vars(config), "transports": {
        **config.transports, "coop": TransportConfig("coop", "pigeon", PigeonSettings())}})
    def create(name: str, settings: Any) -> Any:
        raise AssertionError("the export creates no transport")

    types = {**Registry.collect(build_plugin_manager()).transports,
             "pigeon": TransportType("pigeon", PigeonSettings, create, describe=describe_pigeon)}
    doc = build_document(config, types)
    assert doc["servers"]["coop"] == {"host": "north", "protocol": "pigeon"}
    assert doc["channels"]["coop.in"]["x-destination"] is False
    assert doc["servers"]["chat"]["protocol"] == "ws"  # the others are still there
    del types["pigeon"]
    assert "coop" not in build_document(config, types)["servers"]  # unknown type: left out


@pytest.mark.parametrize("kept", ["chat", "rabbit"])
def test_one_transport_alone_validates(tmp_path: Path, kept: str) -> None:
    """Each transport's part stands alone: the components it refers to are in the document,
    and the other transport's are not."""
    config = example_config(tmp_path)
    config = Config(**{**vars(config), "routes": (),
                       "transports": {kept: config.transports[kept]}})
    doc = build_document(config)
    (tmp_path / "doc.json").write_text(render(doc, "json"))
    (report,) = parse(tmp_path / "doc.json")
    assert report["valid"], report
    assert errors(report) == []
    assert ("dead_notification" in doc["components"]["messages"]) == (kept == "rabbit")
