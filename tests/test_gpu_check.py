"""benchmarks/gpu_check.sh's parts that need no GPU: its arguments and, here, the skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})


def test_help_describes_the_check() -> None:
    out = run("--help")
    assert out.returncode == 0 and "--quick" in out.stdout and "BENCHMARKS.md" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--python"], "--python needs a path"),
    (["--python", "/nonexistent/python"], "no Python at '/nonexistent/python'"),
])
def test_bad_arguments_get_one_line_and_exit_2(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("gpu_check: ") and message in out.stderr
    assert out.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    out = run("--quick", "--no-write")
    assert out.returncode == 0
    assert out.stdout.strip() == ("gpu_check: skipped: no CUDA GPU here "
                                  "(torch.cuda.is_available() is False); nothing to check")
