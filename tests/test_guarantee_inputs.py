"""Bad input is refused up front (issue 9, item 5): one line on stderr, exit 2, no traceback.

Every case runs the real command on real files: the consumer and `saestream train` with
settings no run can use (NaN, negatives, sizes this machine cannot allocate), `train` on
malformed safetensors headers and an unwritable `--out`, the producer on malformed state
files and a `--seq-len` beyond the model's positions, and `demo` on bad input of its own or
of the processes it starts.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from conftest import LoggedProcess, free_tcp_port, run_cli, saestream_cmd
from test_consumer import child_env
from test_guarantee_disk import remount, tmpfs_at

from saestream.producer.models import TinyConfig

D_IN = 16


def one_error_line(res, needle: str) -> None:
    """Exit 2, and stderr is exactly one `saestream: error:` line holding `needle`."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("saestream: error: "), res.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture
def taken_ports() -> Iterator[tuple[int, int]]:
    """Two ports held by listening sockets: a command that got as far as binding either would
    fail on it instead of with the error a test expects."""
    with ExitStack() as stack:
        ports = []
        for _ in range(2):
            port = free_tcp_port()
            stack.enter_context(socket.create_server(("127.0.0.1", port)))
            ports.append(port)
        yield ports[0], ports[1]


# -- consumer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sae", "lr=nan"], "--sae lr='nan': not a finite number"),
        (["--sae", "grad_clip=-1"], "grad_clip must be a positive number, got -1.0"),
        (["--sae", "latents=1e11"], "--sae: training 1 SAE(s) needs at least"),
        (["--sae", "auxk_coef=nan"], "--sae auxk_coef='nan': not a finite number"),
        (["--buffer-tokens", "1000000000000"], "--buffer-tokens 1000000000000: 1 buffer(s)"),
        (["--checkpoint-every-seconds", "inf"], "--checkpoint-every-seconds"),
    ],
    ids=["lr-nan", "grad-clip-negative", "latents-1e11", "auxk-coef-nan", "buffer-1e12",
         "flag-inf"],
)
def test_consumer_refuses_bad_settings_before_binding(
    args: list[str], needle: str, taken_ports: tuple[int, int], tmp_path: Path
) -> None:
    port, metrics_port = taken_ports
    ckpt = tmp_path / "ckpt"
    res = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port",
                   str(metrics_port), "--hook", "h", "--checkpoint-dir", str(ckpt), *args],
                  timeout=120)
    one_error_line(res, needle)
    assert not ckpt.exists()  # refused before the checkpoint directory was touched


# -- saestream train ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((300, D_IN)).astype(np.float32))
    return path


def train(input_path: Path, out: Path, *args: str):
    return run_cli(["train", "--input", str(input_path), "--hook", "h", "--latents", "64",
                    "--k", "4", "--batch-size", "64", "--steps", "2", "--out", str(out),
                    *args], timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "nan"], "--lr"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--latents", "100000000000"], "--latents 100000000000: training needs at least"),
        (["--auxk-coef", "nan"], "--auxk-coef"),
    ],
    ids=["lr-nan", "grad-clip-negative", "latents-1e11", "auxk-coef-nan"],
)
def test_train_refuses_bad_settings(acts: Path, tmp_path: Path, args, needle) -> None:
    res = train(acts, tmp_path / "out", *args)
    one_error_line(res, needle)
    assert res.stdout == "" and not (tmp_path / "out").exists()


def safetensors_bytes(kind: str) -> bytes:
    """A one-tensor [4, D_IN] float32 file, with its header spoiled as `kind` says."""
    data = np.ones((4, D_IN), np.float32).tobytes()
    entry = {"dtype": "F32", "shape": [4, D_IN], "data_offsets": [0, len(data)]}
    header = json.dumps({"acts": entry}).encode()
    if kind == "length-beyond-file":  # the u64 length claims more than the file holds
        return struct.pack("<Q", 8 + len(header) + len(data) + 1000) + header + data
    if kind == "length-huge":
        return struct.pack("<Q", 2**63) + header + data
    if kind == "not-json":
        junk = b"\x89\xff{not json" + b" " * 20
        return struct.pack("<Q", len(junk)) + junk + data
    if kind == "entry-not-an-object":
        header = json.dumps({"acts": [4, D_IN]}).encode()
    elif kind == "offsets-beyond-data":
        header = json.dumps({"acts": {**entry, "data_offsets": [64, 64 + len(data)]}}).encode()
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("kind", ["length-beyond-file", "length-huge", "not-json",
                                  "entry-not-an-object", "offsets-beyond-data"])
def test_train_refuses_a_malformed_safetensors_header(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "acts.safetensors"
    path.write_bytes(safetensors_bytes(kind))
    res = train(path, tmp_path / "out")
    one_error_line(res, f"--input {path}: not a readable .safetensors file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under-a-file", "read-only-mount"])
def test_train_checks_that_out_is_writable_before_training(
    acts: Path, tmp_path: Path, where: str
) -> None:
    with ExitStack() as stack:
        if where == "under-a-file":
            (tmp_path / "file").write_text("not a directory")
            out, why = tmp_path / "file" / "ck", "Not a directory"
        else:
            mnt = stack.enter_context(tmpfs_at(tmp_path / "mnt", "1m"))
            remount(mnt, "ro")
            out, why = mnt / "ck", "Read-only file system"
        res = train(acts, out)
    one_error_line(res, f"--out {out}: not writable ({why})")
    assert res.stdout == ""  # no training line: refused before training


