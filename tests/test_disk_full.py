"""A full disk is a transient fault (docs/operations.md, "Disk space"): the real daemon with
the example config and its state directory on a small tmpfs of the test's own. While the
disk is full nothing is confirmed that is not stored, notifications stay with the broker
(none dead-lettered), /readyz is not ready and the log says so in a few lines; once space
comes back the daemon recovers by itself. The SQLite WALs stay bounded, so a small state
directory does not fill itself."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

from amqp_support import notification, open_broker
from e2e_support import NAMES, chat, example_config, fresh_vhost, running
from trio_websocket import ConnectionClosed

from bridge_plugins.history import WAL_LIMIT_BYTES


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (the suite runs as root), unmounted after."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write to a file until the disk is full (again); the file."""
    filler = directory / "filler"
    with filler.open("ab", buffering=0) as f:  # unbuffered: nothing is left to flush on close
        while True:
            try:
                f.write(b"\0" * 65536)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return filler


def wal_sizes(state: Path) -> list[int]:
    return [p.stat().st_size for p in state.rglob("*.sqlite3-wal")]


async def test_a_full_disk_holds_everything_back_and_recovers_when_space_returns(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "2m") as state:
        async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
            config = example_config(tmp_path, vhost.url())
            config.write_text(config.read_text().replace(  # one client sends the load
                "max_message_bytes = 65536",
                "max_message_bytes = 65536\nrate_limit_per_s = 1e6\nrate_burst = 1000000", 1))
            async with running(config) as daemon, \
                    chat(daemon.ws_port, "alice") as alice, \
                    chat(daemon.ws_port, "user-1") as watcher:
                # Normal load first: 1,500 events, and the WALs stay within their bound.
                for window in range(30):
                    for i in range(50):
                        await alice.send(f"a{window}.{i} " + "x" * 200)
                    for _ in range(50):
                        await alice.next()
                assert max(wal_sizes(state)) <= 2 * WAL_LIMIT_BYTES, wal_sizes(state)
                await broker.publish(NAMES.queue, notification("user-1", "n0"))
                assert (await watcher.next())["message"][0]["text"] == "n0"

                filler = fill(state)
                # SQLite still writes into the room its files hold; soon it needs more.
                refused = None
                for i in range(5000):
                    await alice.send(f"while full {i} " + "x" * 200)
                    try:
                        await alice.next()
                    except ConnectionClosed as e:
                        refused = e.reason
                        break
                assert refused is not None, "every message was stored on a full disk"
                assert refused.code == 1013, refused  # try again later
                assert "store" in (refused.reason or ""), refused
                fill(state)  # what the failed write's checkpoint gave back
                # Notifications until the history too needs room it cannot get (each commit
                # takes at least a page of the WAL's remaining room), then five more.
                sent = 0
                for _ in range(100):
                    for _ in range(10):
                        sent += 1
                        await broker.publish(NAMES.queue, notification("user-1", f"n{sent}"))
                    status, body = await daemon.readyz()
                    if status == 503:
                        break
                assert status == 503, "every notification was stored on a full disk"
                assert "storage" in body["not_ready"], body
                for _ in range(5):
                    sent += 1
                    await broker.publish(NAMES.queue, notification("user-1", f"n{sent}"))
                assert await broker.ready(NAMES.dead) == 0  # nothing dead-lettered

                filler.unlink()  # space comes back
                got = [(await watcher.next())["message"][0]["text"] for _ in range(sent)]
                # each once; order is kept among the ones that waited (docs/architecture.md)
                assert sorted(got, key=lambda t: int(t[1:])) == [f"n{i}" for i in
                                                                  range(1, sent + 1)]
                assert got[-5:] == [f"n{i}" for i in range(sent - 4, sent + 1)]
                await daemon.until_readyz(200, within=15)
                assert await broker.ready(NAMES.dead) == 0
                assert await broker.ready(NAMES.queue) == 0  # every notification acked
                async with chat(daemon.ws_port, "bob") as bob:
                    await bob.say("after")
                assert await daemon.stop() == 0
            storage_lines = [m for m in daemon.messages() if "storage unavailable" in m]
            assert 1 <= len(storage_lines) <= 5, storage_lines  # rate-limited, not per message
            assert not [r for r in daemon.log() if "exc" in r and "disk is full" in r["exc"]]
