"""Producer internals in one process: hooks, early stop, corpora, shards, state, sending."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from conftest import free_tcp_port
from prometheus_client import CollectorRegistry

from saestream.common.wire import decode_chunk, encode_chunk
from saestream.producer.corpus import (
    ArrayCorpus,
    CorpusError,
    Shard,
    open_corpus,
    precheck_corpus,
)
from saestream.producer.daemon import ProducerConfig, run_producer
from saestream.producer.hooks import HookedModel, HookError
from saestream.producer.metrics import ProducerMetrics
from saestream.producer.models import ByteTokenizer, ModelError, build_tiny, find_blocks, load_model
from saestream.producer.sender import Outgoing, Progress, Sender
from saestream.producer.state import ProducerState, StateError, check_state, read_state, write_state

torch.set_num_threads(1)
SEP = ByteTokenizer.eos_token_id


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_tiny(seed=0)


def ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# models and hooks


def test_tiny_model_is_seeded_and_has_llama_block_names() -> None:
    a, b, c = build_tiny(seed=1), build_tiny(seed=1), build_tiny(seed=2)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert find_blocks(a) == ("model.layers", 6)


def test_default_hook_is_block_two_thirds_through() -> None:
    lm = load_model("tiny", device="cpu")
    assert lm.default_hook() == "model.layers.4"  # round(2 * 6 / 3)
    lm.n_layers = 30  # smollm2-135m's depth
    assert lm.default_hook() == "model.layers.20"


def test_hooked_activations_equal_output_hidden_states(tiny: torch.nn.Module) -> None:
    x = ids()
    with torch.no_grad():
        hidden = tiny(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    for early_stop in (True, False):
        hooked = HookedModel(tiny, ["model.layers.1", "model.layers.3"], early_stop=early_stop)
        try:
            acts = hooked(x)
        finally:
            hooked.remove()
        assert torch.equal(acts["model.layers.1"], hidden[2])
        assert torch.equal(acts["model.layers.3"], hidden[4])


def test_early_stop_runs_no_block_after_the_deepest_hook(tiny: torch.nn.Module) -> None:
    calls: dict[str, int] = {}

    def counter(name: str):
        def pre_hook(module: torch.nn.Module, args: object) -> None:
            calls[name] = calls.get(name, 0) + 1

        return pre_hook

    names = [f"model.layers.{i}" for i in range(6)] + ["model.norm", "lm_head"]
    handles = [tiny.get_submodule(n).register_forward_pre_hook(counter(n)) for n in names]
    try:
        hooked = HookedModel(tiny, ["model.layers.2", "model.layers.0"])
        hooked(ids())
        hooked.remove()
        assert calls == {"model.layers.0": 1, "model.layers.1": 1, "model.layers.2": 1}
        calls.clear()
        full = HookedModel(tiny, ["model.layers.2"], early_stop=False)
        full(ids())
        full.remove()
        assert set(calls) == set(names)
    finally:
        for h in handles:
            h.remove()


def test_unknown_hook_is_a_hook_error(tiny: torch.nn.Module) -> None:
    with pytest.raises(HookError, match=r"model\.layers\.9"):
        HookedModel(tiny, ["model.layers.9"])


# ---------------------------------------------------------------------------------------------
# corpora


def contexts_of(corpus) -> list[list[int]]:
    return [c.tolist() for c in corpus.contexts()]


def expected_contexts(stream: list[int], seq_len: int) -> list[list[int]]:
    n = len(stream) // seq_len
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def byte_corpus(spec: str, seq_len: int = 8, **kw):
    return open_corpus(spec, seq_len=seq_len, vocab_size=512, encode=ByteTokenizer().encode,
                       separator=SEP, **kw)


def test_text_corpus_joins_txt_and_jsonl_documents_with_the_separator(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\nnot json\n" + json.dumps({"id": 3}) + "\n"
        + json.dumps({"text": "json two", "meta": 1}) + "\n"
    )
    stream: list[int] = []
    for doc in ("first file", "second file", "json one", "json two"):
        stream += [*doc.encode(), SEP]
    corpus = byte_corpus(f"text:{tmp_path}/*")
    assert contexts_of(corpus) == expected_contexts(stream, 8)
    assert contexts_of(byte_corpus(f"text:{tmp_path}")) == contexts_of(corpus)  # a directory
    only_jsonl = byte_corpus(f"text:{tmp_path}/c.jsonl", seq_len=4)
    assert contexts_of(only_jsonl) == expected_contexts([*b"json one", SEP, *b"json two", SEP], 4)


def test_tokens_corpus_reads_npy_1d_2d_and_bin_ids_exactly(tmp_path: Path) -> None:
    flat = np.arange(1000, dtype=np.int32) % 500
    np.save(tmp_path / "flat.npy", flat)
    np.save(tmp_path / "rows.npy", flat[:960].reshape(30, 32))
    flat.astype(np.uint16).tofile(tmp_path / "t16.bin")
    (flat + 70000).astype(np.uint32).tofile(tmp_path / "t32.bin")

    assert contexts_of(byte_corpus(f"tokens:{tmp_path}/flat.npy", 100)) == expected_contexts(
        flat.tolist(), 100
    )
    rows = byte_corpus(f"tokens:{tmp_path}/rows.npy", 100)  # 2-D: already contexts
    assert rows.seq_len == 32 and contexts_of(rows) == flat[:960].reshape(30, 32).tolist()
    assert contexts_of(byte_corpus(f"tokens:{tmp_path}/t16.bin", 100)) == expected_contexts(
        flat.tolist(), 100
    )
    want32 = expected_contexts((flat + 70000).tolist(), 100)
    assert contexts_of(byte_corpus(f"tokens:{tmp_path}/t32.bin:uint32", 100)) == want32
    assert contexts_of(byte_corpus(f"tokens:{tmp_path}/t32.bin", 100, token_dtype="uint32")) == (
        want32
    )


def test_wiki_sample_is_markup_free_text_in_a_fixed_order() -> None:
    corpus = byte_corpus("wiki-sample", seq_len=256)
    a, b = contexts_of(corpus), contexts_of(corpus)
    assert a == b and len(a) > 1000
    text = bytes(t for ctx in a[:2000] for t in ctx if t != SEP).decode("utf-8", "replace")
    assert "Anarchism" in text
    for markup in ("'''", "[[", "]]", "{{", "<ref", "==="):
        assert markup not in text


def test_synthetic_corpus_is_seeded_and_within_the_vocabulary() -> None:
    def synth(seed: int):
        return open_corpus("synthetic:50", seq_len=16, vocab_size=100, encode=None,
                           separator=0, seed=seed)

    a, b, c = contexts_of(synth(1)), contexts_of(synth(1)), contexts_of(synth(2))
    assert a == b and a != c and len(a) == 50
    assert all(0 <= t < 100 for ctx in a for t in ctx)


def test_missing_or_unknown_corpus_is_a_corpus_error(tmp_path: Path) -> None:
    for spec in ("text:/nonexistent/*.txt", f"tokens:{tmp_path}/none.npy", "bogus",
                 "synthetic:zero"):
        with pytest.raises(CorpusError):
            precheck_corpus(spec)


# ---------------------------------------------------------------------------------------------
# shards


@pytest.mark.parametrize("count", [1, 3, 4])
def test_shards_are_disjoint_and_cover_the_corpus(tmp_path: Path, count: int) -> None:
    array = ArrayCorpus("tokens:x", np.arange(70 * 7), 7)  # context i starts with token 7 i
    (tmp_path / "doc.txt").write_text(" ".join(str(i) for i in range(150)))  # no repeats
    text = byte_corpus(f"text:{tmp_path}/doc.txt", seq_len=9)
    for corpus in (array, text):
        everything = contexts_of(corpus)
        parts = [[c.tolist() for c in corpus.shard_contexts(Shard(i, count))]
                 for i in range(count)]
        seen = [tuple(c) for part in parts for c in part]
        assert len(seen) == len(set(seen)) == len(everything)  # disjoint
        assert sorted(seen) == sorted(tuple(c) for c in everything)  # covering
        skipped = [c.tolist() for c in corpus.shard_contexts(Shard(count - 1, count), start=2)]
        assert skipped == parts[count - 1][2:]


def test_bad_shard_is_rejected() -> None:
    for text in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(CorpusError):
            Shard.parse(text)


# ---------------------------------------------------------------------------------------------
# state file


def test_state_file_round_trips_and_rejects_another_configuration(tmp_path: Path) -> None:
    path = tmp_path / "s" / "state.json"
    assert read_state(path) is None
    state = ProducerState("synthetic", "0/2", 128, False, epoch=1, tokens_done=77)
    write_state(path, state)
    again = read_state(path)
    assert again is not None and (again.epoch, again.tokens_done) == (1, 77)
    check_state(again, ProducerState("synthetic", "0/2", 128, False), path)
    with pytest.raises(StateError, match="shard"):
        check_state(again, ProducerState("synthetic", "1/2", 128, False), path)
    path.write_text("{not json")
    with pytest.raises(StateError):
        read_state(path)
    path.write_text("[" + "{}," * (1 << 20) + "{}]")  # 3 MB, 64 MB once parsed: refused
    with pytest.raises(StateError, match="more than 1,048,576 JSON values"):
        read_state(path)


# ---------------------------------------------------------------------------------------------
# the daemon in-process, against a real PULL socket


def pull_socket(port: int) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    sock.bind(f"tcp://127.0.0.1:{port}")
    return ctx, sock


def receive_all(sock: zmq.Socket, done: threading.Event, quiet: float = 0.5) -> list:
    """Chunks until `done` is set and nothing arrived for `quiet` seconds."""
    chunks = []
    last = time.monotonic()
    while not (done.is_set() and time.monotonic() - last > quiet):
        if sock.poll(50):
            chunks.append(decode_chunk(sock.recv_multipart(copy=False)))
            last = time.monotonic()
    return chunks


def run_in_thread(cfg: ProducerConfig, registry: CollectorRegistry | None = None):
    done, result = threading.Event(), {}

    def target() -> None:
        try:
            result["summary"] = run_producer(cfg, registry=registry)
        finally:
            done.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, done, result


def tiny_cfg(port: int, **kw) -> ProducerConfig:
    base = dict(model="tiny", corpus="synthetic:200", connect=[f"tcp://127.0.0.1:{port}"],
                device="cpu", seq_len=32, batch_size=4, chunk_tokens=100, threads=1,
                producer_id="test", linger=2.0, split="all")  # whole corpus
    return ProducerConfig(**{**base, **kw})


def collect_run(cfg: ProducerConfig, port: int, registry=None) -> tuple[list, dict]:
    ctx, sock = pull_socket(port)
    try:
        thread, done, result = run_in_thread(cfg, registry)
        chunks = receive_all(sock, done)
        thread.join(30)
    finally:
        sock.close()
        ctx.term()
    return chunks, result


def test_max_tokens_sends_exactly_n_tokens_in_order_without_seq_gaps(free_port: int) -> None:
    registry = CollectorRegistry()
    cfg = tiny_cfg(free_port, max_tokens=1000, hooks=["model.layers.1", "model.layers.4"])
    chunks, result = collect_run(cfg, free_port, registry)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert len({c.run for c in chunks}) == 1
    for hook in cfg.hooks:
        mine = [c for c in chunks if c.hook == hook]
        assert sum(c.n for c in mine) == 1000 and all(c.n <= 100 for c in mine)
        assert [c.source["start"] for c in mine] == [0, *[c.source["end"] for c in mine[:-1]]]
        assert all(c.d == 64 and c.dtype == "bfloat16" for c in mine)
        value = registry.get_sample_value
        assert value("saestream_producer_tokens_total", {"hook": hook}) == 1000
        assert value("saestream_producer_messages_total", {"hook": hook}) == len(mine)
        assert value("saestream_producer_raw_bytes_total", {"hook": hook}) == 1000 * 64 * 2
        assert value("saestream_producer_wire_bytes_total", {"hook": hook}) > 0
    assert registry.get_sample_value("saestream_producer_forward_seconds_count") > 0
    assert registry.get_sample_value("saestream_producer_send_blocked_seconds_total") >= 0
    assert registry.get_sample_value("saestream_producer_queue_depth") is not None
    assert result["summary"].tokens == 1000 and result["summary"].complete


def test_state_file_resume_continues_without_repeating(tmp_path: Path, free_port: int) -> None:
    state = tmp_path / "state.json"
    first, _ = collect_run(tiny_cfg(free_port, max_tokens=700, state_file=state), free_port)
    saved = json.loads(state.read_text())
    assert (saved["epoch"], saved["tokens_done"]) == (0, 700)  # 700 = 22 contexts of 31 + 18
    second, _ = collect_run(tiny_cfg(free_port, max_tokens=900, state_file=state), free_port)
    whole, _ = collect_run(tiny_cfg(free_port, max_tokens=1600), free_port)

    resumed = first + second
    assert [(c.source["start"], c.source["end"]) for c in resumed][:7] == [
        (i * 100, min(700, i * 100 + 100)) for i in range(7)
    ]
    assert second[0].source["start"] == 700 and second[0].seq == 0
    assert json.loads(state.read_text())["tokens_done"] == 1600
    a = torch.cat([c.acts.float() for c in resumed])
    b = torch.cat([c.acts.float() for c in whole])
    assert a.shape == b.shape == (1600, 64)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_epochs_end_the_run_and_a_finished_state_sends_nothing(
    tmp_path: Path, free_port: int
) -> None:
    state = tmp_path / "state.json"
    cfg = tiny_cfg(free_port, corpus="synthetic:10", epochs=2, state_file=state)
    chunks, _ = collect_run(cfg, free_port)
    assert sum(c.n for c in chunks) == 2 * 10 * 31
    assert {c.source["epoch"] for c in chunks} == {0, 1}
    assert json.loads(state.read_text())["epoch"] == 2
    again, result = collect_run(cfg, free_port)
    assert again == [] and result["summary"].tokens == 0


def test_producer_waits_for_a_consumer_that_starts_late(free_port: int) -> None:
    thread, done, _ = run_in_thread(tiny_cfg(free_port, max_tokens=500))
    time.sleep(1.0)  # nobody listening yet: the producer must block, not fail or drop
    assert thread.is_alive()
    ctx, sock = pull_socket(free_port)
    try:
        chunks = receive_all(sock, done)
    finally:
        sock.close()
        ctx.term()
    thread.join(30)
    assert sum(c.n for c in chunks) == 500
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_sender_blocks_under_backpressure_and_never_drops() -> None:
    """No peer: ZeroMQ cannot take the chunk, the queue fills, `put` blocks (counted)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.immediate = 1
    sock.linger = 0
    sock.connect(f"tcp://127.0.0.1:{free_tcp_port()}")
    registry = CollectorRegistry()
    metrics = ProducerMetrics.create(registry)
    sender = Sender(sock, producer="p", run="r", model="tiny", codec="lz4", metrics=metrics,
                    queue_size=2, first_hook="h", progress=Progress(0, 0)).start()
    item = Outgoing("h", torch.zeros(4, 8, dtype=torch.bfloat16), {}, Progress(0, 4))
    stop = threading.Event()
    assert sender.put(item, stop, 0.1) and sender.put(item, stop, 0.1)  # one in hand, one queued
    time.sleep(0.2)
    assert sender.put(item, stop, 0.1)
    stop.set()  # a stop gives the blocked put only `linger` seconds
    assert not sender.put(item, stop, 0.3)
    assert not sender.drain(stop, 0.3)
    assert sender.seq == 0 and sender.progress == Progress(0, 0)  # nothing claimed as sent
    assert registry.get_sample_value("saestream_producer_send_blocked_seconds_total") > 0
    sock.close()
    ctx.term()


