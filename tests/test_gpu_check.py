"""benchmarks/gpu_check.sh's parts that need no GPU: its arguments and, here, the skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def run(*args: str, path: str = "/usr/bin:/bin", python: str = sys.executable
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": path, "PYTHON": python})


def test_help_describes_the_check() -> None:
    out = run("--help")
    assert out.returncode == 0 and "--quick" in out.stdout and "BENCHMARKS.md" in out.stdout
    assert "--wheelhouse" in out.stdout and "set -" not in out.stdout  # the comment block only


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--python"], "--python needs a path"),
    (["--python", "/nonexistent/python"], "no Python at '/nonexistent/python'"),
    (["--wheelhouse"], "--wheelhouse needs a path"),
    (["--wheelhouse", "/nonexistent/wheels"], "no wheelhouse folder '/nonexistent/wheels'"),
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


def test_a_python_without_torch_fails_rather_than_skips(tmp_path: Path) -> None:
    """No torch is no answer: on a GPU machine a skip there would pass without checking."""
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # no site: no torch
    bare.chmod(0o755)
    out = run("--no-write", python=str(bare))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("gpu_check: torch does not import") and "torch" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_this_torch_cannot_use_fails_rather_than_skips(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU, torch sees none (a CPU build, a driver mismatch): exit 1."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    out = run("--no-write", path=f"{tmp_path}:/usr/bin:/bin")
    assert out.returncode == 1 and out.stdout == ""
    assert "nvidia-smi lists a GPU, but this torch" in out.stderr and "cannot use it" in out.stderr
