"""The distribution: one import namespace, `saestream`, built without warnings.

The wheel is built from a copy of the tracked files (as a clean clone would be) and installed
into a fresh virtual environment that borrows this one's dependencies through a `.pth` line,
so nothing is downloaded. Every module is then imported from a directory outside the
repository, which also catches a bare `import common` left anywhere in the code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("saestream.common", "saestream.producer", "saestream.consumer", "saestream.tools")


def _tracked_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(wheel path, everything the build printed)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    src = _tracked_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    # PYTHONDONTWRITEBYTECODE makes setuptools say it skips byte-compiling: not ours to report.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))",
         str(out)],
        cwd=src, capture_output=True, text=True, timeout=300, env=env,
    )
    assert build.returncode == 0, build.stderr
    name = build.stdout.strip().splitlines()[-1]
    return out / name, build.stdout + build.stderr


def test_wheel_builds_without_warnings(wheel: tuple[Path, str]) -> None:
    _, log = wheel
    lines = [ln for ln in log.splitlines() if "warning" in ln.lower() or "deprecat" in ln.lower()]
    assert not lines, "\n".join(lines)


def test_wheel_holds_only_the_saestream_namespace(wheel: tuple[Path, str]) -> None:
    path, _ = wheel
    tops = {n.split("/")[0] for n in zipfile.ZipFile(path).namelist()}
    assert tops == {"saestream", path.name.split("-")[0] + "-" + path.name.split("-")[1]
                    + ".dist-info"}
    names = zipfile.ZipFile(path).namelist()
    for pkg in PACKAGES:
        assert pkg.replace(".", "/") + "/__init__.py" in names


@pytest.mark.slow
def test_wheel_install_exposes_only_saestream(wheel: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # Dependencies come from this environment (a path line, not its .pth files: this
    # environment's editable hook for saestream is not run there).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(path) as zf:  # install = unpack a pure wheel into site-packages
        zf.extractall(site)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check = """
import importlib, importlib.util, pkgutil, sys
import saestream
assert saestream.__version__, "no __version__"
assert saestream.__file__.startswith(sys.argv[1]), saestream.__file__
for name in ("common", "producer", "consumer", "tools"):
    assert importlib.util.find_spec(name) is None, f"top-level {name} is importable"
mods = [m.name for m in pkgutil.walk_packages(saestream.__path__, "saestream.")]
for m in mods:
    if not m.endswith("__main__"):
        importlib.import_module(m)
from saestream.consumer import cpu_kernels  # its C source ships in the wheel and builds
assert cpu_kernels.SOURCE.is_file() and cpu_kernels.SOURCE.is_relative_to(sys.argv[1])
assert cpu_kernels.load() is not None, "the C kernels did not build from the wheel"
from saestream.common import wire  # so does the wire's byte regrouping
assert wire._KERNELS.source.is_relative_to(sys.argv[1])
assert wire._KERNELS.load() is not None, "the wire kernels did not build from the wheel"
print(len(mods))
"""
    env = {**os.environ, "SAESTREAM_CACHE": str(tmp_path / "kernels")}
    run = subprocess.run([py, "-c", check, str(site)], cwd=outside, capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip()) >= 30
    version = subprocess.run([py, "-m", "saestream", "--version"], cwd=outside,
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert "saestream" in version.stdout
