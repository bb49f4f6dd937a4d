"""Checkpoints: layout, atomic writes, exact round trip, reading by a plain script."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import saestream.consumer.checkpoint as ckpt
from saestream.consumer.checkpoint import (
    CheckpointError,
    list_snapshots,
    load_latest,
    load_snapshot,
    prune_snapshots,
    save_snapshot,
)
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig

D_IN = 16


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every test sees the same random data


def trained(name="h", steps=3, norm="layer_norm", seed=0, **kw) -> Trainer:
    t = Trainer(
        SAEConfig(d_in=D_IN, n_latents=48, k=4, input_normalization=norm),
        TrainerConfig(dead_tokens=100, k_aux=8, seed=seed, **kw),
        name=name,
        hook=f"model.layers.{seed}",
        model="tiny",
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        t.train_step(torch.randn(64, D_IN, generator=g) * 3 + 1)
    return t


def test_snapshot_layout_and_cfg(tmp_path):
    a, b = trained("a"), trained("b", norm="scalar", seed=1)
    path = save_snapshot(tmp_path, 3, {"a": a, "b": b}, extra={"tokens": {"p1": 192}})
    assert path == tmp_path / "step-00000003"
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["a", "b", "extra.json"]
    assert json.loads((path / "extra.json").read_text()) == {"tokens": {"p1": 192}}
    for name in ("a", "b"):
        d = path / name
        assert {p.name for p in d.iterdir()} >= {"sae.safetensors", "cfg.json", "trainer.pt"}
        with safe_open(str(d / "sae.safetensors"), framework="pt") as f:
            assert sorted(f.keys()) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
            assert all(f.get_tensor(key).dtype == torch.float32 for key in f.keys())
            assert f.get_tensor("W_dec").shape == (48, D_IN)
        torch.load(d / "trainer.pt", weights_only=True)
    cfg = json.loads((path / "b" / "cfg.json").read_text())
    assert cfg["activation"] == "topk" and cfg["normalize_decoder"] is True
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["multi_topk"]) == (D_IN, 48, 4, False)
    assert cfg["input_normalization"] == "scalar" and cfg["input_scale"] == b.sae.input_scale
    assert cfg["hook"] == "model.layers.1" and cfg["model"] == "tiny"
    assert cfg["saestream_version"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_save_load_round_trip_gives_identical_outputs_and_training(tmp_path):
    t = trained(ema_decay=None)
    path = save_snapshot(tmp_path, t.step, {"h": t})
    loaded, extra = load_snapshot(path)
    u = loaded["h"]
    assert extra == {}
    assert (u.step, u.tokens_seen, u.mse_scale, u.hook, u.model) == (
        t.step,
        t.tokens_seen,
        t.mse_scale,
        t.hook,
        t.model,
    )
    assert torch.equal(u.tokens_since_fired, t.tokens_since_fired)
    x = torch.randn(32, D_IN) * 3
    assert torch.equal(u.sae(x).x_hat, t.sae(x).x_hat)
    # Continues exactly: optimiser moments, counters and constants all came back.
    y = torch.randn(64, D_IN) * 3 + 1
    assert t.train_step(y) == u.train_step(y)
    for (n, p), q in zip(t.sae.named_parameters(), u.sae.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_ema_snapshot_saves_ema_weights_and_resumes_raw_ones(tmp_path):
    t = trained(ema_decay=0.9)
    path = save_snapshot(tmp_path, t.step, {"h": t})
    with safe_open(str(path / "h" / "sae.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("W_dec"), t.export_weights()["W_dec"])
    u = load_snapshot(path)[0]["h"]
    y = torch.randn(64, D_IN)
    assert t.train_step(y) == u.train_step(y)
    assert torch.equal(t.export_weights()["W_dec"], u.export_weights()["W_dec"])


PLAIN_SCRIPT = textwrap.dedent(
    """
    # Uses only json, safetensors and numpy: no saestream, no torch.
    import json, sys
    import numpy as np
    from safetensors.numpy import load_file

    d = sys.argv[1]
    cfg = json.load(open(d + "/cfg.json"))
    w = load_file(d + "/sae.safetensors")
    x = np.load(sys.argv[2]).astype(np.float64)
    if cfg["input_normalization"] == "layer_norm":
        mu = x.mean(1, keepdims=True)
        sd = x.std(1, ddof=1, keepdims=True) + cfg["layer_norm_eps"]
        xn = (x - mu) / sd
    elif cfg["input_normalization"] == "scalar":
        xn = x * cfg["input_scale"]
    else:
        xn = x
    pre = (xn - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]
    idx = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    z = np.zeros_like(pre)
    np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    x_hat = z @ w["W_dec"] + w["b_dec"]
    if cfg["input_normalization"] == "layer_norm":
        x_hat = x_hat * sd + mu
    elif cfg["input_normalization"] == "scalar":
        x_hat = x_hat / cfg["input_scale"]
    np.save(sys.argv[3], x_hat)
    """
)


@pytest.mark.parametrize("norm", ["layer_norm", "scalar", "none"])
def test_a_plain_script_with_safetensors_and_json_runs_the_saved_sae(tmp_path, norm):
    import numpy as np

    t = trained(norm=norm)
    path = save_snapshot(tmp_path / "ck", t.step, {"h": t})
    script = tmp_path / "run_sae.py"
    script.write_text(PLAIN_SCRIPT)
    x = torch.randn(40, D_IN) * 3 + 1
    np.save(tmp_path / "x.npy", x.numpy())
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(path / "h"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        check=True,
        timeout=60,
    )
    got = torch.from_numpy(np.load(tmp_path / "y.npy")).float()
    torch.testing.assert_close(got, t.sae(x).x_hat, rtol=1e-4, atol=1e-4)


def test_latest_skips_a_corrupt_newest_snapshot(tmp_path, caplog):
    t = trained()
    save_snapshot(tmp_path, 1, {"h": t})
    bad = save_snapshot(tmp_path, 2, {"h": t})
    (bad / "h" / "sae.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        load_snapshot(bad)
    with caplog.at_level(logging.WARNING):
        path, trainers, _ = load_latest(tmp_path)
    assert path.name == "step-00000001" and "h" in trainers
    assert "step-00000002" in caplog.text
    assert load_latest(tmp_path / "nothing-here") is None


def test_missing_file_raises_checkpoint_error(tmp_path):
    path = save_snapshot(tmp_path, 5, {"h": trained()})
    (path / "h" / "trainer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trainer\.pt"):
        load_snapshot(path)


def test_failed_save_leaves_no_partial_snapshot(tmp_path, monkeypatch):
    t = trained()
    save_snapshot(tmp_path, 1, {"h": t})

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_tensors", broken)
    with pytest.raises(OSError):
        save_snapshot(tmp_path, 2, {"h": t})
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    t = trained()
    save_snapshot(tmp_path, 3, {"h": t}, extra={"n": 1})
    save_snapshot(tmp_path, 3, {"h": t}, extra={"n": 2})
    assert load_snapshot(tmp_path / "step-00000003")[1] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003"]


def test_list_and_prune_keep_the_newest_and_the_latest(tmp_path):
    t = trained(steps=1)
    for step in (5, 100, 7, 20):
        save_snapshot(tmp_path, step, {"h": t})
    (tmp_path / ".tmp-step-00000999-dead").mkdir()  # a crashed write is not a snapshot
    assert [p.name for p in list_snapshots(tmp_path)] == [
        "step-00000005",
        "step-00000007",
        "step-00000020",
        "step-00000100",
    ]
    prune_snapshots(tmp_path, keep=1)  # newest by step, and the one `latest` names
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000020", "step-00000100"]
    # Resuming follows `latest` (the snapshot written last), not the highest step number.
    assert load_latest(tmp_path)[0].name == "step-00000020"


def test_load_sae_reads_weights_only_from_any_way_of_naming_a_snapshot(tmp_path: Path) -> None:
    from saestream.consumer.checkpoint import CheckpointError, load_sae, sae_dirs

    a = Trainer(SAEConfig(d_in=6, n_latents=12, k=3, input_normalization="scalar"),
                TrainerConfig(), name="a", hook="h")
    b = Trainer(SAEConfig(d_in=6, n_latents=8, k=2), TrainerConfig(seed=1), name="b", hook="h")
    x = torch.randn(32, 6) * 3
    a.train_step(x)
    b.train_step(x)
    snap = save_snapshot(tmp_path, 1, {"a": a, "b": b})
    assert sae_dirs(tmp_path) == [snap / "a", snap / "b"]  # checkpoint dir: follows latest
    assert sae_dirs(snap) == [snap / "a", snap / "b"]
    assert sae_dirs(snap / "b") == [snap / "b"] == sae_dirs(tmp_path, "b")
    loaded = load_sae(snap / "a")
    assert loaded.name == "a" and loaded.cfg["hook"] == "h"
    assert loaded.sae.input_scale == a.sae.input_scale
    with torch.no_grad():
        assert torch.equal(loaded.sae(x).x_hat, a.sae(x).x_hat)
    with pytest.raises(CheckpointError, match="no SAE named"):
        sae_dirs(snap, "c")
    (snap / "b" / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_sae(snap / "b")
    with pytest.raises(CheckpointError):
        sae_dirs(tmp_path / "missing")


@pytest.mark.parametrize("damage, message", [
    ("nan", "encoder.weight holds NaN or infinite values"),
    ("inf", "b_dec holds NaN or infinite values"),
    ("int", "encoder.bias holds int32 values, not floating point"),
    ("scale0", "cfg.json's input_scale 0 is not a positive number"),
    ("scale-nan", "cfg.json's input_scale nan is not a positive number"),
    ("scale-bool", "cfg.json's input_scale True is not a positive number"),
    ("model-list", "cfg.json's model is not a string"),
])
def test_load_sae_refuses_weights_and_settings_no_evaluation_can_use(
    tmp_path: Path, damage: str, message: str
) -> None:
    """Each of these once gave a table of NaN, a ZeroDivisionError or a TypeError later."""
    from safetensors.torch import load_file, save_file

    from saestream.consumer.checkpoint import CheckpointError, load_sae

    t = Trainer(SAEConfig(d_in=6, n_latents=12, k=3, input_normalization="scalar"),
                TrainerConfig(), name="a", hook="h")
    t.train_step(torch.randn(32, 6))
    d = save_snapshot(tmp_path, 1, {"a": t}) / "a"
    weights = load_file(d / "sae.safetensors")
    cfg = json.loads((d / "cfg.json").read_text())
    if damage == "nan":
        weights["encoder.weight"][1, 2] = float("nan")
    elif damage == "inf":
        weights["b_dec"][0] = float("-inf")
    elif damage == "int":
        weights["encoder.bias"] = weights["encoder.bias"].to(torch.int32)
    elif damage.startswith("scale"):
        cfg["input_scale"] = {"scale0": 0, "scale-nan": float("nan"), "scale-bool": True}[damage]
    else:
        cfg["model"] = ["tiny"]
    save_file(weights, d / "sae.safetensors")
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_sae(d)
    assert str(err.value) == f"{d}: {message}"


def test_hostile_names_in_a_checkpoint_dir_are_refused_not_followed(tmp_path: Path) -> None:
    from saestream.consumer.checkpoint import CheckpointError, check_complete, latest_name, sae_dirs

    snap = save_snapshot(tmp_path, 1, {"h": trained()})
    (tmp_path / "latest").write_bytes(b"\xff\xfe\n")  # not text
    assert latest_name(tmp_path) is None
    with pytest.raises(CheckpointError, match="latest does not name a snapshot"):
        sae_dirs(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        sae_dirs(snap / "extra.json")
    extra = json.loads((snap / "extra.json").read_text())
    for bad in ({"buffers": "x"}, {"buffers": [1, 2]}, {"buffers": {"h": "../../etc/passwd"}},
                {"saes": {"../elsewhere": {}}}):
        (snap / "extra.json").write_text(json.dumps({**extra, **bad}))
        with pytest.raises(CheckpointError):
            check_complete(snap)


def test_snapshot_weights_are_readable_like_the_rest_of_the_snapshot(tmp_path: Path) -> None:
    """safetensors writes its files 0o600: a daemon of another user could read the folders
    and cfg.json of a snapshot but not its weights."""
    import os

    snap = save_snapshot(tmp_path, 1, {"h": trained()}, buffers=None)
    mode = (snap / "h" / "cfg.json").stat().st_mode & 0o777
    assert mode & 0o044  # the default umask leaves files readable by group and others
    assert (snap / "h" / "sae.safetensors").stat().st_mode & 0o777 == mode
    old = os.umask(0o077)
    try:
        private = save_snapshot(tmp_path, 2, {"h": trained()})
    finally:
        os.umask(old)
    assert (private / "h" / "sae.safetensors").stat().st_mode & 0o777 == 0o600  # as asked


def test_a_fifo_in_place_of_the_weights_is_refused_not_waited_on(tmp_path: Path) -> None:
    import os

    from saestream.consumer.checkpoint import CheckpointError, load_sae

    d = save_snapshot(tmp_path, 1, {"h": trained()}) / "h"
    (d / "sae.safetensors").unlink()
    os.mkfifo(d / "sae.safetensors")  # opening it for reading would wait for a writer
    with pytest.raises(CheckpointError, match=r"sae\.safetensors is not a regular file"):
        load_sae(d)
