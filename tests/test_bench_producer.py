"""benchmarks/bench_producer.py end to end, one round of each comparison: its surgery on the
sending thread (`sending_cut` replaces `Sender._encode` and `Sender._push`) breaks silently
when the sender changes shape, and `make bench` is not run by CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_producer.py"


def test_the_producer_benchmark_runs_its_three_tables_on_the_tiny_model() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--rounds", "1",
                          "--no-write"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for heading in ("| model | device | model dtype | hook |",  # --no-write: no title
                    "### What the sending work costs the forward, by where it runs",
                    "### The producer with its sending thread cut down"):
        assert heading in out, out[-3000:]
    parts = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines()
             if line.startswith("| tiny |") and line.count("|") == 7}
    assert set(parts) == {"drops", "encodes", "sends", "(bare forward)"}, parts
    for side in ("drops", "encodes", "sends"):  # a ratio, a forward share, waits a batch
        ratio = float(parts[side][4].split("**")[1])
        share, waits = float(parts[side][5]), float(parts[side][6])
        assert 0.2 < ratio < 5 and 0.2 < share <= 1 and waits >= 0, parts[side]
