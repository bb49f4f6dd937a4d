"""`saestream evaluator`: a real daemon process following a checkpoint directory — each new
snapshot's figures on /metrics and in --history (equal to an in-process evaluation of the
same contexts), snapshots removed or half-written under it counted and survived, SIGTERM
exit 0, and bad start-up input one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request

import pytest
import torch
from conftest import LoggedProcess, free_tcp_port, run_cli, saestream_cmd
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from saestream.consumer.checkpoint import load_sae, save_snapshot, snapshot_name
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig
from saestream.evaluator.daemon import GROUPS, Publisher
from saestream.evaluator.data import eval_ids
from saestream.evaluator.engine import evaluate
from saestream.evaluator.metrics import FAILURE_REASONS, EvaluatorMetrics
from saestream.producer.models import load_model

HOOK = "model.layers.2"
ARGS = ("--corpus", "synthetic:300", "--seq-len", "16", "--contexts", "6", "--device", "cpu",
        "--poll-seconds", "0.2")


def trainer(seed: int, name: str = "sae") -> Trainer:
    torch.manual_seed(seed)
    t = Trainer(SAEConfig(d_in=64, n_latents=128, k=8, input_normalization="layer_norm"),
                TrainerConfig(), name=name, hook=HOOK, model="tiny")
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        t.train_step(torch.randn(256, 64, generator=g))
    return t


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def gauge(port: int, name: str, sae: str = "sae") -> float | None:
    return scrape(port).get((f"saestream_eval_{name}", (("hook", HOOK), ("sae", sae))))


def failures(port: int, reason: str) -> float:
    return scrape(port)[("saestream_eval_failures_total", (("reason", reason),))]


def wait_for(cond, proc: LoggedProcess, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()
        try:
            value = cond()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out; log:\n{proc.log()}")


@pytest.fixture
def daemon(tmp_path):
    ckpt = tmp_path / "ckpt"
    port = free_tcp_port()
    history = tmp_path / "history.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAESTREAM_THREADS": "1"}
    proc = LoggedProcess(saestream_cmd("evaluator", "--checkpoint-dir", str(ckpt), *ARGS,
                                       "--metrics-port", str(port), "--history", str(history)),
                         tmp_path / "evaluator.log", env)
    yield proc, ckpt, port, history
    proc.close()


def test_each_new_snapshot_is_evaluated_published_and_recorded(daemon) -> None:
    proc, ckpt, port, history = daemon
    wait_for(lambda: scrape(port), proc)  # serving before any snapshot exists
    save_snapshot(ckpt, 3, {"sae": trainer(0)}, {"time": 1234.5})
    assert wait_for(lambda: gauge(port, "snapshot_step") == 3, proc)
    assert gauge(port, "snapshot_timestamp_seconds") == 1234.5
    save_snapshot(ckpt, 9, {"sae": trainer(1)})
    assert wait_for(lambda: gauge(port, "snapshot_step") == 9, proc)

    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 9]
    # The figures are those of an in-process evaluation of the same contexts.
    lm = load_model("tiny", device="cpu")
    ids = eval_ids(lm, "synthetic:300", split="eval", seq_len=16, contexts=6, tokens=None)
    want = evaluate(lm.model, ids, [(load_sae(ckpt / snapshot_name(9) / "sae"), HOOK)], GROUPS)
    got = lines[1]["saes"]["sae"]
    assert lines[1]["contexts"] == 6 and lines[1]["tokens"] == 6 * 15
    for group in GROUPS:
        for key, value in want["sae"][group].items():
            if isinstance(value, float):
                assert got[group][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, (group, key) in {"delta_ce": ("downstream", "delta_ce"),
                               "loss_recovered": ("downstream", "loss_recovered"),
                               "kl": ("downstream", "kl"), "ce_clean": ("downstream", "ce_clean"),
                               "normalized_mse": ("reconstruction", "normalized_mse"),
                               "explained_variance": ("reconstruction", "explained_variance"),
                               "l0": ("reconstruction", "l0"),
                               "dead_fraction": ("reconstruction", "dead_fraction")}.items():
        assert gauge(port, name) == pytest.approx(want["sae"][group][key], rel=1e-5, abs=1e-7)
    assert scrape(port)[("saestream_eval_seconds_count", ())] == 2

    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, proc.log()
    assert "Traceback" not in proc.log()


def test_removed_and_half_written_snapshots_are_counted_and_survived(daemon) -> None:
    proc, ckpt, port, history = daemon
    save_snapshot(ckpt, 1, {"sae": trainer(0)})
    assert wait_for(lambda: gauge(port, "snapshot_step") == 1, proc)

    # `latest` names a snapshot that --keep removed before the evaluator got to it.
    path = save_snapshot(ckpt, 2, {"sae": trainer(1)})
    shutil.rmtree(path)
    assert wait_for(lambda: failures(port, "missing") == 1, proc)
    # A half-written snapshot: its extra.json names an SAE whose weights are not there.
    half = save_snapshot(ckpt, 3, {"sae": trainer(2)})
    (half / "sae" / "sae.safetensors").unlink()
    assert wait_for(lambda: failures(port, "incomplete") == 1, proc)
    # Corrupt weights.
    bad = save_snapshot(ckpt, 4, {"sae": trainer(3)})
    (bad / "sae" / "sae.safetensors").write_bytes(b"\x00" * 64)
    assert wait_for(lambda: failures(port, "unreadable") == 1, proc)
    # An SAE for another model.
    other = trainer(4)
    other.model = "another-model"
    save_snapshot(ckpt, 5, {"sae": other})
    assert wait_for(lambda: failures(port, "mismatch") == 1, proc)
    # extra.json's buffers not a map of files (each of these crashed the daemon once).
    odd = save_snapshot(ckpt, 6, {"sae": trainer(5)}, extra={"buffers": "x"})
    assert wait_for(lambda: failures(port, "unreadable") == 2, proc), odd
    # NaN weights.
    nan = save_snapshot(ckpt, 7, {"sae": trainer(6)})
    weights = load_file(nan / "sae" / "sae.safetensors")
    weights["encoder.weight"][0, 0] = float("nan")
    save_file(weights, nan / "sae" / "sae.safetensors")
    assert wait_for(lambda: failures(port, "unreadable") == 3, proc)
    # A FIFO where cfg.json should be: no writer of ours leaves one, so not "incomplete".
    fifo = save_snapshot(ckpt, 9, {"sae": trainer(8)})
    (fifo / "sae" / "cfg.json").unlink()
    os.mkfifo(fifo / "sae" / "cfg.json")
    assert wait_for(lambda: failures(port, "unreadable") == 4, proc)
    assert failures(port, "incomplete") == 1
    # Finite weights at float32's edge: the figures overflow. Not published (NaN gauges
    # replaced the last good figures), counted.
    edge = save_snapshot(ckpt, 12, {"sae": trainer(10)})
    weights = load_file(edge / "sae" / "sae.safetensors")
    weights["W_dec"].fill_(3e38)
    save_file(weights, edge / "sae" / "sae.safetensors")
    assert wait_for(lambda: failures(port, "unreadable") == 5, proc)
    assert gauge(port, "snapshot_step") == 1
    # extra.json's `time` an integer no float holds (it crashed the daemon): the snapshot is
    # evaluated, its time taken from the folder.
    big = save_snapshot(ckpt, 10, {"sae": trainer(9)}, {"time": 10 ** 400})
    assert wait_for(lambda: gauge(port, "snapshot_step") == 10, proc)
    assert gauge(port, "snapshot_timestamp_seconds") == pytest.approx(
        big.stat().st_mtime, abs=5)
    # `latest` holding bytes that are not text: no snapshot named, nothing evaluated.
    (ckpt / "latest").write_bytes(b"\xff\xfe\n")
    time.sleep(2.0)
    assert proc.proc.poll() is None, proc.log()
    assert gauge(port, "snapshot_step") == 10  # failures leave the last good figures

    save_snapshot(ckpt, 11, {"sae": trainer(7)})
    assert wait_for(lambda: gauge(port, "snapshot_step") == 11, proc)
    assert [json.loads(x)["step"] for x in history.read_text().splitlines()] == [1, 10, 11]
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, proc.log()
    assert "Traceback" not in proc.log()


def test_sigterm_during_an_evaluation_exits_0_promptly(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    save_snapshot(ckpt, 1, {"sae": trainer(0)})
    port = free_tcp_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAESTREAM_THREADS": "1"}
    # Thousands of contexts: an evaluation of minutes, interrupted.
    args = [{"6": "4000", "synthetic:300": "synthetic:100000"}.get(a, a) for a in ARGS]
    proc = LoggedProcess(saestream_cmd("evaluator", "--checkpoint-dir", str(ckpt), *args,
                                       "--metrics-port", str(port), "--batch-size", "4"),
                         tmp_path / "evaluator.log", env)
    try:
        wait_for(lambda: "evaluating 4000 contexts" in proc.log(), proc)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0, proc.log()
        assert time.monotonic() - t0 < 30
        assert "Traceback" not in proc.log()
    finally:
        proc.close()


def test_series_of_saes_gone_from_the_newest_snapshot_are_removed() -> None:
    m = EvaluatorMetrics()
    pub = Publisher(m)
    res = {"hook": HOOK, "downstream": {"delta_ce": 0.5}, "reconstruction": {"l0": 3.0}}
    pub.publish({"step": 1, "snapshot_time": 10.0, "saes": {"a": res, "b": res}})
    pub.publish({"step": 2, "snapshot_time": 20.0, "saes": {"b": res}})
    body = scrape_registry(m)
    assert ("saestream_eval_delta_ce", (("hook", HOOK), ("sae", "b"))) in body
    assert not any(dict(labels).get("sae") == "a" for _, labels in body)
    assert body[("saestream_eval_snapshot_step", (("hook", HOOK), ("sae", "b")))] == 2
    assert {dict(lb)["reason"] for n, lb in body if n == "saestream_eval_failures_total"} == \
        set(FAILURE_REASONS)


def scrape_registry(m: EvaluatorMetrics) -> dict:
    from prometheus_client import generate_latest

    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize(("extra", "needle"), [
    (["--checkpoint-dir", "{file}"], "is a file"),
    (["--checkpoint-dir", "{dir}", "--history", "{dir}/nope/h.jsonl"], "--history"),
    (["--checkpoint-dir", "{dir}", "--model", "no-such-model"], "no-such-model"),
    (["--checkpoint-dir", "{dir}", "--model", "tiny", "--hook", "model.nope"], "model.nope"),
    (["--checkpoint-dir", "{dir}", "--corpus", "text:/no/such/*.txt"], "/no/such"),
    (["--checkpoint-dir", "{dir}", "--metrics-port", "{busy}"], "cannot serve /metrics"),
    (["--checkpoint-dir", "{dir}", "--device", "cuda:7"], "--device"),
    (["--checkpoint-dir", "{dir}", "--contexts", "0"], "--contexts"),
    (["--checkpoint-dir", ""], "empty path"),
    (["--checkpoint-dir", "{dir}", "--features", ""], "empty path"),
    (["--checkpoint-dir", "{dir}", "--history", ""], "empty path"),
    (["--checkpoint-dir", "{dir}", "--hook", ""], "--hook"),
    (["--checkpoint-dir", "{dir}", "--model", ""], "--model"),
    (["--checkpoint-dir", "{dir}", "--history", "{fifo}"], "not a regular file (a FIFO)"),
    (["--checkpoint-dir", "{dir}", "--history", "{dir}/" + "h" * 300], "File name too long"),
])
def test_bad_start_up_input_is_one_line_and_exit_2(tmp_path, extra, needle) -> None:
    import socket

    (tmp_path / "f").write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        os.mkfifo(tmp_path / "fifo")  # appending to it would wait for a reader forever
        fmt = {"file": tmp_path / "f", "dir": tmp_path, "busy": busy.getsockname()[1],
               "fifo": tmp_path / "fifo"}
        args = [a.format(**fmt) for a in extra]
        if "--metrics-port" not in args:
            args += ["--metrics-port", "0"]
        r = run_cli(["evaluator", *args], timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error:"), r.stderr
    assert needle in lines[0]


def test_with_model_given_a_snapshot_of_another_model_is_a_mismatch(tmp_path) -> None:
    ckpt, port = tmp_path / "ckpt", free_tcp_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAESTREAM_THREADS": "1"}
    proc = LoggedProcess(saestream_cmd("evaluator", "--checkpoint-dir", str(ckpt), *ARGS,
                                       "--model", "tiny", "--metrics-port", str(port)),
                         tmp_path / "evaluator.log", env)
    try:
        other = trainer(0)
        other.model = "smollm2-135m"  # read with tiny, its figures would mean nothing
        save_snapshot(ckpt, 1, {"sae": other})
        assert wait_for(lambda: failures(port, "mismatch") == 1, proc)
        save_snapshot(ckpt, 2, {"sae": trainer(1)})
        assert wait_for(lambda: gauge(port, "snapshot_step") == 2, proc)
        assert failures(port, "mismatch") == 1
    finally:
        proc.close()
    assert "smollm2-135m, not --model tiny" in proc.log()


def test_a_history_line_the_disk_has_no_room_for_is_cut_off_and_counted(tmp_path) -> None:
    from test_guarantee_disk import fill, tmpfs_at

    from saestream.evaluator.daemon import append_history

    with tmpfs_at(tmp_path / "mnt", "64k") as mnt:
        history = mnt / "history.jsonl"
        assert append_history(history, {"step": 1, "saes": {}})
        before = history.read_bytes()
        fill(mnt)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        assert free == 0
        # the last page of the file has room for part of the line only
        assert not append_history(history, {"step": 2, "saes": {"x" * 8192: {}}})
        assert history.read_bytes() == before
