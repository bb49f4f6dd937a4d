"""The feature browser on disk: static files a browser opens from `file://` with no network.

    DIR/index.html                   entry: lists the newest build's SAEs (goes straight to
                                     the one SAE when there is one); replaced atomically
    DIR/latest                       the newest build's folder name
    DIR/b000007-step-00001200/       one build (immutable once renamed into place):
        tokens.js, vocab.js          the contexts' token ids; the text of every id shown
        <sae>/index.html             the app: browser.js + browser.css (copied beside it)
        <sae>/index.js               summary and per-latent figures (the sortable index)
        <sae>/fires_on.js            token id -> latents firing on it (loaded on a token search)
        <sae>/latents/<id // 64>.js  pages of 64 latents (loaded when one is opened)

Browsers refuse `fetch()` of `file://` URLs, so every data file is a script calling one
function of `browser.js` (`SAEF.index({...})`, ...), loaded by a `<script>` tag when needed:
the index is one file, a latent's page costs one small file more.

A build is written under `DIR/.tmp-…` and renamed into place, then `latest` and
`index.html` are replaced (write, then `os.replace`), so a reader opening `DIR/index.html`
always lands in a complete build. A page already open keeps reading its own build, which
stays until `KEEP_BUILDS` newer ones exist.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from saestream import __version__
from saestream.consumer.checkpoint import LoadedSAE
from saestream.evaluator.features import (
    Codes,
    Example,
    FeatureError,
    FeatureSettings,
    LatentStats,
    Progress,
    choose_latents,
    encode_contexts,
    example_activations,
    latent_stats,
    logit_effects,
    nearest_latents,
    parse_latents,
    residual_hook,
)
from saestream.evaluator.report import finite
from saestream.producer.models import LoadedModel

BUNDLE = 64
"""Latent pages per data file: few files (16k latents: 256), each small (~100 kB)."""
KEEP_BUILDS = 3
"""Builds kept in DIR: the newest and the two before (pages still open may read them)."""
MARKER = ".saestream-features"
"""A file that marks DIR as a feature browser: only such a directory is ever pruned."""
ASSETS = ("browser.js", "browser.css")
BUILD_RE = re.compile(r"^b(\d{6})-")


@dataclass
class Built:
    """What one build wrote."""

    entry: Path
    """DIR/index.html."""
    build: Path
    """The build's folder."""
    notes: list[str]
    """One line per SAE: latents shown, dead latents, tokens."""
    bytes: int
    """Size of the build's files."""
    files: int
    seconds: dict[str, float]
    """Wall time by stage: encode (forward and SAE), latents (statistics, examples), decoder
    (nearest latents, logit effects), write."""


def check_out_dir(out: Path) -> None:
    """`out` is new, empty, or a feature browser (then its builds are added to): anything
    else is refused, so pruning old builds never touches a file it did not write."""
    if out.exists() and not out.is_dir():
        raise FeatureError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FeatureError(f"--out {out}: not empty and not a feature browser (no {MARKER}); "
                           "give a new directory")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FeatureError(f"--out {out}: {probe} is not writable")


