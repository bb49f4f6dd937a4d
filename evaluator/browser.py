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

import contextlib
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
    check_finite_weights,
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
BUILD_RE = re.compile(r"^b(\d{6,})-")


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
        check_finite_weights(s)
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
    evaluated = evaluated_groups(evaluated)[0]
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
        **{k: evaluated["downstream"].get(k) for k in ("delta_ce", "loss_recovered")},
        "evaluated_tokens": evaluated["tokens"],
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
    """latent -> {text, precision, recall} from a checked `explanations` group (see
    `evaluated_groups`), if any."""
    out: dict[int, dict[str, Any]] = {}
    for e in (group or {}).get("per_latent", []):
        text = e.get("explanation")
        if text is None:
            text = [" ".join("*" if t is None else f"#{t}" for t in p)
                    for p in e.get("patterns") or []]
        out[e["latent"]] = finite({"text": " | ".join(map(str, text)),
                                   "precision": e.get("precision"), "recall": e.get("recall")})
    return out


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _explanation_entry(e: Any) -> bool:
    """Whether `e` is an `explanations.per_latent` entry the browser can show."""
    if not isinstance(e, Mapping) or type(e.get("latent")) is not int or e["latent"] < 0:
        return False
    text, patterns = e.get("explanation"), e.get("patterns")
    if text is not None and not (isinstance(text, list)
                                 and all(isinstance(t, str) for t in text)):
        return False
    if text is None and patterns is not None and not (
            isinstance(patterns, list) and all(
                isinstance(p, list) and all(t is None or type(t) is int for t in p)
                for p in patterns)):
        return False
    return _number(e.get("precision")) and _number(e.get("recall"))


def evaluated_groups(doc: Any) -> tuple[dict[str, Any], list[str]]:
    """What the browser shows of an SAE's `saestream eval` results (an eval.json, or the
    evaluator daemon's figures): `downstream` (its `delta_ce` and `loss_recovered`, numbers),
    `tokens` (an integer) and `explanations.per_latent` (entries with an integer `latent`,
    an `explanation` list of strings or `patterns` lists of token ids, `precision` and
    `recall` numbers). Returns those parts, every malformed one left out (an empty
    `downstream`, `tokens` None, no entry), and a phrase per part left out."""
    doc = doc if isinstance(doc, Mapping) else {}
    problems: list[str] = []
    downstream: dict[str, Any] = {}
    group = doc.get("downstream")
    if group is not None and not isinstance(group, Mapping):
        problems.append(f"downstream is {type(group).__name__}, not an object")
    elif group is not None:
        bad = [k for k in ("delta_ce", "loss_recovered") if not _number(group.get(k))]
        if bad:
            problems.append(f"downstream.{'/'.join(bad)} not a number")
        downstream = {k: group.get(k) for k in ("delta_ce", "loss_recovered") if k not in bad}
    tokens = doc.get("tokens")
    if tokens is not None and type(tokens) is not int:
        problems.append(f"tokens is {type(tokens).__name__}, not an integer")
        tokens = None
    entries: list[Mapping[str, Any]] = []
    group = doc.get("explanations")
    if group is not None and not isinstance(group, Mapping):
        problems.append(f"explanations is {type(group).__name__}, not an object")
    elif group is not None:
        per = group.get("per_latent")
        if per is not None and not isinstance(per, list):
            problems.append(f"explanations.per_latent is {type(per).__name__}, not a list")
        elif per is not None:
            entries = [e for e in per if _explanation_entry(e)]
            if len(entries) < len(per):
                problems.append(f"{len(per) - len(entries)} of the {len(per)} "
                                "explanations.per_latent entries malformed")
    return {"downstream": downstream, "tokens": tokens,
            "explanations": {"per_latent": entries}}, problems


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
    `index.html` at it, prune old builds. Returns (its folder, bytes, files).

    Every file is written before anything is renamed: the build, and the new `latest` and
    `index.html` under temporary names. Raises OSError (a full or read-only disk) after
    removing all this call wrote — the temporaries, and `out` itself when it created it —
    so `out` is left as it was: the previous build still the one presented, or nothing."""
    created = None  # the outermost folder of `out` this call makes, if any
    for folder in (out, *out.parents):
        if folder.exists():
            break
        created = folder
    marked = not (out / MARKER).exists()
    tmp: Path | None = None
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    placed: Path | None = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
        for stale in out.glob(".tmp-*"):  # a crashed build's; an hour old, so no live writer's
            if time.time() - stale.lstat().st_mtime > 3600:
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        numbers = [int(m.group(1)) for p in out.iterdir() if (m := BUILD_RE.match(p.name))]
        name = f"b{max(numbers, default=0) + 1:06d}-{_safe(label)}"
        tmp = out / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
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
        entry = _entry_html(name, [(sae, doc["index"]["summary"]) for sae, doc in docs])
        for final, text in ((out / "latest", name + "\n"), (out / "index.html", entry)):
            staged.append((_stage(final, text), final))
        os.rename(tmp, out / name)
        tmp, placed = None, out / name
        for i, (temporary, final) in enumerate(staged):
            os.replace(temporary, final)
            placed = None  # `latest` names it now: it stays
            staged[i] = (final, final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if placed is not None:
            shutil.rmtree(placed, ignore_errors=True)
        for temporary, final in staged:
            if temporary != final:
                temporary.unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif marked:  # an empty folder given: left empty
            with contextlib.suppress(OSError):
                (out / MARKER).unlink()
        raise
    builds = sorted((p for p in out.iterdir() if BUILD_RE.match(p.name) and p.is_dir()),
                    key=lambda p: int(BUILD_RE.match(p.name).group(1)))  # type: ignore[union-attr]
    for old in builds[:-KEEP_BUILDS]:
        shutil.rmtree(old, ignore_errors=True)
    files = [f for f in (out / name).rglob("*") if f.is_file()]
    return out / name, sum(f.stat().st_size for f in files), len(files)


def _stage(path: Path, text: str) -> Path:
    """`text` written to a new temporary file beside `path` (renamed over it later)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:80] or "build"
