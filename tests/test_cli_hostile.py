"""Flag values past what the libraries underneath take (int64, index sizes, ports), empty and
unprintable paths, and stop signals, meeting every command as a user's shell would send them:
one line `saestream: error: ...` and exit 2 (a scrape: one `unreachable` line), never a
traceback; `saestream train` stopped by a signal keeps what it trained."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, saestream_cmd

HUGE = str(10**30)
SMALL = ("--latents", "64", "--k", "4", "--batch-size", "64")


def one_error_line(res: subprocess.CompletedProcess, code: int = 2) -> str:
    """The only line on stderr, a `saestream: error:` line, and the exit code `code`."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("saestream: error: "), res.stderr
    return lines[0]


@pytest.fixture
def acts(tmp_path: Path) -> Path:
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32))
    return path


@pytest.mark.parametrize("args,says", [
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--dead-tokens",
      str(2**63)], "--dead-tokens"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--tokens", HUGE],
     "--tokens"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--log-interval", "nan"],
     "--log-interval"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--log-interval", "-1"],
     "--log-interval"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--tensor", "x"],
     "--tensor"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--name", ""], "--name"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", ""], "an empty path"),
    (["consumer", "--hook", "h", "--sae", f"latents=64,k=4,dead_tokens={HUGE}", "--d-in", "16",
      "--checkpoint-dir", "{tmp}/c", "--metrics-port", "0", "--device", "cpu"], "dead_tokens"),
    (["consumer", "--hook", "h", "--sae", "latents=64,k=4", "--d-in", "16", "--checkpoint-dir",
      "{tmp}/c", "--metrics-port", "0", "--device", "cpu", "--max-chunk-bytes", HUGE],
     "--max-chunk-bytes"),
    (["consumer", "--hook", "h", "--sae", "latents=64,k=4", "--d-in", "16", "--checkpoint-dir",
      "{tmp}/c", "--metrics-port", "0", "--device", "cpu", "--metrics-window", HUGE],
     "--metrics-window"),
    (["record", "--out", "{tmp}/r", "--hook", "h", "--metrics-port", "0", "--max-chunk-bytes",
      HUGE], "--max-chunk-bytes"),
    (["producer", "--model", "tiny", "--corpus", "synthetic", "--connect",
      "tcp://127.0.0.1:9", "--control-connect", "off", "--device", "cpu", "--metrics-port", "0",
      "--batch-size", HUGE], "--batch-size"),
    (["producer", "--model", "tiny", "--corpus", f"synthetic:{HUGE}", "--connect",
      "tcp://127.0.0.1:9", "--control-connect", "off", "--device", "cpu", "--metrics-port",
      "0"], "synthetic"),
    (["eval", "{tmp}", "--batch-size", HUGE], "--batch-size"),
    (["features", "{tmp}", "--out", "{tmp}/f", "--batch-size", HUGE], "--batch-size"),
    (["features", "{tmp}", "--out", ""], "an empty path"),
    (["evaluator", "--checkpoint-dir", "{tmp}", "--batch-size", HUGE], "--batch-size"),
    (["evaluator", "--device", "cpu", "--metrics-port", "0"], "--checkpoint-dir"),
    (["keygen", "{tmp}/k", "--name", "n" * 300], "bad key name"),
    (["keygen", "{tmp}/k", "--name", "a\nb"], "bad key name 'a\\nb'"),
    (["keygen", ""], "an empty path"),
    (["import", "{tmp}", "--format", "saelens", "--out", ""], "an empty path"),
    (["import", "{tmp}", "--format", "saelens", "--out", "{tmp}/i", "--name", ""],
     "'--name': empty"),
    (["export", "{tmp}", "--format", "saelens", "--out", ""], "an empty path"),
    (["export", "{tmp}", "--format", "saelens", "--out", "{tmp}/e", "--context-size", HUGE],
     "--context-size"),
    (["eval", "{tmp}", "--model", ""], "'--model': empty"),
    (["features", "{tmp}", "--out", "{tmp}/f", "--hook", ""], "'--hook': empty"),
    (["replay", "{tmp}", "--producer-id", ""], "'--producer-id': empty"),
    (["producer", "--model", "tiny", "--producer-id", ""], "'--producer-id': empty"),
    (["consumer", "--hook", "h", "--max-connections", "1000000000000"], "--max-connections"),
    (["consumer", "--hook", "h", "--max-producers", str(2**70)], "--max-producers"),
    (["consumer", "--hook", "h", "--max-tokens", str(2**70)], "--max-tokens"),
    (["consumer", "--hook", "h", "--final-snapshot-attempts", str(2**70)],
     "--final-snapshot-attempts"),
    (["consumer", "--hook", "h", "--dist-timeout", "1e300"], "--dist-timeout"),
    (["train", "--input", "{acts}", "--hook", "h", "--out", "{tmp}/o", "--dist-timeout",
      "1e300"], "--dist-timeout"),
    (["consumer", "--hook", "h", "--checkpoint-dir", ""], "an empty path"),
    (["consumer", "--hook", "h", "--record", ""], "an empty path"),
    (["record", "--out", "", "--hook", "h"], "an empty path"),
    (["replay", ""], "an empty path"),
    (["demo", "--workdir", ""], "an empty path"),
    (["demo", "--duration", "nan"], "'--duration': 'nan' is not a finite number"),
    (["demo", "--duration", "inf"], "'--duration': 'inf' is not a finite number"),
    (["eval", ""], "an empty path"),
    (["demo", "--workdir", "{tmp}/d", "--corpus", "text:"], "--corpus: bad corpus 'text:'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_value_past_what_the_libraries_take_is_one_line_and_exit_2(args, says, tmp_path,
                                                                     acts) -> None:
    argv = [a.format(tmp=tmp_path, acts=acts) for a in args]
    assert says in one_error_line(run_cli(argv, timeout=120))