def test_model_directory_and_random_config_load_offline(tmp_path: Path) -> None:
    build_tiny(seed=3).save_pretrained(tmp_path / "saved")
    lm = load_model(str(tmp_path / "saved"), device="cpu", dtype="bfloat16")
    assert (lm.n_layers, lm.d_model, lm.dtype, lm.tokenizer) == (6, 64, torch.bfloat16, None)
    want = build_tiny(seed=3).model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    assert torch.equal(lm.model.model.layers[0].mlp.up_proj.weight, want)
    lm.model.config.to_json_file(tmp_path / "config.json")
    rand = load_model(f"random:{tmp_path / 'config.json'}", device="cpu", seed=1)
    assert rand.default_hook() == "model.layers.4" and rand.vocab_size == 512
    with pytest.raises(ModelError, match="unknown model"):
        load_model(str(tmp_path / "missing"), device="cpu")


def test_chunks_are_dealt_across_every_connected_endpoint(free_port: int) -> None:
    other = free_tcp_port()
    ctx, a = pull_socket(free_port)
    b = ctx.socket(zmq.PULL)
    b.linger = 0
    b.bind(f"tcp://127.0.0.1:{other}")
    try:
        cfg = tiny_cfg(free_port, max_tokens=2000, connect=[f"tcp://127.0.0.1:{free_port}",
                                                             f"tcp://127.0.0.1:{other}"])
        thread, done, _ = run_in_thread(cfg)
        chunks: list = []
        last = time.monotonic()
        while not (done.is_set() and time.monotonic() - last > 0.5):
            for sock in (a, b):
                if sock.poll(20):
                    chunks.append((sock, decode_chunk(sock.recv_multipart(copy=False))))
                    last = time.monotonic()
        thread.join(30)
    finally:
        a.close()
        b.close()
        ctx.term()
    assert sorted(c.seq for _, c in chunks) == list(range(20))
    assert sum(c.n for _, c in chunks) == 2000
    assert {s for s, _ in chunks} == {a, b}


