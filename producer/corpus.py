"""Token sources: every corpus becomes a deterministic sequence of fixed-length contexts.

Documents are tokenised, joined with the separator id (one after each document) and cut into
`seq_len` contexts in corpus order; a trailing partial context is dropped. Context `i` of the
corpus belongs to shard `i % N == I`, so N shards are disjoint and together cover the corpus.

Every corpus also has a fixed train/eval split (`SPLITS`), so evaluation never scores text an
SAE was trained on: unit `u` (a document of a text corpus, a context of `tokens:` and
`synthetic`) is held out for evaluation iff `u % EVAL_EVERY == EVAL_EVERY - 1` (every tenth).
The split is applied before cutting contexts, so the two splits share no document.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import itertools
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from saestream.common import bounded_json
from saestream.common.files import NotRegularFile, open_regular
from saestream.common.logs import RateLimitedLog

log = logging.getLogger("saestream.producer")

WIKI_SAMPLE = "wiki-sample"
WIKI_SAMPLE_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SYNTHETIC_DEFAULT_CONTEXTS = 4096
MAX_SYNTHETIC = 1 << 40
"""The most contexts `synthetic:N` may name: their token positions stay far below 2^62."""
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
WIKI_MIN_WORDS = 50  # gensim's ARTICLE_MIN_WORDS: shorter pages (stubs, lists) are skipped
SPLITS = ("train", "eval", "all")
EVAL_EVERY = 10
"""Unit u (document, or context of an id corpus) is in the eval split iff u % 10 == 9."""
DROP_UNREADABLE = "unreadable_file"
DROP_NOT_REGULAR = "not_a_regular_file"
DROP_BAD_JSONL = "bad_jsonl_line"
DROP_TRUNCATED = "truncated_tokens"
DROP_REASONS = (DROP_UNREADABLE, DROP_NOT_REGULAR, DROP_BAD_JSONL, DROP_TRUNCATED)
"""`reason` labels of what a corpus drops while it is read (the daemon adds bad_token_ids)."""


class CorpusError(ValueError):
    """A corpus that cannot be opened (missing file, bad spec); the message is one line."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (`--shard I/N`), 0 <= index < count."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
            raise CorpusError(f"bad shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def in_split(unit: int, split: str) -> bool:
    """Whether document/context `unit` (0-based, corpus order) belongs to `split`."""
    if split == "all":
        return True
    held_out = unit % EVAL_EVERY == EVAL_EVERY - 1
    return held_out if split == "eval" else not held_out


def split_size(n: int, split: str) -> int:
    """How many of units 0..n-1 belong to `split`."""
    held_out = n // EVAL_EVERY
    return {"all": n, "eval": held_out, "train": n - held_out}[split]


def split_unit(j: int, split: str) -> int:
    """The corpus index of the j-th unit of `split` (closed form: no index array)."""
    if split == "eval":
        return EVAL_EVERY * j + EVAL_EVERY - 1
    if split == "train":
        return j + j // (EVAL_EVERY - 1)
    return j


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise CorpusError(f"bad split {split!r} (use {', '.join(SPLITS)})")
    return split


class Corpus:
    """A corpus cut into contexts of `seq_len` token ids, always in the same order."""

    spec: str
    """The `--corpus` value this came from; recorded in the state file and in chunk headers."""
    seq_len: int
    read_ahead: bool = False
    """Worth reading on a thread of its own (tokenising text), ahead of the model."""
    on_drop: Callable[[str, int], None] = staticmethod(lambda reason, n: None)
    """Told of input skipped while reading (reason, count): the daemon counts it in a metric."""

    def dropped(self, reason: str, n: int = 1) -> None:
        """Report `n` inputs skipped for `reason` (one of `DROP_REASONS`)."""
        self.on_drop(reason, n)

    def contexts(self) -> Iterator[np.ndarray]:
        """Every context in corpus order, each an int64 array of shape [seq_len]."""
        raise NotImplementedError

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        """This shard's contexts in order, skipping its first `start` ones."""
        first = shard.index + start * shard.count
        return itertools.islice(self.contexts(), first, None, shard.count)


class TokenFile:
    """A `tokens:` file read with `pread` from a descriptor opened at start-up, never mapped.

    A memory map of a file that shrinks kills the process with SIGBUS on the next touch of a
    lost page (MAP_PRIVATE too: pages not yet copied still come from the file). A read just
    comes back short, so a truncated file costs the contexts past its new end (counted as
    dropped), and a file deleted or replaced meanwhile is still read as it was at start-up.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int,
                 fd: int) -> None:
        self.path, self.dtype, self.shape, self.offset, self.fd = path, dtype, shape, offset, fd
        self.ndim = len(shape)
        weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def read(self, first: int, count: int) -> np.ndarray | None:
        """Elements first..first+count-1, or None when the file no longer holds them all."""
        want, at = count * self.dtype.itemsize, self.offset + first * self.dtype.itemsize
        data = b""
        while len(data) < want:
            part = os.pread(self.fd, want - len(data), at + len(data))
            if not part:
                return None
            data += part
        return np.frombuffer(data, dtype=self.dtype)


class ArrayCorpus(Corpus):
    """Contexts sliced out of a token array (a `TokenFile`, a loaded file, a tokenised sample).

    :param split: which contexts of the array to serve (see `SPLITS`); for a tokenised text
        sample the split is applied to its documents beforehand and this is `all`.
    """

    def __init__(self, spec: str, tokens: np.ndarray | TokenFile, seq_len: int,
                 split: str = "all") -> None:
        self.spec = spec
        self.split = check_split(split)
        self._tokens = tokens
        self._warn = RateLimitedLog(log)
        if tokens.ndim == 2:
            self._n, self.seq_len = int(tokens.shape[0]), int(tokens.shape[1])
            if self.seq_len < 2:  # a context of 0 or 1 ids leaves nothing to train on
                raise CorpusError(f"{spec}: 2-D token array of width {self.seq_len}: each row "
                                  f"is a context and needs at least 2 ids")
        elif tokens.ndim == 1:
            self._n, self.seq_len = int(tokens.shape[0]) // seq_len, seq_len
        else:
            raise CorpusError(f"{spec}: token array must be 1-D or 2-D, not {tokens.ndim}-D")
        if self._n == 0:
            raise CorpusError(f"{spec}: fewer tokens than one context of {seq_len}")
        if len(self) == 0:
            raise CorpusError(f"{spec}: no context in the {split} split")

    def __len__(self) -> int:
        return split_size(self._n, self.split)

    def _row(self, i: int) -> np.ndarray | None:
        w = self.seq_len
        if isinstance(self._tokens, TokenFile):
            row = self._tokens.read(i * w, w)
        elif self._tokens.ndim == 2:
            row = self._tokens[i]
        else:
            row = self._tokens[i * w : (i + 1) * w]
        return None if row is None else np.asarray(row, dtype=np.int64)

    def contexts(self) -> Iterator[np.ndarray]:
        return self.shard_contexts(Shard(), 0)

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        todo = range(shard.index + start * shard.count, len(self), shard.count)
        for k, j in enumerate(todo):
            row = self._row(split_unit(j, self.split))
            if row is None:  # the file shrank under us: this pass ends where its data does
                self.dropped(DROP_TRUNCATED, len(todo) - k)
                self._warn.warning("truncated", "%s: the file is shorter than at start-up; "
                                   "dropping its last %d context(s) of this pass", self.spec,
                                   len(todo) - k)
                return
            yield row


class SyntheticCorpus(Corpus):
    """`n` contexts of uniformly random ids; context i depends only on (seed, i).

    Ids are drawn a block of `BLOCK` contexts at a time (block b from the generator seeded
    with (seed, b)), since seeding a generator costs more than drawing one context.
    """

    BLOCK = 64

    def __init__(
        self, spec: str, n: int, seq_len: int, vocab_size: int, seed: int, split: str = "all"
    ) -> None:
        self.spec, self.n, self.seq_len = spec, n, seq_len
        self.vocab_size, self.seed = vocab_size, seed
        self.split = check_split(split)
        self._block: tuple[int, np.ndarray] | None = None
        if len(self) == 0:
            raise CorpusError(f"{spec}: no context in the {split} split")

    def __len__(self) -> int:
        return split_size(self.n, self.split)

    def context(self, i: int) -> np.ndarray:
        b = i // self.BLOCK
        if self._block is None or self._block[0] != b:
            rng = np.random.default_rng([self.seed, b])
            ids = rng.integers(0, self.vocab_size, (self.BLOCK, self.seq_len), dtype=np.int64)
            self._block = (b, ids)
        return self._block[1][i % self.BLOCK].copy()

    def contexts(self) -> Iterator[np.ndarray]:
        return self.shard_contexts(Shard(), 0)

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        for j in range(shard.index + start * shard.count, len(self), shard.count):
            yield self.context(split_unit(j, self.split))


PIECE_CHARS = 1 << 20
"""A document is tokenised in pieces of about this many characters (`text_pieces`): a
tokenizer's own memory grows with the text it is given (SmolLM2's took 5.8 GiB more for one 45 MB
document, so a 1 GB .txt file could not be read), and the document's ids are cut into
contexts piece by piece instead of held whole."""

_PIECE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
"""Where a piece may end: after a lone newline between two words. Byte-level BPE tokenizers
(GPT-2's, Llama 3's, SmolLM2's) split their input into words and whitespace runs before
merging, and make such a newline a unit of its own, at the end of a text too; so pieces cut
there give the ids of the whole text. (A run of whitespace may not end a piece: at the
end of a text it is one unit, before a word all but its last character are.)"""
_WORD_CUT = re.compile(r"(?<=\S)(?= \S)")
"""Else before a lone space between two words (the space starts the next word's unit)."""


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of `size` to 2 × `size` characters (the last may be shorter),
    each ending where `_PIECE_CUT` allows within the next `size` characters, else where
    `_WORD_CUT` does, else at `size` (a text with no lone space or newline between words in
    `size` characters, such as a base64 blob: there a piece's ids may differ from the whole
    text's next to the cut).
    Pieces are sliced as they are asked for: never a second copy of the whole text."""
    start = 0
    while len(text) - start > 2 * size:
        end = _cut(text, start, size)
        yield text[start:end]
        start = end
    yield text[start:]


def stream_pieces(read: Callable[[int], str], size: int = PIECE_CHARS) -> Iterator[str]:
    """`text_pieces` of the text that `read(n)` returns n characters at a time ("" at its
    end), the same pieces, holding at most 3 × `size` characters of it at once."""
    held, end = "", False
    while True:
        while not end and len(held) <= 2 * size:
            more = read(size)
            end = not more
            held += more
        if end:
            yield from text_pieces(held, size)
            return
        cut = _cut(held, 0, size)
        yield held[:cut]
        held = held[cut:]


def _cut(text: str, start: int, size: int) -> int:
    """Where the piece of `text` that starts at `start` ends (`text_pieces`)."""
    end = start + size
    found = _PIECE_CUT.search(text, end, end + size) or _WORD_CUT.search(text, end, end + size)
    return found.end() if found is not None else end


class StreamedText:
    """A .txt file's text, read a piece at a time while `read_text_documents` holds the file
    open: iterate it before asking for the next document. Reading a file whole held all of
    it (four bytes a character when it holds one character beyond the BMP: an emoji made a
    1 GB file 4 GB)."""

    def __init__(self, fh: TextIO, lost: Callable[[OSError], None]) -> None:
        self._fh, self._lost = fh, lost
        self._read = False

    def __iter__(self) -> Iterator[str]:
        if self._read or self._fh.closed:
            raise RuntimeError("a StreamedText was read twice, or after the next document was "
                               "asked for (its file is closed then): read each once, in turn")
        self._read = True
        failed: list[OSError] = []

        def read(n: int) -> str:
            try:
                return self._fh.read(n)
            except OSError as exc:  # the end of the text: what was read is all kept
                failed.append(exc)
                return ""

        yield from stream_pieces(read, PIECE_CHARS)
        if failed:
            self._lost(failed[0])


MAX_JSONL_LINE = 1 << 26
"""Bytes a .jsonl line may hold (64 MiB: a long book is a few MB): a longer one is skipped
and counted. Read whole, a file that is one JSON array on one line, or no JSON at all, was
held whole in memory, four bytes a character with one emoji."""

_THROUGH = 1 << 20
"""Bytes read at a time through the rest of an over-long .jsonl line."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def _lines(fh: BinaryIO, limit: int) -> Iterator[tuple[int, str | None]]:
    """(line number, line decoded as UTF-8, undecodable bytes replaced) for each line of
    `fh`, a line ending at b"\\n" only; None for a line of more than `limit` bytes (its
    newline included). Such a line costs what reading `limit` bytes does, whatever its
    length: its first `limit` bytes are let go and the rest read `_THROUGH` at a time. What
    is yielded is let go before the next line is read."""
    lineno = 0
    while raw := fh.readline(limit):
        lineno += 1
        if len(raw) >= limit and not raw.endswith(b"\n") and (rest := fh.read(1)):
            del raw
            while rest and not rest.endswith(b"\n"):
                rest = fh.readline(_THROUGH)
            yield lineno, None
            continue
        line = raw.decode("utf-8", errors="replace")
        del raw
        yield lineno, line
        del line


def _jsonl_text(line: str) -> str | None:
    """A .jsonl line's "text" (None for a blank line); ValueError, KeyError, TypeError or
    RecursionError when it has none."""
    if not line.strip():
        return None
    text = bounded_json.loads(line)["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    # a lone surrogate (JSON's `\ud800`) is no text a tokenizer takes: replaced, as
    # undecodable bytes of a .txt file are
    return _SURROGATE.sub("\ufffd", text)


_Doc = str | Iterable[str]
"""A document: its text, or its text in pieces (`StreamedText`)."""


class DocumentCorpus(Corpus):
    """Text documents, tokenised lazily as the contexts are consumed, a piece of a long
    document at a time (`text_pieces`)."""

    read_ahead = True

    def __init__(
        self,
        spec: str,
        documents: Callable[[], Iterable[_Doc | None]],
        encode: Callable[[str], list[int]],
        separator: int,
        seq_len: int,
    ) -> None:
        self.spec, self.seq_len = spec, seq_len
        self._documents, self._encode, self._separator = documents, encode, separator

    def contexts(self) -> Iterator[np.ndarray]:
        # Contexts are read at an offset and the buffer is compacted once per document (what
        # is left then is under one context): deleting each context from the front instead
        # moves the rest of the buffer every time, quadratic in the length of a document.
        buf: list[int] = []
        seq_len, off = self.seq_len, 0
        for text in self._documents():
            if text is None:  # a document that could not be read (already counted)
                continue
            pieces = text_pieces(text, PIECE_CHARS) if isinstance(text, str) else iter(text)
            piece = next(pieces, None)  # None: a streamed file that failed at once, skipped
            while piece is not None:
                buf.extend(self._encode(piece))
                piece = next(pieces, None)
                if piece is None:
                    buf.append(self._separator)
                while len(buf) - off >= seq_len:
                    yield np.asarray(buf[off : off + seq_len], dtype=np.int64)
                    off += seq_len
                if off:
                    del buf[:off]
                    off = 0


def text_files(pattern: str) -> list[Path]:
    """Files named by a path, a directory (its *.txt and *.jsonl, recursively) or a glob; sorted.

    Neither form descends into a symlinked directory while recursing (`**`, a directory's
    subfolders): a link back up the tree would repeat the walk until paths hit the OS limit.
    """
    path = Path(pattern).expanduser()
    if path.is_dir():  # Path.rglob does not follow symlinked directories
        files = [p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in set(_glob(str(path))) if Path(p).is_file()]
    return sorted(files)


def _glob(pattern: str) -> Iterator[str]:
    """`glob.glob(pattern, recursive=True)`, except that `**` enters each real folder once:
    glob's follows a symlink back to a parent again and again (exponential with two).
    Symlinked folders are followed otherwise; hidden names need a pattern with a dot."""
    parts = Path(pattern).parts

    def names(base: str, part: str) -> list[str]:
        try:
            with os.scandir(base or ".") as it:
                found = [e.name for e in it]
        except OSError:
            return []
        if not part.startswith("."):
            found = [n for n in found if not n.startswith(".")]
        return fnmatch.filter(found, part)

    def real_subdirs(base: str, seen: set[tuple[int, int]]) -> Iterator[str]:
        try:
            st = os.stat(base or ".")
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(base or ".") as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError:
            return
        for e in entries:
            try:
                if e.is_dir():
                    sub = os.path.join(base, e.name)
                    st = os.stat(sub)
                    if (st.st_dev, st.st_ino) not in seen:
                        yield sub
                        yield from real_subdirs(sub, seen)
            except OSError:
                continue

    def walk(base: str, i: int) -> Iterator[str]:
        if i == len(parts):
            yield base
            return
        part = parts[i]
        if part == "**":
            for sub in itertools.chain([base], real_subdirs(base, set())):
                if i + 1 == len(parts):  # a trailing ** matches files too, as glob's does
                    yield from (os.path.join(sub, name) for name in names(sub, "*"))
                yield from walk(sub, i + 1)
        elif glob.has_magic(part):
            for name in names(base, part):
                yield from walk(os.path.join(base, name), i + 1)
        else:
            yield from walk(os.path.join(base, part), i + 1)

    return walk("", 0)


def read_text_documents(
    files: list[Path], warn: RateLimitedLog,
    dropped: Callable[[str, int], None] = lambda reason, n: None,
    units: dict[Path, int] | None = None,
) -> Iterator[str | StreamedText | None]:
    """One document per .txt file (a `StreamedText`: iterate it before asking for the next
    document); one per line of a .jsonl file (its "text" field).

    A file that cannot be read (deleted, unreadable, no longer a regular file) is logged,
    reported to `dropped` and skipped. It yields None in place of each document it held when
    last read (a .txt file: one), so the documents after it keep their numbers, and with them
    their train/eval split; a skipped bad .jsonl line takes no number (as it never did).
    :param units: documents each .jsonl file held when last read, kept by the caller from
        pass to pass (a file gone in the next pass then keeps its documents' numbers).
    """
    units = {} if units is None else units

    def lost_rest(path: Path, exc: OSError) -> None:
        dropped(DROP_UNREADABLE, 1)
        warn.warning(f"file:{path}", "skipping the rest of corpus file %s (%s)", path,
                     exc.strerror or str(exc))

    for path in files:
        count = 0
        try:
            fd = open_regular(path)
            if path.suffix != ".jsonl":
                with os.fdopen(fd, encoding="utf-8", errors="replace") as fh:
                    count = 1
                    yield StreamedText(fh, lambda exc, path=path: lost_rest(path, exc))
                    continue
            with os.fdopen(fd, "rb") as bh:
                for lineno, line in _lines(bh, MAX_JSONL_LINE):
                    if line is None:
                        dropped(DROP_BAD_JSONL, 1)
                        warn.warning(f"jsonl:{path}", "skipping %s:%d: longer than %s bytes",
                                     path, lineno, f"{MAX_JSONL_LINE:,}")
                        continue
                    try:
                        text = _jsonl_text(line)
                    except (ValueError, KeyError, TypeError, RecursionError) as exc:
                        dropped(DROP_BAD_JSONL, 1)
                        warn.warning(
                            f"jsonl:{path}", "skipping %s:%d: no string 'text' field (%s)",
                            path, lineno, exc,
                        )
                        continue
                    finally:
                        del line  # not held while the next line is read
                    if text is None:
                        continue
                    count += 1
                    yield text
                    del text
        except OSError as exc:
            reason = DROP_NOT_REGULAR if isinstance(exc, NotRegularFile) else DROP_UNREADABLE
            dropped(reason, 1)
            why = "not a regular file" if isinstance(exc, NotRegularFile) else (
                exc.strerror or str(exc))
            warn.warning(f"file:{path}", "skipping corpus file %s (%s)", path, why)
            known = 1 if path.suffix != ".jsonl" else units.get(path, 0)
            for _ in range(known - count):
                yield None
            continue
        if path.suffix == ".jsonl":
            units[path] = count


_WIKI_QUOTES = re.compile(r"'{2,}")
_WIKI_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


def wiki_sample_path() -> Path:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI_SAMPLE_FILE
    if not path.is_file():
        raise CorpusError(f"{WIKI_SAMPLE}: {path} is missing from the gensim package")
    return path


def wiki_documents(path: Path) -> Iterator[str]:
    """Articles of a MediaWiki XML dump, markup stripped by gensim's own `filter_wiki`.

    Redirects, non-article namespaces and pages under 50 words are skipped, as gensim's
    WikiCorpus does; the text keeps its case and punctuation (gensim's tokeniser would not).
    """
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path) as fh:
        for _title, raw, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(raw)
            text = _WIKI_HEADING.sub(r"\1", _WIKI_QUOTES.sub("", text))
            text = _BLANK_LINES.sub("\n\n", text).strip()
            if len(text.split()) >= WIKI_MIN_WORDS:
                yield text


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed `--corpus` value: what `open_corpus` opens and `precheck_corpus` checks."""

    kind: str
    """`synthetic`, `wiki-sample`, `text` or `tokens`."""
    target: str = ""
    """The path or glob of `text:`/`tokens:`."""
    count: int = SYNTHETIC_DEFAULT_CONTEXTS
    """Contexts of `synthetic[:N]`."""
    token_dtype: str = "uint16"
    """Element type of a `tokens:*.bin` file."""


CORPUS_FORMS = "text:PATH_OR_GLOB, tokens:PATH, wiki-sample or synthetic"


def parse_corpus_spec(spec: str, token_dtype: str = "uint16") -> CorpusSpec:
    """`text:PATH_OR_GLOB`, `tokens:PATH[:uint16|uint32]`, `wiki-sample`, `synthetic[:N]`."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.partition(":")[2] or str(SYNTHETIC_DEFAULT_CONTEXTS)
        if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= MAX_SYNTHETIC:
            raise CorpusError(f"bad corpus {spec!r}: expected synthetic or synthetic:N_CONTEXTS "
                              f"(1 to 2^40)")
        return CorpusSpec("synthetic", count=int(count))
    if spec == WIKI_SAMPLE:
        return CorpusSpec("wiki-sample")
    if spec.startswith("text:"):
        target = spec[len("text:") :]
        if not target.strip():  # Path("") is the current directory: never read it unasked
            raise CorpusError(f"bad corpus {spec!r}: expected text:PATH_OR_GLOB, the path is "
                              f"empty")
        return CorpusSpec("text", target=target)
    if spec.startswith("tokens:"):
        target = spec[len("tokens:") :]
        head, sep, tail = target.rpartition(":")
        if sep and tail in TOKEN_DTYPES:
            target, token_dtype = head, tail
        if not target.strip():
            raise CorpusError(f"bad corpus {spec!r}: expected tokens:PATH, the path is empty")
        if token_dtype not in TOKEN_DTYPES:
            raise CorpusError(f"bad token dtype {token_dtype!r} (use uint16 or uint32)")
        return CorpusSpec("tokens", target=target, token_dtype=token_dtype)
    raise CorpusError(f"unknown corpus {spec!r} (use {CORPUS_FORMS})")


def open_corpus(
    spec: str,
    *,
    seq_len: int,
    vocab_size: int,
    encode: Callable[[str], list[int]] | None,
    separator: int,
    seed: int = 0,
    token_dtype: str = "uint16",
    split: str = "all",
) -> Corpus:
    """Open `--corpus SPEC` (see `parse_corpus_spec`), serving only the units of `split`."""
    if seq_len < 2:
        raise CorpusError(f"--seq-len must be at least 2, not {seq_len}")
    check_split(split)
    parsed = parse_corpus_spec(spec, token_dtype)
    if parsed.kind == "synthetic":
        return SyntheticCorpus(spec, parsed.count, seq_len, vocab_size, seed, split)
    if parsed.kind == "tokens":
        return ArrayCorpus(spec, _load_tokens(spec, parsed), seq_len, split)
    if encode is None:
        raise CorpusError(f"corpus {spec} needs a model with a tokenizer")
    if parsed.kind == "wiki-sample":
        stream: list[int] = []
        for text in _split_documents(wiki_documents(wiki_sample_path()), split):
            stream.extend(encode(text))
            stream.append(separator)
        return ArrayCorpus(spec, np.asarray(stream, dtype=np.int64), seq_len)
    files = _text_files_of(spec, parsed)
    warn = RateLimitedLog(log)
    units: dict[Path, int] = {}
    corpus = DocumentCorpus(
        spec, lambda: _split_documents(
            read_text_documents(files, warn, corpus.dropped, units), split),
        encode, separator, seq_len,
    )
    return corpus


def precheck_corpus(spec: str, token_dtype: str = "uint16") -> None:
    """Cheap checks of a `--corpus` value (syntax, files present) before a model is loaded."""
    parsed = parse_corpus_spec(spec, token_dtype)
    if parsed.kind == "text":
        _text_files_of(spec, parsed)
    elif parsed.kind == "tokens":
        ArrayCorpus(spec, _load_tokens(spec, parsed), 2)  # shape and size


def _split_documents(documents: Iterable[_Doc | None], split: str) -> Iterator[_Doc]:
    """The documents of `split`; a None (a document that could not be read) keeps its number."""
    return (doc for i, doc in enumerate(documents) if doc is not None and in_split(i, split))


def _text_files_of(spec: str, parsed: CorpusSpec) -> list[Path]:
    files = text_files(parsed.target)
    if not files:
        raise CorpusError(f"corpus {spec}: no files match {parsed.target!r}")
    return files


def _load_tokens(spec: str, parsed: CorpusSpec) -> TokenFile:
    """The id array of a `tokens:` corpus: its header checked, its ids read as needed."""
    path = Path(parsed.target).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus {spec}: file {str(path)!r} not found")
    if path.suffix not in (".npy", ".bin"):
        raise CorpusError(f"corpus {spec}: expected a .npy or .bin file")
    try:
        fd = open_regular(path)
    except OSError as exc:
        why = "not a regular file" if isinstance(exc, NotRegularFile) else exc.strerror or str(exc)
        raise CorpusError(f"corpus {spec}: cannot read {str(path)!r}: {why}") from None
    try:
        size = os.fstat(fd).st_size
        if path.suffix == ".bin":
            dtype = np.dtype(TOKEN_DTYPES[parsed.token_dtype])
            if size % dtype.itemsize:
                raise CorpusError(f"corpus {spec}: {str(path)!r} holds {size:,} bytes, not a "
                                  f"whole number of {parsed.token_dtype} ids")
            return TokenFile(path, dtype, (size // dtype.itemsize,), 0, os.dup(fd))
        with os.fdopen(os.dup(fd), "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
        if not np.issubdtype(dtype, np.integer):
            raise CorpusError(f"corpus {spec}: {dtype} array, expected integer ids")
        if fortran and len(shape) > 1:
            raise CorpusError(f"corpus {spec}: a Fortran-ordered array; save it C-ordered "
                              f"(numpy.ascontiguousarray) so each context is one run of ids")
        need = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
        if size < need:
            raise CorpusError(f"corpus {spec}: {str(path)!r} is truncated ({size:,} of "
                              f"{need:,} bytes)")
        return TokenFile(path, dtype, tuple(int(d) for d in shape), offset, os.dup(fd))
    except (OSError, ValueError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"corpus {spec}: cannot read {str(path)!r}: {exc}") from None
    finally:
        os.close(fd)
