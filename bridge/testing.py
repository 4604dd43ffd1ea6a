"""The pytest kit for plugin authors (and for bridged's own tests).

Installed as a pytest plugin (entry point ``pytest11``), it offers:

* :func:`run_bridge` - an async context manager that runs a daemon in-process from a config
  (a :class:`~bridge.config.Config`, a path, or TOML text) and drains it on exit;
* the ``bridge_config`` fixture - writes TOML text to a file in ``tmp_path`` (with
  ``[daemon] state_dir`` defaulting into ``tmp_path``) and loads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from .config import Config, load_config
from .daemon import Daemon

#: Two memory transports and one route between them: ``a -> b`` (route ``ab``).
MEMORY_AB = """
[transports.a]
type = "memory"
[transports.b]
type = "memory"
[[routes]]
name = "ab"
from = "a"
to = ["b"]
"""


def write_config(directory: Path, text: str, name: str = "bridged.toml") -> Path:
    """Write ``text`` as a config file in ``directory``; state goes to ``directory/state``
    unless the text sets ``state_dir`` itself."""
    if "state_dir" not in text:
        state = (directory / "state").as_posix()
        text = (f'[daemon]\nstate_dir = "{state}"\n' + text if "[daemon]" not in text
                else text.replace("[daemon]\n", f'[daemon]\nstate_dir = "{state}"\n', 1))
    path = directory / name
    path.write_text(text)
    return path


@asynccontextmanager
async def run_bridge(config: Config | Path | str, *, extra_plugins: Iterable[object] = ()
                     ) -> AsyncIterator[Daemon]:
    """Run a daemon for the duration of the block; on exit drain it and wait until done."""
    extra_plugins = list(extra_plugins)
    if isinstance(config, str | Path):
        config = load_config(config, extra_plugins=extra_plugins)
    daemon = Daemon(config, extra_plugins=extra_plugins)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        try:
            yield daemon
        finally:
            daemon.request_stop()
            await daemon.stopped.wait()


@pytest.fixture
def bridge_config(tmp_path: Path) -> Callable[..., Config]:
    """``bridge_config(toml_text, extra_plugins=())`` -> a loaded
    :class:`~bridge.config.Config` (state in ``tmp_path/state``)."""

    def make(text: str, extra_plugins: Iterable[object] = ()) -> Config:
        return load_config(write_config(tmp_path, text), extra_plugins=extra_plugins)

    return make