def test_curve_keys_authenticate_the_stream(tmp_path: Path, free_port: int) -> None:
    import zmq.auth

    from saestream.common.transport import CurveClientKeys, CurveServerKeys
    from saestream.common.transport import pull_socket as curve_pull

    for name in ("consumer", "producer"):
        zmq.auth.create_certificates(str(tmp_path), name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "producer.key").write_bytes((tmp_path / "producer.key").read_bytes())
    ctx = zmq.Context()
    sock = curve_pull(ctx, f"tcp://127.0.0.1:{free_port}",
                      curve=CurveServerKeys(tmp_path / "consumer.key_secret", allowed))
    try:
        curve = CurveClientKeys(tmp_path / "producer.key_secret", tmp_path / "consumer.key")
        thread, done, _ = run_in_thread(tiny_cfg(free_port, max_tokens=300, curve=curve))
        chunks = receive_all(sock, done)
        thread.join(30)
    finally:
        sock.close()
        ctx.term()
    assert sum(c.n for c in chunks) == 300


def test_consumer_restart_does_not_stop_the_producer(free_port: int) -> None:
    thread, done, result = run_in_thread(tiny_cfg(free_port, max_tokens=3000, queue_size=1,
                                                  hwm=1))
    ctx, sock = pull_socket(free_port)
    first = []
    while len(first) < 3:
        if sock.poll(100):
            first.append(decode_chunk(sock.recv_multipart(copy=False)))
    sock.close()  # the consumer goes away mid-stream ...
    ctx.term()
    time.sleep(0.5)
    ctx, sock = pull_socket(free_port)  # ... and comes back on the same port
    try:
        second = receive_all(sock, done)
    finally:
        sock.close()
        ctx.term()
    thread.join(30)
    assert second and result["summary"].tokens == 3000 and result["summary"].complete
    seqs = [c.seq for c in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_contexts_with_out_of_range_ids_are_skipped_not_fatal(
    tmp_path: Path, free_port: int
) -> None:
    rows = np.arange(10 * 32).reshape(10, 32) % 500
    rows[3, 5] = 9999  # outside tiny's vocabulary of 512
    np.save(tmp_path / "rows.npy", rows)
    cfg = tiny_cfg(free_port, corpus=f"tokens:{tmp_path}/rows.npy", epochs=1)
    chunks, result = collect_run(cfg, free_port)
    assert sum(c.n for c in chunks) == 9 * 31 == result["summary"].tokens
    assert chunks[0].source["start"] == 0 and chunks[-1].source["end"] == 10 * 31


def test_text_corpus_is_read_ahead_on_its_own_thread_in_order(
    tmp_path: Path, free_port: int
) -> None:
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(str(n) for n in range(i, 400 + i)))
    corpus = byte_corpus(f"text:{tmp_path}/*.txt", seq_len=32)
    assert corpus.read_ahead
    n_contexts = len(contexts_of(corpus))
    chunks, _ = collect_run(tiny_cfg(free_port, corpus=f"text:{tmp_path}/*.txt", epochs=1),
                            free_port)
    assert sum(c.n for c in chunks) == n_contexts * 31
    assert [c.source["start"] for c in chunks[1:]] == [c.source["end"] for c in chunks[:-1]]


