"""`saestream eval`: the downstream, reconstruction and progressive groups, checked by their
numbers (an exact SAE, a zero SAE, an independent spliced forward) and the command as a user
runs it."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from evalkit import sharpened_tiny, synthetic_ids
from test_guarantee_disk import fill, tmpfs_at

from saestream.common.errors import UserError
from saestream.consumer.checkpoint import load_sae, save_snapshot
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig
from saestream.evaluator.engine import CHEAP_GROUPS as GROUPS
from saestream.evaluator.engine import GROUPS as ALL_GROUPS
from saestream.evaluator.engine import EvalError, evaluate
from saestream.evaluator.options import one_model
from saestream.evaluator.progressive import progressive_ks
from saestream.evaluator.reconstruction import DENSITY_BIN_EDGES

HOOK = "model.layers.2"
D = 64  # the tiny model's d_model
T = 16
N_CONTEXTS = 6


@pytest.fixture(scope="module")
def lm():
    return sharpened_tiny()


@pytest.fixture(scope="module")
def ids(lm) -> torch.Tensor:
    return synthetic_ids(lm, N_CONTEXTS, T)


def trainer(name: str, n_latents: int, k: int, norm: str = "none", hook: str = HOOK) -> Trainer:
    return Trainer(SAEConfig(d_in=D, n_latents=n_latents, k=k, input_normalization=norm),
                   TrainerConfig(), name=name, hook=hook, model="tiny")


def exact_trainer() -> Trainer:
    """Latents ±e_j, k = d, no normalisation, b_dec 0: the top d of [x, −x] are |x_j|, so
    x̂ = Σ_j x_j e_j = x exactly."""
    t = trainer("exact", 2 * D, D)
    eye = torch.eye(D)
    with torch.no_grad():
        t.sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        t.sae.encoder.bias.zero_()
        t.sae.W_dec.copy_(torch.cat([eye, -eye]))
        t.sae.b_dec.zero_()
    return t


def zero_trainer() -> Trainer:
    """Every weight 0 and b_dec 0: x̂ = 0 whatever x is."""
    t = trainer("zero", 32, 4)
    with torch.no_grad():
        for p in t.sae.parameters():
            p.zero_()
    return t


def random_trainer(steps: int = 2) -> Trainer:
    """A layer_norm SAE trained a couple of steps on the tiny model's activations."""
    t = trainer("rand", 128, 8, norm="layer_norm")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t.train_step(torch.randn(256, D, generator=g) * 2 + 0.5)
    return t


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    trainers = {"exact": exact_trainer(), "zero": zero_trainer(), "rand": random_trainer()}
    return save_snapshot(root, 7, trainers)


@pytest.fixture(scope="module")
def results(lm, ids, snapshot) -> dict:
    saes = [(load_sae(snapshot / n), HOOK) for n in ("exact", "zero", "rand")]
    return evaluate(lm.model, ids, saes, GROUPS, batch_size=4)


def test_exact_reconstruction_costs_nothing(results) -> None:
    r = results["exact"]
    d = r["downstream"]
    assert abs(d["ce_zero"] - d["ce_clean"]) > 0.1  # the test is not vacuous
    assert d["delta_ce"] == pytest.approx(0, abs=1e-4)
    assert d["kl"] == pytest.approx(0, abs=1e-5)
    assert d["loss_recovered"] == pytest.approx(1, abs=1e-3)
    rec = r["reconstruction"]
    assert rec["normalized_mse"] == pytest.approx(0, abs=1e-10)
    assert rec["explained_variance"] == pytest.approx(1, abs=1e-10)
    assert 60 <= rec["l0"] <= D  # one of ±e_j per non-zero coordinate
    # k' = 2k = 128 keeps the top d and the d non-positive ones (ReLU -> 0): still exact.
    by_k = {e["k"]: e for e in r["progressive"]}
    assert sorted(by_k) == [16, 32, 64, 128]  # 4k = 256 capped at 128 latents, once
    for k in (64, 128):
        assert by_k[k]["normalized_mse"] == pytest.approx(0, abs=1e-10)
        assert by_k[k]["delta_ce"] == pytest.approx(0, abs=1e-4)
    assert by_k[16]["normalized_mse"] > by_k[32]["normalized_mse"] > 1e-3


