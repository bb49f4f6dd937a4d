"""A corpus that changes under a running producer, or is odd from the start: files deleted or
swapped for a FIFO mid-run, a tokens file truncated mid-run, 2-D token arrays of a width no
model can take, an empty path, a glob through a symlink cycle, one huge document. Each is a
counted, logged drop or a one-line error; never a traceback, a hang or a death by signal."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import LoggedProcess, free_tcp_port, run_cli, saestream_cmd
from test_consumer import child_env
from test_guarantee_inputs import one_error_line

from saestream.common.logs import RateLimitedLog
from saestream.producer.chunker import Prefetch
from saestream.producer.corpus import (
    DocumentCorpus,
    open_corpus,
    read_text_documents,
    text_files,
)
from saestream.producer.models import TinyConfig

SEQ_LEN = 32


class Drain:
    """A bare PULL socket where the producer sends: it takes every message, once `start`ed."""

    def __init__(self) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(self.endpoint)
        while not self._stop.is_set():
            if sock.poll(100):
                sock.recv_multipart()
        sock.close(0)
        ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def producer(tmp_path: Path, corpus: str, drain: Drain, metrics: int) -> LoggedProcess:
    """A producer that holds almost nothing in flight: until `drain` starts, it stops reading
    the corpus a few contexts in."""
    return LoggedProcess(saestream_cmd(
        "producer", "--model", "tiny", "--corpus", corpus, "--connect", drain.endpoint,
        "--control-connect", "off", "--seq-len", str(SEQ_LEN), "--batch-size", "1",
        "--chunk-tokens", "31", "--queue-size", "1", "--hwm", "1", "--threads", "1",
        "--metrics-port", str(metrics), "--epochs", "0",
    ), tmp_path / "producer.log", child_env())


def wait_started(p: LoggedProcess) -> None:
    deadline = time.monotonic() + 120
    while " run " not in p.log():
        assert p.proc.poll() is None and time.monotonic() < deadline, p.log()
        time.sleep(0.2)


def dropped(port: int) -> dict[str, float]:
    """saestream_producer_dropped_inputs_total by reason, scraped from the producer."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return {}
    pattern = r'saestream_producer_dropped_inputs_total\{reason="(\w+)"\} (\S+)'
    return {m[0]: float(m[1]) for m in re.findall(pattern, text.decode())}


def wait_dropped(p: LoggedProcess, port: int, want: dict[str, int]) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while True:
        got = dropped(port)
        if all(got.get(k, 0) >= v for k, v in want.items()):
            return got
        assert p.proc.poll() is None, p.log()
        assert time.monotonic() < deadline, f"{got} after 60 s\n{p.log()}"
        time.sleep(0.2)


def stops_cleanly(p: LoggedProcess) -> None:
    """SIGTERM ends it with status 0, and nothing in its log is a traceback."""
    p.proc.send_signal(signal.SIGTERM)
    try:
        assert p.proc.wait(30) == 0, p.log()
    except subprocess.TimeoutExpired:
        pytest.fail(f"the producer ignored SIGTERM for 30 s\n{p.log()}")
    assert "Traceback" not in p.log(), p.log()


@pytest.fixture
def drain() -> Iterator[Drain]:
    d = Drain()
    yield d
    d.close()


# -- files that change under a running producer ------------------------------------------------


