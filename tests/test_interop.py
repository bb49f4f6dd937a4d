"""SAEs out to SAELens and sparsify and back, in from OpenAI's release format, and training
runs started from given weights (`--init-from`). Loading is checked with the real peer
packages (`sae-lens`, `eai-sparsify`: the `interop` extra `make test` installs)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import run_cli
from safetensors.torch import load_file, save_file

from saestream.consumer.checkpoint import load_sae, load_trainer, save_snapshot
from saestream.consumer.interop_cli import export, import_command
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside sae_lens

D, N, K = 24, 96, 6
MODES = ("layer_norm", "none", "scalar")
TOL = dict(rtol=1e-5, atol=1e-5)


def peer(module: str):
    """A peer package, imported once; missing, it fails the test under CI (where `make test`
    installs the extra) and skips it elsewhere."""
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} not installed: run `make interop` (the `interop` extra)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def invoke(command, *args: str) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def inputs(seed: int = 7, rows: int = 300) -> torch.Tensor:
    """Raw activations with an offset and a scale, as a residual stream has."""
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)) * 3 + 1.5


def trained(mode: str, layer: int) -> Trainer:
    t = Trainer(SAEConfig(d_in=D, n_latents=N, k=K, input_normalization=mode),
                TrainerConfig(k_aux=16, seed=layer), name=mode, hook=f"model.layers.{layer}",
                model="tiny")
    gen = torch.Generator().manual_seed(layer)
    for _ in range(4):
        t.train_step(torch.randn(256, D, generator=gen) * 3 + 1)
    return t


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[Path, dict[str, Trainer]]:
    """One snapshot holding a layer_norm, a none and a scalar SAE, each on its own hook, its
    extra.json naming the producers' context length (as a consumer's ledger does)."""
    root = tmp_path_factory.mktemp("ours")
    trainers = {mode: trained(mode, i) for i, mode in enumerate(MODES)}
    path = save_snapshot(root, 4, trainers,
                         extra={"producers": {"p1": {"stream": {"seq_len": 64}}}})
    return path, trainers


def ours(directory: Path):
    return load_sae(directory).sae


def reconstruct(directory: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ours(directory)(x).x_hat


# -- SAELens -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saelens_export(snapshot, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("exports") / "saelens"
    return out, invoke(export, snapshot[0], "--format", "saelens", "--out", out)


@pytest.mark.parametrize("mode", MODES)
def test_saelens_loads_the_export_and_reconstructs_identically(snapshot, saelens_export, mode):
    sae_lens = peer("sae_lens")
    out, _ = saelens_export
    sae = sae_lens.SAE.load_from_disk(str(out / mode))
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == K
    assert sae.cfg.normalize_activations == ("layer_norm" if mode == "layer_norm" else "none")
    x = inputs()
    with torch.no_grad():
        theirs = sae(x)
        ref = ours(snapshot[0] / mode)(x)
        torch.testing.assert_close(theirs, ref.x_hat, **TOL)
        acts = sae.encode(x)  # the same latents, the scalar constant folded or not
        z = torch.zeros_like(acts).scatter(1, ref.latent_indices, ref.latent_acts)
        torch.testing.assert_close(acts, z, **TOL)


def test_saelens_export_cfg_metadata_and_sparsity(snapshot, saelens_export):
    out, output = saelens_export
    _, trainers = snapshot
    cfg = json.loads((out / "scalar" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D, N, K)
    assert cfg["apply_b_dec_to_input"] is True and cfg["dtype"] == "float32"
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert meta["model_name"] == "tiny" and meta["hook_name"] == "model.layers.2"
    assert meta["context_size"] == 64 and meta["prepend_bos"] is False
    assert meta["saestream"]["folded_input_scale"] == trainers["scalar"].sae.input_scale
    assert meta["saestream"]["step"] == 4
    weights = load_file(str(out / "layer_norm" / "sae_weights.safetensors"))
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
    t = trainers["layer_norm"]
    assert t.counted_tokens == 4 * 256 and int(t.fired_tokens.sum()) > 0
    sparsity = load_file(str(out / "layer_norm" / "sparsity.safetensors"))["sparsity"]
    want = torch.log10(t.fired_tokens.double() / t.counted_tokens + 1e-10).float()
    torch.testing.assert_close(sparsity, want)
    assert "scalar input constant" in output and "load with: sae_lens.SAE" in output


@pytest.mark.parametrize("mode", ["layer_norm", "none"])
def test_round_trip_through_saelens_is_bit_exact(snapshot, saelens_export, tmp_path, mode):
    out, _ = saelens_export
    back = tmp_path / "back"
    invoke(import_command, out / mode, "--format", "saelens", "--out", back)
    src, got = load_sae(snapshot[0] / mode), load_sae(back / "step-00000000" / mode)
    for n, p in src.sae.named_parameters():
        assert torch.equal(dict(got.sae.named_parameters())[n], p), n
    assert got.cfg["input_normalization"] == mode and got.cfg["hook"] == src.cfg["hook"]
    assert got.cfg["k"] == K and got.cfg["model"] == "tiny"
    assert got.cfg["origin"]["kind"] == "import" and got.cfg["origin"]["format"] == "saelens"


# -- sparsify ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparsify_export(snapshot, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("exports") / "sparsify"
    return out, invoke(export, snapshot[0], "--format", "sparsify", "--out", out)


def test_sparsify_reads_the_run_folder_and_reconstructs_identically(snapshot, sparsify_export):
    sparsify = peer("sparsify")
    out, output = sparsify_export
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny" and config["ctx_len"] == 64
    coders = sparsify.SparseCoder.load_many(str(out), local=True)
    assert sorted(coders) == [f"model.layers.{i}" for i in range(3)]
    x = inputs()
    for i, mode in enumerate(MODES):
        sae = ours(snapshot[0] / mode)
        coder = coders[f"model.layers.{i}"]
        with torch.no_grad():
            xn, stats = sae.normalize(x)  # sparsify normalises nothing: layer_norm is ours
            x_in = xn if mode == "layer_norm" else x
            enc = coder.encode(x_in)
            y = coder.decode(enc.top_acts, enc.top_indices)
            if mode == "layer_norm":
                y = sae.denormalize(y, stats)
            torch.testing.assert_close(y, sae(x).x_hat, **TOL)
    assert "sparsify applies no input normalisation" in output
    assert output.count("sparsify applies no input normalisation") == 1  # layer_norm only


def test_saelens_sparsify_loader_reads_the_export(snapshot, sparsify_export):
    peer("sae_lens")
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    def loader(path, device="cpu", cfg_overrides=None):
        # SAELens 6.54's loader returns sparsify's W_dec [latents, d_in] transposed, so no
        # sparsify folder (sparsify's own saves included) loads into an SAE as it is: turn it
        # back, and only it, here.
        cfg, state = sparsify_disk_loader(path, device, cfg_overrides)
        if tuple(state["W_dec"].shape) == (cfg["d_in"], cfg["d_sae"]):
            state["W_dec"] = state["W_dec"].t().contiguous()
        return cfg, state

    out, _ = sparsify_export
    x = inputs()
    for i, mode in enumerate(("none", "scalar")):
        folder = out / f"model.layers.{i + 1}"
        cfg, _ = sparsify_disk_loader(folder)
        assert cfg["hook_name"] == f"blocks.{i + 1}.hook_resid_post" and cfg["model_name"] == "tiny"
        assert cfg["context_size"] == 64 and cfg["activation_fn_kwargs"]["k"] == K
        sae = SAE.load_from_disk(str(folder), dtype="float32", converter=loader)
        assert sae.cfg.apply_b_dec_to_input and sae.cfg.k == K
        with torch.no_grad():
            torch.testing.assert_close(sae(x), reconstruct(snapshot[0] / mode, x), **TOL)


def test_round_trip_through_sparsify_is_bit_exact(snapshot, sparsify_export, tmp_path):
    out, _ = sparsify_export
    back = tmp_path / "back"
    invoke(import_command, out, "--format", "sparsify", "--out", back)
    snap = back / "step-00000000"
    assert sorted(p.name for p in snap.iterdir() if p.is_dir()) == sorted(MODES)
    for mode in ("layer_norm", "none"):
        src, got = load_sae(snapshot[0] / mode), load_sae(snap / mode)
        for n, p in src.sae.named_parameters():
            assert torch.equal(dict(got.sae.named_parameters())[n], p), (mode, n)
        assert got.cfg["input_normalization"] == mode and got.cfg["hook"] == src.cfg["hook"]
    # scalar comes back as `none` with its constant folded: the same forward, to rounding
    got = load_sae(snap / "scalar")
    assert got.cfg["input_normalization"] == "none"
    x = inputs()
    torch.testing.assert_close(reconstruct(snap / "scalar", x),
                               reconstruct(snapshot[0] / "scalar", x), **TOL)


# -- OpenAI ------------------------------------------------------------------------------------

ON, OD, OK = 128, 32, 8


def openai_state(seed: int = 0, d: int = OD, n: int = ON) -> dict:
    """A state dict in the release's format (sparse_autoencoder's `Autoencoder.state_dict()`
    of a TopK SAE): the documented keys and shapes; decoder columns not unit-norm."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_bias": torch.randn(d, generator=g) * 0.1,
        "encoder.weight": torch.randn(n, d, generator=g) / d**0.5,
        "latent_bias": torch.randn(n, generator=g) * 0.05,
        "decoder.weight": torch.randn(d, n, generator=g) * 0.2,
        "stats_last_nonzero": torch.randint(0, 50, (n,), generator=g),
        "latents_activation_frequency": torch.ones(n),
        "latents_mean_square": torch.zeros(n),
        "activation": "TopK",
        "activation_state_dict": {"k": OK, "postact_fn": "ReLU"},
    }


