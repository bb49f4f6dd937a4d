"""Hostile values for `saestream producer`'s flags: each is refused at start-up in one line,
exit 2 — never a traceback, a hang, a segfault, or a run that streams nothing (or the wrong
thing) and exits 0 — while the largest values each range admits still stream.

Flag checks run in-process (click's CliRunner) with a corpus that does not exist: a value
that got past its check stops at the corpus ("no files match"), before any model or socket,
so a regression fails the test instead of hanging or crashing it. What needs a process of
its own (a FIFO that would hang the test, a thread count that crashed the interpreter, a
model) runs as a real `saestream` process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from conftest import free_tcp_port, run_cli

from saestream.common.devices import MAX_THREADS
from saestream.producer.cli import producer
from saestream.producer.config import MAX_SEED

NO_CORPUS = "text:/nonexistent/saestream-hostile/*.txt"
INT32_MAX = 2**31 - 1


def one_error_line(res, needle: str) -> None:
    """Exit 2, and stderr is exactly one `saestream: error:` line holding `needle`."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("saestream: error: "), res.stderr
    assert needle in lines[0], lines[0]


def refused(args: list[str], needle: str, env: dict[str, str] | None = None) -> None:
    """`saestream producer ARGS` exits 2 naming `needle`, before it looks at the corpus."""
    res = CliRunner().invoke(producer, ["--model", "tiny", "--corpus", NO_CORPUS, *args],
                             env=env)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "no files match" not in res.output, res.output
    assert needle in res.output, res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--linger", "1e12"], "'--linger': '1e12' must be <= 86400"),
        (["--hwm", str(INT32_MAX + 1)], f"'--hwm': {INT32_MAX + 1} is not in the range"),
        (["--seed", "-1"], "'--seed': -1 is not in the range"),
        (["--seed", str(MAX_SEED + 1)], f"'--seed': {MAX_SEED + 1} is not in the range"),
        (["--threads", str(MAX_THREADS + 1)],
         f"'--threads': {MAX_THREADS + 1} is not in the range"),
        (["--queue-size", "1000000000000"], "'--queue-size': 1000000000000 is not in the range"),
        (["--epochs", str(2**70)], f"'--epochs': {2**70} is not in the range"),
        (["--max-tokens", str(2**70)], f"'--max-tokens': {2**70} is not in the range"),
        (["--cache-dir", ""], "'--cache-dir': an empty path"),
        (["--state-file", ""], "'--state-file': an empty path"),
    ],
    ids=["linger-1e12", "hwm-past-int32", "seed-negative", "seed-past-uint64",
         "threads-1025", "queue-1e12", "epochs-2^70", "max-tokens-2^70", "empty-cache-dir",
         "empty-state-file"],
)
def test_numbers_the_libraries_underneath_cannot_take_are_refused(
    args: list[str], needle: str
) -> None:
    """ZeroMQ's HWM and LINGER are C ints, torch's seed a uint64 (numpy's non-negative):
    each overflowed in a traceback once the model had loaded."""
    refused(args, needle)


def test_a_thread_count_from_the_environment_gets_the_same_range() -> None:
    for value in ("99999", "many", "-3"):
        refused([], f"SAESTREAM_THREADS={value!r}: not a number of threads",
                env={"SAESTREAM_THREADS": value})


