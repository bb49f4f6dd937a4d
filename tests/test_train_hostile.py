"""Hostile files and a hostile disk meet `saestream train` and `saestream consumer --resume`:
one line on stderr (`saestream: error: ...`) and a plain exit code, never a traceback, a
hang, NaN weights reported as success, or a training run lost without a word."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import free_tcp_port, run_cli, saestream_cmd

from saestream.consumer.checkpoint import TEMP_PREFIXES, load_snapshot, write_run_id
from saestream.consumer.train_cli import train

D_IN = 16
SMALL = ("--latents", "64", "--k", "4", "--batch-size", "64", "--log-interval", "0")
DEEP = "[" * 100_000 + "]" * 100_000


def invoke(*args: str):
    return CliRunner().invoke(train, list(args), catch_exceptions=False)


def one_error_line(text: str) -> str:
    """The output's only line, which must be a `saestream: error:` line."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error: "), text
    return lines[0]


def rows(n: int = 400, d: int = D_IN) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    """A real `saestream train` snapshot of an SAE named h (its folder: snapshot/h)."""
    np.save(tmp_path / "src.npy", rows())
    res = invoke("--input", str(tmp_path / "src.npy"), "--hook", "h", *SMALL, "--steps", "2",
                 "--out", str(tmp_path / "src"))
    assert res.exit_code == 0, res.output
    return tmp_path / "src" / "step-00000002"


# -- 1: FIFOs in a checkpoint directory ----------------------------------------------------------


@pytest.mark.parametrize("where", ["latest", "run.json", "extra.json"])
def test_resume_refuses_a_fifo_in_the_checkpoint_dir_instead_of_hanging(tmp_path, where):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if where != "run.json":
        write_run_id(ckpt, "run000000001")
    if where == "extra.json":
        (ckpt / "step-00000002").mkdir()
        (ckpt / "latest").write_text("step-00000002\n")
        fifo = ckpt / "step-00000002" / "extra.json"
    else:
        fifo = ckpt / where
    os.mkfifo(fifo)
    argv = saestream_cmd("consumer", "--bind", f"tcp://127.0.0.1:{free_tcp_port()}",
                         "--metrics-port", "0", "--hook", "h", "--sae", "latents=64,k=4",
                         "--checkpoint-dir", str(ckpt), "--resume")
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"saestream consumer --resume hung on a FIFO at {where}")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("saestream: error:")]
    assert len(errors) == 1, res.stderr
    if where == "extra.json":  # that snapshot is skipped, with the reason, and none is left
        assert "not a regular file" in res.stderr and "no readable snapshot" in errors[0]
    else:
        assert f"{fifo}: not a regular file" in errors[0], errors
    assert fifo.exists()  # nothing was deleted


# -- 2: deep JSON, non-numbers ---------------------------------------------------------------------


def test_resume_with_a_deeply_nested_run_file_is_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "run.json").write_text(DEEP)
    res = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{free_tcp_port()}",
                   "--metrics-port", "0", "--hook", "h", "--sae", "latents=64,k=4",
                   "--checkpoint-dir", str(ckpt), "--resume"], timeout=90)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "run.json" in res.stderr  # the warning says which file was ignored


@pytest.mark.parametrize("damage", ["deep", "d_in-infinity", "d_in-nan", "d_in-fraction",
                                    "num_latents-huge", "num_latents-overflow", "a million"])
