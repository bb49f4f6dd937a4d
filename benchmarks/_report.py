"""Writes one benchmark's table into BENCHMARKS.md, replacing that benchmark's previous section."""

from __future__ import annotations

import fcntl
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {dev}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, write: bool = True) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md; prints it too. With `write`
    False (a script's --no-write) only prints `body`."""
    if not write:
        print(body)
        return
    command = "python " + shlex.join(sys.argv)  # quoted: the command re-runs as written
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- {name}:begin -->\n## {title}\n\n"
        f"Command: `{command}` — {stamp}\n\nMachine: {machine()}\n\n{body.strip()}\n"
        f"<!-- {name}:end -->"
    )
    print(section)
    with open(BENCHMARKS_MD, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read() or "# Benchmarks\n\nFigures measured by the scripts in `benchmarks/`.\n"
        pattern = re.compile(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: section, text)
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        fh.seek(0)
        fh.truncate()
        fh.write(text)
