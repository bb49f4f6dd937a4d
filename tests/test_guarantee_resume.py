"""Resume follows `latest`, within one run (issue 9, item 4), with real consumer processes.

One base run (two SAEs, snapshots at steps 2, 4 and 6) is written once; each test damages a
copy of its checkpoint directory the way a crash, an operator or another run would, then
starts `saestream consumer --resume` on it. Unit-level cases of the same rules (pruning,
which snapshots are offered) are at the end and in test_checkpoint.py.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_tcp_port, run_cli
from test_checkpoint import trained
from test_consumer import HOOK, Consumer, Sender, latest, snapshot_dirs

from saestream.consumer import checkpoint as ckpt_mod
from saestream.consumer.checkpoint import (
    check_complete,
    list_snapshots,
    prune_snapshots,
    read_run_id,
    resumable,
    save_snapshot,
    write_run_id,
)

SAES = ("--sae", "name=k4,latents=128,k=4,k_aux=32", "--sae", "name=k8,latents=256,k=8,k_aux=32")
OTHER_RUN = "0therrun0000"


def extra_of(snap: Path) -> dict:
    return json.loads((snap / "extra.json").read_text())


def set_run(snap: Path, run_id: str) -> None:
    (snap / "extra.json").write_text(json.dumps({**extra_of(snap), "run_id": run_id}))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, str]:
    """A finished run's checkpoint directory (step-00000002, 4 and 6) and its run id."""
    work = tmp_path_factory.mktemp("base")
    ckpt = work / "ckpt"
    c = Consumer(work, *SAES, "--checkpoint-every", "2", "--max-steps", "6", "--keep", "0",
                 ckpt=ckpt)
    sender = Sender(c.endpoint)
    try:
        sender.in_background(200)
        assert c.wait_exit() == 0, c.log()
    finally:
        sender.close()
        c.close()
    assert snapshot_dirs(ckpt) == ["step-00000002", "step-00000004", "step-00000006"]
    run_id = read_run_id(ckpt)
    assert run_id and all(extra_of(p)["run_id"] == run_id for p in list_snapshots(ckpt))
    return ckpt, run_id


