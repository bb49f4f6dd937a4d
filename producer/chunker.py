"""From the corpus to chunks: batches of contexts (read ahead where it pays), and the cutting of
per-context activations into chunks of `chunk_tokens` consecutive stream positions.

A chunk always covers one unbroken range of its stream: `source` start..end with
end − start = its rows. A skipped context (or a resume point) ends the chunk before it, so
the consumer can account for every position exactly.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from saestream.producer.sender import Outgoing, Progress


def batched(contexts: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Stacks of up to `size` contexts: [batch, seq_len] token ids."""
    it = iter(contexts)
    while batch := list(itertools.islice(it, size)):
        yield np.stack(batch)


class Prefetch:
    """Runs an iterator on a thread of its own, up to `depth` items ahead, so reading and
    tokenising the corpus overlaps the forward pass. Exceptions surface in the consumer.

    `depth` 0 iterates inline instead: for corpora that are cheap to read (arrays, synthetic
    ids) a second Python thread costs the model loop more in GIL hand-overs than it saves.

    `stop`, when set, ends the iteration early even while the reader is stuck (a slow or hung
    file system): the caller checks its stop flag after the loop, so SIGTERM is always heard.
    """

    _END = object()
    WAKE_SECONDS = 0.1

    def __init__(self, items: Iterable, depth: int = 4,
                 stop: threading.Event | None = None) -> None:
        self._items = items
        self._stop = stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._closed = threading.Event()
        if depth > 0:
            self._thread = threading.Thread(target=self._run, args=(items,), name="corpus",
                                            daemon=True)
            self._thread.start()
        self._inline = depth <= 0

    def _put(self, entry: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exc:
            self._put((self._END, exc))

    def __iter__(self) -> Iterator:
        if self._inline:
            yield from self._items
            return
        while True:
            try:
                item, exc = self._queue.get(timeout=self.WAKE_SECONDS)
            except queue.Empty:
                if self._stop is not None and self._stop.is_set():
                    return
                continue
            if exc is not None:
                raise exc
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop reading ahead (the thread ends at its next item)."""
        self._closed.set()


class Chunker:
    """Collects per-context activations and cuts them into chunks of at most `chunk_tokens`
    rows, each a run of consecutive stream positions."""

    def __init__(self, hooks: Sequence[str], chunk_tokens: int, source: dict) -> None:
        self.hooks, self.chunk_tokens, self.source = list(hooks), chunk_tokens, source
        self.segments: deque[tuple[int, dict[str, torch.Tensor]]] = deque()
        self.rows = 0
        self.last_end = 0
        """Position after the last row added."""

    def add(self, start: int, acts: dict[str, torch.Tensor]) -> None:
        """Rows of one context, starting at position `start` of the shard's token stream."""
        n = int(next(iter(acts.values())).shape[0])
        if n:
            self.segments.append((start, acts))
            self.rows += n
            self.last_end = start + n

    def add_batch(
        self, acts: dict[str, torch.Tensor], starts: list[int], done: int = 0,
        left: int | None = None, stop_at: int | None = None,
    ) -> int | None:
        """Add a batch's rows, except positions before `done` (sent before), from `stop_at`
        on (the end of the stream) and beyond the row budget `left` (None = no limit);
        returns the budget still left.

        :param acts: hook -> [batch, per_ctx, d], context j starting at position starts[j].
        """
        per_ctx = int(next(iter(acts.values())).shape[1])
        spans = []  # (row in batch, first position, lo, hi) of what is added
        for j, start in enumerate(starts):
            lo = max(0, done - start)
            hi = per_ctx if stop_at is None else min(per_ctx, stop_at - start)
            if left is not None:
                hi = min(hi, lo + left)
            if hi > lo:
                spans.append((j, start, lo, hi))
                if left is not None:
                    left -= hi - lo
        contiguous = starts[-1] - starts[0] == per_ctx * (len(starts) - 1)
        if contiguous and len(spans) == len(starts) and all(
            lo == 0 and hi == per_ctx for _, _, lo, hi in spans
        ):  # the common case: the whole batch is one run of the token stream, no copy
            self.add(starts[0], {h: a.reshape(-1, a.shape[-1]) for h, a in acts.items()})
        else:
            for j, start, lo, hi in spans:
                self.add(start + lo, {h: a[j, lo:hi] for h, a in acts.items()})
        return left

    def _head_run(self) -> tuple[int, bool]:
        """Rows at the head that are consecutive (at most chunk_tokens), and whether a gap
        follows them (then they cannot grow into a longer chunk)."""
        rows, end = 0, None
        for start, acts in self.segments:
            if end is not None and start != end:
                return rows, True
            n = int(acts[self.hooks[0]].shape[0])
            rows, end = rows + n, start + n
            if rows >= self.chunk_tokens:
                return self.chunk_tokens, False
        return rows, False

    def take(self, epoch: int, final: bool = False) -> Iterator[Outgoing]:
        """Full chunks, chunks cut short by a gap (and with `final`, the partial rest), one
        message per hook each."""
        while self.rows:
            need, gap = self._head_run()
            if need < self.chunk_tokens and not (gap or final):
                return
            pieces: list[dict[str, torch.Tensor]] = []
            first = end = self.segments[0][0]
            while need:
                start, acts = self.segments.popleft()
                n = int(acts[self.hooks[0]].shape[0])
                if n > need:
                    self.segments.appendleft((start + need, {h: a[need:] for h, a in acts.items()}))
                    acts, n = {h: a[:need] for h, a in acts.items()}, need
                pieces.append(acts)
                need -= n
                self.rows -= n
                end = start + n
            source = {**self.source, "epoch": epoch, "start": first, "end": end}
            for i, hook in enumerate(self.hooks):
                parts = [p[hook] for p in pieces]
                acts_h = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
                last = i == len(self.hooks) - 1
                yield Outgoing(hook, acts_h, source, Progress(epoch, end) if last else None)

    def clear(self) -> None:
        """Drop what is held (a rewind: it will be produced again)."""
        self.segments.clear()
        self.rows = 0
