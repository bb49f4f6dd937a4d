"""The embedded model's cache never leaves a daemon in a crash loop: a damaged cache is
rebuilt once, a killed build's leftovers are removed, and SIGTERM during a build is honoured
within seconds without leaving a half-written cache behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_tcp_port, saestream_cmd

from saestream.producer.models import load_model, smollm2_cache_path

pytestmark = pytest.mark.slow  # each cache build dequantises the GGUF: ~15-25 s on 2 cores

STOP_WITHIN_S = 20.0
"""How long SIGTERM may take during a build: a promise of 'a few seconds', with room for a
loaded 2-core machine (systemd's default stop timeout is 90 s)."""


def test_a_truncated_cache_is_rebuilt_once_and_killed_builds_are_cleaned_up(
    smollm2_cache: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "models"
    shutil.copytree(smollm2_cache, cache)
    weights = smollm2_cache_path(cache) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:  # what a full disk or a kill during a copy leaves
        fh.truncate(size // 2)
    stale = cache / ".smollm2-135m-killed"  # what a kill -9 during a build leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * (1 << 20))

    lm = load_model("smollm2-135m", device="cpu", cache_dir=cache)

    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert weights.stat().st_size == size
    assert not stale.exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".smollm2-135m-")] == []


def test_sigterm_during_the_cache_build_stops_the_producer_and_leaves_no_partial_cache(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "models"
    log_path = tmp_path / "producer.log"
    port = free_tcp_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            saestream_cmd("producer", "--model", "smollm2-135m", "--cache-dir", str(cache),
                          "--connect", f"tcp://127.0.0.1:{port}", "--max-tokens", "100",
                          "--threads", "1"),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 120
        while "building the smollm2-135m cache" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the cache build never started"
            time.sleep(0.1)
        time.sleep(2.0)  # well into the build
        assert proc.poll() is None, "the build finished before it could be interrupted"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_WITHIN_S + 10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert code == 0, out
    assert took < STOP_WITHIN_S, f"SIGTERM took {took:.1f} s during the cache build"
    assert "Traceback" not in out
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".smollm2-135m-")]
    assert leftovers == []
    target = smollm2_cache_path(cache)
    # Never half-used: either no cache, or (had the build just finished) a complete one.
    assert not target.exists() or (target / "saestream-cache.json").is_file()