@pytest.mark.parametrize("hook", ["", "  "], ids=["empty", "blank"])
def test_an_empty_hook_is_refused(hook: str) -> None:
    """`--hook ''` named the model itself, whose output (logits) is no hidden state."""
    refused(["--hook", hook], f"--hook {hook!r}: give a module path")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--connect", "inproc://x"], "'inproc://x' (use tcp://HOST:PORT or ipc://PATH)"),
        (["--connect", "inproc://x", "--control-connect", "off"],
         "--connect 'inproc://x': use tcp://HOST:PORT or ipc://PATH"),
        (["--connect", "tcp://127.0.0.1:99999"], "port 99999 is not a TCP port (1..65535)"),
        (["--connect", "tcp://127.0.0.1:99999", "--control-connect", "off"],
         "--connect 'tcp://127.0.0.1:99999': use tcp://HOST:PORT with PORT 1..65535"),
        (["--connect", "tcp://*:5557", "--control-connect", "off"],
         "--connect 'tcp://*:5557': connect to a host, not *"),
        (["--connect", "tcp://127.0.0.1:5557", "--control-connect", "inproc://c"],
         "--control-connect 'inproc://c': use tcp://HOST:PORT or ipc://PATH"),
        (["--connect", "ipc://", "--control-connect", "off"],
         "--connect 'ipc://': an ipc:// path of 1 to 107 bytes"),
        (["--control-connect", "off", "--control-connect", "tcp://127.0.0.1:5558"],
         "--control-connect off cannot be combined with endpoints"),
    ],
    ids=["inproc", "inproc-control-off", "port-99999", "port-99999-control-off",
         "wildcard-host", "inproc-control", "empty-ipc-path", "off-and-an-endpoint"],
)
def test_an_endpoint_no_other_process_can_reach_is_refused(
    args: list[str], needle: str
) -> None:
    """inproc:// reaches only its own process: the producer exited 0 having sent nothing.
    A port past 65535 was accepted by ZeroMQ's connect."""
    refused(args, needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bind", "inproc://x"], "--bind 'inproc://x': use tcp://HOST:PORT or ipc://PATH"),
        (["--bind", "inproc://x", "--control-bind", "tcp://127.0.0.1:5999"],
         "--bind 'inproc://x': use tcp://HOST:PORT or ipc://PATH"),
        (["--control-bind", "inproc://c"],
         "--control-bind 'inproc://c': use tcp://HOST:PORT or ipc://PATH"),
        (["--bind", "tcp://127.0.0.1:70000"],
         "--bind 'tcp://127.0.0.1:70000': use tcp://HOST:PORT with PORT 1..65535"),
        (["--hwm", str(INT32_MAX + 1)], f"'--hwm': {INT32_MAX + 1} is not in the range"),
        (["--seed", "-1"], "'--seed': -1 is not in the range"),
    ],
    ids=["inproc", "inproc-with-control-bind", "inproc-control", "port-70000", "hwm", "seed"],
)
@pytest.mark.parametrize("command", ["consumer", "record"])
def test_a_consumer_or_sink_refuses_endpoints_and_numbers_like_a_producer(
        tmp_path: Path, command: str, args: list[str], needle: str) -> None:
    """The same rules at `saestream consumer` and `saestream record` start-up: `--bind
    inproc://x` with a --control-bind waited for producers that cannot come, a huge --hwm
    was a traceback once the socket was made (after run.json was written)."""
    out = tmp_path / "out"
    where = (["--checkpoint-dir", str(out)] if command == "consumer" else ["--out", str(out)])
    if command == "record" and args[0] == "--seed":
        pytest.skip("saestream record has no --seed")
    res = run_cli([command, "--hook", "h", "--metrics-port", "0", *where, *args], timeout=120)
    one_error_line(res, needle)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", [["producer", "--model", "tiny", "--corpus", "synthetic"],
                                     ["replay", "/nonexistent"],
                                     ["record", "--hook", "h", "--out", "/nonexistent/x"],
                                     ["train", "--input", "/nonexistent.npy", "--hook", "h",
                                      "--out", "/nonexistent/x"]])
def test_a_bad_native_switch_is_one_line_before_any_thread_reads_it(command: list[str]) -> None:
    """Read first by an encode or decode thread (raw or lz4 chunks, a recording sink), a
    bad $SAESTREAM_NATIVE was only an error in the log; every streaming command reads it at
    start-up now."""
    res = run_cli(command, timeout=120, env={**os.environ, "SAESTREAM_NATIVE": "maybe"})
    one_error_line(res, "SAESTREAM_NATIVE='maybe': not on or off")


def test_threads_beyond_the_range_exit_2_instead_of_crashing() -> None:
    """`--threads 99999` made OpenMP crash the process (SIGSEGV)."""
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--threads",
                   "99999", "--connect", f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=120)
    one_error_line(res, "Invalid value for '--threads': 99999 is not in the range 0<=x<=1024")


def test_a_state_file_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    """Reading a FIFO waits for a writer that never comes: the start hung for good."""
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--state-file",
                   str(fifo)], timeout=60)
    one_error_line(res, f"state file '{fifo}' is not a regular file")


BAD_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": "big", "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "vocab_size": 300}