@pytest.fixture
def run_dir(base_run, tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the base run's checkpoint directory, and the run id."""
    ckpt, run_id = base_run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    return copy, run_id


@pytest.fixture
def resume(tmp_path: Path):
    """`resume(ckpt, *args)`: a consumer with `--resume` and the base run's SAEs, fed by a
    sender until it exits (--max-steps); returns it after checking it exited 0."""
    started: list[tuple[Consumer, Sender]] = []

    def run(ckpt: Path, *args: str) -> Consumer:
        c = Consumer(tmp_path, *SAES, "--resume", *args, ckpt=ckpt)
        s = Sender(c.endpoint)
        started.append((c, s))
        s.in_background(200, run="r2")
        assert c.wait_exit() == 0, c.log()
        return c

    yield run
    for c, s in started:
        s.close()
        c.close()


def resumed_from(c: Consumer, snap: Path, run_id: str, step: int) -> bool:
    return f"resumed from {snap} (run {run_id}): step {step}," in c.log()


def final_state(snap: Path, run_id: str, step: int) -> None:
    """`snap` is a complete snapshot of `run_id` at `step`, both SAEs there."""
    extra = check_complete(snap)
    assert extra["run_id"] == run_id and extra["step"] == step
    assert sorted(extra["saes"]) == ["k4", "k8"]
    for name in ("k4", "k8"):
        assert json.loads((snap / name / "trainer.json").read_text())["step"] == step


# -- through the CLI ---------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_follows_latest_not_a_stale_higher_snapshot_of_another_run(run_dir, resume):
    ckpt, run_id = run_dir
    stale = ckpt / "step-00000361"
    shutil.copytree(ckpt / "step-00000006", stale)
    set_run(stale, OTHER_RUN)
    c = resume(ckpt, "--max-steps", "8", "--keep", "1")
    assert resumed_from(c, ckpt / "step-00000006", run_id, 6), c.log()
    final_state(latest(ckpt), run_id, 8)
    # --keep 1 pruned this run's older snapshots and nothing of the other run
    assert snapshot_dirs(ckpt) == ["step-00000008", "step-00000361"]
    assert extra_of(stale)["run_id"] == OTHER_RUN


@pytest.mark.slow
@pytest.mark.parametrize("other_run_between", [False, True], ids=["alone", "other-run-between"])
def test_a_snapshot_without_extra_json_is_skipped_for_the_older_one_of_the_same_run(
    run_dir, resume, other_run_between: bool
) -> None:
    ckpt, run_id = run_dir
    (ckpt / "step-00000006" / "extra.json").unlink()
    if other_run_between:  # never the fallback: it belongs to another run
        shutil.copytree(ckpt / "step-00000004", ckpt / "step-00000005")
        set_run(ckpt / "step-00000005", OTHER_RUN)
    c = resume(ckpt, "--max-steps", "8", "--checkpoint-every", "2", "--keep", "2")
    assert resumed_from(c, ckpt / "step-00000004", run_id, 4), c.log()
    assert f"skipping incomplete snapshot {ckpt / 'step-00000006'}" in c.log()
    # the new snapshots are kept (step 6 rewritten complete), the older ones pruned
    assert snapshot_dirs(ckpt) == (["step-00000005"] if other_run_between else []) + [
        "step-00000006", "step-00000008"]
    final_state(ckpt / "step-00000006", run_id, 6)
    final_state(latest(ckpt), run_id, 8)
    if other_run_between:
        assert extra_of(ckpt / "step-00000005")["run_id"] == OTHER_RUN


@pytest.mark.slow
def test_an_empty_step_directory_is_not_resumed_nor_counted_by_keep(run_dir, resume) -> None:
    ckpt, run_id = run_dir
    (ckpt / "step-99999999").mkdir()
    c = resume(ckpt, "--max-steps", "8", "--checkpoint-every", "2", "--keep", "2")
    assert resumed_from(c, ckpt / "step-00000006", run_id, 6), c.log()
    assert snapshot_dirs(ckpt) == ["step-00000006", "step-00000008", "step-99999999"]
    assert latest(ckpt).name == "step-00000008"
    final_state(ckpt / "step-00000006", run_id, 6)
    final_state(ckpt / "step-00000008", run_id, 8)
    assert not any((ckpt / "step-99999999").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["sae-folder", "one-file"])
def test_a_multi_sae_snapshot_missing_one_sae_falls_back_to_the_older_complete_one(
    run_dir, resume, damage: str
) -> None:
    ckpt, run_id = run_dir
    if damage == "sae-folder":
        shutil.rmtree(ckpt / "step-00000006" / "k8")
    else:
        (ckpt / "step-00000006" / "k8" / "trainer.pt").unlink()
    c = resume(ckpt, "--max-steps", "8")
    assert resumed_from(c, ckpt / "step-00000004", run_id, 4), c.log()
    warning = next(x for x in c.log().splitlines() if "skipping incomplete snapshot" in x)
    assert "step-00000006" in warning and "SAE k8 lacks" in warning
    final_state(latest(ckpt), run_id, 8)


def run_resume_cli(ckpt: Path, *args: str):
    return run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{free_tcp_port()}",
                    "--metrics-port", "0", "--hook", HOOK, *SAES, "--checkpoint-dir",
                    str(ckpt), *args], timeout=120)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [x for x in stderr.splitlines() if x.startswith("saestream: error:")]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt-weights", "no-extra-json"])
def test_no_readable_snapshot_is_an_error_not_a_silent_fresh_start(run_dir, damage) -> None:
    ckpt, _ = run_dir
    for snap in list_snapshots(ckpt):
        if damage == "corrupt-weights":
            (snap / "k4" / "sae.safetensors").write_bytes(b"\0 not safetensors")
        else:
            (snap / "extra.json").unlink()
    before = sorted(p.name for p in ckpt.iterdir())
    res = run_resume_cli(ckpt, "--resume")
    assert res.returncode == 2, res.stderr
    assert error_lines(res.stderr) == [
        f"saestream: error: --resume: no readable snapshot of the run in {ckpt} (see the "
        "warnings above); --overwrite starts over"
    ]
    assert res.stderr.strip().splitlines()[-1].startswith("saestream: error:")
    for step in ("00000002", "00000004", "00000006"):
        assert f"step-{step}" in res.stderr  # a warning for each one skipped
    assert sorted(p.name for p in ckpt.iterdir()) == before


