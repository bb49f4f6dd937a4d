"""Token sources: every corpus becomes a deterministic sequence of fixed-length contexts.

Documents are tokenised, joined with the separator id (one after each document) and cut into
`seq_len` contexts in corpus order; a trailing partial context is dropped. Context `i` of the
corpus belongs to shard `i % N == I`, so N shards are disjoint and together cover the corpus.
"""

from __future__ import annotations

import bz2
import glob
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saestream.common.logs import RateLimitedLog

log = logging.getLogger("saestream.producer")

WIKI_SAMPLE = "wiki-sample"
WIKI_SAMPLE_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SYNTHETIC_DEFAULT_CONTEXTS = 4096
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
WIKI_MIN_WORDS = 50  # gensim's ARTICLE_MIN_WORDS: shorter pages (stubs, lists) are skipped


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


class Corpus:
    """A corpus cut into contexts of `seq_len` token ids, always in the same order."""

    spec: str
    """The `--corpus` value this came from; recorded in the state file and in chunk headers."""
    seq_len: int
    read_ahead: bool = False
    """Worth reading on a thread of its own (tokenising text), ahead of the model."""

    def contexts(self) -> Iterator[np.ndarray]:
        """Every context in corpus order, each an int64 array of shape [seq_len]."""
        raise NotImplementedError

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        """This shard's contexts in order, skipping its first `start` ones."""
        first = shard.index + start * shard.count
        return itertools.islice(self.contexts(), first, None, shard.count)


class ArrayCorpus(Corpus):
    """Contexts sliced out of a token array (a memmap, a loaded file, a tokenised sample)."""

    def __init__(self, spec: str, tokens: np.ndarray, seq_len: int) -> None:
        self.spec = spec
        if tokens.ndim == 2:
            self._rows = tokens
            self.seq_len = int(tokens.shape[1])
        elif tokens.ndim == 1:
            n = len(tokens) // seq_len
            self._rows = tokens[: n * seq_len].reshape(n, seq_len)
            self.seq_len = seq_len
        else:
            raise CorpusError(f"{spec}: token array must be 1-D or 2-D, not {tokens.ndim}-D")
        if len(self._rows) == 0:
            raise CorpusError(f"{spec}: fewer tokens than one context of {seq_len}")

    def __len__(self) -> int:
        return len(self._rows)

    def contexts(self) -> Iterator[np.ndarray]:
        return self.shard_contexts(Shard(), 0)

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        for i in range(shard.index + start * shard.count, len(self._rows), shard.count):
            yield np.asarray(self._rows[i], dtype=np.int64)


