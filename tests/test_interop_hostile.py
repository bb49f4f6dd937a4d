"""`saestream import` and `export` on hostile files: a FIFO or a device where a JSON file
should be, JSON nested past the parser's recursion limit, a compressed torch archive, flags
and names of the wrong JSON type. Each is one `saestream: error:` line and exit code 2
(`extra.json`, optional context for an export, one warning line), never a hang, a traceback
or an allocation the file's size does not bound."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from test_interop import _one_line_error, invoke, openai_state, trained

from saestream.consumer.checkpoint import load_sae, save_snapshot
from saestream.consumer.interop_cli import export, import_command

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TIMEOUT = 60
"""Seconds a refused command may take: a hang fails the test instead of the suite."""
NESTED = "[" * 100_000 + "]" * 100_000
"""Valid JSON that Python's recursive parser cannot read (RecursionError)."""


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A snapshot of one trained SAE (`none`), with firing counts and a producer ledger."""
    root = tmp_path_factory.mktemp("hostile")
    return save_snapshot(root, 4, {"none": trained("none", 0)},
                         extra={"producers": {"p1": {"stream": {"seq_len": 64}}}})


@pytest.fixture(scope="module")
def saelens_dir(snapshot, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saelens") / "sl"
    invoke(export, snapshot, "--format", "saelens", "--out", out)
    return out


@pytest.fixture(scope="module")
def sparsify_dir(snapshot, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sparsify") / "sp"
    invoke(export, snapshot, "--format", "sparsify", "--out", out)
    return out


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))  # NaN stays NaN: Python's JSON reads it back


def _import(src: Path, fmt: str, out: Path, *extra: str, **kw):
    return run_cli(["import", str(src), "--format", fmt, *extra, "--out", str(out)],
                   timeout=TIMEOUT, **kw)


def _limit_memory() -> None:  # a reader without bound dies of MemoryError, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _deflated(path: Path) -> None:
    """Rewrite the torch.save archive at `path` with every entry deflated: what torch.load
    inflates to the size the archive states (a few bytes could ask for gigabytes)."""
    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries:
            dst.writestr(name, data)


# -- D1: a cfg.json that is no regular file ---------------------------------------------------


def test_import_saelens_refuses_a_fifo_cfg_json(tmp_path, saelens_dir):
    """open() of a FIFO waits for a writer forever: the import hung."""
    src = _copy(saelens_dir, tmp_path / "sl")
    (src / "cfg.json").unlink()
    os.mkfifo(src / "cfg.json")
    res = _import(src, "saelens", tmp_path / "out")
    _one_line_error(res, "cfg.json", "not a regular file (a FIFO)")
    assert not (tmp_path / "out").exists()


def test_import_saelens_refuses_a_cfg_json_linked_to_dev_zero(tmp_path, saelens_dir):
    """/dev/zero never ends: the import read it into memory without bound."""
    src = _copy(saelens_dir, tmp_path / "sl")
    (src / "cfg.json").unlink()
    (src / "cfg.json").symlink_to("/dev/zero")
    res = _import(src, "saelens", tmp_path / "out", preexec_fn=_limit_memory)
    _one_line_error(res, "cfg.json", "not a regular file (a character device)")


# -- D2: an extra.json that is no regular file (export) -----------------------------------------


def _export_warning(snap: Path, fmt: str, out: Path) -> str:
    """Export `snap` as `fmt`: it must succeed with exactly one warning line, returned."""
    res = run_cli(["export", str(snap), "--format", fmt, "--out", str(out)], timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: warning: "), res.stderr
    return lines[0]


def test_export_with_a_fifo_extra_json_warns_and_records_no_context(tmp_path, snapshot):
    """extra.json only gives the context size: a FIFO there (which hung the export) is one
    warning, and the export goes on without it."""
    snap = _copy(snapshot, tmp_path / snapshot.name)
    (snap / "extra.json").unlink()
    os.mkfifo(snap / "extra.json")
    out = tmp_path / "out"
    line = _export_warning(snap, "saelens", out)
    assert "extra.json" in line and "FIFO" in line and "--context-size" in line
    assert json.loads((out / "cfg.json").read_text())["metadata"]["context_size"] is None


# -- D3: JSON nested too deeply to parse --------------------------------------------------------


@pytest.mark.parametrize("where", ["saelens cfg.json", "sparsify config.json",
                                   "sparsify cfg.json"])
def test_import_refuses_json_nested_too_deeply(tmp_path, saelens_dir, sparsify_dir, where):
    fmt, name = where.split()
    src = _copy(saelens_dir if fmt == "saelens" else sparsify_dir, tmp_path / "src")
    target = src / name if fmt == "saelens" or name == "config.json" else \
        next(src.glob("*/cfg.json"))
    target.write_text(NESTED)
    res = _import(src, fmt, tmp_path / "out")
    _one_line_error(res, name, "not JSON (nested too deeply)")
    assert not (tmp_path / "out").exists()


def test_export_with_an_extra_json_nested_too_deeply_warns(tmp_path, snapshot):
    snap = _copy(snapshot, tmp_path / snapshot.name)
    (snap / "extra.json").write_text(NESTED)
    out = tmp_path / "out"
    assert "extra.json: not JSON (nested too deeply)" in _export_warning(snap, "sparsify", out)
    assert json.loads((out / "config.json").read_text())["ctx_len"] is None


# -- D7: compressed torch archives --------------------------------------------------------------


def test_export_refuses_a_compressed_trainer_pt(tmp_path, snapshot):
    sae = _copy(snapshot / "none", tmp_path / "sae")
    _deflated(sae / "trainer.pt")
    res = run_cli(["export", str(sae), "--format", "saelens", "--out", str(tmp_path / "out")],
                  timeout=TIMEOUT)
    _one_line_error(res, "trainer.pt", "compressed", "remove it to export without firing counts")
    assert not (tmp_path / "out").exists()


def test_import_openai_refuses_a_compressed_file(tmp_path):
    path = tmp_path / "layer_0.pt"
    torch.save(openai_state(), path)
    _deflated(path)
    res = _import(path, "openai", tmp_path / "out", "--hook", "h")
    _one_line_error(res, "layer_0.pt", "compressed")
    assert not (tmp_path / "out").exists()


def test_import_openai_still_reads_an_uncompressed_file(tmp_path):
    """The check refuses nothing torch.save writes; mmap=True reads the same values."""
    sd = openai_state()
    torch.save(sd, tmp_path / "layer_0.pt")
    invoke(import_command, tmp_path / "layer_0.pt", "--format", "openai", "--hook", "h",
           "--out", tmp_path / "out")
    got = dict(load_sae(tmp_path / "out" / "step-00000000" / "layer_0").sae.named_parameters())
    assert torch.equal(got["encoder.weight"], sd["encoder.weight"])
    assert torch.equal(got["b_dec"], sd["pre_bias"])


# -- D9: flags and names of the wrong JSON type -------------------------------------------------


BAD_SAELENS_CFG = {
    "b_dec-str-false": (lambda c: c.update(apply_b_dec_to_input="false"),
                        "apply_b_dec_to_input 'false' is not true or false"),
    "b_dec-str": (lambda c: c.update(apply_b_dec_to_input="x"),
                  "apply_b_dec_to_input 'x' is not true or false"),
    "b_dec-list": (lambda c: c.update(apply_b_dec_to_input=[1]),
                   "apply_b_dec_to_input [1] is not true or false"),
    "b_dec-nan": (lambda c: c.update(apply_b_dec_to_input=math.nan),
                  "apply_b_dec_to_input nan is not true or false"),
    "rescale-str-false": (lambda c: c.update(rescale_acts_by_decoder_norm="false"),
                          "rescale_acts_by_decoder_norm 'false' is not true or false"),
    "rescale-nan": (lambda c: c.update(rescale_acts_by_decoder_norm=math.nan),
                    "rescale_acts_by_decoder_norm nan is not true or false"),
    "rescale-one": (lambda c: c.update(rescale_acts_by_decoder_norm=1),
                    "rescale_acts_by_decoder_norm 1 is not true or false"),
    "name-int": (lambda c: c["metadata"]["saestream"].update(name=5),
                 "metadata.saestream.name 5 is not a string"),
}


def _refused_in_process(command, args: list[str], *needles: str) -> None:
    """Exit code 2 and one `saestream: error:` line naming `needles` (an exception would
    escape: catch_exceptions=False)."""
    res = CliRunner().invoke(command, args, catch_exceptions=False)
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", sorted(BAD_SAELENS_CFG))
def test_import_saelens_refuses_flags_and_names_of_the_wrong_type(tmp_path, saelens_dir, case):
    """A string or NaN flag was taken for true (folding what should not be folded), a number
    name became a string."""
    edit, needle = BAD_SAELENS_CFG[case]
    src = _copy(saelens_dir, tmp_path / "sl")
    _edit_json(src / "cfg.json", edit)
    _refused_in_process(import_command, [str(src), "--format", "saelens", "--out",
                                         str(tmp_path / "out")], "cfg.json", needle)
    assert not (tmp_path / "out").exists()


def test_import_saelens_still_reads_real_booleans(tmp_path, saelens_dir):
    src = _copy(saelens_dir, tmp_path / "sl")
    _edit_json(src / "cfg.json", lambda c: (c.pop("apply_b_dec_to_input"),
                                            c.update(rescale_acts_by_decoder_norm=False)))
    invoke(import_command, src, "--format", "saelens", "--out", tmp_path / "out")
    assert (tmp_path / "out" / "step-00000000" / "none" / "cfg.json").is_file()


BAD_SPARSIFY_CFG = {
    "multi_topk-str": ({"multi_topk": "x"}, "multi_topk 'x' is not true or false"),
    "multi_topk-int": ({"multi_topk": 1}, "multi_topk 1 is not true or false"),
    "multi_topk-null": ({"multi_topk": None}, "multi_topk None is not true or false"),
    "transcode-str-false": ({"transcode": "false"}, "transcode 'false' is not true or false"),
    "name-int": ({"name": 5}, "name 5 is not a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPARSIFY_CFG))
def test_import_sparsify_refuses_flags_and_names_of_the_wrong_type(tmp_path, sparsify_dir, case):
    update, needle = BAD_SPARSIFY_CFG[case]
    src = _copy(sparsify_dir, tmp_path / "sp")
    _edit_json(next(src.glob("*/cfg.json")), lambda c: c.update(update))
    _refused_in_process(import_command, [str(src), "--format", "sparsify", "--out",
                                         str(tmp_path / "out")], "cfg.json", needle)
    assert not (tmp_path / "out").exists()


# -- tensors `weights_only` loads that no check could compare --------------------------------


def _huge(t: torch.Tensor) -> torch.Tensor:
    out = t.double()
    out[0] = 1e300  # beyond float32: it would import as infinity
    return out


HOSTILE_OPENAI = {
    "empty width": (lambda sd: sd.update({
        "encoder.weight": torch.zeros(sd["encoder.weight"].shape[0], 0),
        "decoder.weight": torch.zeros(0, sd["encoder.weight"].shape[0]),
        "pre_bias": torch.zeros(0)}), "encoder.weight has shape", "it is empty"),
    "float8": (lambda sd: sd.update({"encoder.weight": sd["encoder.weight"].to(
        torch.float8_e4m3fn)}), "encoder.weight is float8_e4m3fn", "expected a dense"),
    "sparse": (lambda sd: sd.update({"decoder.weight": sd["decoder.weight"].to_sparse()}),
               "decoder.weight is float32 (torch.sparse_coo", "expected a dense"),
    "meta": (lambda sd: sd.update({"encoder.weight": torch.empty(
        sd["encoder.weight"].shape, device="meta")}), "on meta", "expected a dense"),
    "complex counts": (lambda sd: sd.update({"stats_last_nonzero": sd[
        "stats_last_nonzero"].to(torch.complex64)}), "stats_last_nonzero must be"),
    "uint64 counts": (lambda sd: sd.update({"stats_last_nonzero": sd[
        "stats_last_nonzero"].to(torch.uint64)}), "stats_last_nonzero must be"),
    "float64 past float32": (lambda sd: sd.update({"pre_bias": _huge(sd["pre_bias"])}),
                             "pre_bias holds NaN or infinite values", "beyond float32"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_OPENAI))
def test_import_openai_refuses_tensors_of_every_odd_kind_in_one_line(tmp_path, case):
    """Each was a traceback (a sparse tensor's was hundreds of lines), or, for float64 past
    float32's range, a snapshot of infinities that every other command then refused."""
    edit, *needles = HOSTILE_OPENAI[case]
    sd = openai_state()
    edit(sd)
    torch.save(sd, tmp_path / "layer_0.pt")
    _refused_in_process(import_command, [str(tmp_path / "layer_0.pt"), "--format", "openai",
                                         "--hook", "h", "--out", str(tmp_path / "out")],
                        *needles)
    assert not (tmp_path / "out").exists()


def test_import_sparsify_sae_reads_only_the_sub_folder_named(tmp_path, sparsify_dir):
    """A broken SAE beside the one asked for stopped the import of the good one."""
    src = _copy(sparsify_dir, tmp_path / "sp")
    good = next(src.glob("*/cfg.json")).parent
    _copy(good, src / "broken")
    _edit_json(src / "broken" / "cfg.json", lambda c: c.update(k=0))
    _refused_in_process(import_command, [str(src), "--format", "sparsify", "--out",
                                         str(tmp_path / "all")], "broken", "k 0")
    invoke(import_command, src, "--format", "sparsify", "--sae", good.name, "--out",
           tmp_path / "one")
    assert len(list((tmp_path / "one" / "step-00000000").glob("*/cfg.json"))) == 1