def build_browser(
    out: Path, lm: LoadedModel, ids: torch.Tensor, saes: Sequence[tuple[LoadedSAE, str]], *,
    label: str, texts: Sequence[str], latents: str = "all",
    about: Mapping[str, Any] | None = None,
    evaluated: Mapping[str, Mapping[str, Any]] | None = None,
    settings: FeatureSettings | None = None, batch_size: int = 16,
    progress: Progress | None = None,
) -> Built:
    """Encode the contexts `ids` [n, T] with every (SAE, hook), compute each latent's page and
    write a new build into `out` (see the module docstring). Raises FeatureError.

    :param label: names the build's folder (e.g. the snapshot's name).
    :param texts: every token id's text (`probes.token_texts`).
    :param latents: `--latents` (all, N most frequent, or ids).
    :param about: summary fields shared by the SAEs (model, corpus, split, snapshot, step).
    :param evaluated: per SAE name, `saestream eval`'s groups for it (downstream, explanations)
        when known: an eval.json, or the evaluator daemon's figures.
    """
    settings = settings or FeatureSettings()
    for s, _ in saes:
        parse_latents(latents, s.sae.cfg.n_latents)
    seconds = dict.fromkeys(("encode", "latents", "decoder", "write"), 0.0)
    t0 = time.perf_counter()
    codes = encode_contexts(lm.model, ids, saes, batch_size=batch_size, progress=progress)
    seconds["encode"] = time.perf_counter() - t0
    token_ids = ids[:, 1:].reshape(-1)
    docs, notes, shown_ids = [], [], set(ids.unique().tolist())
    for s, hook in saes:
        doc, note = _sae_documents(lm, s, hook, codes[s.name], token_ids, int(ids.shape[1]),
                                   latents, dict(about or {}), (evaluated or {}).get(s.name, {}),
                                   settings, seconds)
        docs.append((s.name, doc))
        notes.append(note)
        for page in doc["pages"].values():
            shown_ids.update(t for t, _ in page["promoted"] + page["suppressed"])
    vocab = {str(i): texts[i] if i < len(texts) else f"#{i}" for i in sorted(shown_ids)}
    shared = {
        "tokens.js": _script("tokens", {"seq_len": int(ids.shape[1]),
                                        "ids": ids.reshape(-1).tolist()}),
        "vocab.js": _script("vocab", vocab),
    }
    t0 = time.perf_counter()
    build, size, files = _write_build(out, label, shared, docs)
    seconds["write"] += time.perf_counter() - t0
    return Built(out / "index.html", build, notes, size, files, seconds)


def _sae_documents(
    lm: LoadedModel, s: LoadedSAE, hook: str, codes: Codes, token_ids: torch.Tensor,
    seq_len: int, latents: str, about: dict[str, Any], evaluated: Mapping[str, Any],
    settings: FeatureSettings, seconds: dict[str, float],
) -> tuple[dict[str, Any], str]:
    """One SAE's index, pages and token index, and a line saying what they hold (adds its
    time to `seconds`)."""
    t0 = time.perf_counter()
    n = s.sae.cfg.n_latents
    stats = latent_stats(codes, token_ids, n, lm.vocab_size, settings)
    chosen, which = choose_latents(latents, stats)
    alive = int((stats.count > 0).sum())
    if alive == 0 and parse_latents(latents, n).kind != "list":
        raise FeatureError(f"SAE {s.name}: no latent fired on the {len(token_ids)} tokens seen "
                           f"(is {hook} the hook it was trained on, with this model?)")
    rows = torch.cat([stats.top_rows[chosen], stats.band_rows[chosen].flatten(1)], dim=1)
    examples = example_activations(codes, rows, chosen, seq_len, settings)
    t1 = time.perf_counter()
    near = nearest_latents(s, chosen, settings.neighbours)
    effects = (logit_effects(lm.model, s, chosen, settings.logit_tokens)
               if residual_hook(lm.model, hook, lm.block_prefix) else None)
    t2 = time.perf_counter()
    pages = {lat: _page(stats, lat, examples[i], [t[i] for t in near],
                        None if effects is None else [t[i] for t in effects])
             for i, lat in enumerate(chosen.tolist())}
    summary = finite({
        **about, "sae": s.name, "hook": hook, "k": s.sae.cfg.k, "d_in": s.sae.cfg.d_in,
        "latents": n, "input_normalization": s.sae.cfg.input_normalization,
        "tokens": len(token_ids), "alive": alive, "dead": n - alive, "shown": len(pages),
        "which": which, "logit_effects": effects is not None,
        **{k: codes.reconstruction[k] for k in ("normalized_mse", "explained_variance", "l0")},
        **{k: (evaluated.get("downstream") or {}).get(k) for k in ("delta_ce", "loss_recovered")},
        "evaluated_tokens": evaluated.get("tokens"),
        "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "saestream_version": __version__,
    })
    doc = {"index": _index(summary, stats, list(pages), settings, evaluated),
           "pages": pages, "fires_on": _fires_on(stats)}
    note = (f"{s.name}: {len(pages)} latents shown ({which}); {n - alive} of {n} never fired "
            f"on the {len(token_ids)} tokens seen (listed as dead)")
    seconds["decoder"] += t2 - t1
    seconds["latents"] += (t1 - t0) + (time.perf_counter() - t2)
    return doc, note