class SyntheticCorpus(Corpus):
    """`n` contexts of uniformly random ids; context i depends only on (seed, i).

    Ids are drawn a block of `BLOCK` contexts at a time (block b from the generator seeded
    with (seed, b)), since seeding a generator costs more than drawing one context.
    """

    BLOCK = 64

    def __init__(self, spec: str, n: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.spec, self.n, self.seq_len = spec, n, seq_len
        self.vocab_size, self.seed = vocab_size, seed
        self._block: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

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
        for i in range(shard.index + start * shard.count, self.n, shard.count):
            yield self.context(i)


class DocumentCorpus(Corpus):
    """Text documents, tokenised lazily as the contexts are consumed."""

    read_ahead = True

    def __init__(
        self,
        spec: str,
        documents: Callable[[], Iterable[str]],
        encode: Callable[[str], list[int]],
        separator: int,
        seq_len: int,
    ) -> None:
        self.spec, self.seq_len = spec, seq_len
        self._documents, self._encode, self._separator = documents, encode, separator

    def contexts(self) -> Iterator[np.ndarray]:
        buf: list[int] = []
        for text in self._documents():
            buf.extend(self._encode(text))
            buf.append(self._separator)
            while len(buf) >= self.seq_len:
                yield np.asarray(buf[: self.seq_len], dtype=np.int64)
                del buf[: self.seq_len]


def text_files(pattern: str) -> list[Path]:
    """Files named by a path, a directory (its *.txt and *.jsonl, recursively) or a glob; sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    return sorted(files)


def read_text_documents(files: list[Path], warn: RateLimitedLog) -> Iterator[str]:
    """One document per .txt file; one per line of a .jsonl file (its "text" field)."""
    for path in files:
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with path.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError("text is not a string")
                except (ValueError, KeyError, TypeError) as exc:
                    warn.warning(
                        f"jsonl:{path}", "skipping %s:%d: no string 'text' field (%s)",
                        path, lineno, exc,
                    )
                    continue
                yield text


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


def open_corpus(
    spec: str,
    *,
    seq_len: int,
    vocab_size: int,
    encode: Callable[[str], list[int]] | None,
    separator: int,
    seed: int = 0,
    token_dtype: str = "uint16",
) -> Corpus:
    """Open `--corpus SPEC`: text:PATH_OR_GLOB, tokens:PATH[:uint16|uint32], wiki-sample,
    synthetic[:N_CONTEXTS]."""
    if seq_len < 2:
        raise CorpusError(f"--seq-len must be at least 2, not {seq_len}")
    warn = RateLimitedLog(log)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.partition(":")[2] or str(SYNTHETIC_DEFAULT_CONTEXTS)
        if not count.isdigit() or int(count) < 1:
            raise CorpusError(f"bad corpus {spec!r}: expected synthetic or synthetic:N_CONTEXTS")
        return SyntheticCorpus(spec, int(count), seq_len, vocab_size, seed)
    if spec == WIKI_SAMPLE:
        if encode is None:
            raise CorpusError(f"corpus {spec} needs a model with a tokenizer")
        path = wiki_sample_path()
        stream: list[int] = []
        for text in wiki_documents(path):
            stream.extend(encode(text))
            stream.append(separator)
        return ArrayCorpus(spec, np.asarray(stream, dtype=np.int64), seq_len)
    if spec.startswith("text:"):
        if encode is None:
            raise CorpusError(f"corpus {spec} needs a model with a tokenizer")
        files = text_files(spec[len("text:") :])
        if not files:
            raise CorpusError(f"corpus {spec}: no files match {spec[len('text:'):]!r}")
        return DocumentCorpus(
            spec, lambda: read_text_documents(files, warn), encode, separator, seq_len
        )
    if spec.startswith("tokens:"):
        return _open_tokens(spec, seq_len, token_dtype)
    raise CorpusError(
        f"unknown corpus {spec!r} (use text:PATH_OR_GLOB, tokens:PATH, wiki-sample or synthetic)"
    )


def _open_tokens(spec: str, seq_len: int, token_dtype: str) -> ArrayCorpus:
    target = spec[len("tokens:") :]
    head, sep, tail = target.rpartition(":")
    if sep and tail in TOKEN_DTYPES:
        target, token_dtype = head, tail
    if token_dtype not in TOKEN_DTYPES:
        raise CorpusError(f"bad token dtype {token_dtype!r} (use uint16 or uint32)")
    path = Path(target).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus {spec}: file {str(path)!r} not found")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
            if not np.issubdtype(tokens.dtype, np.integer):
                raise CorpusError(f"corpus {spec}: {tokens.dtype} array, expected integer ids")
        elif path.suffix == ".bin":
            tokens = np.memmap(path, dtype=TOKEN_DTYPES[token_dtype], mode="r")
        else:
            raise CorpusError(f"corpus {spec}: expected a .npy or .bin file")
    except (OSError, ValueError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"corpus {spec}: cannot read {str(path)!r}: {exc}") from exc
    return ArrayCorpus(spec, tokens, seq_len)


def precheck_corpus(spec: str, token_dtype: str = "uint16") -> None:
    """Cheap checks of a `--corpus` value (syntax, files present) before a model is loaded."""
    if spec == WIKI_SAMPLE or spec == "synthetic":
        return
    if spec.startswith("synthetic:"):
        count = spec.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise CorpusError(f"bad corpus {spec!r}: expected synthetic or synthetic:N_CONTEXTS")
    elif spec.startswith("text:"):
        if not text_files(spec[len("text:") :]):
            raise CorpusError(f"corpus {spec}: no files match {spec[len('text:'):]!r}")
    elif spec.startswith("tokens:"):
        _open_tokens(spec, 2, token_dtype)
    else:
        raise CorpusError(
            f"unknown corpus {spec!r} (use text:PATH_OR_GLOB, tokens:PATH, wiki-sample or "
            "synthetic)"
        )