# -- producer ----------------------------------------------------------------------------------

GOOD_STATE = {"version": 1, "corpus": "synthetic", "shard": "0/1", "split": "train",
              "seq_len": 128, "keep_first_token": False}


@pytest.mark.parametrize(
    "content",
    [
        b"garbage{",
        b"\xff\xfe not utf-8",
        b"[1, 2]",
        json.dumps({**GOOD_STATE, "seq_len": "128"}).encode(),
        json.dumps({**GOOD_STATE, "tokens_done": -5}).encode(),
        json.dumps({**GOOD_STATE, "budget": {"rows": "many"}}).encode(),
        json.dumps({**GOOD_STATE, "origins": {"run": [1]}}).encode(),
        json.dumps({**GOOD_STATE, "surprise": 1}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # a traceback (RecursionError)
        json.dumps({**GOOD_STATE, "epoch": 2**70}).encode(),  # killed the sending thread
        json.dumps({**GOOD_STATE, "tokens_done": 100, "budget": {  # exit 0, nothing sent
            "rows": 100, "start": [0, 500], "end": [0, 10], "done": False}}).encode(),
    ],
    ids=["garbage", "not-utf8", "not-an-object", "seq-len-string", "negative", "bad-budget",
         "bad-origins", "unknown-field", "nested-too-deeply", "epoch-2^70",
         "budget-ends-before-it-starts"],
)
def test_producer_refuses_a_malformed_state_file(tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(content)
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--state-file",
                   str(state)], timeout=120)
    one_error_line(res, f"state file '{state}'")
    assert state.read_bytes() == content  # left as it was


def test_producer_refuses_a_seq_len_beyond_the_models_positions() -> None:
    longest = TinyConfig().max_position_embeddings
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--seq-len",
                   str(longest + 1)], timeout=120)
    one_error_line(res, f"--seq-len {longest + 1}: model tiny takes at most {longest} positions")


def test_a_state_file_in_use_by_a_running_producer_is_refused_until_it_is_gone(
    tmp_path: Path
) -> None:
    """Two producers on one state file would share its id and overwrite each other's
    progress; kill -9 of the first leaves no stale lock."""
    state = tmp_path / "p.json"
    args = ["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
            "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--control-connect", "off",
            "--state-file", str(state)]

    def started(p: LoggedProcess) -> None:
        deadline = time.monotonic() + 120
        while " run " not in p.log() or "-> tcp://" not in p.log():
            assert p.proc.poll() is None and time.monotonic() < deadline, p.log()
            time.sleep(0.2)

    first = LoggedProcess(saestream_cmd(*args), tmp_path / "first.log", child_env())
    try:
        started(first)
        one_error_line(run_cli(args, timeout=120),
                       f"state file '{state}' is in use by another producer")
        assert first.proc.poll() is None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        first.close()
    again = LoggedProcess(saestream_cmd(*args), tmp_path / "again.log", child_env())
    try:
        started(again)
    finally:
        again.close()


def test_producer_refuses_an_id_no_header_can_carry() -> None:
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--producer-id",
                   "p" * 1025], timeout=120)
    one_error_line(res, "--producer-id: at most 1024 characters, not 1025")


@pytest.mark.parametrize("command", [
    ["consumer", "--bind", "tcp://127.0.0.1:0", "--hook", "h"],
    ["record", "--bind", "tcp://127.0.0.1:0", "--hook", "h"],
    ["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
     "--connect", "tcp://127.0.0.1:0"],
])
def test_a_data_port_without_a_control_port_beside_it_is_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    """Port 0 (the system's choice) has no port + 1: each daemon once raised a traceback,
    and the consumer left a run file behind that made its next start need --resume."""
    out = {"consumer": ["--checkpoint-dir", str(tmp_path / "ckpt")],
           "record": ["--out", str(tmp_path / "rec")]}.get(command[0], [])
    res = run_cli([*command, *out, "--metrics-port", "0"], timeout=120)
    one_error_line(res, "cannot derive a control endpoint from 'tcp://127.0.0.1:0'")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


# -- demo --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sae", "lr=nan"], "--sae lr='nan': not a finite number"),
        (["--buffer-tokens", "1000000000000"], "--buffer-tokens 1000000000000: 1 buffer(s)"),
        (["--workdir", "{tmp}/file/demo"], "not writable (Not a directory)"),
        (["--corpus", "text:/nonexistent/*.txt"],  # the producers' own check, run first
         "--corpus: corpus text:/nonexistent/*.txt: no files match"),
    ],
    ids=["sae-lr-nan", "buffer-1e12", "workdir-under-a-file", "corpus-missing"],
)
def test_demo_exits_2_on_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "demo"
    res = run_cli(["demo", "--model", "tiny", "--corpus", "synthetic", "--duration", "2",
                   "--port", "0", "--metrics-port", "0", "--workdir", str(workdir),
                   *(a.replace("{tmp}", str(tmp_path)) for a in args)], timeout=180)
    one_error_line(res, needle)
    assert res.stdout == "" and not workdir.exists()  # refused before starting anything