@pytest.mark.parametrize("change", ["deleted", "fifo"])
def test_a_text_file_deleted_or_swapped_for_a_fifo_mid_run_is_skipped_counted_and_logged(
    tmp_path: Path, drain: Drain, change: str
) -> None:
    """Deleted: the read failed with a traceback. A FIFO: opening it waited for a writer
    forever, and the model loop waited on the read-ahead without ever seeing SIGTERM.
    Bad .jsonl lines were logged but not counted."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first document " * 400)  # ~190 contexts: read first
    (folder / "b.txt").write_text("changed before it is read " * 20)
    (folder / "c.jsonl").write_text('{"text": "fine ' + "x" * 100 + '"}\nnot json\n{"t": 1}\n')
    metrics = free_tcp_port()
    p = producer(tmp_path, f"text:{folder}", drain, metrics)
    try:
        wait_started(p)
        (folder / "b.txt").unlink()
        if change == "fifo":
            os.mkfifo(folder / "b.txt")
        drain.start()
        reason = "unreadable_file" if change == "deleted" else "not_a_regular_file"
        got = wait_dropped(p, metrics, {reason: 1, "bad_jsonl_line": 2})
        others = set(got) - {reason, "bad_jsonl_line"}
        assert len(others) == 3 and not any(got[k] for k in others), got
        stops_cleanly(p)
        why = "No such file or directory" if change == "deleted" else "not a regular file"
        assert f"skipping corpus file {folder / 'b.txt'} ({why})" in p.log()
    finally:
        p.close()


def test_a_text_corpus_whose_every_file_is_gone_ends_with_one_line(
    tmp_path: Path, drain: Drain
) -> None:
    """Nothing left to read is not something to skip forever: the next pass finds no context,
    and the producer says so in one line (exit 2), with the lost file in its log."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("the only document " * 300)
    p = producer(tmp_path, f"text:{folder}", drain, free_tcp_port())
    try:
        wait_started(p)
        (folder / "a.txt").unlink()
        drain.start()
        assert p.proc.wait(60) == 2, p.log()
        log = p.log()
        assert "Traceback" not in log, log
        assert log.rstrip().splitlines()[-1] == (
            f"saestream: error: shard 0/1 of corpus text:{folder} has no contexts"), log
        assert f"skipping corpus file {folder / 'a.txt'} (No such file or directory)" in log
    finally:
        p.close()


def test_a_tokens_file_truncated_mid_run_drops_the_lost_contexts_instead_of_sigbus(
    tmp_path: Path, drain: Drain
) -> None:
    """The file was memory-mapped: touching a page past the new end killed the producer with
    SIGBUS. Contexts with ids outside the vocabulary were skipped but not counted."""
    tokens = np.arange(400 * SEQ_LEN, dtype=np.uint16) % 256
    tokens[SEQ_LEN * 2] = TinyConfig.vocab_size  # context 2 holds an id the model lacks
    path = tmp_path / "ids.npy"
    np.save(path, tokens)
    metrics = free_tcp_port()
    p = producer(tmp_path, f"tokens:{path}", drain, metrics)
    try:
        wait_started(p)
        with open(path, "r+b") as fh:  # keep the header and 10 contexts
            fh.truncate(128 + 10 * SEQ_LEN * 2)
        drain.start()
        got = wait_dropped(p, metrics, {"truncated_tokens": 300, "bad_token_ids": 1})
        assert got["unreadable_file"] == 0, got
        stops_cleanly(p)
        assert "is shorter than at start-up" in p.log()
    finally:
        p.close()


def test_a_deleted_text_file_keeps_the_split_of_every_later_document(tmp_path: Path) -> None:
    """Document numbers decide train/eval: were a lost file's number given to the next one,
    every later document would change sides and eval text would be trained on."""
    files = []
    for i in range(12):
        files.append(tmp_path / f"{i:02}.txt")
        files[-1].write_text(f"doc{i:02}")
    drops: list[tuple[str, int]] = []
    corpus = open_corpus(f"text:{tmp_path}", seq_len=2, vocab_size=512, separator=0,
                         encode=lambda t: [ord(c) for c in t], split="eval")
    corpus.on_drop = lambda reason, n: drops.append((reason, n))

    def eval_text() -> str:  # one pass (an epoch) over the files listed at start-up
        return "".join(chr(i) for c in corpus.contexts() for i in c if i)

    assert eval_text() == "doc09"
    files[3].unlink()
    assert eval_text() == "doc09"
    assert drops == [("unreadable_file", 1)]