def _page(stats: LatentStats, lat: int, examples: list[Example], near: list[torch.Tensor],
          effects: list[torch.Tensor] | None) -> dict[str, Any]:
    """A latent's page: its examples ([context, position, [[position, activation], ...]]:
    the top ones, then each quantile band's), histogram, neighbours, logit effects."""
    ex = [[c, p, [[q, _sig(v)] for q, v in acts]] for c, p, acts in examples]
    at = int((stats.top_rows[lat] >= 0).sum())
    page: dict[str, Any] = {"top": ex[:at], "bands": [], "hist": stats.histogram[lat].tolist()}
    for (lo, hi), k in zip(stats.band_edges[lat].tolist(),
                           (stats.band_rows[lat] >= 0).sum(dim=1).tolist(), strict=True):
        page["bands"].append({"lo": _sig(lo), "hi": _sig(hi), "ex": ex[at:at + k]})
        at += k
    page["neighbours"] = [[j, _sig(c)] for j, c in zip(*(t.tolist() for t in near), strict=True)]
    up, up_v, down, down_v = (t.tolist() for t in effects) if effects else ([], [], [], [])
    page["promoted"] = [[t, _sig(v)] for t, v in zip(up, up_v, strict=True)]
    page["suppressed"] = [[t, _sig(v)] for t, v in zip(down, down_v, strict=True)]
    return page