@pytest.mark.slow
@pytest.mark.parametrize("holds", ["snapshots", "run-file-only"])
def test_starting_without_resume_where_a_run_is_is_refused_and_overwrite_starts_over(
    run_dir, tmp_path: Path, holds: str
) -> None:
    ckpt, run_id = run_dir
    if holds == "run-file-only":  # a run killed before its first snapshot
        ckpt = tmp_path / "killed-early"
        ckpt.mkdir()
        write_run_id(ckpt, "killedearly0")
    res = run_resume_cli(ckpt)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"saestream: error: --checkpoint-dir {ckpt} already holds a run: pass --resume to "
        "continue it, --overwrite to discard it, or choose a new directory"
    ]
    if holds == "run-file-only":
        return
    c = Consumer(tmp_path, *SAES, "--overwrite", "--max-steps", "2", ckpt=ckpt)
    s = Sender(c.endpoint)
    try:
        s.in_background(200)
        assert c.wait_exit() == 0, c.log()
    finally:
        s.close()
        c.close()
    assert "--overwrite: deleting the run" in c.log()
    new_run = read_run_id(ckpt)
    assert new_run and new_run != run_id
    assert snapshot_dirs(ckpt) == ["step-00000002"]
    final_state(latest(ckpt), new_run, 2)


@pytest.mark.slow
def test_a_second_consumer_on_a_checkpoint_dir_in_use_is_refused_until_the_first_is_gone(
    run_dir, tmp_path: Path
) -> None:
    """Two consumers resuming one directory would overwrite each other's snapshots, remove
    each other's temporaries and prune each other's steps: the second is refused while the
    first runs, and a first killed with -9 leaves no stale lock."""
    ckpt, run_id = run_dir
    first = Consumer(tmp_path, *SAES, "--resume", ckpt=ckpt)
    try:
        first.wait_for("start-up", lambda: first.metrics() is not None)
        before = sorted(p.name for p in ckpt.iterdir())
        res = run_resume_cli(ckpt, "--resume")
        assert res.returncode == 2, res.stderr
        assert error_lines(res.stderr) == res.stderr.splitlines() == [
            f"saestream: error: --checkpoint-dir {ckpt}: another process is using it (is "
            "this run's consumer still running?)"]
        assert sorted(p.name for p in ckpt.iterdir()) == before
        assert first.proc.poll() is None and first.metrics() is not None
        first.proc.kill()
        first.proc.wait(30)
    finally:
        first.close()
    second = Consumer(tmp_path, *SAES, "--resume", ckpt=ckpt)
    try:
        second.wait_for("start-up", lambda: second.metrics() is not None)
        assert resumed_from(second, ckpt / "step-00000006", run_id, 6), second.log()
    finally:
        second.close()


@pytest.mark.slow
def test_stale_temporaries_are_removed_at_start_up(run_dir, tmp_path: Path) -> None:
    ckpt, run_id = run_dir
    stale = [ckpt / ".tmp-step-00000008-0badc0de", ckpt / ".old-step-00000004-0ddba11e",
             ckpt / ".del-step-00000002-5ca1ab1e"]  # a prune killed midway
    for d in stale:
        shutil.copytree(ckpt / "step-00000004", d)  # as big as a real one
    (stale[-1] / "extra.json").unlink()
    (ckpt / ".latest.tmp").write_text("step-00000008\n")
    (ckpt / ".tmp-run.json").write_text("{")
    c = Consumer(tmp_path, *SAES, "--resume", ckpt=ckpt)
    try:
        c.wait_for("start-up", lambda: c.metrics() is not None)
        assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []
        for d in stale:
            assert f"removed {d}, left by an interrupted snapshot" in c.log()
        assert resumed_from(c, ckpt / "step-00000006", run_id, 6), c.log()
        c.signal(signal.SIGTERM)
        assert c.wait_exit() == 0, c.log()
    finally:
        c.close()