def test_nothing_readable_left_yields_no_document_and_reports_each_file(tmp_path: Path) -> None:
    """When every file is gone, the documents simply end (the daemon then stops with one line:
    'shard 0/1 of corpus ... has no contexts'); each lost file is reported once."""
    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    for f in files:
        f.write_text('{"text": "x"}\n')
    reported: list[tuple[str, int]] = []
    warn = RateLimitedLog(logging.getLogger("test"))
    docs = read_text_documents(files, warn, lambda reason, n: reported.append((reason, n)))
    for f in files:
        f.unlink()
    assert [d for d in docs if d is not None] == []
    assert reported == [("unreadable_file", 1), ("unreadable_file", 1)]


def test_the_read_ahead_wait_ends_when_the_stop_flag_is_set() -> None:
    """A reader stuck in the file system (a FIFO, a hung mount) must not keep SIGTERM out."""
    stuck = threading.Event()

    def hangs() -> Iterator[int]:
        yield 1
        stuck.wait()  # never set: the reader is stuck for good
        yield 2

    stop = threading.Event()
    got: list[int] = []

    def consume() -> None:
        for item in Prefetch(hangs(), depth=2, stop=stop):
            got.append(item)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(10)
    assert not t.is_alive() and got == [1]
    stuck.set()


# -- odd corpora refused at start-up ---------------------------------------------------------


@pytest.mark.parametrize("width", [0, 1])
def test_a_2d_tokens_array_too_narrow_for_a_context_is_one_line(tmp_path: Path,
                                                                 width: int) -> None:
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros((8, width), dtype=np.uint16))
    res = run_cli(["producer", "--model", "tiny", "--corpus", f"tokens:{path}", "--threads",
                   "1", "--connect", f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=60)
    one_error_line(res, f"2-D token array of width {width}: each row is a context and needs "
                        f"at least 2 ids")


def test_a_2d_tokens_array_wider_than_the_models_positions_is_one_line(tmp_path: Path) -> None:
    """--seq-len was checked against the model, but a 2-D array's width replaces it."""
    longest = TinyConfig.max_position_embeddings
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros((2, longest + 1), dtype=np.uint16))
    res = run_cli(["producer", "--model", "tiny", "--corpus", f"tokens:{path}", "--threads",
                   "1", "--connect", f"tcp://127.0.0.1:{free_tcp_port()}",
                   "--control-connect", "off"], timeout=90)
    one_error_line(res, f"contexts of {longest + 1} tokens (the width of its 2-D array): model "
                        f"tiny takes at most {longest} positions")


@pytest.mark.parametrize("spec", ["text:", "tokens:"])
def test_an_empty_corpus_path_is_one_line_not_the_current_directory(tmp_path: Path,
                                                                    spec: str) -> None:
    """`text:` read the current directory (here: streamed stray.txt); `tokens:` already
    failed, as "file '.' not found"."""
    (tmp_path / "stray.txt").write_text("not meant to be a corpus " * 50)
    res = run_cli(["producer", "--model", "tiny", "--corpus", spec, "--threads", "1",
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--control-connect",
                   "off"], timeout=60, cwd=tmp_path)
    one_error_line(res, "the path is empty")


