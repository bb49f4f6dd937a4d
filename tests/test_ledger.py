"""The consumer's ledger: which positions of each producer's stream are accounted for, the
arithmetic exactly-once delivery rests on, and the bounds that keep strangers from growing it."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from test_consumer import Consumer, Sender, chunk_frames

from saestream.consumer.buffer import Batch
from saestream.consumer.control import ControlServer
from saestream.consumer.daemon import _renumber_sources
from saestream.consumer.ledger import (
    KEEP_EPOCHS,
    MAX_POS,
    MAX_RANGES,
    Ledger,
    LedgerFull,
    StreamMismatch,
)
from saestream.consumer.metrics import ConsumerMetrics

HOOK = "h"
STREAM = {"corpus": "c", "split": "train", "shard": "0/1", "seq_len": 9, "first": 1}


def src(start: int, end: int, epoch: int = 0) -> dict:
    return {"corpus": "c", "epoch": epoch, "start": start, "end": end}


def receive(ledger: Ledger, producer: str, start: int, end: int, epoch: int = 0) -> list:
    """Admit a chunk of positions [start, end) and commit what is kept, as the receiver does."""
    adm = ledger.admit(producer, HOOK, end - start, src(start, end, epoch), now=0.0)
    for first, rows in adm.parts:
        ledger.commit(adm, HOOK, first, rows)
    return adm.parts


def test_rows_already_accounted_for_are_trimmed_and_the_rest_kept() -> None:
    ledger = Ledger()
    assert receive(ledger, "p", 0, 100) == [(0, 100)]
    # A rewind re-sends 50..150: the first half is a duplicate, the second half is new.
    assert receive(ledger, "p", 50, 150) == [(50, 50)]
    # A chunk straddling a hole keeps only the rows of the hole.
    receive(ledger, "p", 200, 300)
    assert receive(ledger, "p", 140, 260) == [(10, 50)]
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.data == {0: [[0, 300]]}
    assert hl.received_tokens == 300
    assert hl.duplicate_tokens == 50 + 70


def test_forgotten_rows_are_a_hole_again_and_are_admitted_when_re_sent() -> None:
    """A recording that could not write a shard forgets its rows: the frontier falls back to
    them (below `low` too), rows after them still count, and a re-send is kept."""
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    receive(ledger, "p", 0, 300)
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.low == (0, 300)
    ledger.forget("p", HOOK, 0, 100, 200)
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.data == {0: [[0, 100], [200, 300]]}
    assert hl.frontier((0, 0)) == (0, 100) and hl.beyond((0, 100))
    assert receive(ledger, "p", 50, 250) == [(50, 100)]  # only the forgotten rows
    assert ledger.get("p").hooks[HOOK].frontier((0, 0)) == (0, 300)  # type: ignore[union-attr]
    ledger.forget("nobody", HOOK, 0, 0, 10)  # unknown producers and hooks: nothing happens
    ledger.forget("p", "other", 0, 0, 10)


def test_the_frontier_walks_received_and_void_ranges_across_epochs() -> None:
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    receive(ledger, "p", 0, 80)
    receive(ledger, "p", 96, 120)
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.frontier((0, 0)) == (0, 80)
    assert hl.beyond((0, 80))  # rows past the frontier arrived: something was lost
    ledger.add_void("p", [(0, 80, 96)])  # a skipped context
    ledger.add_void("p", [(0, 120, MAX_POS)])  # the end of epoch 0
    receive(ledger, "p", 0, 16, epoch=1)
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.frontier((0, 0)) == (1, 16)
    assert not hl.beyond((1, 16))


def test_rows_arriving_before_the_first_request_do_not_hide_the_rows_before_them() -> None:
    """A resumed consumer hears from a producer's data before its control request: the rows
    sent before that data may have reached only the process that died, so the producer's
    proposed start, not the first row seen, is where accounting begins."""
    ledger = Ledger()
    receive(ledger, "p", 900, 909)
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert ledger.get("p").origin == (0, 0)  # type: ignore[union-attr]
    assert hl.frontier((0, 0)) == (0, 0) and hl.beyond((0, 0))  # the producer re-sends


def test_a_chunk_from_another_stream_under_a_declared_id_is_refused() -> None:
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    receive(ledger, "p", 0, 10)
    other = {**src(0, 10), "split": "train", "shard": "1/2"}
    with pytest.raises(StreamMismatch):
        ledger.admit("p", HOOK, 10, other, now=0.0)


def test_skipped_contexts_do_not_count_as_holes() -> None:
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    for i in range(2 * MAX_RANGES):  # every other context skipped (ids out of vocabulary)
        receive(ledger, "p", 16 * i, 16 * i + 8)
        ledger.add_void("p", [(0, 16 * i + 8, 16 * i + 16)])
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.frontier((0, 0)) == (0, 32 * MAX_RANGES)


def test_an_endless_stream_keeps_the_ledger_small_and_the_frontier_exact() -> None:
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    for epoch in range(3000):
        receive(ledger, "p", 0, 50, epoch=epoch)
        ledger.add_void("p", [(epoch, 50, MAX_POS)])
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert hl.frontier((0, 0)) == (3000, 0)
    assert len(hl.data) <= KEEP_EPOCHS + 1 and len(hl.void) <= KEEP_EPOCHS + 1
    assert receive(ledger, "p", 0, 50, epoch=5) == []  # a forgotten epoch is accounted for
    restored = Ledger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert restored.get("p").hooks[HOOK].frontier((0, 0)) == (3000, 0)  # type: ignore[union-attr]


def test_repeating_known_voids_changes_nothing_a_snapshot_records() -> None:
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    ledger.add_void("p", [(0, 8, 16)])
    version = ledger.version
    ledger.add_void("p", [(0, 8, 16)])  # every request repeats the producer's recent voids
    assert ledger.version == version


def test_a_producer_of_a_hook_the_consumer_does_not_train_is_told_so() -> None:
    server = ControlServer(None, Ledger(), ConsumerMetrics(), run_id="r", durable=True,  # type: ignore[arg-type]
                           hooks=["model.layers.20"])
    request = {"producer": "p", "run": "x", "hooks": ["model.layers.10"], "stream": STREAM,
               "propose": {"*": (0, 0)}, "void": [], "flush": False}
    assert "does not train hook 'model.layers.10'" in server.reply(request)["error"]


def test_rows_of_a_forgotten_producer_keep_no_tag_in_a_snapshot() -> None:
    batch = Batch(torch.zeros(4, 2), torch.tensor([0, 1, 7, -1], dtype=torch.int32))
    out = _renumber_sources({HOOK: batch}, {0: 1, 1: 0})  # tag 7: forgotten
    assert out[HOOK].sources.tolist() == [1, 0, -1, -1]


def test_a_chunk_that_would_open_too_many_holes_is_refused() -> None:
    ledger = Ledger()
    for i in range(MAX_RANGES):
        receive(ledger, "p", 10 * i, 10 * i + 5)
    with pytest.raises(ValueError, match="holes"):
        receive(ledger, "p", 10 * MAX_RANGES + 2, 10 * MAX_RANGES + 4)
    # Filling a hole still works: it merges ranges instead of adding one.
    assert receive(ledger, "p", 5, 10) == [(0, 5)]


def test_new_ids_beyond_max_producers_are_refused_until_idle_ones_expire() -> None:
    ledger = Ledger(max_producers=2, expiry=10.0)
    ledger.admit("a", HOOK, 1, {}, now=0.0)
    ledger.admit("b", HOOK, 1, {}, now=5.0)
    with pytest.raises(LedgerFull):
        ledger.admit("c", HOOK, 1, {}, now=6.0)
    assert ledger.expired(12.0) == ["a"]
    assert ledger.live_count(12.0) == 1
    ledger.admit("c", HOOK, 1, {}, now=12.0)  # a's slot is free again
    assert ledger.live_count(12.0) == 2


def test_a_producer_id_known_with_another_stream_is_refused() -> None:
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    with pytest.raises(ValueError, match="another --producer-id"):
        ledger.declare("p", {**STREAM, "shard": "1/2"}, [HOOK], (0, 0), now=1.0)
    # streams that differ in the first position kept alone are told apart in the message
    ledger.declare("q", {**STREAM, "first": 1}, [HOOK], (0, 0), now=0.0)
    with pytest.raises(ValueError, match=r"first 1, not .*first 0"):
        ledger.declare("q", {**STREAM, "first": 0}, [HOOK], (0, 0), now=1.0)


def test_saved_order_is_by_name_and_buffer_tags_follow_it() -> None:
    """Snapshots store the ledger with sorted keys; buffer rows are tagged by a producer's
    position in that order, whatever order the producers arrived in."""
    ledger = Ledger()
    for name in ("zeta", "alpha", "mid"):
        receive(ledger, name, 0, 10)
    tags = {ledger.get(n).index: n for n in ("zeta", "alpha", "mid")}  # type: ignore[union-attr]
    saved = json.loads(json.dumps(ledger.to_json(), sort_keys=True))
    assert list(saved) == ["alpha", "mid", "zeta"]
    ordinals = ledger.ordinals()
    assert {ordinals[tag]: name for tag, name in tags.items()} == {0: "alpha", 1: "mid",
                                                                  2: "zeta"}
    restored = Ledger.from_json(saved)
    assert [restored.get(n).index for n in ("alpha", "mid", "zeta")] == [0, 1, 2]  # type: ignore[union-attr]
    assert restored.to_json() == ledger.to_json()


@pytest.mark.slow
def test_idle_producers_leave_the_metrics_after_the_expiry(tmp_path) -> None:
    c = Consumer(tmp_path, "--producer-expiry-seconds", "1", "--max-producers", "2")
    sender = Sender(c.endpoint)
    try:
        c.wait_for("metrics", lambda: c.metrics() is not None)
        for seq, producer in enumerate(("old-1", "old-2")):
            assert sender.send(chunk_frames(seq, producer=producer))
        c.wait_for("both producers", lambda: all(
            c.value("saestream_received_messages_total", producer=p) == 1
            for p in ("old-1", "old-2")))
        # Both slots are taken: a third id is refused until the first two have been idle.
        c.wait_for("the idle ones to expire", lambda: "old-1" not in _producers(c), timeout=30)
        assert sender.send(chunk_frames(0, producer="new"))
        c.wait_for("the new id", lambda: c.value(
            "saestream_received_messages_total", producer="new") == 1)
        assert _producers(c) == {"new"}
        assert c.value("saestream_rejected_messages_total", reason="producers") == 0
        c.signal(signal.SIGTERM)
        assert c.wait_exit() == 0
    finally:
        sender.close()
        c.close()


def _producers(c: Consumer) -> set[str]:
    m = c.metrics() or {}
    return {s.labels["producer"] for s in m.get("saestream_received_messages_total", [])
            if "producer" in s.labels}


def test_void_ranges_are_bounded_as_data_ranges_are() -> None:
    """A peer sent thousands of one-position voids in new epochs: the ledger, every copy of
    it and every snapshot grew without bound, and every producer's answers slowed."""
    from saestream.consumer.ledger import MAX_RANGES

    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    far = [(KEEP_EPOCHS + 1 + e, 0, 1) for e in range(500)]  # epochs past the frontier's
    assert ledger.add_void("p", far) == 500
    holes = [(3, 2 * i, 2 * i + 1) for i in range(MAX_RANGES + 100)]  # one epoch, all holes
    assert ledger.add_void("p", holes) == 100
    hl = ledger.get("p").hooks[HOOK]  # type: ignore[union-attr]
    assert list(hl.void) == [3] and len(hl.void[3]) == MAX_RANGES
    # a range touching those held still merges: the void that closes an epoch is taken
    assert ledger.add_void("p", [(3, 2 * MAX_RANGES - 1, MAX_POS)]) == 0
    # and an epoch's end refused while far ahead is taken once the frontier comes near
    ledger.add_void("p", [(e, 0, MAX_POS) for e in range(3)])
    assert ledger.add_void("p", [(KEEP_EPOCHS + 1, 0, MAX_POS)]) == 0