@pytest.mark.slow
def test_a_kill_between_the_renames_of_a_rewrite_loses_no_snapshot(run_dir, resume) -> None:
    """Rewriting step 6 moves the old one to `.old-` before the new one leaves `.tmp-`; a
    kill -9 between the two renames left `latest` naming nothing, and the next start
    deleted both complete copies: the run was gone (found by a probe, with strace)."""
    ckpt, run_id = run_dir
    old = ckpt / ".old-step-00000006-deadbeef"
    (ckpt / "step-00000006").rename(old)
    shutil.copytree(old, ckpt / ".tmp-step-00000006-feedface")
    for older in ("step-00000002", "step-00000004"):
        shutil.rmtree(ckpt / older)  # the only snapshot, as with --keep 1
    c = resume(ckpt, "--max-steps", "8")
    assert f"put step-00000006 back from {old.name}" in c.log()
    assert resumed_from(c, ckpt / "step-00000006", run_id, 6), c.log()
    final_state(latest(ckpt), run_id, 8)


@pytest.mark.slow
def test_garbage_in_latest_is_named_and_the_newest_snapshot_resumed(run_dir, resume) -> None:
    ckpt, run_id = run_dir
    (ckpt / "latest").write_bytes(b"\xff\x00not a snapshot name")
    c = resume(ckpt, "--max-steps", "8")
    assert "latest names no snapshot (garbage in it)" in c.log()
    assert resumed_from(c, ckpt / "step-00000006", run_id, 6), c.log()


@pytest.mark.slow
def test_a_torn_latest_with_only_newer_snapshots_readable_resumes_a_newer_one(
    run_dir, resume
) -> None:
    """`latest` naming an older snapshot that is torn, nothing older readable: the newer
    complete ones are the last resort, not "no readable snapshot … --overwrite"."""
    ckpt, run_id = run_dir
    (ckpt / "latest").write_text("step-00000002\n")
    (ckpt / "step-00000002" / "extra.json").unlink()
    c = resume(ckpt, "--max-steps", "8")
    assert "resuming from" in c.log() and "a newer one" in c.log()
    assert resumed_from(c, ckpt / "step-00000004", run_id, 4), c.log()


@pytest.mark.slow
def test_a_snapshot_whose_weights_hold_nan_is_skipped(run_dir, resume) -> None:
    """A damaged file that still parses: resuming it would skip every step."""
    from safetensors.torch import load_file, save_file

    ckpt, run_id = run_dir
    weights = ckpt / "step-00000006" / "k4" / "sae.safetensors"
    tensors = load_file(str(weights))
    tensors["encoder.weight"][3, :5] = float("nan")
    save_file(tensors, str(weights))
    c = resume(ckpt, "--max-steps", "8")
    assert "encoder.weight holds inf or NaN" in c.log()
    assert resumed_from(c, ckpt / "step-00000004", run_id, 4), c.log()


@pytest.mark.slow
def test_a_stop_right_after_resume_does_not_rewrite_the_snapshot_it_resumed(
    run_dir, tmp_path: Path
) -> None:
    """Rewriting the very state it resumed from gains nothing and opens the window of the
    renames above on every restart of an idle consumer."""
    ckpt, _ = run_dir
    inode = (ckpt / "step-00000006").stat().st_ino
    idle = ("--buffer-tokens", "65536", "--batch-size", "256", "--min-fill", "1")  # no step
    c = Consumer(tmp_path, *SAES, "--resume", *idle, ckpt=ckpt)
    try:
        c.wait_for("resumed", lambda: "resumed from" in c.log())
        c.signal(signal.SIGTERM)
        assert c.wait_exit() == 0, c.log()
    finally:
        c.close()
    assert "final snapshot: step 6 already saved in" in c.log(), c.log()
    assert (ckpt / "step-00000006").stat().st_ino == inode
    assert extra_of(ckpt / "step-00000006")["stop_reason"]


# -- unit level --------------------------------------------------------------------------------


def test_a_rewrite_killed_between_its_renames_is_put_back_whatever_latest_names(
    tmp_path: Path,
) -> None:
    """A retried rewrite of step 2 (its `latest` update had failed) or one after a resume
    from a fallback snapshot: `latest` names another step, and both copies were deleted."""
    t = trained(steps=1)
    write_run_id(tmp_path, "mine")
    for step in (2, 3):
        save_snapshot(tmp_path, step, {"h": t}, extra={"run_id": "mine", "saes": {"h": {}}})
    (tmp_path / "step-00000002").rename(tmp_path / ".old-step-00000002-0badc0de")
    shutil.copytree(tmp_path / "step-00000003", tmp_path / ".old-step-00000009-0ddba11e")
    set_run(tmp_path / ".old-step-00000009-0ddba11e", OTHER_RUN)  # never another run's
    removed = ckpt_mod.remove_stale_temporaries(tmp_path)
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000002", "step-00000003"]
    assert [p.name for p in removed] == [".old-step-00000009-0ddba11e"]
    check_complete(tmp_path / "step-00000002")


