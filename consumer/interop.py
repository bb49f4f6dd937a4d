"""Other tools' SAE formats: SAELens 6.x and EleutherAI's sparsify out and in, OpenAI's
released TopK SAEs in.

Every format maps onto one neutral record, `PortableSAE`: the four tensors of our
parametrisation (`consumer/sae.py`: z = ReLU(TopK(W_enc (x′ − b_dec) + b_enc)),
x̂′ = z W_dec + b_dec, on the normalised input x′) and what gives them their meaning (k, the
input normalisation). Readers check every tensor (present, floating point, its shape, finite)
and refuse what our SAE cannot compute (another activation, a skip connection, a per-token
rescaling) with one line naming it; writers never change a value they can copy. Where a
format lacks a feature of ours its effect is folded into the weights (the `scalar` constant;
SAELens' `apply_b_dec_to_input: false` and `rescale_acts_by_decoder_norm`), exact up to
float rounding, and said in `notes`.

No import of sae_lens or sparsify: the formats are files, and both packages are heavy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saestream.common.files import NotRegularFile, UnsafeArchive, check_torch_archive
from saestream.consumer.checkpoint import (
    EXTRA_JSON_VALUES,
    WEIGHT_NAMES,
    CheckpointError,
    load_sae,
    read_json_file,
)
from saestream.consumer.sae import LAYER_NORM_EPS

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""`metadata.sae_lens_version` of an export: the first version of the layout written."""
SPARSITY_FLOOR = 1e-10
"""Added to a firing frequency before its log10 (SAELens' own convention: a latent that never
fired gets -10, not -inf)."""
SPARSIFY_WEIGHTS = "sae.safetensors"
OPENAI_TOKENS_PER_STEP = 131072
"""Tokens per step of OpenAI's reference train.py (`Config.bs`): `stats_last_nonzero` counts
steps, our dead-latent counter tokens."""
TOKENS_SINCE_FIRED_CAP = 2**62
"""Largest dead-latent counter an import writes (`stats_last_nonzero` × tokens per step is
clamped to it): dead by any threshold, and far enough from int64's end that counting on
never overflows."""
OPENAI_IGNORED = ("latents_activation_frequency", "latents_mean_square")
"""Buffers of OpenAI's `Autoencoder` that no part of our SAE holds."""


class InteropError(Exception):
    """A file that cannot be read or written in the asked format; the message is one line."""


@dataclass
class PortableSAE:
    """One TopK SAE in our parametrisation, whatever file it came from or goes to."""

    name: str
    """Its name (the snapshot folder); from the source's folder or file when imported."""
    hook: str | None
    """Hook (module path) it reads, when the source says."""
    model: str | None
    """Model it was trained on, when the source says."""
    k: int
    """Latents kept per token."""
    weights: dict[str, torch.Tensor]
    """`encoder.weight` [n, d], `encoder.bias` [n], `W_dec` [n, d], `b_dec` [d]; float32, CPU."""
    input_normalization: str = "none"
    """`none`, `layer_norm` or `scalar` (consumer/sae.py)."""
    input_scale: float | None = None
    """The `scalar` constant c (x′ = c·x)."""
    multi_topk: bool = False
    tokens_since_fired: torch.Tensor | None = None
    """int64 [n]: our dead-latent counter, when the source has one."""
    fired_tokens: torch.Tensor | None = None
    """int64 [n]: tokens each latent fired on, over `counted_tokens` tokens."""
    counted_tokens: int = 0
    origin: dict[str, Any] | None = None
    """Where the source's own weights came from (its cfg.json `origin`)."""
    folded_scale: float | None = None
    """The `scalar` constant `fold_scalar` folded into the weights."""
    notes: list[str] = field(default_factory=list)
    """What was folded or left out on the way, for the command to say."""

    @property
    def d_in(self) -> int:
        return int(self.weights["b_dec"].shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.weights["encoder.bias"].shape[0])

    def describe(self) -> str:
        return (f"d_in {self.d_in}, {self.n_latents} latents, k {self.k}, "
                f"{self.input_normalization}")


# -- our snapshots ----------------------------------------------------------------------------