def test_a_glob_does_not_follow_a_symlink_cycle(tmp_path: Path) -> None:
    """glob's `**` followed a link to a parent until the OS said ELOOP: every file came back
    dozens of times (and two such links multiply: exponential)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("1")
    (tmp_path / "a" / "b" / "two.txt").write_text("2")
    (tmp_path / "a" / "b" / ".hidden.txt").write_text("h")
    (tmp_path / "a" / "b" / "up").symlink_to("..")
    expected = [tmp_path / "a" / "b" / "two.txt", tmp_path / "a" / "one.txt"]
    assert text_files(str(tmp_path / "**" / "*.txt")) == sorted(expected)
    hidden = tmp_path / "a" / "b" / ".hidden.txt"
    assert text_files(str(tmp_path / "a")) == sorted([*expected, hidden])  # as before
    assert text_files(str(tmp_path / "a" / "*" / "*.txt")) == [expected[0]]
    assert text_files(str(tmp_path / "a" / "b" / "up" / "*.txt")) == [  # named: followed
        tmp_path / "a" / "b" / "up" / "one.txt"]


def test_a_glob_follows_a_symlinked_folder_once_and_a_trailing_star_star_matches_files(
        tmp_path: Path) -> None:
    """`**` reached files under a symlinked data folder and a trailing `**` matched files
    with glob; the cycle-safe walk must keep both (it once dropped them silently)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "t.txt").write_text("t")
    (tmp_path / "real" / "x.txt").write_text("x")
    (tmp_path / "real" / "sub" / "y.txt").write_text("y")
    (tmp_path / "data" / "linked").symlink_to("../real")
    linked = tmp_path / "data" / "linked"
    expected = sorted([tmp_path / "data" / "t.txt", linked / "x.txt", linked / "sub" / "y.txt"])
    assert text_files(str(tmp_path / "data" / "**" / "*.txt")) == expected
    assert text_files(str(tmp_path / "data" / "**")) == expected


def test_a_jsonl_file_gone_in_a_later_pass_keeps_the_split_of_later_documents(
        tmp_path: Path) -> None:
    """The documents a .jsonl held are counted across passes: the count lived in each pass's
    generator, so a file gone in the next pass renumbered everything after it."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(f'{{"text": "a{i}"}}\n' for i in range(5)))
    b.write_text("".join(f'{{"text": "b{i}"}}\n' for i in range(10)))
    corpus = open_corpus(f"text:{tmp_path}", seq_len=2, vocab_size=512, separator=0,
                         encode=lambda t: [ord(c) for c in t], split="eval")

    def eval_text() -> str:
        return "".join(chr(i) for c in corpus.contexts() for i in c if i)

    assert eval_text() == "b4"
    a.unlink()
    assert eval_text() == "b4"


# -- one huge document ----------------------------------------------------------------------


def test_cutting_one_huge_document_costs_what_cutting_many_small_ones_does() -> None:
    """Contexts were deleted from the front of the buffer, which moves the whole rest of it
    each time: quadratic in a document's length (a 1 GB .txt file never got going).

    No clock is compared with a number: the same tokens are cut twice, as one document and as
    many small ones (where the buffer never grows, so the old code was linear there too), and
    the CPU time of the two must be alike. The old code took ~100x longer on the one."""
    seq_len, total = 4, 400_000
    ids = list(range(total - 1))

    def cpu_seconds(documents: list[list[int]]) -> float:
        # each document one piece (a list of ids: `encode` passes them through)
        corpus = DocumentCorpus("text:x", lambda: [[d] for d in documents], lambda d: d, 0,
                                seq_len)
        begin = time.process_time()
        n = sum(1 for _ in corpus.contexts())
        assert n == sum(len(d) + 1 for d in documents) // seq_len
        return time.process_time() - begin

    small = [ids[i : i + 63] for i in range(0, len(ids), 63)]
    many = min(cpu_seconds(small) for _ in range(3))
    one = min(cpu_seconds([ids]) for _ in range(2))
    assert one < 4 * many + 0.05, (one, many)


def test_a_document_cut_into_pieces_gives_the_contexts_of_the_whole(monkeypatch) -> None:
    """Long documents are tokenised a piece at a time (`text_pieces`): the contexts, and
    where each document's separator falls, are those of tokenising each whole (here bytes,
    which any cut keeps; SmolLM2's ids across cuts: test_producer_smollm2)."""
    from saestream.producer import corpus as corpus_module

    docs = ["word " * 5000 + "\n" + "x\ny " * 3000, "short", "a b\nc" * 2000, "z" * 999]

    def contexts() -> list[list[int]]:
        corpus = DocumentCorpus("text:x", lambda: docs, lambda s: list(s.encode()), 999, 7)
        return [c.tolist() for c in corpus.contexts()]

    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 10**9)
    whole = contexts()
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 50)
    assert contexts() == whole
    assert sum(len(d) + 1 for d in docs) == 7 * len(whole) + 3  # a tail of 3 ids is left
    assert sum(c.count(999) for c in whole) == len(docs) - 1  # the last separator is in it