def test_a_path_with_a_newline_is_named_on_one_line(tmp_path) -> None:
    line = one_error_line(run_cli(["train", "--input", str(tmp_path / "no\nsuch.npy"), "--hook",
                                   "h", "--out", str(tmp_path / "o")]))
    assert "no\\nsuch.npy: no such file" in line


def test_an_output_path_that_is_not_utf8_is_refused(tmp_path, acts) -> None:
    out = bytes(tmp_path / "o") + b"\xff"
    res = subprocess.run([*map(str.encode, saestream_cmd("train", "--input", str(acts),
                                                          "--hook", "h", *SMALL, "--steps",
                                                          "1", "--out")), out],
                         capture_output=True, text=True, timeout=120)
    assert "not a UTF-8 path" in one_error_line(res)
    assert not Path(out.decode(errors="surrogateescape")).exists()


def test_train_refuses_a_consumers_checkpoint_directory(tmp_path, acts) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run.json").write_text('{"run": "r"}')
    res = run_cli(["train", "--input", str(acts), "--hook", "h", *SMALL, "--steps", "1",
                   "--out", str(tmp_path / "c")])
    assert "holds a consumer's run" in one_error_line(res)


def test_train_says_when_it_replaces_an_earlier_runs_snapshot(tmp_path, acts) -> None:
    argv = ["train", "--input", str(acts), "--hook", "h", *SMALL, "--steps", "2", "--out",
            str(tmp_path / "o")]
    assert run_cli(argv).returncode == 0
    res = run_cli([*argv, "--seed", "1"])
    assert res.returncode == 0 and "note: replaced" in res.stderr, res.stderr


@pytest.mark.parametrize("url", [HUGE, "84637", "127.0.0.1:70000", "0"])
def test_status_names_a_port_no_socket_can_have(url) -> None:
    res = run_cli(["status", url], timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "unreachable: bad URL" in res.stdout, res.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_train_stopped_by_a_signal_writes_what_it_trained(sig, tmp_path, acts) -> None:
    """A run of ~10^6 steps, stopped once it has logged progress: the checkpoint holds the
    steps done, says why it stopped, and the command exits 0."""
    out = tmp_path / "o"
    with subprocess.Popen(saestream_cmd("train", "--input", str(acts), "--hook", "h", *SMALL,
                                        "--steps", "1000000", "--log-interval", "0.2", "--out",
                                        str(out)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first progress line: training is under way
            if line.startswith("step "):
                break
        time.sleep(0.5)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "(signal): writing the checkpoint" in err
    snapshot = out / (out / "latest").read_text().strip()
    extra = json.loads((snapshot / "extra.json").read_text())
    assert extra["stop_reason"] == "signal"
    steps = int(snapshot.name.removeprefix("step-"))
    assert 0 < steps < 1_000_000 and extra["tokens"] == 64 * steps
    assert f"checkpoint: {snapshot / 'h'}" in rest


def test_a_run_whose_every_step_was_skipped_still_writes_its_checkpoint(tmp_path) -> None:
    """No signal, every loss not finite: the run ends as runs end, with its checkpoint (no
    step taken), not as a run stopped before its first step."""
    np.save(tmp_path / "huge.npy", np.full((64, 16), 1e30, dtype=np.float32))
    res = run_cli(["train", "--input", str(tmp_path / "huge.npy"), "--hook", "h", *SMALL,
                   "--steps", "2", "--input-normalization", "none", "--out",
                   str(tmp_path / "o")])
    assert res.returncode == 0 and "skipped" in res.stderr, res.stderr
    assert "stopped before" not in res.stderr and (tmp_path / "o" / "latest").is_file()