def test_prune_counts_only_complete_snapshots_of_this_run(tmp_path: Path) -> None:
    t = trained(steps=1)
    for step in (1, 2, 3, 4):
        save_snapshot(tmp_path, step, {"h": t}, extra={"run_id": "mine", "saes": {"h": {}}})
    save_snapshot(tmp_path, 50, {"h": t}, extra={"run_id": "theirs", "saes": {"h": {}}})
    (tmp_path / "latest").write_text("step-00000004\n")  # this run's newest
    (tmp_path / "step-99999999").mkdir()  # empty
    (tmp_path / "step-00000003" / "extra.json").unlink()  # incomplete
    deleted = prune_snapshots(tmp_path, keep=2, run="mine")
    assert [p.name for p in deleted] == ["step-00000001"]
    assert [p.name for p in list_snapshots(tmp_path)] == [
        "step-00000002", "step-00000003", "step-00000004", "step-00000050", "step-99999999"]


def test_resumable_offers_latest_then_older_ones_of_its_run_only(tmp_path: Path, caplog) -> None:
    t = trained(steps=1)
    for step, run in ((1, "mine"), (2, "theirs"), (3, "mine"), (4, "mine"), (9, "theirs")):
        save_snapshot(tmp_path, step, {"h": t}, extra={"run_id": run, "saes": {"h": {}}})
    (tmp_path / "latest").write_text("step-00000004\n")
    shutil.rmtree(tmp_path / "step-00000003" / "h")  # incomplete
    with caplog.at_level(logging.WARNING, logger=ckpt_mod.log.name):
        offered = [p.name for p, _ in resumable(tmp_path)]
    assert offered == ["step-00000004", "step-00000001"]
    assert "step-00000003" in caplog.text and "step-00000002" in caplog.text
    # `latest` without extra.json: its run is still known from the directory's run file
    (tmp_path / "step-00000004" / "extra.json").unlink()
    write_run_id(tmp_path, "mine")
    assert [p.name for p, _ in resumable(tmp_path, read_run_id(tmp_path))] == ["step-00000001"]


def test_a_start_that_fails_to_bind_leaves_no_run_behind(tmp_path: Path) -> None:
    """The run file was written before the sockets were bound: a consumer whose control
    port (--bind + 1) was taken exited 2 and left a run with no snapshot, so the same
    command again met "already holds a run". Its message now names the control endpoint."""
    import socket

    port = free_tcp_port()
    ckpt = tmp_path / "ckpt"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        res = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{port}", "--hook", HOOK,
                       "--sae", f"hook={HOOK},latents=64,k=4", "--buffer-tokens", "1024",
                       "--batch-size", "64", "--metrics-port", "0",
                       "--checkpoint-dir", str(ckpt)], timeout=120)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("saestream: error: cannot bind") and "control endpoint" in line
    assert not (ckpt / "run.json").exists()
    again = Consumer(tmp_path, ckpt=ckpt)  # the same directory, free ports: it starts
    try:
        again.wait_for("metrics", lambda: again.metrics() is not None)
        again.signal(signal.SIGTERM)
        assert again.wait_exit() == 0, again.log()
    finally:
        again.close()


@pytest.mark.slow
def test_resume_says_which_given_settings_the_snapshot_overrides(run_dir, tmp_path) -> None:
    """A resumed SAE keeps the snapshot's hyper-parameters; --sae keys and --d-in given with
    other values were dropped without a word."""
    ckpt, run_id = run_dir
    c = Consumer(tmp_path, "--sae", "name=k4,latents=512,k=4,k_aux=32,lr=0.001", "--sae",
                 "name=k8,latents=256,k=8,k_aux=32", "--d-in", "7", "--resume",
                 "--max-steps", "8", ckpt=ckpt)
    s = Sender(c.endpoint)
    try:
        s.in_background(200, run="r2")
        assert c.wait_exit() == 0, c.log()
        log = c.log()
        assert resumed_from(c, ckpt / "step-00000006", run_id, 6), log
        assert "--sae k4: latents=512 ignored, the snapshot" in log and "latents=128" in log
        assert "--sae k4: lr=0.001 ignored" in log
        assert "--sae k8:" not in log  # what it gives agrees with the snapshot
        assert f"--d-in 7 ignored for {HOOK}" in log
        final_state(latest(ckpt), run_id, 8)
    finally:
        s.close()
        c.close()