def test_zero_reconstruction_recovers_nothing(results) -> None:
    r = results["zero"]
    d = r["downstream"]
    assert d["ce_spliced"] == pytest.approx(d["ce_zero"], abs=1e-9)
    assert d["loss_recovered"] == pytest.approx(0, abs=1e-6)
    assert d["kl"] > 0.01
    rec = r["reconstruction"]
    assert rec["dead_fraction"] == 1.0 and rec["l0"] == 0.0
    hist = rec["density_histogram"]
    assert hist["never_fired"] == 32 and sum(hist["counts"]) == 0
    assert hist["log10_bin_edges"] == DENSITY_BIN_EDGES
    assert rec["normalized_mse"] >= 1  # Σ‖x‖² / Σ‖x − x̄‖²
    assert rec["explained_variance"] <= 0
    # The clean, zero and mean losses belong to the hook, not the SAE: shared.
    for key in ("ce_clean", "ce_zero", "ce_mean"):
        assert d[key] == results["exact"]["downstream"][key]


def _hidden(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace(output, new):
    return new if isinstance(output, torch.Tensor) else (new, *output[1:])


def test_spliced_ce_kl_and_reconstruction_match_an_independent_computation(
    lm, ids, snapshot, results
) -> None:
    """A plain forward hook, the SAE's training `forward` and torch's own losses."""
    model = lm.model
    sae = load_sae(snapshot / "rand").sae
    block = model.get_submodule(HOOK)
    grabbed = {}
    h = block.register_forward_hook(lambda m, a, o: grabbed.__setitem__("x", _hidden(o)))
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
    h.remove()
    x = grabbed["x"][:, 1:].reshape(-1, D)
    out = sae(x)
    x_hat = out.x_hat.view(ids.shape[0], T - 1, D)

    def spliced(fill):
        def hook(module, args, output):
            o = _hidden(output).clone()
            o[:, 1:] = fill
            return _replace(output, o)

        handle = block.register_forward_hook(hook)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        handle.remove()
        return logits

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                               ids[:, 1:].reshape(-1)).item()

    sp = spliced(x_hat)
    lp_clean = F.log_softmax(clean[:, :-1].double(), -1).reshape(-1, clean.shape[-1])
    lp_sp = F.log_softmax(sp[:, :-1].double(), -1).reshape(-1, clean.shape[-1])
    kl = F.kl_div(lp_sp, lp_clean, log_target=True, reduction="batchmean").item()
    d = results["rand"]["downstream"]
    assert d["ce_clean"] == pytest.approx(ce(clean), rel=1e-5)
    assert d["ce_spliced"] == pytest.approx(ce(sp), rel=1e-5)
    assert d["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert d["kl"] > 1e-3 and d["delta_ce"] != 0
    assert d["ce_zero"] == pytest.approx(ce(spliced(0.0)), rel=1e-5)
    assert d["ce_mean"] == pytest.approx(ce(spliced(x.double().mean(0).float())), rel=1e-5)
    zero, clean_ce = d["ce_zero"], d["ce_clean"]
    assert d["loss_recovered"] == pytest.approx((zero - d["ce_spliced"]) / (zero - clean_ce))

    rec = results["rand"]["reconstruction"]
    xn, xn_hat = out.normalized_x.double(), out.normalized_x_hat.double()
    nmse = ((xn - xn_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    ev = 1 - ((x - out.x_hat).double() ** 2).sum() / ((x - x.mean(0)).double() ** 2).sum()
    assert rec["normalized_mse"] == pytest.approx(nmse.item(), rel=1e-5)
    assert rec["explained_variance"] == pytest.approx(ev.item(), rel=1e-5, abs=1e-6)
    fires = torch.zeros(128, dtype=torch.bool)
    fires[out.latent_indices[out.latent_acts > 0]] = True
    assert rec["dead_fraction"] == pytest.approx(1 - fires.double().mean().item())
    assert rec["l0"] == pytest.approx((out.latent_acts > 0).sum().item() / x.shape[0])
    hist = rec["density_histogram"]
    assert sum(hist["counts"]) + hist["never_fired"] == 128
    by_k = {e["k"]: e for e in results["rand"]["progressive"]}
    assert sorted(by_k) == [2, 4, 8, 16, 32]
    assert by_k[8]["normalized_mse"] == pytest.approx(rec["normalized_mse"])
    assert by_k[8]["delta_ce"] == pytest.approx(d["delta_ce"])


def test_progressive_ks_are_quarter_to_four_times_k_capped_at_the_latents() -> None:
    assert progressive_ks(32, 16384) == [8, 16, 32, 64, 128]
    assert progressive_ks(4, 10) == [1, 2, 4, 8, 10]
    assert progressive_ks(64, 128) == [16, 32, 64, 128]
    assert progressive_ks(1, 1) == [1]
    assert progressive_ks(6, 1000) == [1, 3, 6, 12, 24]


def test_reconstruction_alone_runs_only_the_truncated_forward(lm, ids, snapshot) -> None:
    calls = []
    head = lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = evaluate(lm.model, ids, [(load_sae(snapshot / "exact"), HOOK)],
                       ["reconstruction"], batch_size=4)
    finally:
        head.remove()
    assert calls == [] and set(out["exact"]) == {"reconstruction"}
    assert out["exact"]["reconstruction"]["normalized_mse"] == pytest.approx(0, abs=1e-10)


def test_progressive_alone_gives_the_numbers_of_the_full_run(lm, ids, snapshot, results) -> None:
    out = evaluate(lm.model, ids, [(load_sae(snapshot / "rand"), HOOK)], ["progressive"],
                   batch_size=5)
    assert set(out["rand"]) == {"progressive"}
    for got, want in zip(out["rand"]["progressive"], results["rand"]["progressive"],
                         strict=True):
        assert got["k"] == want["k"]
        assert got["normalized_mse"] == pytest.approx(want["normalized_mse"], rel=1e-6)
        assert got["delta_ce"] == pytest.approx(want["delta_ce"], rel=1e-4, abs=1e-6)


def test_an_sae_of_another_width_is_an_eval_error(lm, ids, tmp_path) -> None:
    t = Trainer(SAEConfig(d_in=32, n_latents=64, k=4), TrainerConfig(), name="narrow",
                hook=HOOK, model="tiny")
    path = save_snapshot(tmp_path, 1, {"narrow": t})
    with pytest.raises(EvalError, match=r"d_in 32, but hook model\.layers\.2 gives 64"):
        evaluate(lm.model, ids, [(load_sae(path / "narrow"), HOOK)], GROUPS)


# -- the command, as real processes ----------------------------------------------------------

FIELDS = {"ce_clean", "ce_spliced", "delta_ce", "ce_zero", "ce_mean", "loss_recovered", "kl"}
RECON_FIELDS = {"normalized_mse", "explained_variance", "l0", "dead_fraction",
                "density_histogram"}
ARGS = ["--corpus", "synthetic:200", "--seq-len", "12", "--contexts", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory) -> Path:
    """A checkpoint directory (followed through `latest`) with one layer_norm SAE."""
    root = tmp_path_factory.mktemp("cli")
    save_snapshot(root, 3, {"rand": random_trainer(steps=1)})
    return root


def test_cli_prints_a_table_and_writes_eval_json_beside_cfg_json(cli_ckpt) -> None:
    res = run_cli(["eval", str(cli_ckpt), *ARGS], timeout=300)
    assert res.returncode == 0, res.stderr
    target = cli_ckpt / "step-00000003" / "rand" / "eval.json"
    assert (target.parent / "cfg.json").is_file()
    doc = json.loads(target.read_text())
    assert FIELDS <= set(doc["downstream"])
    assert RECON_FIELDS <= set(doc["reconstruction"])
    assert [e["k"] for e in doc["progressive"]] == [2, 4, 8, 16, 32]
    assert all({"k", "normalized_mse", "delta_ce"} == set(e) for e in doc["progressive"])
    assert (doc["sae"], doc["model"], doc["hook"], doc["step"]) == ("rand", "tiny", HOOK, 3)
    assert (doc["split"], doc["contexts"], doc["tokens"], doc["seq_len"]) == ("eval", 3, 33, 12)
    assert doc["metrics"] == ["downstream", "reconstruction", "progressive"]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["metric", "rand"]
    assert any(line.split()[0] == "delta_ce" for line in lines)
    assert f"wrote {target}" in res.stdout


def test_cli_json_prints_what_it_writes(cli_ckpt, tmp_path) -> None:
    out = tmp_path / "e.json"
    res = run_cli(["eval", str(cli_ckpt / "step-00000003"), *ARGS, "--json", "--sae", "rand",
                   "--metrics", "downstream", "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed == json.loads(out.read_text())
    assert FIELDS == set(printed["downstream"]) and "reconstruction" not in printed
    assert printed["metrics"] == ["downstream"]


def test_cli_metrics_all_writes_every_group(cli_ckpt, tmp_path) -> None:
    out = tmp_path / "all.json"
    res = run_cli(["eval", str(cli_ckpt), "--corpus", "synthetic:400", "--seq-len", "24",
                   "--contexts", "10", "--device", "cpu", "--metrics", "all", "--out", str(out),
                   "--ablation-latents", "4", "--explanation-latents", "4"], timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["metrics"] == list(ALL_GROUPS)
    assert set(ALL_GROUPS) <= set(doc)
    assert doc["ablation"]["latents"] == 4 and 0 < doc["ablation"]["mean"] <= 1
    assert doc["explanations"]["latents"] == 4
    assert len(doc["probes"]["tasks"]) >= 8
    rows = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"ablation_sparsity", "explanation_precision", "probe_loss"} <= rows


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--sae", "nope"], "no SAE named 'nope'"),
        (["--metrics", "downstream,bogus"], "--metrics 'bogus'"),
        (["--metrics", "all", "--ablation-latents", "0"], "--ablation-latents"),
        (["--contexts", "2", "--tokens", "5"], "not both"),
        (["--hook", "model.layers.99", *ARGS], "unknown hook 'model.layers.99'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(cli_ckpt, extra, needle) -> None:
    res = run_cli(["eval", str(cli_ckpt), *extra], timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("saestream: error: ")
    assert needle in res.stderr


@pytest.mark.parametrize("case", ["fifo out", "hook model", "long name", "empty path",
                                  "wide npy"])
def test_cli_hostile_paths_and_hooks_are_one_line_and_exit_2(cli_ckpt, tmp_path, case) -> None:
    """Each of these was a traceback, or worse: root's `--out /dev/null` replaced the device
    with a file (a FIFO stands in for it here: no mknod needed)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    wide = tmp_path / "wide.npy"  # 2-D: its rows are the contexts, wider than tiny's 4096
    np.save(wide, np.zeros((20, 5000), dtype=np.uint16))
    argv, needle = {
        "wide npy": (["eval", str(cli_ckpt), "--corpus", f"tokens:{wide}", "--device", "cpu"],
                     "contexts of 5000 tokens, but model tiny takes at most 4096 positions"),
        "fifo out": (["eval", str(cli_ckpt), *ARGS, "--sae", "rand", "--out", str(fifo)],
                     "not a regular file (a FIFO)"),
        "hook model": (["eval", str(cli_ckpt), *ARGS, "--hook", "model"],
                       "hook 'model' produced a BaseModelOutputWithPast"),
        "long name": (["eval", str(tmp_path / ("x" * 300)), *ARGS], "File name too long"),
        "empty path": (["eval", "", *ARGS], "an empty path"),
    }[case]
    res = run_cli(argv, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("saestream: error: ")
    assert needle in res.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_cli_missing_directory_is_one_line_and_exit_2(tmp_path) -> None:
    res = run_cli(["eval", str(tmp_path / "missing"), "--device", "cpu"], timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "no such directory" in res.stderr


# -- hostile disks and cfg.json ----------------------------------------------------------------


def test_cli_full_disk_prints_the_table_then_one_line_and_leaves_no_temporary(
        cli_ckpt, tmp_path) -> None:
    """A disk full at the end of the run (the start-up check reads permissions only): the
    numbers are printed first, the write fails as one line, exit 2, and no temporary file is
    left beside --out."""
    with tmpfs_at(tmp_path / "mnt", "1m") as mnt:
        fill(mnt)
        out = mnt / "e.json"
        res = run_cli(["eval", str(cli_ckpt), *ARGS, "--out", str(out)], timeout=300)
        left = sorted(p.name for p in mnt.iterdir())
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        f"saestream: error: --out {out}: could not write (No space left on device)"]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["metric", "rand"]
    assert any(line.split()[0] == "delta_ce" for line in lines)
    assert "wrote" not in res.stdout
    assert left == ["fill"]


def test_cli_json_on_a_full_disk_prints_the_documents_first(cli_ckpt, tmp_path) -> None:
    with tmpfs_at(tmp_path / "mnt", "1m") as mnt:
        fill(mnt)
        res = run_cli(["eval", str(cli_ckpt), *ARGS, "--metrics", "reconstruction", "--json",
                       "--out", str(mnt / "e.json")], timeout=300)
        left = sorted(p.name for p in mnt.iterdir())
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and "No space left on device" in res.stderr
    assert json.loads(res.stdout)["reconstruction"]["l0"] > 0
    assert left == ["fill"]


@pytest.mark.parametrize("model", [["tiny"], {"name": "tiny"}, 5])
def test_cli_a_cfg_json_model_that_is_not_a_string_is_one_line(cli_ckpt, tmp_path,
                                                                 model) -> None:
    sae = tmp_path / "rand"
    shutil.copytree(cli_ckpt / "step-00000003" / "rand", sae)
    cfg = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps({**cfg, "model": model}))
    res = run_cli(["eval", str(sae), *ARGS], timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error: ")
    assert str(sae) in lines[0] and "model" in lines[0]


def test_one_model_names_the_sae_whose_model_is_not_a_string(tmp_path) -> None:
    """The evaluator's own check, whatever the loader lets through."""
    good = SimpleNamespace(cfg={"model": "tiny"}, directory=tmp_path / "a")
    for model in (["tiny"], {"name": "tiny"}, 3):
        bad = SimpleNamespace(cfg={"model": model}, directory=tmp_path / "b")
        with pytest.raises(UserError, match=f"{tmp_path / 'b'}/cfg.json: model must be a "
                                            "model name"):
            one_model([good, bad])
    assert one_model([good, good]) == "tiny"