def read_ours(directory: Path) -> PortableSAE:
    """One SAE folder of a snapshot: its weights (as `saestream eval` reads them) and, when
    trainer.pt is there, the trainer's counters. Raises InteropError."""
    d = Path(directory)
    try:
        loaded = load_sae(d)
    except CheckpointError as exc:
        raise InteropError(str(exc)) from None
    cfg, sae = loaded.cfg, loaded.sae
    for key in ("hook", "model"):  # recorded in the export's metadata as they are
        value = cfg.get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise InteropError(f"{d}/cfg.json: {key} {value!r:.100} is not a non-empty string")
    p = PortableSAE(
        name=Path(os.path.abspath(d)).name, hook=cfg.get("hook"), model=cfg.get("model"),
        k=sae.cfg.k,
        weights={n: t.detach().float().cpu().contiguous() for n, t in sae.named_parameters()},
        input_normalization=sae.cfg.input_normalization, input_scale=sae.input_scale,
        multi_topk=sae.cfg.multi_topk,
        origin=cfg.get("origin") if isinstance(cfg.get("origin"), dict) else None,
    )
    if (d / "trainer.pt").is_file():
        _read_counters(p, d / "trainer.pt")
    return p


def _read_counters(p: PortableSAE, path: Path) -> None:
    """The firing counters of a snapshot's trainer.pt into `p`, checked (a state dict; int64
    [n] counts; `counted_tokens` a whole number >= every count). Raises InteropError."""
    fix = "(remove it to export without firing counts)"
    _check_archive(path, fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt files surface as many exception types
        raise InteropError(f"{path}: not a trainer state torch.load reads with weights_only=True "
                           f"({type(exc).__name__}: {_first_line(exc)}) {fix}") from None
    if not isinstance(state, dict):
        raise InteropError(f"{path}: holds a {type(state).__name__}, not a trainer state {fix}")
    n = p.n_latents
    since = state.get("tokens_since_fired")
    p.tokens_since_fired = since if _is_counts(since, n) else None  # not exported: not judged
    if "fired_tokens" not in state:
        return
    fired = state["fired_tokens"]
    if not _is_counts(fired, n):
        what = (f"a {str(fired.dtype).removeprefix('torch.')} tensor of shape "
                f"{list(fired.shape)}" if isinstance(fired, torch.Tensor)
                else f"a {type(fired).__name__}")
        raise InteropError(f"{path}: fired_tokens is {what}, expected [{n}] whole counts >= 0 "
                           f"{fix}")
    counted = state.get("counted_tokens")
    try:
        counted = _int(counted, "counted_tokens")
    except InteropError as exc:
        raise InteropError(f"{path}: {exc} {fix}") from None
    if counted < 0 or (fired.numel() and int(fired.max()) > counted):
        raise InteropError(f"{path}: counted_tokens {counted} is below the tokens a latent "
                           f"fired on {fix}")
    p.fired_tokens = fired.to(torch.int64)
    p.counted_tokens = counted


def _is_counts(t: object, n: int) -> bool:
    """Whether `t` is an integer tensor of shape [n] without negative values."""
    return _plain(t, COUNT_DTYPES) and tuple(t.shape) == (n,) and not bool((t < 0).any())


def snapshot_context(snapshot: Path, warn: Callable[[str], None] | None = None) -> int | None:
    """The context length the snapshot's producers read (`seq_len` of every stream its ledger
    holds), when there is exactly one; None otherwise (e.g. `saestream train` snapshots).
    Optional metadata: a missing extra.json gives None; one that is unreadable (a FIFO, too
    large, not JSON) or a ledger of the wrong shape gives None, and says why to `warn`."""
    try:  # checkpoint's reader: never blocks on a FIFO, bounded, RecursionError caught
        extra = read_json_file(Path(snapshot) / "extra.json", EXTRA_JSON_VALUES)
    except FileNotFoundError:
        return None
    except CheckpointError as exc:
        if warn is not None:
            warn(f"{exc}: no context size recorded (give --context-size)")
        return None
    producers = extra.get("producers") if isinstance(extra, dict) else None
    if producers is None:
        return None
    lens = set()
    bad = None
    if not isinstance(producers, dict):
        bad = f"producers is a {type(producers).__name__}, not a map"
    else:
        for name, entry in producers.items():
            stream = entry.get("stream") if isinstance(entry, dict) else None
            seq_len = stream.get("seq_len") if isinstance(stream, dict) else None
            if not isinstance(entry, dict) or not isinstance(stream, (dict, type(None))):
                bad = f"producer {name!r:.60} has no stream map"
            elif seq_len is None:
                continue
            elif not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
                bad = f"producer {name!r:.60} has seq_len {seq_len!r:.60}"
            else:
                lens.add(seq_len)
                continue
            break
    if bad is not None:
        if warn is not None:
            warn(f"{Path(snapshot) / 'extra.json'}: {bad}: no context size recorded "
                 "(give --context-size)")
        return None
    return lens.pop() if len(lens) == 1 else None


def fold_scalar(p: PortableSAE) -> PortableSAE:
    """The same SAE on raw inputs: with x′ = c·x, W_enc·c, b_dec/c and W_dec/c give the same
    latents and x̂ (b_enc unchanged). Other normalisations are returned as they are. Raises
    InteropError when c is not a positive number or the folded weights leave float32."""
    if p.input_normalization != "scalar":
        return p
    c = p.input_scale
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) or c <= 0:
        raise InteropError(f"{p.name}: scalar input constant {c!r} is not a positive number")
    c = float(c)
    w = p.weights
    folded = {
        "encoder.weight": _f32(w["encoder.weight"].double() * c),
        "encoder.bias": w["encoder.bias"],
        "W_dec": _f32(w["W_dec"].double() / c),
        "b_dec": _f32(w["b_dec"].double() / c),
    }
    _check_finite(folded, f"{p.name}: folding the scalar input constant c = {c!r}")
    note = (f"{p.name}: the scalar input constant c = {c!r} is folded into the weights "
            "(W_enc·c, W_dec/c, b_dec/c): the export reads raw activations")
    return dataclasses.replace(p, weights=folded, input_normalization="none",
                               input_scale=None, folded_scale=c, notes=[*p.notes, note])