def test_adam_moments_or_ema_with_nan_make_a_snapshot_unresumable(tmp_path: Path) -> None:
    from saestream.consumer.daemon import _check_finite

    t = trained(steps=2)
    _check_finite({"h": t}, tmp_path)  # a sound one passes
    t.optimizer.state[t.sae.W_dec]["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(ckpt_mod.CheckpointError, match="Adam's exp_avg_sq of W_dec holds inf"):
        _check_finite({"h": t}, tmp_path)


def test_overwrite_leaves_no_half_deleted_snapshot_behind(tmp_path: Path, monkeypatch) -> None:
    """A kill during --overwrite's deletion leaves a `.del-*` (removed at the next start),
    never a `step-*` missing some of its files."""
    t = trained(steps=1)
    for step in (1, 2):
        save_snapshot(tmp_path, step, {"h": t}, extra={"run_id": "old", "saes": {"h": {}}})

    def killed(path, *a, **kw):
        raise KeyboardInterrupt  # as a kill in the middle of the deletion

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.remove_run(tmp_path)
    monkeypatch.undo()
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000002"]
    assert [p.name.rsplit("-", 1)[0] for p in tmp_path.glob(".del-*")] == [".del-step-00000001"]
    ckpt_mod.remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.glob(".del-*"))


# -- hostile contents that still parse (issue: D4-D7) -----------------------------------------


LONG_LATEST = "step-" + "0" * 300 + "\n"
"""A `latest` whose name passed the snapshot pattern but is too long to probe (ENAMETOOLONG)."""


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["eval", "{ckpt}", "--device", "cpu"],
    ["export", "{ckpt}", "--format", "sparsify", "--out", "{tmp}/x"],
    ["features", "{ckpt}", "--out", "{tmp}/f"],
    ["train", "--input", "{tmp}/acts.npy", "--hook", "h", "--init-from", "{ckpt}",
     "--out", "{tmp}/t"],
], ids=["eval", "export", "features", "init-from"])
def test_a_latest_too_long_to_probe_is_a_one_line_error_for_its_readers(
    run_dir, tmp_path: Path, argv: list[str]
) -> None:
    """It was an OSError (File name too long) traceback, exit 1."""
    import numpy as np

    ckpt, _ = run_dir
    (ckpt / "latest").write_text(LONG_LATEST)
    np.save(tmp_path / "acts.npy", np.zeros((64, 64), np.float32))
    res = run_cli([a.format(ckpt=ckpt, tmp=tmp_path) for a in argv], timeout=120)
    assert res.returncode == 2, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].endswith(f"{ckpt}/latest does not name a snapshot of "
                                                 f"{ckpt}"), res.stderr


@pytest.mark.slow
def test_a_latest_too_long_to_probe_is_garbage_the_newest_snapshot_resumed(
    run_dir, resume
) -> None:
    ckpt, run_id = run_dir
    (ckpt / "latest").write_text(LONG_LATEST)
    c = resume(ckpt, "--max-steps", "8")
    assert "latest names no snapshot (garbage in it)" in c.log()
    assert "Traceback" not in c.log()
    assert resumed_from(c, ckpt / "step-00000006", run_id, 6), c.log()


