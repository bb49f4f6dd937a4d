"""The shuffle buffer: each token trained once, counts balance, backpressure, low-water mark."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from saestream.consumer.buffer import BufferSet, ShuffleBuffer, _sample_distinct


def tokens(start: int, n: int, d: int = 4) -> torch.Tensor:
    """Rows whose every column holds the token's id, so ids survive dtype float32."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).clone()


def ids(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x[:, 0].tolist()]


def test_each_token_is_taken_exactly_once_and_counts_balance() -> None:
    buf = ShuffleBuffer(64, 4, torch.float32, seed=1)
    taken: list[int] = []
    next_id = 0
    for _ in range(30):
        n = int(torch.randint(1, 20, ()).item())
        if buf.n_free >= n:
            buf.put(tokens(next_id, n))
            next_id += n
        batch = buf.take(16, low_water=32)
        if batch is not None:
            taken += ids(batch.x)
        assert buf.tokens_in == buf.tokens_out + buf.fill()
    rest, _ = buf.contents()
    everything = taken + ids(rest)
    assert sorted(everything) == list(range(next_id))
    assert buf.tokens_in == next_id
    assert buf.tokens_out == len(taken)


def test_rows_keep_their_source_ids() -> None:
    buf = ShuffleBuffer(32, 4, torch.float32)
    buf.put(tokens(0, 10), source=3)
    buf.put(tokens(10, 10), source=7)
    batch = buf.take(20)
    assert batch is not None
    for token_id, src in zip(ids(batch.x), batch.sources.tolist(), strict=True):
        assert src == (3 if token_id < 10 else 7)


def test_batches_are_shuffled_across_chunks() -> None:
    buf = ShuffleBuffer(1000, 4, torch.float32, seed=0)
    buf.put(tokens(0, 500), source=0)
    buf.put(tokens(500, 500), source=1)
    batch = buf.take(100)
    assert batch is not None
    n_second = int((batch.sources == 1).sum())
    assert 20 < n_second < 80  # both chunks are represented in one batch


def test_take_waits_below_the_low_water_mark() -> None:
    buf = ShuffleBuffer(100, 4, torch.float32)
    buf.put(tokens(0, 49))
    assert buf.take(10, low_water=50) is None
    buf.put(tokens(49, 1))
    assert buf.take(10, low_water=50) is not None
    assert buf.fill() == 40


def test_put_blocks_while_full_and_resumes_when_a_batch_is_taken() -> None:
    buf = ShuffleBuffer(10, 4, torch.float32)
    buf.put(tokens(0, 10))
    done = threading.Event()

    def writer() -> None:
        buf.put(tokens(10, 5))
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not done.wait(0.3)  # full: the writer is held back
    assert buf.tokens_in == 10
    assert buf.take(5) is not None
    assert done.wait(10)
    t.join(10)
    assert buf.fill() == 10 and buf.tokens_in == 15


def test_chunk_larger_than_capacity_is_written_in_parts() -> None:
    buf = ShuffleBuffer(8, 4, torch.float32)
    taken: list[int] = []
    t = threading.Thread(target=lambda: buf.put(tokens(0, 30)), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while len(taken) < 24 and time.monotonic() < deadline:
        batch = buf.take(4, timeout=0.1)
        if batch is not None:
            taken += ids(batch.x)
    t.join(10)
    rest, _ = buf.contents()
    assert sorted(taken + ids(rest)) == list(range(30))


def test_blocked_put_gives_up_when_asked_to_stop() -> None:
    buf = ShuffleBuffer(4, 4, torch.float32)
    stop = threading.Event()
    result: list[int] = []
    t = threading.Thread(
        target=lambda: result.append(buf.put(tokens(0, 10), should_stop=stop.is_set, poll=0.05)),
        daemon=True,
    )
    t.start()
    time.sleep(0.1)
    stop.set()
    t.join(10)
    assert result == [4]


def test_rows_are_cast_to_the_buffer_dtype() -> None:
    buf = ShuffleBuffer(8, 4, torch.bfloat16)
    buf.put(tokens(0, 8).to(torch.float16))
    batch = buf.take(8)
    assert batch is not None and batch.x.dtype == torch.bfloat16
    assert sorted(ids(batch.x.float())) == list(range(8))


def test_wrong_width_is_refused() -> None:
    buf = ShuffleBuffer(8, 4, torch.float32)
    with pytest.raises(ValueError):
        buf.put(torch.zeros(2, 5))


@pytest.mark.parametrize("n,b", [(10, 10), (100, 7), (100_000, 256), (50, 20)])
def test_sample_distinct_draws_distinct_positions_in_range(n: int, b: int) -> None:
    pos = _sample_distinct(n, b, torch.Generator().manual_seed(0))
    assert pos.numel() == b
    assert len(set(pos.tolist())) == b
    assert 0 <= int(pos.min()) and int(pos.max()) < n


def test_sample_distinct_is_roughly_uniform() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(400)
    for _ in range(500):
        counts[_sample_distinct(400, 20, gen)] += 1
    # expected 25 hits per position; all positions are reached, none dominates
    assert int(counts.min()) > 5 and int(counts.max()) < 60


def test_buffer_set_takes_from_the_fullest_ready_hook() -> None:
    bs = BufferSet(100)
    a = bs.get_or_create("a", 4, torch.float32)
    b = bs.get_or_create("b", 4, torch.float32)
    assert bs.get_or_create("a", 4, torch.float32) is a
    a.put(tokens(0, 60))
    b.put(tokens(100, 90))
    hook, batch = bs.take_any(10, low_water=50, timeout=0)  # type: ignore[misc]
    assert hook == "b" and batch.x.shape == (10, 4)
    assert bs.take_any(10, low_water=95, timeout=0.05) is None


def test_buffer_set_wait_returns_when_data_arrives() -> None:
    bs = BufferSet(100)
    a = bs.get_or_create("a", 4, torch.float32)
    threading.Timer(0.1, lambda: a.put(tokens(0, 60))).start()
    got = bs.take_any(10, low_water=50, timeout=30)
    assert got is not None and got[0] == "a"


def test_batches_are_fresh_tensors_the_buffer_does_not_write_again() -> None:
    """A batch is the caller's to keep (the trainer may still be copying it to a device
    while the buffer refills the slots it came from)."""
    buf = ShuffleBuffer(16, 4, torch.float32, seed=2)
    buf.put(tokens(0, 16))
    batch = buf.take(8)
    assert batch is not None
    kept = batch.x.clone()
    buf.put(tokens(100, 8))  # reuses the freed slots
    assert torch.equal(batch.x, kept)
    assert batch.x.data_ptr() != buf.data.data_ptr()