@pytest.mark.parametrize("form", ["directory", "random"])
def test_a_malformed_model_config_is_one_line(tmp_path: Path, form: str) -> None:
    """A config.json with a field of the wrong type raised huggingface_hub's
    StrictDataclassFieldValidationError as a traceback."""
    (tmp_path / "config.json").write_text(json.dumps(BAD_CONFIG))
    model = str(tmp_path) if form == "directory" else f"random:{tmp_path / 'config.json'}"
    res = run_cli(["producer", "--model", model, "--corpus", "synthetic", "--threads", "1",
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=120)
    one_error_line(res, "Field 'hidden_size' expected int, got str")


def _stream(args: list[str]) -> tuple[object, int]:
    """Run a tiny-model producer to its end against a PULL socket: (its result, the number
    of chunks that arrived)."""
    port = free_tcp_port()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    sock.bind(f"tcp://127.0.0.1:{port}")
    try:
        res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--threads", "1",
                       "--connect", f"tcp://127.0.0.1:{port}", "--control-connect", "off",
                       "--seq-len", "16", "--chunk-tokens", "16", "--max-tokens", "30",
                       "--log-level", "ERROR", *args], timeout=120)
        chunks = 0
        while sock.poll(500):
            sock.recv_multipart()
            chunks += 1
    finally:
        sock.close()
        ctx.term()
    return res, chunks


def test_a_hook_whose_output_is_not_a_hidden_state_is_refused_before_anything_is_sent() -> None:
    """`model.rotary_emb` returns (cos, sin) of shape [1, seq, head_dim]: with one context
    per batch it passed for a hidden state, and its 16-wide rows were streamed, exit 0."""
    res, chunks = _stream(["--hook", "model.rotary_emb", "--batch-size", "1"])
    one_error_line(res, "hook 'model.rotary_emb' produced a tuple whose first tensor has "
                   "shape [1, 16, 16], not [batch, seq, d_model] = [1, 16, 64]")
    assert chunks == 0


def test_the_largest_values_of_each_range_still_stream() -> None:
    res, chunks = _stream(["--seed", str(MAX_SEED), "--hwm", str(INT32_MAX),
                           "--linger", "86400"])
    assert res.returncode == 0, res.stderr  # type: ignore[attr-defined]
    assert chunks == 2  # 30 rows in chunks of 16


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:\u00b2", "tcp://127.0.0.1:\uff15\uff15"])
@pytest.mark.parametrize("command", [["producer", "--model", "tiny", "--corpus", "synthetic"],
                                     ["replay", "/nonexistent"]])
def test_a_port_of_unicode_digits_is_one_line(command: list[str], endpoint: str) -> None:
    """str.isdigit() takes '²' (int() then raised: a traceback) and full-width digits (which
    ZeroMQ cannot take); replay had none of the producer's endpoint checks."""
    for flag, other in (("--connect", "--control-connect"), ("--control-connect", "--connect")):
        given = "off" if other == "--control-connect" else "tcp://127.0.0.1:5557"
        res = run_cli([*command, flag, endpoint, other, given], timeout=120)
        one_error_line(res, f"{flag} {endpoint!r}: use tcp://HOST:PORT with PORT 1..65535")
    res = run_cli([*command, "--connect", endpoint], timeout=120)  # control port derived
    one_error_line(res, f"cannot derive a control endpoint from {endpoint!r}")


def test_an_evaluator_hook_may_be_of_any_width_while_a_producer_hook_is_residual() -> None:
    """The d_model check is the producer's (it streams the residual stream); the evaluators
    read SAEs trained on any module, such as an MLP's up-projection."""
    import torch

    from saestream.producer.hooks import HookedModel, HookError
    from saestream.producer.models import load_model

    lm = load_model("tiny", device="cpu")
    ids = torch.randint(0, 256, (2, 8))
    hook = "model.layers.0.mlp.up_proj"
    any_width = HookedModel(lm.model, [hook])
    wide = any_width(ids)[hook]
    any_width.remove()
    assert wide.shape[:2] == (2, 8) and wide.shape[2] != lm.model.config.hidden_size
    with pytest.raises(HookError, match="not \\[batch, seq, d_model\\]"):
        HookedModel(lm.model, [hook], residual=True)(ids)



def test_a_producer_id_with_a_control_character_is_refused(tmp_path: Path) -> None:
    """A newline in the id split the producer's log lines (and the consumer's) in two."""
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--producer-id",
                   "a\nb", "--connect", f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=120)
    one_error_line(res, "--producer-id 'a\\nb': holds a control character")


def test_a_state_file_of_another_producer_id_is_refused(tmp_path: Path) -> None:
    """Its progress and its consumers' origins are the other id's: restarted as a new id on
    it, a producer re-sent (and a consumer trained again) its whole stream, without a word."""
    from saestream.producer.state import ProducerState, write_state

    state = tmp_path / "p0.json"
    write_state(state, ProducerState("synthetic", "0/1", 128, False, split="train",
                                     producer_id="p0"))
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--producer-id",
                   "p1", "--state-file", str(state), "--connect",
                   f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=120)
    one_error_line(res, "written by producer 'p0', not --producer-id 'p1'")