def test_init_from_a_hostile_cfg_json_is_one_line(tmp_path, snapshot, damage):
    cfg_path = snapshot / "h" / "cfg.json"
    if damage == "deep":
        cfg_path.write_text(DEEP)
    elif damage == "a million":  # values: refused before they are built
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps({**cfg, "junk": [{}] * (1 << 20)}))
    else:
        key, value = {"d_in-infinity": ("d_in", "Infinity"), "d_in-nan": ("d_in", "NaN"),
                      "d_in-fraction": ("d_in", "16.5"),
                      "num_latents-huge": ("num_latents", str(1 << 62)),
                      "num_latents-overflow": ("num_latents", str(10**20))}[damage]
        text = cfg_path.read_text()
        old = f'"{key}": {json.loads(text)[key]}'
        assert old in text
        cfg_path.write_text(text.replace(old, f'"{key}": {value}'))
    np.save(tmp_path / "a.npy", rows())
    res = invoke("--input", str(tmp_path / "a.npy"), "--hook", "h", "--steps", "2",
                 "--init-from", str(snapshot), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    line = one_error_line(res.output)
    assert "--init-from" in line
    assert damage != "a million" or "more than 1,048,576 JSON values" in line
    assert not (tmp_path / "out").exists()


# -- 3: input files numpy and safetensors can hold but training cannot read as is ----------------


@pytest.mark.parametrize("dtype", [">f4", ">f2", ">f8"])
def test_big_endian_npy_trains_exactly_as_little_endian(tmp_path, dtype):
    data = rows().astype(dtype.replace(">", "<"))
    np.save(tmp_path / "le.npy", data)
    np.save(tmp_path / "be.npy", data.astype(dtype))
    assert np.load(tmp_path / "be.npy").dtype.str == dtype
    weights = []
    for name in ("le", "be"):
        res = invoke("--input", str(tmp_path / f"{name}.npy"), "--hook", "h", *SMALL,
                     "--steps", "3", "--out", str(tmp_path / name / "ck"))
        assert res.exit_code == 0, res.output
        trainers, _ = load_snapshot(tmp_path / name / "ck" / "step-00000003")
        weights.append(trainers["h"].sae.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.mark.parametrize("dtype", ["longdouble", "complex64"])
def test_npy_of_a_dtype_training_cannot_read_is_one_line(tmp_path, dtype):
    if dtype == "longdouble" and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is float64 on this platform")
    np.save(tmp_path / "a.npy", rows().astype(dtype))
    res = invoke("--input", str(tmp_path / "a.npy"), "--hook", "h", *SMALL, "--steps", "2",
                 "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert "expected float16, float32 or float64" in one_error_line(res.output)


@pytest.mark.parametrize("header", [
    DEEP.encode(),
    b'{"x": {"dtype": "F32", "shape": ' + DEEP.encode() + b', "data_offsets": [0, 4]}}',
    b'{"__metadata__": ' + ("{\"a\":" * 50_000 + "1" + "}" * 50_000).encode() + b"}",
    # a million tiny values: 3 bytes each in the file, 64 bytes each once parsed
    b'{"junk": [' + b"[]," * (1 << 20) + b'[]], "x": {"dtype": "F32", "shape": [1, 1], '
    b'"data_offsets": [0, 4]}}',
])
def test_safetensors_with_a_deeply_nested_header_is_one_line(tmp_path, header):
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    res = invoke("--input", str(path), "--hook", "h", *SMALL, "--steps", "2",
                 "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    line = one_error_line(res.output)
    assert "not a readable .safetensors file" in line
    assert b"junk" not in header or "more than 1,048,576 JSON values" in line


# -- 4: the disk fills up during training ---------------------------------------------------------


def test_a_full_disk_at_the_end_does_not_lose_the_training(tmp_path):
    from test_guarantee_disk import fill, tmpfs_at  # imported here: it imports much more

    np.save(tmp_path / "a.npy", rows())
    rescue_tmp = tmp_path / "tmp"
    rescue_tmp.mkdir()
    with tmpfs_at(tmp_path / "mnt", "4m") as mnt:
        out = mnt / "ck"
        proc = subprocess.Popen(
            saestream_cmd("train", "--input", str(tmp_path / "a.npy"), "--hook", "h", *SMALL,
                          "--steps", "4000", "--out", str(out)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TMPDIR": str(rescue_tmp), "OMP_NUM_THREADS": "1"},
        )
        try:
            # It blocks on a full stdout pipe long before step 4000: the disk fills first.
            while not proc.stdout.readline().startswith("step "):  # type: ignore[union-attr]
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            os.kill(proc.pid, signal.SIGSTOP)
            fill(mnt)
            os.kill(proc.pid, signal.SIGCONT)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1, stderr
        line = one_error_line(stderr)
        assert "No space left on device" in line and str(out) in line, line
        # nothing in --out looks like a snapshot, nothing half-written is left there
        assert not [p for p in out.iterdir() if p.name.startswith(("step-", "latest"))]
        assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIXES)]
    assert "step 4000/4000" in stdout
    rescued = [p for p in rescue_tmp.iterdir() if p.name.startswith("saestream-rescue-")]
    assert len(rescued) == 1 and str(rescued[0] / "step-00004000") in line, line
    trainers, extra = load_snapshot(rescued[0] / "step-00004000")
    assert trainers["h"].step == 4000 and extra["source"] == "saestream train"
    assert (rescued[0] / "latest").read_text().strip() == "step-00004000"


# -- 5: layer norm over one dimension -------------------------------------------------------------


def test_layer_norm_over_one_dimension_is_refused_up_front(tmp_path):
    np.save(tmp_path / "a.npy", rows(d=1))
    res = invoke("--input", str(tmp_path / "a.npy"), "--hook", "h", "--latents", "8", "--k",
                 "1", "--batch-size", "64", "--steps", "3", "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert "layer_norm" in one_error_line(res.output)
    assert not (tmp_path / "out").exists()
    res = invoke("--input", str(tmp_path / "a.npy"), "--hook", "h", "--latents", "8", "--k",
                 "1", "--batch-size", "64", "--steps", "3", "--input-normalization", "none",
                 "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output


def test_consumer_refuses_layer_norm_at_d_in_1_before_binding(tmp_path):
    res = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{free_tcp_port()}",
                   "--metrics-port", "0", "--hook", "h", "--d-in", "1", "--sae",
                   "latents=8,k=1", "--checkpoint-dir", str(tmp_path / "ckpt")], timeout=90)
    assert res.returncode == 2, res.stderr
    assert "layer_norm needs d_in >= 2" in one_error_line(res.stderr)
    assert not (tmp_path / "ckpt").exists()


# -- seeds the generators underneath cannot take ----------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_the_generators_cannot_take_is_one_line(tmp_path, seed):
    """numpy's generator refused -1 and torch's overflowed past 2^64 - 1: tracebacks."""
    np.save(tmp_path / "x.npy", rows())
    res = run_cli(["train", "--input", str(tmp_path / "x.npy"), "--hook", "h", *SMALL,
                   "--steps", "1", "--seed", seed, "--out", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2
    assert "'--seed'" in one_error_line(res.stderr)
    res = run_cli(["consumer", "--hook", "h", "--sae", f"hook=h,latents=64,k=4,seed={seed}",
                   "--checkpoint-dir", str(tmp_path / "ckpt")], timeout=120)
    assert res.returncode == 2
    assert "seed must be in 0.." in one_error_line(res.stderr)


def test_a_npy_whose_declared_shape_overflows_is_one_line(tmp_path: Path) -> None:
    """numpy warned (two more lines on stderr) before it refused the size."""
    path = tmp_path / "overflow.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (2**62, 8)})
        fh.write(b"\0" * 64)
    res = run_cli(["train", "--input", str(path), "--hook", "h", "--latents", "16", "--k", "2",
                   "--out", str(tmp_path / "o"), "--device", "cpu"], timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("saestream: error: "), res.stderr
    assert "not a readable .npy file" in res.stderr