def test_streamed_pieces_are_the_pieces_of_the_whole_text() -> None:
    import io
    import random

    from saestream.producer.corpus import stream_pieces, text_pieces

    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(["word ", "\n", "  ", "x\ny", "é", "😀", "ab"])
                       for _ in range(rng.randrange(0, 400)))
        size = rng.randrange(1, 40)
        read = io.StringIO(text).read
        assert list(stream_pieces(read, size)) == list(text_pieces(text, size)), (text, size)


def test_a_streamed_file_that_fails_mid_read_keeps_what_was_read_and_reports_the_rest(
        monkeypatch) -> None:
    from saestream.producer import corpus as corpus_module
    from saestream.producer.corpus import StreamedText

    class Failing:
        closed = False
        reads = 0

        def read(self, n: int) -> str:
            self.reads += 1
            if self.reads > 3:
                raise OSError(5, "Input/output error")
            return "word " * n

    lost: list[OSError] = []
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 10)
    text = StreamedText(Failing(), lost.append)  # type: ignore[arg-type]
    assert "".join(text) == "word " * 30  # all three reads (10 characters each) kept
    assert [e.strerror for e in lost] == ["Input/output error"]
    with pytest.raises(RuntimeError, match="read twice, or after the next document"):
        list(text)
    closed = Failing()
    closed.closed = True
    with pytest.raises(RuntimeError, match="read twice, or after the next document"):
        list(StreamedText(closed, lost.append))  # type: ignore[arg-type]


