"""The shuffle buffer: a preallocated `capacity × d` tensor of tokens, filled from the stream,
emptied by random batches.

Token level, never per sequence: incoming chunks are written into free slots; a batch is a
uniformly random set of filled slots, which are copied out and become free again, so each
token is trained on exactly once. Tokens from all producers mix within a window of
`capacity` tokens.

Bookkeeping is two index stacks, `filled[:n_filled]` and `free[:n_free]`. A writer reserves
free slots under the lock and copies outside it; a reader picks filled slots under the
lock and gathers outside it, so the receiver thread and the training loop never wait on
each other's memcpy. Slots in flight (reserved, or being gathered) are in neither stack:
`n_filled + n_free + in_flight == capacity`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

T = TypeVar("T")

class Batch(NamedTuple):
    """One training batch taken from the buffer."""

    x: torch.Tensor
    """Activations, shape [batch, d], the buffer's dtype, on CPU."""
    sources: torch.Tensor
    """Source id of each row (the `source` given to `put`), shape [batch], int32."""


class ShuffleBuffer:
    """Token-level shuffle buffer for one hook.

    :param capacity: number of token slots.
    :param d: width of a token (the hook's d_in).
    :param dtype: storage dtype (the wire dtype; incoming rows are cast to it).
    :param pin_memory: hand batches out in page-locked memory, so that the trainer's
        `.to(cuda, non_blocking=True)` really is asynchronous (a copy from pageable memory
        is not). Only the batch is pinned, not the buffer: the gather into it is one host
        copy either way, and a buffer of millions of rows page-locked would only take that
        memory from the rest of the machine. torch's caching host allocator keeps each
        pinned block from reuse until the copy that reads it has finished.
    :param seed: seed of the generator that picks batches.
    :param cond: condition to share with other buffers (see `BufferSet`); a new one if None.
    """

    def __init__(
        self,
        capacity: int,
        d: int,
        dtype: torch.dtype,
        *,
        pin_memory: bool = False,
        seed: int = 0,
        cond: threading.Condition | None = None,
    ) -> None:
        if capacity <= 0 or d <= 0:
            raise ValueError(f"capacity and d must be positive, got {capacity}, {d}")
        self.capacity = capacity
        self.d = d
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.data = torch.empty((capacity, d), dtype=dtype)
        self.source = torch.zeros(capacity, dtype=torch.int32)
        self.filled = torch.empty(capacity, dtype=torch.int64)
        self.free = torch.arange(capacity, dtype=torch.int64)
        self.n_filled = 0
        self.n_free = capacity
        self.tokens_in = 0
        """Tokens ever written (committed) into the buffer."""
        self.tokens_out = 0
        """Tokens ever taken out in batches."""
        self._gen = torch.Generator().manual_seed(seed)
        self._cond = cond if cond is not None else threading.Condition()

    # -- writing ----------------------------------------------------------------------------

    def put(
        self,
        acts: torch.Tensor,
        *,
        source: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
        poll: float = 0.1,
        on_commit: Callable[[int, int], None] | None = None,
    ) -> int:
        """Write the rows of `acts` ([n, d]) into free slots; blocks while the buffer is full.

        A chunk larger than the free space is written in parts as slots free up; after each
        part, `on_commit(first_row, rows)` runs under the buffer's lock, so whoever freezes
        the buffer (`BufferSet.freeze`) sees exactly the rows it was told about. Returns the
        number of rows written: `n`, or fewer if `should_stop()` turned true while waiting.
        """
        n = acts.shape[0]
        if acts.dim() != 2 or acts.shape[1] != self.d:
            raise ValueError(f"expected [n, {self.d}] rows, got {tuple(acts.shape)}")
        written = 0
        while written < n:
            with self._cond:
                while self.n_free == 0:
                    if should_stop():
                        return written
                    self._cond.wait(poll)
                m = min(n - written, self.n_free)
                slots = self.free[self.n_free - m : self.n_free].clone()
                self.n_free -= m
            self.data.index_copy_(0, slots, acts[written : written + m].to(self.dtype))
            self.source.index_fill_(0, slots, source)
            with self._cond:
                self.filled[self.n_filled : self.n_filled + m] = slots
                self.n_filled += m
                self.tokens_in += m
                if on_commit is not None:
                    on_commit(written, m)
                self._cond.notify_all()
            written += m
        return written

    def restore(self, batch: Batch) -> None:
        """Refill an empty buffer with rows saved by a snapshot, each with its own source."""
        n = batch.x.shape[0]
        with self._cond:
            if self.n_filled or self.n_free != self.capacity or n > self.capacity:
                raise ValueError(f"cannot restore {n} rows into this buffer")
            slots = self.free[self.n_free - n : self.n_free].clone()
            self.n_free -= n
            self.data.index_copy_(0, slots, batch.x.to(self.dtype))
            self.source.index_copy_(0, slots, batch.sources.to(torch.int32))
            self.filled[:n] = slots
            self.n_filled = n
            self.tokens_in += n
            self._cond.notify_all()

    # -- reading ----------------------------------------------------------------------------

    def ready(self, batch_size: int, low_water: int) -> bool:
        """True when a batch may be taken: `n_filled >= max(batch_size, low_water)`."""
        return self.n_filled >= max(batch_size, low_water)

    def take(
        self, batch_size: int, low_water: int = 0, timeout: float | None = 0.0
    ) -> Batch | None:
        """A batch of `batch_size` tokens from uniformly random filled slots, or None if the
        buffer holds fewer than `max(batch_size, low_water)` tokens after `timeout` seconds.
        The slots become free again once copied out."""
        need = max(batch_size, low_water)
        with self._cond:
            if self.n_filled < need:
                if timeout:
                    self._cond.wait_for(lambda: self.n_filled >= need, timeout)
                if self.n_filled < need:
                    return None
            chosen = self._pick(batch_size)
        x = torch.empty((batch_size, self.d), dtype=self.dtype, pin_memory=self.pin_memory)
        torch.index_select(self.data, 0, chosen, out=x)
        sources = self.source.index_select(0, chosen)
        with self._cond:
            self.free[self.n_free : self.n_free + batch_size] = chosen
            self.n_free += batch_size
            self.tokens_out += batch_size
            self._cond.notify_all()
        return Batch(x, sources)

    def _pick(self, b: int) -> torch.Tensor:
        """Remove `b` uniformly random entries from `filled[:n_filled]` and return them.
        Called with the lock held. Costs O(b), not O(n_filled), when b is small."""
        n = self.n_filled
        pos = _sample_distinct(n, b, self._gen)
        chosen = self.filled[pos].clone()
        # Compact: chosen positions in the head are refilled from unchosen tail positions.
        tail_start = n - b
        in_tail = pos >= tail_start
        tail_taken = torch.zeros(b, dtype=torch.bool)
        tail_taken[pos[in_tail] - tail_start] = True
        holes = pos[~in_tail]
        movers = tail_start + torch.nonzero(~tail_taken).flatten()
        self.filled[holes] = self.filled[movers]
        self.n_filled = tail_start
        return chosen

    # -- inspection -------------------------------------------------------------------------

    def fill(self) -> int:
        """Tokens ready to be taken."""
        return self.n_filled

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the buffered rows and their sources (snapshots, tests, diagnostics)."""
        with self._cond:
            return self._contents()

    def _contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.filled[: self.n_filled]
        return self.data.index_select(0, idx), self.source.index_select(0, idx)

    def wake(self) -> None:
        """Wake any thread blocked in `put` or `take` (e.g. on shutdown)."""
        with self._cond:
            self._cond.notify_all()


def _sample_distinct(n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """`b` distinct positions drawn uniformly from range(n), in random order.

    randperm(n) costs O(n) (tens of ms for a million-token buffer), so when b is small
    against n we draw with replacement and deduplicate: given its size, the set of distinct
    values of iid uniform draws is a uniformly random subset, and a random b-subset of it
    is again uniform.
    """
    if b > n:
        raise ValueError(f"cannot take {b} of {n}")
    if 4 * b <= n:
        draws = torch.randint(n, (b + b // 4 + 16,), generator=gen)
        uniq = torch.unique(draws)
        if uniq.numel() >= b:
            return uniq[torch.randperm(uniq.numel(), generator=gen)[:b]]
    return torch.randperm(n, generator=gen)[:b]


class BufferSet:
    """One `ShuffleBuffer` per hook, created when the hook's width is first known. The buffers
    share one condition, so the training loop can wait for whichever hook is ready first."""

    def __init__(self, capacity: int, *, pin_memory: bool = False, seed: int = 0) -> None:
        self.capacity = capacity
        self.pin_memory = pin_memory
        self.seed = seed
        self.buffers: dict[str, ShuffleBuffer] = {}
        self._cond = threading.Condition()

    def get_or_create(self, hook: str, d: int, dtype: torch.dtype) -> ShuffleBuffer:
        with self._cond:
            buf = self.buffers.get(hook)
            if buf is None:
                buf = ShuffleBuffer(
                    self.capacity, d, dtype, pin_memory=self.pin_memory,
                    seed=self.seed + len(self.buffers), cond=self._cond,
                )
                self.buffers[hook] = buf
            return buf

    def dtype_of(self, hook: str, first: torch.dtype) -> torch.dtype:
        """The dtype `hook`'s rows are kept in: its buffer's (made by its first accepted
        chunk, or restored by a snapshot), or `first` before it has one. A chunk in another
        dtype is converted to it."""
        with self._cond:
            buf = self.buffers.get(hook)
        return first if buf is None else buf.dtype

    def items(self) -> list[tuple[str, ShuffleBuffer]]:
        with self._cond:
            return list(self.buffers.items())

    def fill(self, hook: str) -> int:
        """Tokens ready in `hook`'s buffer (0 before it exists)."""
        buf = self.buffers.get(hook)
        return 0 if buf is None else buf.fill()

    def freeze(self, capture: Callable[[], T]) -> tuple[T, dict[str, Batch]]:
        """`capture()` and copies of every buffer's rows (as `Batch`es), taken under the lock
        every commit holds: one consistent cut of buffers and whatever `capture` reads."""
        with self._cond:
            return capture(), {h: Batch(*b._contents()) for h, b in self.buffers.items()}

    def take_any(
        self, batch_size: int, low_water: int, timeout: float
    ) -> tuple[str, Batch] | None:
        """A batch from the fullest buffer that is ready (see `ShuffleBuffer.ready`), waiting
        up to `timeout` seconds for one; None if none became ready."""

        def fullest() -> tuple[str, ShuffleBuffer] | None:
            ready = [(h, b) for h, b in self.buffers.items() if b.ready(batch_size, low_water)]
            return max(ready, key=lambda hb: hb[1].n_filled, default=None)

        with self._cond:
            pick = fullest()
            if pick is None and timeout:
                self._cond.wait_for(lambda: fullest() is not None, timeout)
                pick = fullest()
        if pick is None:
            return None
        hook, buf = pick
        # Only this thread takes, so the buffer is still ready.
        batch = buf.take(batch_size, low_water, timeout=0)
        return None if batch is None else (hook, batch)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
