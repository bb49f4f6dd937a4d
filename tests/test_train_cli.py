"""`saestream train`: activations on disk in, a checkpoint out; bad input is one line, exit 2."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from safetensors.torch import save_file

from saestream.consumer.checkpoint import load_snapshot
from saestream.consumer.train_cli import ShuffledBatches, train

D_IN = 16


@pytest.fixture
def acts_npy(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "acts.npy"
    np.save(path, (rng.standard_normal((1000, D_IN)) * 2 + 1).astype(np.float32))
    return path


def invoke(*args: str):
    return CliRunner().invoke(train, list(args), catch_exceptions=False)


SMALL = ("--latents", "64", "--k", "4", "--batch-size", "128", "--log-interval", "0")


def test_train_on_npy_writes_a_checkpoint_as_a_real_process(tmp_path, acts_npy):
    out = tmp_path / "ck"
    res = run_cli(
        [
            "train",
            "--input",
            str(acts_npy),
            "--hook",
            "model.layers.1",
            *SMALL,
            "--steps",
            "12",
            "--out",
            str(out),
        ],
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    if platform.libc_ver()[0] == "glibc":  # consumer/heap.py, on the CPU
        assert "on cpu (freed memory kept for reuse)" in res.stdout
    progress = [line for line in res.stdout.splitlines() if line.startswith("step ")]
    assert progress and progress[-1].startswith("step 12/12")
    for word in ("tok/s", "nmse", "dead", "L0"):
        assert word in progress[-1]
    snap = out / "step-00000012"
    assert (out / "latest").read_text().strip() == snap.name
    d = snap / "model.layers.1"
    assert {"sae.safetensors", "cfg.json"} <= {p.name for p in d.iterdir()}
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["hook"] == "model.layers.1" and cfg["model"] is None and cfg["k"] == 4
    trainers, extra = load_snapshot(snap)
    t = trainers["model.layers.1"]
    assert t.step == 12 and t.tokens_seen == 12 * 128 and extra["input"] == str(acts_npy)


def test_train_on_safetensors_with_tokens_budget_and_name(tmp_path):
    path = tmp_path / "acts.safetensors"
    save_file({"acts": torch.randn(500, D_IN).bfloat16(), "other": torch.zeros(2)}, str(path))
    out = tmp_path / "ck"
    res = invoke(
        "--input",
        str(path),
        "--tensor",
        "acts",
        "--hook",
        "h",
        "--name",
        "sae1",
        *SMALL,
        "--tokens",
        "300",
        "--input-normalization",
        "scalar",
        "--multi-topk",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    t = load_snapshot(out / "step-00000003")[0]["sae1"]  # ceil(300 / 128) steps
    assert t.hook == "h" and t.sae_cfg.multi_topk and t.sae.input_scale is not None
    assert t.tokens_seen == 300  # the last batch cut: exactly --tokens


def test_default_is_one_pass_and_batches_cover_every_token_once_per_pass(tmp_path, acts_npy):
    res = invoke("--input", str(acts_npy), "--hook", "h", *SMALL, "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "step-00000008").is_dir()  # ceil(1000 / 128)
    # exactly the file's 1000 rows: the eighth batch is cut to 104, not filled up with 24
    # rows of a second pass (4097 rows at the default batch trained 8192 tokens)
    assert json.loads((tmp_path / "o" / "step-00000008" / "extra.json").read_text())[
        "tokens"] == 1000
    b = ShuffledBatches(10, 4, seed=0)
    two_passes = np.concatenate([b.next() for _ in range(5)])
    assert np.bincount(two_passes).tolist() == [2] * 10
    assert len({tuple(b.next()) for _ in range(5)}) > 1  # shuffled, not a fixed order


def _write(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.mark.parametrize(
    "case",
    ["missing", "wrong_shape", "nan", "int", "k_gt_latents", "zero_batch", "not_npy", "both",
     "long_name", "newline_name"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, acts_npy, case):
    good = ["--input", str(acts_npy), "--hook", "h", "--latents", "64", "--k", "4"]
    args = {
        "missing": ["--input", str(tmp_path / "nope.npy"), "--hook", "h"],
        "wrong_shape": [
            "--input",
            str(_write(tmp_path, "a.npy", np.zeros((4, 5, 6), "f4"))),
            "--hook",
            "h",
        ],
        "nan": ["--input", str(_write(tmp_path, "a.npy", _with_nan())), "--hook", "h"],
        "int": ["--input", str(_write(tmp_path, "a.npy", np.zeros((9, 4), "i4"))), "--hook", "h"],
        "k_gt_latents": [*good[:4], "--latents", "64", "--k", "65"],
        "zero_batch": [*good, "--batch-size", "0"],
        "not_npy": ["--input", str(_text_file(tmp_path)), "--hook", "h"],
        "both": [*good, "--tokens", "10", "--steps", "1"],
        "long_name": [*good, "--name", "x" * 300],  # trained, then lost: no snapshot folder
        "newline_name": [*good, "--name", "a\nb"],
    }[case]
    res = invoke(*args, "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error: ")
    assert not (tmp_path / "out").exists()


def _with_nan() -> np.ndarray:
    a = np.ones((50, 4), np.float32)
    a[17, 2] = np.nan
    return a


def _text_file(tmp_path):
    p = tmp_path / "acts.npy"
    p.write_text("not numpy")
    return p


def test_bad_input_as_a_real_process(tmp_path):
    path = _write(tmp_path, "a.npy", _with_nan())
    res = run_cli(
        ["train", "--input", str(path), "--hook", "h", "--out", str(tmp_path / "o")], timeout=120
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"saestream: error: {path}: NaN or infinite value in row 17"


def test_help_documents_every_flag():
    res = invoke("--help")
    assert res.exit_code == 0
    for flag in (
        "--input",
        "--hook",
        "--latents",
        "--k",
        "--k-aux",
        "--multi-topk",
        "--batch-size",
        "--tokens",
        "--steps",
        "--lr",
        "--input-normalization",
        "--seed",
        "--device",
        "--out",
    ):
        assert flag in res.output
