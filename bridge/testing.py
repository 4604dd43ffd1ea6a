"""The pytest kit for plugin authors (and for bridged's own tests).

Installed as a pytest plugin (entry point ``pytest11``), it offers:

* :func:`run_bridge` - an async context manager that runs a daemon in-process from what
  ``bridge_config`` returned (an :class:`~bridge.assembly.Assembly`) or a config file's
  path, and drains it on exit;
* the ``bridge_config`` fixture - writes TOML text to a file in ``tmp_path`` (with
  ``[daemon] state_dir`` defaulting into ``tmp_path``) and assembles it with its plugins.

Plugins given in code (``extra_plugins``) are given once, to whichever of the two comes
first; giving the same objects to both also works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from .api import Config
from .assembly import Assembly, assemble
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


def with_plugins(source: Assembly | Config | Path | str, extra_plugins: Iterable[object] = ()
                 ) -> Assembly:
    """``source`` assembled with ``extra_plugins``. An assembly that already has them is
    returned as it is; otherwise its file is assembled again with them added."""
    extra = list(extra_plugins)
    if isinstance(source, Assembly):
        missing = [p for p in extra if not source.pm.is_registered(p)]
        if not missing:
            return source
        extra = [*source.extra_plugins, *missing]
        source = source.config.path
    elif isinstance(source, Config):
        source = source.path
    return assemble(source, extra_plugins=extra)


@asynccontextmanager
async def run_bridge(config: Assembly | Config | Path | str, *,
                     extra_plugins: Iterable[object] = ()) -> AsyncIterator[Daemon]:
    """Run a daemon for the duration of the block; on exit drain it and wait until done.
    ``config``: what ``bridge_config`` returned, or a config file's path; ``extra_plugins``
    are added to the plugins it was assembled with (see :func:`with_plugins`)."""
    daemon = Daemon(with_plugins(config, extra_plugins))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        try:
            yield daemon
        finally:
            daemon.request_stop()
            await daemon.stopped.wait()


@pytest.fixture
def bridge_config(tmp_path: Path) -> Callable[..., Assembly]:
    """``bridge_config(toml_text, extra_plugins=())`` -> the config written to
    ``tmp_path/bridged.toml`` (state in ``tmp_path/state``), checked and assembled with its
    plugins: an :class:`~bridge.assembly.Assembly` (``.config`` is the checked config)."""

    def make(text: str, extra_plugins: Iterable[object] = ()) -> Assembly:
        return assemble(write_config(tmp_path, text), extra_plugins=extra_plugins)

    return make