def _extra(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(snap: Path) -> None:
        extra = extra_of(snap)
        edit(extra)
        (snap / "extra.json").write_text(json.dumps(extra))
    return damage


def _state(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Rewrite k4's trainer.pt (128 latents) with `edit` applied, as torch.save writes it."""
    def damage(snap: Path) -> None:
        path = snap / "k4" / "trainer.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return damage


def _compressed(snap: Path) -> None:
    _compressed_sae(snap / "k4")


def _compressed_sae(sae: Path) -> None:
    """The SAE's trainer.pt with its entries deflated: what a zip bomb looks like to
    torch.load."""
    path = sae / "trainer.pt"
    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries:
            dst.writestr(name, data)


def _producer_hook_low(extra: dict[str, Any]) -> None:
    extra["producers"]["p1"]["hooks"][HOOK] = {"low": "x"}


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def _hook_width(d_in: int) -> Callable[[dict[str, Any]], None]:
    return lambda extra: extra["hooks"][HOOK].__setitem__("d_in", d_in)


def _adam_lr(state: dict[str, Any]) -> None:
    state["optimizer"]["param_groups"][0]["lr"] = math.nan


HOSTILE = {  # damage of step 6 -> what the warning that skips it says
    "producers-list": (_extra(_set("producers", [1, 2])), "producers is not a map"),
    "producer-hook-low": (_extra(_producer_hook_low), "low 'x' is not [epoch, position]"),
    "hooks-string": (_extra(_set("hooks", "x")), "hooks is not a map of hook to width"),
    "d_in-2^40": (_extra(_hook_width(2**40)), "has no width (d_in of 1..32768)"),
    "d_in-2^22": (_extra(_hook_width(2**22)), "has no width (d_in of 1..32768)"),
    "d_in-other": (_extra(_hook_width(128)), "says d_in 128, its SAEs and buffer have 64"),
    "tokens-string": (_extra(_set("tokens", "many")), "tokens 'many' is not a whole number"),
    "fired-shape": (_state(_set("fired_tokens", torch.zeros(5, dtype=torch.int64))),
                    "fired_tokens is int64 (5,), not int64 (128,)"),
    "since-fired-shape": (_state(_set("tokens_since_fired", torch.zeros(5, dtype=torch.int64))),
                          "tokens_since_fired is int64 (5,), not int64 (128,)"),
    "since-fired-nan": (_state(_set("tokens_since_fired", torch.full((128,), math.nan))),
                        "tokens_since_fired is float32 (128,), not int64 (128,)"),
    "since-fired-negative": (_state(_set("tokens_since_fired",
                                         torch.full((128,), -1, dtype=torch.int64))),
                             "tokens_since_fired holds negative counts"),
    "step-negative": (_state(_set("step", -7)), "step -7 is not a whole number >= 0"),
    "mse_scale-nan": (_state(_set("mse_scale", math.nan)), "mse_scale nan is not a positive"),
    "mse_scale-0": (_state(_set("mse_scale", 0.0)), "mse_scale 0.0 is not a positive"),
    "input_scale-negative": (_state(_set("input_scale", -1.0)),
                             "input_scale -1.0 is not a positive"),
    "adam-lr-nan": (_state(_adam_lr), "Adam lr nan is not a positive number"),
    "compressed-trainer.pt": (_compressed, "is compressed (torch.save stores every entry"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(HOSTILE))
def test_a_snapshot_whose_contents_would_break_training_is_skipped_for_the_older_one(
    run_dir, resume, damage: str
) -> None:
    """Each was a traceback at start-up (a ledger or width of the wrong type), a crash at the
    first step after resuming (counters of another shape, a negative step), training that
    skipped every step for good (a loss constant of 0 or NaN), gigabytes allocated (a width
    of 2^22, a compressed trainer.pt), or a resume that trusted it all."""
    ckpt, run_id = run_dir
    snap = ckpt / "step-00000006"
    apply, why = HOSTILE[damage]
    apply(snap)
    c = resume(ckpt, "--max-steps", "8")
    log = c.log()
    assert "Traceback" not in log, log
    warning = [x for x in log.splitlines() if f"skipping unreadable snapshot {snap}:" in x]
    assert len(warning) == 1 and why in warning[0], log
    assert resumed_from(c, ckpt / "step-00000004", run_id, 4), log
    # the rows committed in step 6 alone are no longer held: said, for exited producers
    assert "resumed from step-00000004, not from step-00000006, which `latest` names" in log
    final_state(latest(ckpt), run_id, 8)


def test_a_compressed_trainer_pt_is_refused_before_torch_load_reads_it(
    tmp_path: Path, monkeypatch
) -> None:
    """torch.load inflates a compressed entry to the size it states (without mmap) or fails
    on it with "Trying to resize storage" (with): the archive is checked first, and named."""
    snap = save_snapshot(tmp_path, 1, {"h": trained()}, extra={"saes": {"h": {}}})
    _compressed_sae(snap / "h")
    loads: list[Any] = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    with pytest.raises(ckpt_mod.CheckpointError, match=r"trainer\.pt: entry .* is compressed"):
        ckpt_mod.load_snapshot(snap)
    assert loads == []