# -- SAELens ----------------------------------------------------------------------------------


def write_saelens(p: PortableSAE, out: Path, *, context_size: int | None, prepend_bos: bool,
                  provenance: dict[str, Any]) -> None:
    """SAELens 6.x inference layout in `out` (created): cfg.json, sae_weights.safetensors and,
    when the trainer counted firings, sparsity.safetensors. `p` must not be `scalar`."""
    if p.input_normalization not in ("none", "layer_norm"):
        raise ValueError(f"fold the {p.input_normalization} normalisation first")
    out.mkdir(parents=True)
    w = p.weights
    cfg = {
        "architecture": "topk",
        "d_in": p.d_in,
        "d_sae": p.n_latents,
        "k": p.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": p.input_normalization,
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": p.model,
            "hook_name": p.hook,
            "context_size": context_size,
            "prepend_bos": prepend_bos,
            "saestream": provenance,
        },
    }
    save_file({"W_enc": w["encoder.weight"].t().contiguous(), "b_enc": w["encoder.bias"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(out / SAELENS_WEIGHTS))
    frequency = firing_frequency(p)
    if frequency is not None:
        save_file({"sparsity": torch.log10(frequency + SPARSITY_FLOOR).float()},
                  str(out / SAELENS_SPARSITY))
    _write_json(out / SAELENS_CFG, cfg)


def firing_frequency(p: PortableSAE) -> torch.Tensor | None:
    """Fraction of the counted tokens each latent fired on (float64 [n]); None when the
    trainer counted none (an import, a snapshot from before the counters)."""
    if p.fired_tokens is None or p.counted_tokens <= 0:
        return None
    return p.fired_tokens.double() / p.counted_tokens


def read_saelens(directory: Path, *, name: str | None = None) -> PortableSAE:
    """A SAELens SAE folder (cfg.json + sae_weights.safetensors; 6.x, or the older layout with
    `activation_fn` `topk`). TopK only. Raises InteropError."""
    d = Path(directory)
    cfg = _read_json(d / SAELENS_CFG, "saelens")
    if not (d / SAELENS_WEIGHTS).is_file():  # e.g. a sparsify folder: say what is missing
        raise InteropError(f"{d / SAELENS_WEIGHTS}: no such file (a saelens SAE folder holds it)")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch, k = _saelens_architecture(cfg, meta)
    if arch != "topk":
        raise InteropError(f"{d}: architecture {arch!r} is not TopK: only TopK SAEs import")
    tensors = _load_safetensors(d / SAELENS_WEIGHTS, "saelens")
    extra = sorted(set(tensors) - {"W_enc", "b_enc", "W_dec", "b_dec"})
    if extra:
        raise InteropError(f"{d}/{SAELENS_WEIGHTS}: tensors {', '.join(extra)} have no place "
                           "in a TopK SAE")
    what = f"{d}/{SAELENS_WEIGHTS}"
    w_enc = _tensor(tensors, "W_enc", None, what)
    if w_enc.ndim != 2:
        raise InteropError(f"{what}: W_enc has shape {tuple(w_enc.shape)}, expected [d_in, d_sae]")
    d_in, n = w_enc.shape
    for key, want in (("d_in", d_in), ("d_sae", n)):
        if cfg.get(key) is not None and cfg.get(key) != want:
            raise InteropError(f"{d}/{SAELENS_CFG}: {key} {cfg.get(key)} but W_enc has shape "
                               f"{[d_in, n]}")
    b_enc = _tensor(tensors, "b_enc", (n,), what)
    w_dec = _tensor(tensors, "W_dec", (n, d_in), what)
    b_dec = _tensor(tensors, "b_dec", (d_in,), what)
    _check_k(k, n, f"{d}/{SAELENS_CFG}")
    ours = meta.get("saestream") if isinstance(meta.get("saestream"), dict) else {}
    where = f"{d}/{SAELENS_CFG}"
    apply_b_dec = _flag(cfg, "apply_b_dec_to_input", True, where)
    rescale = _flag(cfg, "rescale_acts_by_decoder_norm", False, where)
    p = PortableSAE(
        name=name or _name(ours.get("name"), "metadata.saestream.name", where) or d.name,
        hook=meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point"))),
        model=meta.get("model_name", cfg.get("model_name")), k=k,
        weights={"encoder.weight": w_enc.t().contiguous(), "encoder.bias": b_enc,
                 "W_dec": w_dec, "b_dec": b_dec},
        origin=ours.get("origin") if isinstance(ours.get("origin"), dict) else None,
    )
    _note_dtype(p, tensors, what)
    if cfg.get("dtype", "float32") != "float32":
        p.notes.append(f"{p.name}: SAELens runs it in {cfg.get('dtype')}; imported in float32")
    p.input_normalization = _saelens_normalization(cfg.get("normalize_activations", "none"), p)
    if not apply_b_dec:
        # Their encoder reads x′ (b_dec not subtracted): b_enc + b_dec·W_enc compensates ours.
        p.weights["encoder.bias"] = _f32(b_enc.double() + b_dec.double() @ w_enc.double())
        _check_finite(p.weights, f"{what}: folding apply_b_dec_to_input false "
                      "(b_enc + b_dec·W_enc)")
        p.notes.append(f"{p.name}: apply_b_dec_to_input false: b_dec·W_enc is folded into b_enc")
    if rescale:
        _fold_decoder_norms(p, what)
        _check_finite(p.weights, f"{what}: folding rescale_acts_by_decoder_norm (W_enc and b_enc "
                      "times the decoder norms)")
    return p


def _saelens_architecture(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[str, int]:
    """(architecture, k). Files older than 6.0 name TopK by `activation_fn` `topk` with
    `activation_fn_kwargs.k` (SAELens reads them so)."""
    version = str(meta.get("sae_lens_version") or cfg.get("sae_lens_version") or "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    arch = str(cfg.get("architecture", "standard"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if major < 6 and (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk" \
            and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        return "topk", _int(kwargs["k"], "activation_fn_kwargs.k")
    return arch, _int(cfg.get("k", 100), "k") if arch == "topk" else 0  # SAELens' default


def _saelens_normalization(mode: object, p: PortableSAE) -> str:
    if mode is None or mode is False or mode == "none":
        return "none"
    if mode == "layer_norm":
        return "layer_norm"
    if mode == "expected_average_only_in":
        p.notes.append(f"{p.name}: normalize_activations expected_average_only_in reads raw "
                       "activations at inference in SAELens, and so does the import")
        return "none"
    raise InteropError(f"normalize_activations {mode!r} has no equivalent here (none, "
                       "layer_norm and expected_average_only_in import)")


def _fold_decoder_norms(p: PortableSAE, what: str) -> None:
    """`rescale_acts_by_decoder_norm`: their TopK ranks pre-activations times ‖W_dec_i‖ and
    decodes with unit rows; ours gets W_enc·‖W_dec_i‖, b_enc·‖W_dec_i‖, W_dec/‖W_dec_i‖."""
    w = p.weights
    norms = w["W_dec"].double().norm(dim=1)
    if bool((norms == 0).any()):
        raise InteropError(f"{what}: rescale_acts_by_decoder_norm with an all-zero W_dec row")
    w["encoder.weight"] = _f32(w["encoder.weight"].double() * norms[:, None])
    w["encoder.bias"] = _f32(w["encoder.bias"].double() * norms)
    w["W_dec"] = _f32(w["W_dec"].double() / norms[:, None])
    p.notes.append(f"{p.name}: rescale_acts_by_decoder_norm: the decoder norms are folded into "
                   "W_enc and b_enc")


# -- sparsify ---------------------------------------------------------------------------------


def sparsify_folders(saes: list[PortableSAE]) -> list[str]:
    """Sub-folder of each SAE in a sparsify run folder: its hook when every SAE reads its own
    (sparsify's convention, and the name SAELens' sparsify loader parses `layers.N` from),
    else its name. Each is one safe path component, else InteropError naming the SAE."""
    hooks = [p.hook for p in saes]
    use_hooks = None not in hooks and len({repr(h) for h in hooks}) == len(hooks)
    folders = []
    for p in saes:
        folder = p.hook if use_hooks else p.name
        if not _is_path_component(folder):
            what = f"hook {p.hook!r:.100}" if use_hooks else f"name {p.name!r:.100}"
            raise InteropError(f"SAE {p.name!r:.100}: {what} cannot be a sparsify folder name "
                               "(a non-empty name without /, \\, NUL, not . or ..)")
        folders.append(folder)
    return folders


def _is_path_component(name: object) -> bool:
    """Whether `name` is one non-empty path component naming a new entry of its directory."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in "/\\\0") and len(name.encode(errors="replace")) <= 255)


def path_inside(root: Path, name: str) -> Path:
    """`root / name`, checked to resolve to an entry directly inside `root`."""
    path = root / name
    if os.path.dirname(os.path.normpath(os.path.abspath(path))) != os.path.normpath(
            os.path.abspath(root)):
        raise InteropError(f"{name!r:.100} is not a folder name inside {root}")
    return path


def write_sparsify(saes: list[PortableSAE], out: Path, *, context_size: int | None,
                   provenance: dict[str, Any]) -> list[str]:
    """A sparsify run folder in `out` (created): config.json (model, hookpoints, ctx_len) and
    one `<folder>/cfg.json` + `sae.safetensors` per SAE. Returns the folders' names."""
    folders = sparsify_folders(saes)  # checked before anything is written
    if len(set(folders)) < len(folders):
        raise InteropError(f"two SAEs would share a sparsify folder ({', '.join(folders)})")
    out.mkdir(parents=True)
    models = {p.model for p in saes} - {None}
    for p, folder in zip(saes, folders, strict=True):
        if p.input_normalization not in ("none", "layer_norm"):
            raise ValueError(f"fold the {p.input_normalization} normalisation first")
        d = path_inside(out, folder)
        d.mkdir()
        save_file({n: p.weights[n] for n in WEIGHT_NAMES}, str(d / SPARSIFY_WEIGHTS))
        _write_json(d / "cfg.json", {
            "activation": "topk", "d_in": p.d_in, "num_latents": p.n_latents, "k": p.k,
            "multi_topk": p.multi_topk,
            # sparsify reads normalize_decoder only when it trains; SAELens' sparsify loader
            # turns it into apply_b_dec_to_input = not normalize_decoder, and b_dec *is*
            # subtracted from the input here.
            "normalize_decoder": False,
            "skip_connection": False, "transcode": False,
            "input_normalization": p.input_normalization,
            "layer_norm_eps": LAYER_NORM_EPS,
            "name": p.name, "hook": p.hook, "model": p.model,
        })
    _write_json(out / "config.json", {
        "model": models.pop() if len(models) == 1 else None,
        "hookpoints": [p.hook for p in saes],
        "ctx_len": context_size,
        "saestream": provenance,
    })
    return folders


def read_sparsify(source: Path, only: str | None = None) -> list[PortableSAE]:
    """A sparsify SAE folder (cfg.json + sae.safetensors) or run folder (one such folder per
    hookpoint, config.json beside them). TopK autoencoders only. Raises InteropError.
    `only`: of a run folder, read only the sub-folder of that name when there is one (a
    broken SAE beside it is not read)."""
    src = Path(source)
    if (src / "cfg.json").is_file():
        return [_read_sparsify_sae(src, {})]
    folders = sorted(d for d in src.iterdir() if (d / "cfg.json").is_file()) \
        if src.is_dir() else []
    if not folders:
        raise InteropError(f"{src}: neither a sparsify SAE folder (cfg.json, {SPARSIFY_WEIGHTS}) "
                           "nor a run folder of them")
    folders = [d for d in folders if d.name == only] or folders
    run = _read_json(src / "config.json", "sparsify") if (src / "config.json").is_file() else {}
    return [_read_sparsify_sae(d, run) for d in folders]


def _read_sparsify_sae(d: Path, run: Mapping[str, Any]) -> PortableSAE:
    cfg = _read_json(d / "cfg.json", "sparsify")
    if cfg.get("activation", "topk") != "topk":
        raise InteropError(f"{d}: activation {cfg.get('activation')!r} is not TopK: only TopK "
                           "SAEs import")
    where = f"{d}/cfg.json"
    multi_topk = _flag(cfg, "multi_topk", False, where)
    for flag, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection"),
                       ("signed", "signed activations")):
        if _flag(cfg, flag, False, where):
            raise InteropError(f"{d}: {flag} true ({what}) has no equivalent in a TopK SAE")
    what = f"{d}/{SPARSIFY_WEIGHTS}"
    tensors = _load_safetensors(d / SPARSIFY_WEIGHTS, "sparsify")
    extra = sorted(set(tensors) - set(WEIGHT_NAMES))
    if extra:
        raise InteropError(f"{what}: tensors {', '.join(extra)} have no place in a TopK SAE")
    enc = _tensor(tensors, "encoder.weight", None, what)
    if enc.ndim != 2:
        raise InteropError(f"{what}: encoder.weight has shape {tuple(enc.shape)}, expected "
                           "[num_latents, d_in]")
    n, d_in = enc.shape
    want_n = cfg.get("num_latents") or _int(cfg.get("d_in", 0), "d_in") * _int(
        cfg.get("expansion_factor", 32), "expansion_factor")
    if cfg.get("d_in") != d_in or want_n != n:
        raise InteropError(f"{d}/cfg.json: d_in {cfg.get('d_in')!r}, {want_n!r} latents, but "
                           f"encoder.weight has shape {[n, d_in]}")
    k = _int(cfg.get("k", 32), "k")
    _check_k(k, n, f"{d}/cfg.json")
    weights = {"encoder.weight": enc,
               "encoder.bias": _tensor(tensors, "encoder.bias", (n,), what),
               "W_dec": _tensor(tensors, "W_dec", (n, d_in), what),
               "b_dec": _tensor(tensors, "b_dec", (d_in,), what)}
    mode = str(cfg.get("input_normalization", "none"))  # ours; sparsify has none
    if mode not in ("none", "layer_norm", "scalar"):
        raise InteropError(f"{d}/cfg.json: input_normalization {mode!r} is not one of ours")
    scale = cfg.get("input_scale")
    if mode == "scalar" and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                 and math.isfinite(scale) and scale > 0):
        raise InteropError(f"{d}/cfg.json: scalar input normalisation without a valid "
                           "input_scale")
    p = PortableSAE(
        name=_name(cfg.get("name"), "name", where) or d.name, hook=cfg.get("hook") or d.name,
        model=cfg.get("model") or run.get("model"), k=k, weights=weights,
        input_normalization=mode, input_scale=float(scale) if mode == "scalar" else None,
        multi_topk=multi_topk and 4 * k <= n,
        origin=cfg.get("origin") if isinstance(cfg.get("origin"), dict) else None,
    )
    _note_dtype(p, tensors, what)
    return p


# -- OpenAI -----------------------------------------------------------------------------------


def read_openai(path: Path, *, tokens_per_step: int = OPENAI_TOKENS_PER_STEP) -> PortableSAE:
    """The `torch.save`d state dict of an SAE of OpenAI's release (sparse_autoencoder's
    `Autoencoder`), read with weights_only=True. Their forward, on layer-normalised x′:
    latents = TopK(encoder(x′ − pre_bias) + latent_bias) with ReLU after the TopK, recons =
    decoder(latents) + pre_bias, which is ours with b_dec = pre_bias, b_enc = latent_bias,
    W_dec = decoder.weightᵀ; their LN is our `layer_norm` (see LAYER_NORM_EPS).
    `stats_last_nonzero` counts steps: times `tokens_per_step` it is our dead-latent counter."""
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else \
            "not a regular file" if path.exists() else "no such file"
        raise InteropError(f"{path}: {what} (an openai SAE is one torch.save file)")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickles and zip archives fail in many ways
        raise InteropError(f"{path}: not a state dict torch.load reads with weights_only=True "
                           f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise InteropError(f"{path}: holds a {type(state).__name__}, not a state dict")
    # Their from_state_dict: no `activation` means ReLU.
    activation = state.get("activation", "ReLU")
    if activation != "TopK":
        raise InteropError(f"{path}: activation {activation!r} is not TopK: only TopK SAEs "
                           "import")
    act = state.get("activation_state_dict")
    if not isinstance(act, dict) or "k" not in act:
        raise InteropError(f"{path}: activation_state_dict has no k")
    if act.get("postact_fn", "ReLU") != "ReLU":
        raise InteropError(f"{path}: TopK with postact_fn {act.get('postact_fn')!r}: only ReLU "
                           "after the TopK imports")
    enc = _tensor(state, "encoder.weight", None, str(path))
    if enc.ndim != 2:
        raise InteropError(f"{path}: encoder.weight has shape {tuple(enc.shape)}, expected "
                           "[n_latents, d]")
    n, d = enc.shape
    k = _int(act["k"], "activation_state_dict.k")
    _check_k(k, n, str(path))
    p = PortableSAE(
        name=_stem_name(path), hook=None, model=None, k=k,
        weights={"encoder.weight": enc,
                 "encoder.bias": _tensor(state, "latent_bias", (n,), str(path)),
                 "W_dec": _tensor(state, "decoder.weight", (d, n), str(path)).t().contiguous(),
                 "b_dec": _tensor(state, "pre_bias", (d,), str(path))},
        input_normalization="layer_norm",
    )
    _note_dtype(p, state, str(path))
    stats = state.get("stats_last_nonzero")
    if stats is not None:
        if not _plain(stats, COUNT_DTYPES) or tuple(stats.shape) != (n,) \
                or bool((stats < 0).any()):
            raise InteropError(f"{path}: stats_last_nonzero must be [{n}] counts >= 0")
        p.tokens_since_fired, clamped = _steps_to_tokens(stats, tokens_per_step)
        if clamped:
            p.notes.append(f"{p.name}: stats_last_nonzero × {tokens_per_step} tokens per step "
                           f"exceeds 2^62 tokens for {clamped} latents: "
                           "clamped to it (dead either way)")
    known = {"activation", "activation_state_dict", "encoder.weight", "latent_bias",
             "decoder.weight", "pre_bias", "stats_last_nonzero", *OPENAI_IGNORED}
    unknown = sorted(str(key) for key in state if key not in known)
    if unknown:
        p.notes.append(f"{p.name}: entries {', '.join(unknown)} are not read")
    return p


# -- helpers ----------------------------------------------------------------------------------


def _tensor(tensors: Mapping[Any, Any], key: str, shape: tuple[int, ...] | None,
            what: str) -> torch.Tensor:
    """`tensors[key]` as float32, checked: present, floating point, `shape`, finite."""
    if key not in tensors:
        held = ", ".join(sorted(str(k) for k in tensors)) or "nothing"
        raise InteropError(f"{what}: no tensor {key!r} (holds {held})")
    t = tensors[key]
    if not _plain(t, FLOAT_DTYPES):
        kind = (f"{str(t.dtype).removeprefix('torch.')} ({t.layout}, on {t.device.type})"
                if isinstance(t, torch.Tensor) else type(t).__name__)
        raise InteropError(f"{what}: {key} is {kind}, expected a dense float16, bfloat16, "
                           "float32 or float64 tensor")
    if shape is not None and tuple(t.shape) != shape:
        raise InteropError(f"{what}: {key} has shape {list(t.shape)}, expected {list(shape)}")
    if t.numel() == 0:
        raise InteropError(f"{what}: {key} has shape {list(t.shape)}: it is empty")
    out = t.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(out).all()):  # after the cast: float64 past float32's range
        raise InteropError(f"{what}: {key} holds NaN or infinite values (or float64 values "
                           "beyond float32's range)")
    return out


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COUNT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _plain(t: Any, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether `t` is a dense tensor in memory of one of `dtypes` (what `weights_only`
    loads may also be sparse, on the meta device, float8, complex or uint64, which the
    checks after this one cannot even compare)."""
    return isinstance(t, torch.Tensor) and t.layout == torch.strided \
        and t.device.type == "cpu" and t.dtype in dtypes


def _note_dtype(p: PortableSAE, tensors: Mapping[Any, Any], what: str) -> None:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()} - {"float32"}
    if dtypes:
        p.notes.append(f"{p.name}: {what} stores {', '.join(sorted(dtypes))}; read as float32 "
                       "(exact)")


def _load_safetensors(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InteropError(f"{path}: no such file (a {fmt} SAE folder holds it)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own and OS errors
        raise InteropError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_json(path: Path, fmt: str) -> dict[str, Any]:
    """A JSON object file of the source, read as checkpoint.py reads ours: a FIFO or device
    refused without blocking, at most MAX_SMALL_FILE bytes, nesting too deep for the parser
    one line; InteropError for all of them."""
    try:
        obj = read_json_file(path)
    except FileNotFoundError:
        raise InteropError(f"{path}: no such file (a {fmt} SAE folder holds it)") from None
    except CheckpointError as exc:
        raise InteropError(str(exc)) from None
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: not a JSON object")
    return obj


def _check_archive(path: Path, fix: str = "") -> None:
    """InteropError unless `path` is a zip archive of stored entries (`check_torch_archive`):
    torch.load inflates compressed entries to the size they state, however small the file,
    and mmap=True would read compressed bytes as values."""
    try:
        check_torch_archive(path)
    except (UnsafeArchive, NotRegularFile) as exc:
        raise InteropError(f"{exc} {fix}".rstrip()) from None
    except OSError as exc:
        raise InteropError(f"{path}: cannot read it ({exc.strerror or exc}) {fix}".rstrip()) \
            from None


def _flag(cfg: Mapping[str, Any], key: str, default: bool, where: object) -> bool:
    """`cfg[key]` when it is a JSON boolean, `default` when missing: a string, a number or
    NaN is no flag (truthiness would turn "false" and NaN into true)."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise InteropError(f"{where}: {key} {value!r:.100} is not true or false")
    return value


def _name(value: object, what: str, where: object) -> str | None:
    """A name from a source's config: a string, or None when absent or empty (the folder's
    name is used then); a number or a list is refused, not turned into a string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InteropError(f"{where}: {what} {value!r:.100} is not a string")
    return value or None


def _int(value: object, what: str) -> int:
    if _plain(value, COUNT_DTYPES) and value.numel() == 1:  # type: ignore[union-attr]
        value = int(value)  # type: ignore[call-overload]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InteropError(f"{what} is {value!r}, not a whole number")
    return value


def _check_k(k: int, n: int, what: str) -> None:
    if not 1 <= k <= n:
        raise InteropError(f"{what}: k {k} is not between 1 and the {n} latents")


def _stem_name(path: Path) -> str:
    """A snapshot folder name from a file name: `layer_8.pt` -> `layer_8`."""
    stem = "".join(c if c.isalnum() or c in "._+-" else "_" for c in path.stem)
    return stem.lstrip("._+-") or "sae"


def _steps_to_tokens(stats: torch.Tensor, tokens_per_step: int) -> tuple[torch.Tensor, int]:
    """int64 `stats` × `tokens_per_step`, each product clamped to TOKENS_SINCE_FIRED_CAP
    (never overflowing on the way); and how many were clamped."""
    s = stats.to(torch.int64)
    limit = TOKENS_SINCE_FIRED_CAP // tokens_per_step  # 0 when one step already exceeds it
    over = s > limit
    tokens = s.clamp(max=limit) * min(tokens_per_step, TOKENS_SINCE_FIRED_CAP)
    return tokens.masked_fill(over, TOKENS_SINCE_FIRED_CAP), int(over.sum())


def _check_finite(weights: Mapping[str, torch.Tensor], what: str) -> None:
    """InteropError naming the first tensor of `weights` that holds NaN or infinite values
    (a fold that overflowed float32)."""
    for key, t in weights.items():
        if not bool(torch.isfinite(t).all()):
            raise InteropError(f"{what} overflows float32: {key} would hold infinite or NaN "
                               "values")


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, at most 200 characters, on one line."""
    text = str(exc).strip()
    return text.split(".")[0].splitlines()[0][:200] if text else ""


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
