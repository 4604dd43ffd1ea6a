"""Logs: one JSON object per line when asked; chat text never at info level or above."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import running_service

from bridge import ContractError, Message, hookimpl
from bridge.assembly import assemble
from bridge.logs import JsonFormatter, setup_logging
from bridge.testing import MEMORY_AB, write_config


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_format_writes_one_object_per_line(root_logging: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json", "info")
    log = logging.getLogger("bridge.test")
    log.info("two\nlines", extra={"chat_id": "c1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed on %s", "m1")
    log.debug("not at info level")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "two\nlines"
    assert first["level"] == "info"
    assert first["logger"] == "bridge.test"
    assert first["chat_id"] == "c1"
    assert isinstance(first["ts"], float)
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exc"]


def test_json_ignores_what_other_formatters_add() -> None:
    record = logging.makeLogRecord({"msg": "x %s", "args": ("y",), "levelname": "INFO"})
    logging.Formatter("%(asctime)s %(message)s").format(record)  # sets message, asctime
    entry = json.loads(JsonFormatter().format(record))
    assert set(entry) == {"ts", "level", "logger", "msg"}
    assert entry["msg"] == "x y"


def test_text_format_is_one_line_per_event(root_logging: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text", "info")
    logging.getLogger("bridge.test").info("transport %s started", "ws")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("INFO    bridge.test: transport ws started")


def _journal_env(path: Path) -> dict[str, str]:
    """``$JOURNAL_STREAM`` naming the file at ``path``, as systemd names its stream."""
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_on_the_journal_stream_every_line_carries_its_priority(
        root_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        setup_logging("text", "debug", environ=_journal_env(path))
        log = logging.getLogger("bridge.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("e")
        log.critical("c")
    lines = path.read_text().splitlines()
    assert lines[:4] == ["<7>DEBUG   bridge.test: d", "<6>INFO    bridge.test: i",
                         "<4>WARNING bridge.test: w", "<3>ERROR   bridge.test: e"]
    assert lines[-1] == "<2>CRITICAL bridge.test: c"
    traceback = lines[4:-1]  # journald splits at newlines: every line keeps the priority
    assert traceback[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in traceback)


def test_json_on_the_journal_stream_and_no_prefix_elsewhere(
        root_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, other = tmp_path / "journal", tmp_path / "other"
    other.touch()
    with journal.open("w") as stream:  # a stderr that is not the stream the variable names
        monkeypatch.setattr(sys, "stderr", stream)
        setup_logging("text", "info", environ=_journal_env(other))
        logging.getLogger("bridge.test").error("e")
    assert journal.read_text().startswith("20")  # the timestamp, no priority
    with journal.open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        setup_logging("json", "info", environ=_journal_env(journal))
        logging.getLogger("bridge.test").error("e")
    (line,) = journal.read_text().splitlines()
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["msg"] == "e"


def test_the_daemon_refusing_its_config_logs_at_error_priority(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[daemon]\nhop_limit = 0\n" + MEMORY_AB)
    stderr = tmp_path / "stderr"
    stderr.touch()
    env = {**os.environ, **_journal_env(stderr)}
    with stderr.open("w") as fd:
        code = subprocess.run([sys.executable, "-m", "bridge", "run", "-c", str(config)],
                              env=env, stderr=fd, stdout=subprocess.DEVNULL, timeout=60,
                              check=False).returncode
    assert code == 1
    lines = stderr.read_text().splitlines()
    assert lines
    assert all(line.startswith("<3>ERROR   bridge: config: ") for line in lines), lines
    assert any("hop_limit" in line for line in lines)


class _RejectSome:
    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if message.body["message"][0]["text"].startswith("REJECT"):
            raise ContractError("message.0.text: not allowed here", field="message.0.text")


async def test_chat_text_is_never_logged_at_info_or_above(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = assemble(write_config(tmp_path, """
[admin]
port = 0
""" + MEMORY_AB), extra_plugins=[_RejectSome()])
    async with running_service(config) as service:
        a: Any = service.daemon.transports["a"]
        for text in ("TOP-SECRET-CHAT-TEXT", "REJECT-TOP-SECRET-CHAT-TEXT"):
            body = {"type": "update", "message": [{"type": "message", "text": text}]}
            await a.inject(body, chat_id="c1")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any("rejected message" in r.getMessage() for r in loud)  # the rejection is logged
    assert all("TOP-SECRET-CHAT-TEXT" not in r.getMessage() for r in loud)
