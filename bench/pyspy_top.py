"""Summarise a py-spy ``-f raw`` profile (collapsed stacks): the functions with the most
samples on top of the stack (self) and anywhere in it (total), per thread.

    .venv/bin/python bench/pyspy_top.py PROFILE [--top 25] [--match TEXT]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="", help="only stacks containing this text")
    args = p.parse_args()
    self_: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    samples: collections.Counter[str] = collections.Counter()
    for line in Path(args.profile).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or (args.match and args.match not in stack):
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        names = [frame_name(f) for f in frames[1:]] or ["?"]
        samples[thread] += n
        self_[thread][names[-1]] += n
        for name in set(names):
            total[thread][name] += n
    for thread, n in samples.most_common():
        print(f"\n## {thread}: {n} samples")
        print("  self:")
        for name, c in self_[thread].most_common(args.top):
            print(f"    {c / n:6.1%}  {name}")
        print("  total:")
        for name, c in total[thread].most_common(args.top):
            print(f"    {c / n:6.1%}  {name}")


if __name__ == "__main__":
    main()
