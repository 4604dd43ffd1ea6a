"""The daemon's garbage-collector tuning (bridge.cli.tune_gc; why: BENCHMARKS.md scenario 5).
Checked in a child process so that this test process keeps its own collector settings."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc
from bridge.cli import GC_THRESHOLDS, tune_gc
assert gc.get_freeze_count() == 0
tune_gc()
assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()
assert GC_THRESHOLDS[0] >= 10_000
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
"""


def test_tune_gc_freezes_start_up_and_raises_the_young_threshold() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