def openai_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The release's forward, written from its definition: LN, TopK(encoder(x − pre_bias) +
    latent_bias), ReLU, decoder, + pre_bias, un-normalise (· std + mean)."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    std = xc.std(dim=-1, keepdim=True)
    xn = xc / (std + 1e-5)
    pre = F.linear(xn - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    top = torch.topk(pre, k=sd["activation_state_dict"]["k"], dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
    recons = F.linear(latents, sd["decoder.weight"]) + sd["pre_bias"]
    return recons * std + mu


@pytest.fixture(scope="module")
def openai_import(tmp_path_factory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("openai")
    sd = openai_state()
    torch.save({**sd, "some_future_buffer": torch.zeros(3)}, root / "layer_3.pt")
    out = root / "imported"
    res = run_cli(["import", str(root / "layer_3.pt"), "--format", "openai", "--hook",
                   "model.layers.3", "--model", "gpt2", "--tokens-per-step", "1000",
                   "--out", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "imported layer_3 (d_in 32, 128 latents, k 8, layer_norm)" in res.stdout
    assert "some_future_buffer are not read" in res.stdout
    return sd, root / "layer_3.pt", out


def test_openai_import_forward_equals_the_release_forward(openai_import):
    sd, _, out = openai_import
    x = torch.randn(400, OD, generator=torch.Generator().manual_seed(3)) * 4 - 2
    got = reconstruct(out / "step-00000000" / "layer_3", x)
    torch.testing.assert_close(got, openai_forward(sd, x), **TOL)
    trainer = load_trainer(out / "step-00000000" / "layer_3")
    assert torch.equal(trainer.tokens_since_fired, sd["stats_last_nonzero"] * 1000)
    assert (trainer.hook, trainer.model, trainer.sae_cfg.input_normalization) == (
        "model.layers.3", "gpt2", "layer_norm")
    assert trainer.origin["format"] == "openai" and trainer.origin["kind"] == "import"


def test_openai_import_evaluates_and_exports(openai_import, tmp_path):
    """An imported SAE is a snapshot like ours: it exports to SAELens and loads there."""
    sae_lens = peer("sae_lens")
    sd, _, out = openai_import
    invoke(export, out, "--format", "saelens", "--out", tmp_path / "sl")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    x = torch.randn(100, OD, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(sae(x), openai_forward(sd, x), **TOL)
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["saestream"]["origin"]["format"] == "openai"


def test_an_openai_file_for_the_tiny_model_imports_and_evaluates(tmp_path):
    torch.save(openai_state(1, d=64, n=256), tmp_path / "tiny_l2.pt")
    out = tmp_path / "imported"
    invoke(import_command, tmp_path / "tiny_l2.pt", "--format", "openai", "--hook",
           "model.layers.2", "--model", "tiny", "--out", out)
    res = run_cli(["eval", str(out), "--corpus", "synthetic:200", "--seq-len", "12",
                   "--contexts", "3", "--device", "cpu", "--json"], timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.splitlines()[0])
    assert (doc["sae"], doc["model"], doc["hook"], doc["step"]) == (
        "tiny_l2", "tiny", "model.layers.2", 0)
    assert (doc["n_latents"], doc["k"], doc["input_normalization"]) == (256, OK, "layer_norm")
    assert np.isfinite(doc["reconstruction"]["normalized_mse"])


# -- bad inputs: one line, exit 2 ----------------------------------------------------------------


def _saelens_dir(root: Path, snapshot_path: Path, edit) -> Path:
    """A copy of an exported SAELens folder, changed by `edit(cfg, weights)`."""
    out = root / "sl"
    invoke(export, snapshot_path, "--format", "saelens", "--sae", "none", "--out", out)
    cfg = json.loads((out / "cfg.json").read_text())
    weights = load_file(str(out / "sae_weights.safetensors"))
    edit(cfg, weights)
    (out / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(out / "sae_weights.safetensors"))
    return out


def _openai_file(root: Path, edit) -> Path:
    sd = openai_state()
    edit(sd)
    torch.save(sd, root / "bad.pt")
    return root / "bad.pt"


BAD_OPENAI = {
    "missing tensor": (lambda sd: sd.pop("latent_bias"), "no tensor 'latent_bias'"),
    "wrong shape": (lambda sd: sd.update({"pre_bias": torch.zeros(OD + 1)}),
                    "pre_bias has shape [33], expected [32]"),
    "NaN": (lambda sd: sd["decoder.weight"].__setitem__((0, 0), float("nan")),
            "decoder.weight holds NaN"),
    "not TopK": (lambda sd: sd.update({"activation": "ReLU"}), "activation 'ReLU' is not TopK"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPENAI))
def test_bad_openai_file_is_one_line_and_exit_2(tmp_path, case):
    edit, message = BAD_OPENAI[case]
    path = _openai_file(tmp_path, edit)
    res = run_cli(["import", str(path), "--format", "openai", "--hook", "h", "--out",
                   str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error:"), res.stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "latest").exists()


def test_bad_directories_are_one_line_and_exit_2(tmp_path, snapshot):
    jumprelu = _saelens_dir(tmp_path, snapshot[0],
                            lambda cfg, w: cfg.update({"architecture": "jumprelu"}))
    pickle = tmp_path / "not-a-state-dict.pt"
    pickle.write_bytes(b"\x80\x04 certainly not a zip archive")
    cases = [
        (["import", str(jumprelu), "--format", "saelens"], "architecture 'jumprelu' is not TopK"),
        # the wrong format: an SAELens folder read as sparsify, a text file as openai
        (["import", str(jumprelu), "--format", "sparsify"], "holds it"),
        (["import", str(pickle), "--format", "openai", "--hook", "h"],
         "not a torch.save zip archive"),
        (["export", str(tmp_path / "nowhere"), "--format", "saelens"], "no such directory"),
    ]
    for args, message in cases:
        res = run_cli([*args, "--out", str(tmp_path / "out")], timeout=120)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.stderr)


def test_bad_saelens_weights_are_refused(tmp_path, snapshot):
    """In-process (the same code path as the processes above): shapes, NaNs, extra tensors,
    a per-token normalisation we cannot compute."""
    cases = {
        "W_dec has shape [96, 23]": lambda c, w: w.update({"W_dec": w["W_dec"][:, :-1].clone()}),
        "b_enc holds NaN": lambda c, w: w["b_enc"].__setitem__(0, float("nan")),
        "no tensor 'b_dec'": lambda c, w: w.pop("b_dec"),
        "tensors threshold have no place": lambda c, w: w.update({"threshold": torch.ones(N)}),
        "constant_norm_rescale": lambda c, w: c.update(
            {"normalize_activations": "constant_norm_rescale"}),
    }
    for i, (message, edit) in enumerate(cases.items()):
        src = _saelens_dir(tmp_path / str(i), snapshot[0], edit)
        result = CliRunner().invoke(import_command, [str(src), "--format", "saelens", "--out",
                                                     str(tmp_path / str(i) / "out")])
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        assert len(result.output.strip().splitlines()) == 1


# -- --init-from -----------------------------------------------------------------------------------


def test_train_init_from_an_import_starts_from_its_weights(openai_import, tmp_path):
    sd, _, imported = openai_import
    acts = tmp_path / "acts.npy"
    np.save(acts, (np.random.default_rng(0).standard_normal((512, OD)) * 3).astype(np.float32))
    out = tmp_path / "ft"
    res = run_cli(["train", "--input", str(acts), "--hook", "model.layers.3", "--init-from",
                   str(imported), "--steps", "1", "--batch-size", "256", "--lr", "1e-12",
                   "--k", "4", "--out", str(out), "--log-interval", "0"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "latents=128 k=4" in res.stdout  # latents adopted, k given
    d = out / "step-00000001" / "model.layers.3"
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["num_latents"] == ON and cfg["k"] == 4 and cfg["input_normalization"] == "layer_norm"
    origin = cfg["origin"]
    assert origin["kind"] == "init-from" and origin["sae"] == "layer_3" and origin["step"] == 0
    assert origin["origin"]["kind"] == "import" and origin["origin"]["format"] == "openai"
    assert json.loads((out / "step-00000001" / "extra.json").read_text())["init_from"] == str(
        imported)
    got = dict(load_sae(d).sae.named_parameters())
    # lr 1e-12: one step leaves the weights where they started, but for the decoder rows,
    # which training keeps unit-norm
    torch.testing.assert_close(got["encoder.weight"], sd["encoder.weight"], rtol=0, atol=1e-8)
    torch.testing.assert_close(got["b_dec"], sd["pre_bias"], rtol=0, atol=1e-8)
    w_dec = sd["decoder.weight"].t()
    torch.testing.assert_close(got["W_dec"], w_dec / w_dec.norm(dim=1, keepdim=True),
                               rtol=0, atol=1e-6)
    trainer = load_trainer(d)
    assert trainer.step == 1 and trainer.optimizer.state_dict()["state"][0]["step"] == 1


def test_train_init_from_refuses_a_conflicting_shape(openai_import, tmp_path):
    _, _, imported = openai_import
    acts = tmp_path / "acts.npy"
    np.save(acts, np.zeros((64, OD + 1), dtype=np.float32))
    res = run_cli(["train", "--input", str(acts), "--hook", "h", "--init-from", str(imported),
                   "--out", str(tmp_path / "ft")], timeout=120)
    assert res.returncode == 2 and "reads d_in 32" in res.stderr, res.stderr
    res = CliRunner().invoke(
        importlib.import_module("saestream.consumer.train_cli").train,
        ["--input", str(acts), "--hook", "h", "--init-from", str(imported), "--latents", "64",
         "--out", str(tmp_path / "ft")])
    assert res.exit_code == 2 and "has latents 128, --input asks for 64" in res.output, res.output


def test_consumer_init_from_our_snapshot(tmp_path):
    from test_consumer import HOOK, Consumer, Sender, latest
    from test_consumer import D as CD

    src_trainer = Trainer(SAEConfig(d_in=CD, n_latents=128, k=8), TrainerConfig(seed=5),
                          name="base", hook=HOOK, model="synthetic")
    src_trainer.train_step(torch.randn(512, CD))
    src = save_snapshot(tmp_path / "base", 1, {"base": src_trainer})
    c = Consumer(tmp_path, "--sae", "name=ft,lr=1e-12,k_aux=0", "--init-from", str(src),
                 "--max-steps", "2")
    sender = Sender(c.endpoint)
    try:
        sender.in_background(100)
        assert c.wait_exit() == 0, c.log()
        assert "SAE ft starts from" in c.log()
    finally:
        sender.close()
        c.close()
    d = latest(c.ckpt) / "ft"
    cfg = json.loads((d / "cfg.json").read_text())
    assert (cfg["num_latents"], cfg["k"]) == (128, 8)  # adopted: --sae set neither
    assert cfg["origin"] == {"kind": "init-from", "path": str((src / "base").resolve()),
                             "sae": "base", "step": 1, "origin": None}
    got = dict(load_sae(d).sae.named_parameters())
    for n, p in src_trainer.export_weights().items():
        torch.testing.assert_close(got[n], p, rtol=0, atol=1e-7)
    trainer = load_trainer(d)
    assert trainer.step == 2 and trainer.origin == cfg["origin"]
    # a consumer's snapshot exports to SAELens and reconstructs there as here
    sae_lens = peer("sae_lens")
    invoke(export, c.ckpt, "--format", "saelens", "--out", tmp_path / "sl")
    x = torch.randn(64, CD)
    with torch.no_grad():
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))(x),
                                   reconstruct(d, x), **TOL)


# -- hostile inputs found by an adversarial probe: one line, exit 2, nothing outside --out -------


def _one_line_error(res, *needles: str) -> str:
    """The single `saestream: error:` line of a refused command (exit 2, no traceback)."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _sae_copy(snapshot_path: Path, dest: Path, name: str = "none", cfg=None) -> Path:
    """A copy of one SAE folder of the module's snapshot, its cfg.json updated with `cfg`."""
    import shutil

    shutil.copytree(snapshot_path / name, dest)
    if cfg is not None:
        doc = json.loads((dest / "cfg.json").read_text())
        doc.update(cfg)
        (dest / "cfg.json").write_text(json.dumps(doc))
    return dest


@pytest.mark.parametrize("hook", ["ABS", "../../escaped", "..", "a/b", "", ["model.layers.1"]],
                         ids=["absolute", "traversal", "dotdot", "slash", "empty", "list"])
def test_export_sparsify_refuses_a_hook_that_is_no_folder_name(tmp_path, snapshot, hook):
    """The sparsify folder is the hook from cfg.json: an absolute path, `..` or a `/` in it
    must not put a file outside --out (the probe saw `/tmp/x` written)."""
    if hook == "ABS":
        hook = str(tmp_path / "absolute")
    src = _sae_copy(snapshot[0], tmp_path / "src" / "sae", cfg={"hook": hook})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "exports" / "out"
    res = run_cli(["export", str(src), "--format", "sparsify", "--out", str(out)], timeout=120)
    _one_line_error(res, "hook")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _limit_file_size():  # the child's files stop at 8 KiB: its weights cannot be written
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_export_and_import_on_a_failing_disk_are_one_line_and_leave_nothing(
        tmp_path, snapshot, saelens_export):
    """A write failing half-way (here EFBIG past RLIMIT_FSIZE; ENOSPC in the next test) is one
    line naming --out and the OS's reason; what the command made is gone, and an --out that
    was there is as it was."""
    for fmt in ("saelens", "sparsify"):
        out = tmp_path / fmt / "new" / "out"
        res = run_cli(["export", str(snapshot[0]), "--format", fmt, "--out", str(out)],
                      timeout=120, preexec_fn=_limit_file_size)
        _one_line_error(res, f"--out {out}: could not write (File too large)")
        assert not (tmp_path / fmt).exists()
    src = saelens_export[0] / "none"
    for there in (False, True):
        out = tmp_path / "imp" / "out"
        if there:
            out.mkdir(parents=True)
            (out / "keep.txt").write_text("mine")
        res = run_cli(["import", str(src), "--format", "saelens", "--out", str(out)],
                      timeout=120, preexec_fn=_limit_file_size)
        _one_line_error(res, f"--out {out}: could not write (File too large)")
        if there:
            assert [p.name for p in out.iterdir()] == ["keep.txt"]
        else:
            assert not (tmp_path / "imp").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted under tmp_path for the test (root only: skipped elsewhere)."""
    from test_guarantee_disk import tmpfs_at

    with tmpfs_at(tmp_path / "mnt", "1m") as mnt:
        yield mnt


def test_export_and_import_on_a_disk_that_fills_mid_write(small_tmpfs, snapshot, saelens_export):
    mnt = small_tmpfs
    fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT)
    try:  # fill it, then free 24 KiB: the first SAE's files fit, the rest does not
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == 0
    os.truncate(mnt / "fill", os.path.getsize(mnt / "fill") - 24 * 1024)
    runs = [(["export", str(snapshot[0]), "--format", "sparsify"], mnt / "exp"),
            (["import", str(saelens_export[0] / "layer_norm"), "--format", "saelens"],
             mnt / "imp")]
    for args, out in runs:
        res = run_cli([*args, "--out", str(out)], timeout=120)
        _one_line_error(res, f"--out {out}: could not write (No space left on device)")
        assert sorted(p.name for p in mnt.iterdir()) == ["fill"]


@pytest.mark.parametrize("producers", [
    [1], {"a": {"stream": 5}}, {"a": {"stream": {"seq_len": "abc"}}},
    {"a": {"stream": {"seq_len": [1]}}}], ids=["list", "stream-int", "seq-len-str", "seq-len-list"])
def test_export_with_a_malformed_producer_ledger_warns_and_records_no_context(
        tmp_path, snapshot, producers):
    """The context size is optional metadata (`--context-size` gives it): a ledger of the
    wrong shape is ignored, with one warning line, instead of a traceback."""
    import shutil

    snap = tmp_path / snapshot[0].name
    shutil.copytree(snapshot[0], snap)
    extra = json.loads((snap / "extra.json").read_text())
    (snap / "extra.json").write_text(json.dumps({**extra, "producers": producers}))
    out = tmp_path / "out"
    res = run_cli(["export", str(snap), "--format", "saelens", "--sae", "none", "--out",
                   str(out)], timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: warning: "), res.stderr
    assert "extra.json" in lines[0] and "--context-size" in lines[0]
    assert json.loads((out / "cfg.json").read_text())["metadata"]["context_size"] is None


TRAINER_PT = {
    "list": lambda path: torch.save([1, 2], path),
    "counted-str": lambda path: torch.save(
        {**torch.load(path, weights_only=True), "counted_tokens": "many"}, path),
    "random-bytes": lambda path: path.write_bytes(os.urandom(3000)),
    "fired-shape": lambda path: torch.save(
        {**torch.load(path, weights_only=True), "fired_tokens": torch.zeros(3, dtype=torch.int64)},
        path),
}


@pytest.mark.parametrize("case", sorted(TRAINER_PT))
def test_export_refuses_a_hostile_trainer_pt_in_one_line(tmp_path, snapshot, case):
    """trainer.pt holds the firing counts the sparsity file is made of: anything but a state
    dict with [n] counts is refused, saying how to export without them."""
    src = _sae_copy(snapshot[0], tmp_path / "sae")
    TRAINER_PT[case](src / "trainer.pt")
    res = run_cli(["export", str(src), "--format", "saelens", "--out", str(tmp_path / "out")],
                  timeout=120)
    _one_line_error(res, "trainer.pt", "remove it to export without firing counts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


BAD_IMPORTS = {
    "hook-int": (lambda c, w: c["metadata"].update(hook_name=7), "hook 7"),
    "hook-list": (lambda c, w: c["metadata"].update(hook_name=["model.layers.1"]), "give --hook"),
    "model-list": (lambda c, w: c["metadata"].update(model_name=["tiny"]), "give --model"),
    "b_dec-fold-overflows": (
        lambda c, w: (c.update(apply_b_dec_to_input=False), w["W_enc"].fill_(3e38),
                      w["b_dec"].fill_(3e38)), "apply_b_dec_to_input false"),
    "rescale-fold-overflows": (
        lambda c, w: (c.update(rescale_acts_by_decoder_norm=True), w["W_enc"].fill_(3e38),
                      w["W_dec"].fill_(1.0)), "rescale_acts_by_decoder_norm"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMPORTS))
def test_import_refuses_what_it_cannot_record_or_compute(tmp_path, snapshot, case):
    """A hook or model that is not a string, and a fold that overflows float32 after the
    tensors were checked finite, are refused in one line; nothing is written."""
    edit, message = BAD_IMPORTS[case]
    src = _saelens_dir(tmp_path, snapshot[0], edit)
    out = tmp_path / "out"
    res = run_cli(["import", str(src), "--format", "saelens", "--out", str(out)], timeout=120)
    _one_line_error(res, message)
    assert not out.exists()


def test_import_refuses_a_sparsify_input_scale_that_is_a_bool(tmp_path, sparsify_export):
    src = _sae_copy(sparsify_export[0], tmp_path / "sp", name="model.layers.0",
                    cfg={"input_normalization": "scalar", "input_scale": True})
    res = run_cli(["import", str(src), "--format", "sparsify", "--out", str(tmp_path / "out")],
                  timeout=120)
    _one_line_error(res, "input_scale")
    assert not (tmp_path / "out").exists()


def test_openai_stats_that_overflow_int64_are_clamped(tmp_path):
    """stats_last_nonzero × tokens per step past int64 wrapped to negative counters (alive,
    to the dead-latent logic); clamped instead, with a note."""
    sd = openai_state()
    sd["stats_last_nonzero"] = torch.full((ON,), 2**62, dtype=torch.int64)
    sd["stats_last_nonzero"][0] = 3
    torch.save(sd, tmp_path / "l0.pt")
    out = tmp_path / "out"
    res = run_cli(["import", str(tmp_path / "l0.pt"), "--format", "openai", "--hook", "h",
                   "--out", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"exceeds 2^62 tokens for {ON - 1} latents" in res.stdout
    since = load_trainer(out / "step-00000000" / "l0").tokens_since_fired
    assert int(since[0]) == 3 * 131072 and bool((since[1:] == 2**62).all())
