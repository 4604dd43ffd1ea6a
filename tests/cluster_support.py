"""Cluster mode under test: several real ``bridged run`` processes on one RabbitMQ vhost and
one PostgreSQL schema of the test's own (dropped afterwards)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio
from e2e_support import Running, running
from ops_support import REPO

DSN = "postgresql://postgres@127.0.0.1:5432/test"
CLUSTER_EXAMPLE = REPO / "config.cluster.example.toml"


def _drop(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@asynccontextmanager
async def fresh_schema(dsn: str = DSN) -> AsyncIterator[str]:
    """A PostgreSQL schema name for one test; the schema is dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_drop, dsn, schema)


def cluster_config(directory: Path, amqp_url: str, schema: str, *, dsn: str = DSN,
                   extra: str = "") -> Path:
    """config.cluster.example.toml with only what isolation needs changed: ports 0 (each
    instance binds its own; the test connects to each), state under ``directory``, the
    broker URL (a vhost of the test), the database URL and schema."""
    text = CLUSTER_EXAMPLE.read_text()
    for old, new in [
        ('state_dir = "state/cluster-{instance}"',
         f'state_dir = "{(directory / "state-{instance}").as_posix()}"'),
        ("port = 9100", "port = 0"),
        ("port = 3000", "port = 0"),
        ('url = "amqp://guest:guest@127.0.0.1:5672/"', f'url = "{amqp_url}"'),
        ('database_url = "postgresql://postgres@127.0.0.1:5432/test"',
         f'database_url = "{dsn}"'),
        ('schema = "bridged"', f'schema = "{schema}"'),
    ]:
        assert text.count(old) == 1, f"config.cluster.example.toml no longer has {old!r} once"
        text = text.replace(old, new)
    path = directory / "cluster.toml"
    path.write_text(text + extra)
    return path


@asynccontextmanager
async def instances(config: Path, names: list[str],
                    extra_env: dict[str, str] | None = None
                    ) -> AsyncIterator[dict[str, Running]]:
    """``bridged run`` once per name (``BRIDGED_INSTANCE``), each READY before the block."""
    async with AsyncExitStack() as stack:
        out = {}
        for name in names:
            out[name] = await stack.enter_async_context(running(
                config, log_name=f"bridged-{name}.stderr",
                extra_env={"BRIDGED_INSTANCE": name, **(extra_env or {})}))
        yield out


def offset(event_id: str) -> int:
    """The chat offset in a cluster event id (``9<epoch:3><offset:16>``)."""
    assert len(event_id) == 20, event_id
    assert event_id[0] == "9", event_id
    return int(event_id[4:])


def texts(frame: dict[str, Any]) -> list[str]:
    return [item["text"] for item in frame["message"]]