# ---------------------------------------------------------------------------------------------
# train/eval split


def test_train_and_eval_splits_share_no_document_and_together_are_the_corpus(
    tmp_path: Path,
) -> None:
    docs = [f"document number {i} " + "x" * (i % 7) for i in range(45)]  # distinct documents
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def texts(split: str) -> list[str]:
        corpus = byte_corpus(f"text:{tmp_path}/docs.jsonl", seq_len=4, split=split)
        ids = [t for ctx in corpus.contexts() for t in ctx]
        text = "".join("\n" if t == SEP else chr(t) for t in ids).split("\n")
        return [d for d in text if d.startswith("document")]

    train, held = texts("train"), texts("eval")
    want = [docs[i] for i in range(45) if i % 10 == 9]  # every tenth document, as documented
    assert held[:-1] == want[:-1] and want[-1].startswith(held[-1])  # the tail is cut off
    assert train[:-1] == [docs[i] for i in range(45) if i % 10 != 9][:len(train) - 1]
    assert not set(train) & set(want)


def test_id_corpora_split_by_contiguous_contexts() -> None:
    flat = np.arange(40 * 5)  # context i = ids 5i..5i+4
    parts = {s: contexts_of(ArrayCorpus("tokens:x", flat, 5, split=s))
             for s in ("train", "eval", "all")}
    assert [c[0] // 5 for c in parts["eval"]] == [9, 19, 29, 39]
    assert sorted(parts["train"] + parts["eval"]) == parts["all"]
    assert not {tuple(c) for c in parts["train"]} & {tuple(c) for c in parts["eval"]}
    synth = {s: contexts_of(open_corpus("synthetic:30", seq_len=8, vocab_size=100, encode=None,
                                        separator=0, split=s)) for s in ("train", "eval", "all")}
    assert synth["eval"] == [synth["all"][i] for i in (9, 19, 29)]
    assert len(synth["train"]) == 27 and synth["train"][9] == synth["all"][10]


def test_wiki_sample_eval_split_is_held_out_articles() -> None:
    train = {tuple(c) for c in byte_corpus("wiki-sample", seq_len=256, split="train").contexts()}
    held = contexts_of(byte_corpus("wiki-sample", seq_len=256, split="eval"))
    assert len(held) > 50 and len(train) > 9 * len(held) // 2
    assert not train & {tuple(c) for c in held}


def test_a_state_file_of_another_split_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    write_state(path, ProducerState("synthetic", "0/1", 128, False, split="train"))
    with pytest.raises(StateError, match="split"):
        check_state(read_state(path), ProducerState("synthetic", "0/1", 128, False,
                                                    split="eval"), path)


def test_encoding_pool_sends_in_queue_order_with_the_bytes_of_one_thread() -> None:
    """Chunks of different sizes (so encodings finish out of order) go out numbered 0, 1, ...
    in the order they were queued, each payload byte-identical to a one-thread encoding."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    registry = CollectorRegistry()
    sender = Sender(push, producer="p", run="r", model="tiny", codec="lz4-shuffle",
                    metrics=ProducerMetrics.create(registry), queue_size=4, first_hook="h",
                    progress=Progress(0, 0), encode_threads=3).start()
    assert sender.encode_threads == 3
    gen = torch.Generator().manual_seed(0)
    items, start = [], 0
    for i in range(24):
        n = [400, 3, 97][i % 3]
        acts = torch.randn(n, 64, generator=gen).to(torch.bfloat16)
        items.append(Outgoing("h", acts, {"first": start}, Progress(0, start + n)))
        start += n
    stop = threading.Event()
    for item in items[:12]:
        assert sender.put(item, stop, 1.0)
    assert sender.put(Outgoing(None, None, {}, Progress(1, 0)), stop, 1.0)  # a marker between
    for item in items[12:]:
        assert sender.put(item, stop, 1.0)
    assert sender.drain(stop, 1.0)
    got = [pull.recv_multipart() for _ in items]
    assert sender.seq == len(items) and sender.progress == items[-1].progress
    for seq, (frames, item) in enumerate(zip(got, items, strict=True)):
        chunk = decode_chunk(frames)
        assert chunk.seq == seq and chunk.source == item.source
        assert torch.equal(chunk.acts, item.acts)
        one = encode_chunk(item.acts, producer="p", run="r", seq=seq, model="tiny", hook="h",
                           source=item.source, codec="lz4-shuffle")
        assert frames[1] == one[1]
    assert registry.get_sample_value("saestream_producer_messages_total", {"hook": "h"}) == 24
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()
