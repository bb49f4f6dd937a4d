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
SPLITS = ("train", "eval", "all")
EVAL_EVERY = 10
"""Unit u (document, or context of an id corpus) is in the eval split iff u % 10 == 9."""


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

    def contexts(self) -> Iterator[np.ndarray]:
        """Every context in corpus order, each an int64 array of shape [seq_len]."""
        raise NotImplementedError

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        """This shard's contexts in order, skipping its first `start` ones."""
        first = shard.index + start * shard.count
        return itertools.islice(self.contexts(), first, None, shard.count)


class ArrayCorpus(Corpus):
    """Contexts sliced out of a token array (a memmap, a loaded file, a tokenised sample).

    :param split: which contexts of the array to serve (see `SPLITS`); for a tokenised text
        sample the split is applied to its documents beforehand and this is `all`.
    """

    def __init__(self, spec: str, tokens: np.ndarray, seq_len: int, split: str = "all") -> None:
        self.spec = spec
        self.split = check_split(split)
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
        if len(self) == 0:
            raise CorpusError(f"{spec}: no context in the {split} split")

    def __len__(self) -> int:
        return split_size(len(self._rows), self.split)

    def contexts(self) -> Iterator[np.ndarray]:
        return self.shard_contexts(Shard(), 0)

    def shard_contexts(self, shard: Shard, start: int = 0) -> Iterator[np.ndarray]:
        for j in range(shard.index + start * shard.count, len(self), shard.count):
            yield np.asarray(self._rows[split_unit(j, self.split)], dtype=np.int64)


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
        if not count.isdigit() or int(count) < 1:
            raise CorpusError(f"bad corpus {spec!r}: expected synthetic or synthetic:N_CONTEXTS")
        return CorpusSpec("synthetic", count=int(count))
    if spec == WIKI_SAMPLE:
        return CorpusSpec("wiki-sample")
    if spec.startswith("text:"):
        return CorpusSpec("text", target=spec[len("text:") :])
    if spec.startswith("tokens:"):
        target = spec[len("tokens:") :]
        head, sep, tail = target.rpartition(":")
        if sep and tail in TOKEN_DTYPES:
            target, token_dtype = head, tail
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
    return DocumentCorpus(
        spec, lambda: _split_documents(read_text_documents(files, warn), split), encode,
        separator, seq_len,
    )


def precheck_corpus(spec: str, token_dtype: str = "uint16") -> None:
    """Cheap checks of a `--corpus` value (syntax, files present) before a model is loaded."""
    parsed = parse_corpus_spec(spec, token_dtype)
    if parsed.kind == "text":
        _text_files_of(spec, parsed)
    elif parsed.kind == "tokens":
        ArrayCorpus(spec, _load_tokens(spec, parsed), 2)  # shape and size


def _split_documents(documents: Iterable[str], split: str) -> Iterator[str]:
    return (doc for i, doc in enumerate(documents) if in_split(i, split))


def _text_files_of(spec: str, parsed: CorpusSpec) -> list[Path]:
    files = text_files(parsed.target)
    if not files:
        raise CorpusError(f"corpus {spec}: no files match {parsed.target!r}")
    return files


def _load_tokens(spec: str, parsed: CorpusSpec) -> np.ndarray:
    """The id array of a `tokens:` corpus, memory-mapped (never read whole)."""
    path = Path(parsed.target).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus {spec}: file {str(path)!r} not found")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
            if not np.issubdtype(tokens.dtype, np.integer):
                raise CorpusError(f"corpus {spec}: {tokens.dtype} array, expected integer ids")
            return tokens
        if path.suffix == ".bin":
            return np.memmap(path, dtype=TOKEN_DTYPES[parsed.token_dtype], mode="r")
    except (OSError, ValueError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"corpus {spec}: cannot read {str(path)!r}: {exc}") from exc
    raise CorpusError(f"corpus {spec}: expected a .npy or .bin file")