def test_a_large_text_file_is_read_a_piece_at_a_time(tmp_path: Path) -> None:
    """40 MB of text with one emoji: read whole, a str of four bytes a character, the process
    grew by 190 MiB at its peak; streamed, by 47 MiB (both measured here). Every context
    comes out, in order."""
    path = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog. " * 20 + "\n"
    path.write_text("😀" + line * 44_000)  # 39.6 M characters
    script = f"""
import json
from saestream.producer.corpus import open_corpus
def status(key):
    return int(next(x for x in open("/proc/self/status") if x.startswith(key)).split()[1])
corpus = open_corpus("text:{path}", seq_len=4096, vocab_size=1 << 21,
                     encode=lambda t: [ord(c) for c in t], separator=0)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
first = None
n = 0
for c in corpus.contexts():
    first = c[:3].tolist() if first is None else first
    n += 1
print(json.dumps([n, first, (status("VmHWM") - base) // 1024]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    n, first, grew_mib = json.loads(out)
    assert n == (1 + len(line) * 44_000 + 1) // 4096  # the text, then the separator
    assert first == [ord("😀"), ord("T"), ord("h")]
    assert grew_mib < 100, f"the process grew {grew_mib} MiB"


@pytest.mark.parametrize("limit", [1, 2, 7, 8, 64])
def test_jsonl_lines_longer_than_the_limit_are_read_through_not_held(limit: int) -> None:
    """`_lines` against a split of the bytes after each newline: every line of at most
    `limit` bytes (its newline included) comes out whole, decoded with undecodable bytes
    replaced; every longer one as None; the numbering unchanged, also for the last line with
    no newline; a carriage return is no line end (JSON reads it as white space)."""
    import io
    import random

    from saestream.producer.corpus import _lines

    rng = random.Random(limit)
    for _ in range(300):
        data = b"".join(rng.choice([b"a", b"bb", b"\n", "é😀".encode(), b"x" * 9, b"\r\n", b"\r",
                                    b"\xff", "😀".encode()[:2]])
                        for _ in range(rng.randrange(30)))
        lines = re.findall(rb"[^\n]*\n|[^\n]+$", data)
        want = [(i, line.decode("utf-8", errors="replace") if len(line) <= limit else None)
                for i, line in enumerate(lines, 1)]
        assert list(_lines(io.BytesIO(data), limit)) == want, (data, limit)


def test_a_jsonl_line_costs_what_reading_the_limit_does_and_is_let_go_before_the_next(
        tmp_path: Path) -> None:
    """A line of 260 MiB of emoji (skipped: costs what reading the 64 MiB limit does, about
    130 MiB at peak, whatever the line's length), then three lines of 16 MiB with one emoji
    each (kept: text four bytes a character; each let go before the next is read). The
    process grew by 130 MiB; by 515 MiB when the limit counted characters (the first 64 Mi
    characters of the long line built before the rest was read), by 240 MiB when a kept
    line's bytes and the last text were still held while the next line was read (found by
    review)."""
    path = tmp_path / "long.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        fh.write('{"text": "one"}\n{"text": "')
        for _ in range(65):
            fh.write("😀" * (1 << 20))
        fh.write('"}\n')
        for _ in range(3):
            fh.write('{"text": "😀' + "a" * ((1 << 24) - 20) + '"}\n')
        fh.write('{"text": "two"}\n')
    script = (
        "import json, logging, sys\n"
        "from pathlib import Path\n"
        "from saestream.common.logs import RateLimitedLog\n"
        "from saestream.producer.corpus import read_text_documents\n"
        "def hwm():\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status')\n"
        "                if line.startswith('VmHWM')) / 1024\n"
        "before, reported = hwm(), []\n"
        "docs = []\n"
        "for doc in read_text_documents([Path(sys.argv[1])],\n"
        "        RateLimitedLog(logging.getLogger('t')), lambda r, n: reported.append((r, n))):\n"
        "    docs.append(doc if len(doc) < 10 else len(doc))\n"
        "    del doc\n"
        "print(json.dumps([docs, reported, hwm() - before]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    docs, reported, grew_mib = json.loads(out)
    assert docs == ["one", *[(1 << 24) - 19] * 3, "two"]
    assert reported == [["bad_jsonl_line", 1]]
    assert grew_mib < 200, f"the process grew {grew_mib:.0f} MiB"


def test_a_jsonl_line_over_the_limit_is_skipped_and_counted(tmp_path: Path, monkeypatch) -> None:
    from saestream.producer import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "MAX_JSONL_LINE", 5000)
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"text": "' + "x" * 6000 + '"}\n'
                    '[' + "{}," * 30 + '{}]\n' + "[" * 2000 + "]" * 2000 + '\n{"text": "two"}')
    reported: list[tuple[str, int]] = []
    warn = RateLimitedLog(logging.getLogger("test"))
    docs = list(read_text_documents([path], warn, lambda r, n: reported.append((r, n))))
    assert docs == ["one", "two"]
    assert reported == [("bad_jsonl_line", 1)] * 3  # too long; no text; nested too deeply


def test_a_jsonl_text_with_a_lone_surrogate_is_tokenised_with_it_replaced(tmp_path: Path) -> None:
    """JSON's `\\ud800` makes a str no UTF-8 encoder takes: the tiny model's byte tokenizer
    raised UnicodeEncodeError and a Hugging Face one TypeError, out of the producer's
    read-ahead (found by review). Replaced by U+FFFD, as undecodable bytes of a .txt file
    are; the rest of the line is kept."""
    from saestream.producer.models import ByteTokenizer

    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok \\ud800 lone \\udc00"}\n{"text": "next"}\n')
    warn = RateLimitedLog(logging.getLogger("test"))
    docs = list(read_text_documents([path], warn))
    assert docs == ["ok \ufffd lone \ufffd", "next"]
    tok = ByteTokenizer()
    corpus = DocumentCorpus("text:x", lambda: docs, tok.encode, 0, 4)
    assert next(c.tolist() for c in corpus.contexts()) == list(b"ok \xef")