def _index(summary: dict[str, Any], stats: LatentStats, shown: list[int],
           settings: FeatureSettings, evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """The index document: summary, the shown latents that fired (columns), the dead ones."""
    table = torch.tensor([lat for lat in shown if stats.count[lat] > 0], dtype=torch.int64)
    return {
        "summary": summary,
        "settings": {"before": settings.before, "after": settings.after, "bins": settings.bins,
                     "bundle": BUNDLE},
        "latents": {
            "id": table.tolist(),
            "count": stats.count[table].tolist(),
            "max": [_sig(v) for v in stats.max[table].tolist()],
            "mean": [_sig(v) for v in stats.mean[table].tolist()],
            "tokens": [[t for t in row if t >= 0] for row in stats.top_tokens[table].tolist()],
            "tokenCounts": [[c for c in row if c > 0]
                            for row in stats.top_token_counts[table].tolist()],
        },
        "dead": stats.dead.tolist(),
        "deadPages": [lat for lat in shown if stats.count[lat] == 0],
        "explanations": {str(k): v for k, v in
                         _explanations(evaluated.get("explanations")).items()},
    }


def _fires_on(stats: LatentStats) -> dict[str, Any]:
    """token id -> how often it occurs, and the latents firing on it most ([latent, count])."""
    seen = (stats.token_occurrences > 0).nonzero().squeeze(1)
    latents, counts = stats.token_latents[seen].tolist(), stats.token_latent_counts[seen].tolist()
    return {
        "occurrences": {str(t): n for t, n in zip(seen.tolist(),
                                                  stats.token_occurrences[seen].tolist(),
                                                  strict=True)},
        "latents": {str(t): [[la, c] for la, c in zip(lats, cs, strict=True) if la >= 0]
                    for t, lats, cs in zip(seen.tolist(), latents, counts, strict=True)},
    }


def _explanations(group: Any) -> dict[int, dict[str, Any]]:
    """latent -> {text, precision, recall} from an `explanations` group, if any."""
    out: dict[int, dict[str, Any]] = {}
    if not isinstance(group, Mapping):
        return out
    for e in group.get("per_latent") or []:
        if not isinstance(e, Mapping) or not isinstance(e.get("latent"), int):
            continue
        text = e.get("explanation")
        if text is None:
            text = [" ".join("*" if t is None else f"#{t}" for t in p)
                    for p in e.get("patterns") or []]
        out[e["latent"]] = finite({"text": " | ".join(map(str, text)),
                                   "precision": e.get("precision"), "recall": e.get("recall")})
    return out


def _sig(v: float) -> float:
    """4 significant digits: what the page shows, and a third of the bytes of a full float."""
    return float(f"{v:.4g}")


def _script(call: str, doc: Any) -> str:
    """A data file: one call of the app's `SAEF` loader with the JSON document."""
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return f"SAEF.{call}({body});\n"


def _app_html(title: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="browser.css">
</head><body>
<header id="summary"></header>
<main id="view"><p class="note">loading…</p></main>
<script src="browser.js"></script>
<script src="index.js"></script>
</body></html>
"""


def _entry_html(build: str, saes: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """DIR/index.html: the build's SAEs as links; with one SAE it goes straight there (the
    #hash kept, so `index.html#latent=5` opens latent 5 of the newest build)."""
    rows = []
    for name, summary in saes:
        href = f"{quote(build)}/{quote(name)}/index.html"
        rows.append(f'<li><a href="{href}">{html.escape(name)}</a> — hook '
                    f'{html.escape(str(summary.get("hook")))}, {summary.get("latents")} latents, '
                    f'k {summary.get("k")}, {summary.get("tokens")} tokens</li>')
    redirect = ""
    if len(saes) == 1:
        target = json.dumps(f"{quote(build)}/{quote(saes[0][0])}/index.html")
        redirect = f"<script>location.replace({target} + location.hash);</script>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>saestream feature browser</title>
<link rel="stylesheet" href="{quote(build)}/{quote(saes[0][0])}/browser.css">
{redirect}</head><body><main>
<h1>saestream feature browser</h1>
<p>Build {html.escape(build)}:</p>
<ul>{"".join(rows)}</ul>
</main></body></html>
"""


def _write_build(out: Path, label: str, shared: Mapping[str, str],
                 docs: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[Path, int, int]:
    """Write the build under a temporary name, rename it into place, point `latest` and
    `index.html` at it, prune old builds. Returns (its folder, bytes, files)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for stale in out.glob(".tmp-*"):  # a crashed build's; an hour old, so no live writer's
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := BUILD_RE.match(p.name))]
    name = f"b{max(numbers, default=0) + 1:06d}-{_safe(label)}"
    tmp = out / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, text in shared.items():
            (tmp / fname).write_text(text)
        for sae, doc in docs:
            d = tmp / sae
            (d / "latents").mkdir(parents=True)
            for asset in ASSETS:
                (d / asset).write_bytes(resources.files("saestream.evaluator")
                                        .joinpath(asset).read_bytes())
            (d / "index.html").write_text(_app_html(f"{sae} — saestream features"))
            (d / "index.js").write_text(_script("index", doc["index"]))
            (d / "fires_on.js").write_text(_script("firesOn", doc["fires_on"]))
            bundles: dict[int, dict[str, Any]] = {}
            for lat, page in doc["pages"].items():
                bundles.setdefault(lat // BUNDLE, {})[str(lat)] = page
            for b, pages in bundles.items():
                (d / "latents" / f"{b}.js").write_text(_script("latents", pages))
        os.rename(tmp, out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(out / "latest", name + "\n")
    _replace(out / "index.html",
             _entry_html(name, [(sae, doc["index"]["summary"]) for sae, doc in docs]))
    builds = sorted((p for p in out.iterdir() if BUILD_RE.match(p.name) and p.is_dir()),
                    key=lambda p: p.name)
    for old in builds[:-KEEP_BUILDS]:
        shutil.rmtree(old, ignore_errors=True)
    files = [f for f in (out / name).rglob("*") if f.is_file()]
    return out / name, sum(f.stat().st_size for f in files), len(files)


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:80] or "build"
