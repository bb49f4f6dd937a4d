"""`saestream features`: the feature browser. Built for an SAE with planted latents on the tiny
model's embeddings (latent 0 fires on 'e' and nowhere else, latent 1 on 'a', six random
directions, eight dead), checked against a plain forward-and-encode of the same contexts,
then opened from disk in headless Chromium: searched, clicked, read back from the DOM and
photographed. Also: bad input is one line and exit 2, rebuilds swap atomically, and the
evaluator daemon refreshes the browser for each new snapshot."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from chromium import Chromium
from conftest import run_cli, saestream_cmd
from safetensors.torch import load_file, save_file
from test_guarantee_disk import fill, tmpfs_at

from saestream.consumer.checkpoint import load_sae, save_snapshot
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig
from saestream.evaluator.browser import KEEP_BUILDS, build_browser
from saestream.evaluator.config import EvaluatorConfig
from saestream.evaluator.daemon import run_evaluator
from saestream.evaluator.data import eval_ids
from saestream.evaluator.features import (
    Codes,
    FeatureError,
    FeatureSettings,
    encode_contexts,
    latent_stats,
)
from saestream.evaluator.metrics import EvaluatorMetrics
from saestream.producer.hooks import HookedModel
from saestream.producer.models import load_model

HOOK = "model.embed_tokens"
SEQ = 32
TOKENS = 2000
E, A, X = ord("e"), ord("a"), ord("x")
RANDOM = range(2, 8)
DEAD = range(8, 16)
WORDS = ("the river runs past old stone houses where people sell bread and fruit in a busy "
         "market near Paris every morning while children play by the water").split()


def load_js(path: Path) -> object:
    """The document of a data file `SAEF.name({...});`."""
    text = path.read_text()
    return json.loads(text[text.index("(") + 1:text.rindex(")")])


def write_corpus(path: Path, documents: int = 20) -> str:
    """A .jsonl of `documents` documents of English words (documents 9 and 19: the eval split)."""
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(260)) + "."})
             for _ in range(documents)]
    path.write_text("\n".join(lines) + "\n")
    return f"text:{path}"


def planted_sae(folder: Path, *, hook: str = HOOK, d_in: int | None = None,
                alive: bool = True) -> Path:
    """An SAE folder (cfg.json + sae.safetensors) of 16 latents, k = 4, at `hook` of the tiny
    model: latent 0 reads the embedding of 'e' (1.0 there, and it fires nowhere else: another
    byte's projection stays under the threshold), latent 1 that of 'a', latents 2..7 random
    directions (values well under 1), 8..15 never fire. Decoder: row 0 is the unembedding of
    'x' (so it promotes 'x'), row 3 is row 2 plus a little noise (its nearest neighbour)."""
    lm = load_model("tiny", device="cpu")
    emb = lm.model.model.embed_tokens.weight.detach()
    d = emb.shape[1]
    g = torch.Generator().manual_seed(0)
    enc, bias = torch.zeros(16, d), torch.full((16,), -1.0)
    if alive:
        for j, t in ((0, E), (1, A)):
            enc[j] = 2 * emb[t] / float(emb[t] @ emb[t])
        scale = float(emb[ord(" "):ord("z")].norm(dim=1).median())
        for j in RANDOM:
            u = torch.randn(d, generator=g)
            enc[j], bias[j] = u / u.norm() / scale, 0.0
    dec = torch.randn(16, d, generator=g)
    dec[0] = lm.model.lm_head.weight.detach()[X]
    dec[3] = dec[2] + 0.05 * torch.randn(d, generator=g)
    dec = dec / dec.norm(dim=1, keepdim=True)
    width = d_in or d
    folder.mkdir(parents=True)
    save_file({"encoder.weight": enc[:, :width].contiguous(), "encoder.bias": bias,
               "W_dec": dec[:, :width].contiguous(), "b_dec": torch.zeros(width)},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "d_in": width, "num_latents": 16, "k": 4,
        "input_normalization": "none", "hook": hook, "model": "tiny", "name": folder.name}))
    return folder


def reference(sae_dir: Path, corpus: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The contexts the browser must show, and every latent's activation on every evaluated
    token [contexts·(SEQ−1), 16], by a plain forward and encode."""
    lm = load_model("tiny", device="cpu")
    ids = eval_ids(lm, corpus, split="eval", seq_len=SEQ, contexts=None, tokens=TOKENS)
    sae = load_sae(sae_dir).sae
    hooked = HookedModel(lm.model, [HOOK])
    try:
        x = hooked(ids)[HOOK][:, 1:].reshape(-1, sae.cfg.d_in)
    finally:
        hooked.remove()
    values, indices = sae.encode(x)
    return ids, torch.zeros(len(x), 16).scatter(1, indices, values)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    corpus = write_corpus(root / "corpus.jsonl")
    sae_dir = planted_sae(root / "ckpt" / "step-00000005" / "planted")
    out = root / "browser"
    result = run_cli(["features", str(sae_dir.parent), "--out", str(out), "--corpus", corpus,
                      "--seq-len", str(SEQ), "--tokens", str(TOKENS), "--device", "cpu"],
                     timeout=300)
    assert result.returncode == 0, result.stderr
    ids, acts = reference(sae_dir, corpus)
    return out, result.stdout, ids, acts


def fmt4(v: float) -> float:
    return float(f"{v:.4g}")


# -- the numbers -------------------------------------------------------------------------------


def test_latent_stats_equal_a_plain_loop_over_random_codes() -> None:
    g = torch.Generator().manual_seed(1)
    n_tok, k, n_lat, vocab = 400, 3, 12, 7
    values = torch.rand(n_tok, k, generator=g) * (torch.rand(n_tok, k, generator=g) > 0.3)
    indices = torch.stack([torch.randperm(n_lat, generator=g)[:k] for _ in range(n_tok)])
    indices[:, 0] = torch.where(indices[:, 0] == 11, 0, indices[:, 0])  # latent 11 rarer
    values[(indices == 10).any(dim=1)] *= (indices[(indices == 10).any(dim=1)] != 10)  # dead
    tokens = torch.randint(0, vocab, (n_tok,), generator=g)
    s = FeatureSettings(top=5, bands=4, per_band=2, bins=6, top_tokens=2, token_latents=3)
    st = latent_stats(Codes(values, indices.to(torch.int32), {}), tokens, n_lat, vocab, s)

    for j in range(n_lat):
        fired = [(float(values[r, c]), r) for r in range(n_tok) for c in range(k)
                 if indices[r, c] == j and values[r, c] > 0]
        ranked = sorted(fired, key=lambda t: (-t[0], t[1]))
        assert st.count[j] == len(fired)
        if not fired:
            assert st.max[j] == 0 and (st.top_rows[j] == -1).all() and st.histogram[j].sum() == 0
            continue
        top = max(v for v, _ in fired)
        assert st.max[j] == top
        assert st.mean[j] == pytest.approx(sum(v for v, _ in fired) / len(fired), rel=1e-6)
        assert st.top_rows[j].tolist() == ([r for _, r in ranked[:5]] + [-1] * 5)[:5]
        bins = [0] * 6
        for v, _ in fired:
            bins[min(int(v / top * 6), 5)] += 1
        assert st.histogram[j].tolist() == bins
        for b in range(4):  # each band's rows come from its ranks, its edges are its extremes
            lo, hi = -(-len(fired) * b // 4), -(-len(fired) * (b + 1) // 4)
            members = {r for _, r in ranked[lo:hi]}
            rows = [r for r in st.band_rows[j, b].tolist() if r >= 0]
            assert set(rows) <= members and len(rows) == len(set(rows))
            assert len(rows) == min(2, hi - lo)
            if hi > lo:
                assert st.band_edges[j, b].tolist() == pytest.approx(
                    [ranked[hi - 1][0], ranked[lo][0]])
        on = {}
        for _, r in fired:
            on[int(tokens[r])] = on.get(int(tokens[r]), 0) + 1
        best = sorted(on.items(), key=lambda t: (-t[1], t[0]))[:2]
        assert st.top_token_counts[j, :len(best)].tolist() == [c for _, c in best]
    assert st.count[10] == 0 and st.dead.tolist() == [10]
    assert st.token_occurrences.tolist() == torch.bincount(tokens, minlength=vocab).tolist()
    for t in range(vocab):  # the latents firing most often on each token id
        counts = {j: sum(1 for r in range(n_tok) for c in range(k) if tokens[r] == t
                         and indices[r, c] == j and values[r, c] > 0) for j in range(n_lat)}
        want = sorted((c for c in counts.values() if c), reverse=True)[:3]
        assert [c for c in st.token_latent_counts[t].tolist() if c] == want


def test_the_written_files_hold_what_a_plain_forward_gives(built) -> None:
    out, stdout, ids, acts = built
    assert re.search(r"planted: 16 latents shown \(all latents\); 8 of 16 never fired on the "
                     rf"{acts.shape[0]} tokens seen \(listed as dead\)", stdout), stdout
    assert f"feature browser: {(out / 'index.html').resolve().as_uri()}" in stdout
    build = out / (out / "latest").read_text().strip()
    tokens = load_js(build / "tokens.js")
    assert tokens["seq_len"] == SEQ and tokens["ids"] == ids.reshape(-1).tolist()
    index = load_js(build / "planted" / "index.js")
    count = (acts > 0).sum(dim=0)
    assert index["dead"] == list(DEAD) and index["deadPages"] == list(DEAD)
    lat = index["latents"]
    assert lat["id"] == [j for j in range(16) if count[j] > 0] == [0, 1, *RANDOM]
    for r, j in enumerate(lat["id"]):
        assert lat["count"][r] == count[j]
        assert lat["max"][r] == fmt4(float(acts[:, j].max()))
        assert lat["mean"][r] == fmt4(float(acts[:, j].sum() / count[j]))
    s = index["summary"]
    assert (s["model"], s["hook"], s["k"], s["latents"], s["tokens"], s["alive"]) == (
        "tiny", HOOK, 4, 16, acts.shape[0], 8)
    assert s["step"] == 5 and s["delta_ce"] is None and 0 < s["l0"] <= 4

    # Latent 0 fires on every 'e' and nothing else: its top contexts are 'e's, each window's
    # activations sit exactly on the window's 'e's.
    tok = ids[:, 1:].reshape(-1)
    assert torch.equal(acts[:, 0] > 0, tok == E)
    page = load_js(build / "planted" / "latents" / "0.js")["0"]
    flat = ids.reshape(-1).tolist()
    assert len(page["top"]) == 16
    for c, p, window in page["top"] + [e for b in page["bands"] for e in b["ex"]]:
        assert flat[c * SEQ + p] == E
        shown = range(max(0, p - 16), min(SEQ - 1, p + 6) + 1)
        assert [q for q, _ in window] == [q for q in shown if q >= 1 and flat[c * SEQ + q] == E]
        assert all(v == 1.0 for _, v in window)
    assert page["promoted"][0][0] == X  # its decoder row is the unembedding of 'x'
    assert load_js(build / "planted" / "latents" / "0.js")["2"]["neighbours"][0][0] == 3
    fires_on = load_js(build / "planted" / "fires_on.js")
    assert fires_on["occurrences"][str(E)] == int((tok == E).sum())
    assert fires_on["latents"][str(E)][0] == [0, int((tok == E).sum())]


def test_bad_input_is_one_line_and_exit_2(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    few = write_corpus(tmp_path / "few.jsonl", documents=3)  # no document in the eval split
    cases = {
        "empty split": (planted_sae(tmp_path / "a" / "planted"), ["--corpus", few],
                        "tokens in the eval split"),
        "hook mismatch": (planted_sae(tmp_path / "b" / "planted", hook="model.layers.99"),
                          ["--corpus", corpus], "unknown hook 'model.layers.99'"),
        "width mismatch": (planted_sae(tmp_path / "c" / "planted", d_in=32),
                           ["--corpus", corpus], "reads d_in 32, but hook model.embed_tokens "
                                                 "gives 64"),
        "all dead": (planted_sae(tmp_path / "d" / "planted", alive=False),
                     ["--corpus", corpus], "no latent fired on the"),
        "latents": (tmp_path / "a" / "planted", ["--latents", "3,99"],
                    "latent 99 does not exist"),
        "out": (tmp_path / "a" / "planted", ["--out", str(tmp_path)],
                "not empty and not a feature browser"),
    }
    procs = {}
    for i, (name, (sae, args, _)) in enumerate(cases.items()):  # all at once: each loads torch
        argv = ["features", str(sae), "--out", str(tmp_path / f"out-{i}"), "--seq-len",
                str(SEQ), "--tokens", "300", "--device", "cpu", "--corpus", corpus, *args]
        procs[name] = subprocess.Popen(saestream_cmd(*argv), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    cases["daemon out"] = (None, [], f"--features {tmp_path}: not empty and not a feature browser")
    procs["daemon out"] = subprocess.Popen(
        saestream_cmd("evaluator", "--checkpoint-dir", str(tmp_path / "ckpt"), "--features",
                      str(tmp_path), "--metrics-port", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("saestream: error: "), (name, stderr)
        assert cases[name][2] in lines[0], (name, lines[0])


# -- in a real browser -------------------------------------------------------------------------

TOP_CONTEXTS = """[...document.querySelectorAll('.ctx[data-section="top"]')].map(row =>
    [...row.querySelectorAll('.tok')].map(t => [t.textContent, Number(t.dataset.act),
        Number(t.dataset.pos), getComputedStyle(t).backgroundColor]))"""


def field(page, name: str) -> str:
    return page.evaluate(f"document.querySelector('#stats [data-field={name}] dd').textContent")


def test_chromium_opens_the_browser_from_disk_searches_and_shows_the_planted_latent(
        built, tmp_path) -> None:
    from PIL import Image

    out, _, _, acts = built
    with Chromium(tmp_path / "profile") as chrome:
        page = chrome.open((out / "index.html").as_uri())
        page.wait_for("document.querySelectorAll('#table tbody tr').length === 8")
        assert "Dead latents (8)" in page.evaluate("document.querySelector('#dead').innerText")
        # which latents fire on 'e'? Typed into the search box.
        page.evaluate("document.querySelector('#search').focus()")
        page.type_text("e")
        page.wait_for("!!document.querySelector('#tokenhits li[data-latent]')")
        assert page.evaluate("document.querySelector('#tokenhits li').dataset.latent") == "0"
        page.click("#tokenhits li[data-latent='0'] a")
        page.wait_for("document.querySelectorAll('.ctx[data-section=\"top\"]').length === 16")
        assert page.evaluate("location.hash") == "#latent=0"

        rows = page.evaluate(TOP_CONTEXTS)
        for row in rows:
            assert any(text == "e" and act > 0 for text, act, _, _ in row)
            for text, act, pos, background in row:
                shaded = text == "e" and pos >= 1
                assert (act > 0) == shaded, row
                assert (background != "rgba(0, 0, 0, 0)") == shaded, row
        assert float(field(page, "max")) == fmt4(float(acts[:, 0].max())) == 1.0  # 4 digits
        assert field(page, "count") == f"{int((acts[:, 0] > 0).sum())} tokens"
        shot = page.screenshot(tmp_path / "latent-0.png")

        # Back to the index; search a latent by id, open it, read its maximum.
        page.click(".latentnav a[href='#']")
        page.wait_for("!!document.querySelector('#search')")
        page.evaluate("document.querySelector('#search').focus()")
        page.type_text("2")
        page.wait_for("!!document.querySelector('#jump-link')")
        page.click("#jump-link")
        page.wait_for("document.querySelector('#latent-title')?.textContent === 'Latent 2'")
        assert float(field(page, "max")) == fmt4(float(acts[:, 2].max()))
        page.wait_for("!!document.querySelector('ol.neighbours li a')")
        assert page.evaluate("document.querySelector('ol.neighbours li a').textContent") == "3"
        urls = page.requested_urls()
    assert urls and all(u.startswith("file://") for u in urls), urls  # nothing from a network

    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert image.size[0] >= 800 and len(colours) > 20  # not blank: text, shading, histogram
    white = max(colours)[0]
    assert white < 0.98 * image.size[0] * image.size[1]


def test_the_grafana_dashboard_links_to_the_browser() -> None:
    root = Path(__file__).resolve().parent.parent
    d = json.loads((root / "deploy" / "grafana" / "dashboards" / "saestream.json").read_text())
    link = next(x for x in d["links"] if x["title"] == "Feature browser")
    assert link["type"] == "link" and link["url"] == "${features_url}"
    var = next(v for v in d["templating"]["list"] if v["name"] == "features_url")
    assert var["type"] == "textbox" and var["query"].startswith("http")


def test_the_readme_shows_a_committed_screenshot() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("<!-- section:features:begin -->"):
                     readme.index("<!-- section:features:end -->")]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
    assert images, "no screenshot in the README's feature browser section"
    data = (root / images[0]).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000


# -- builds swap atomically; the daemon refreshes them -----------------------------------------


def test_a_reader_always_lands_in_a_complete_build_while_builds_replace_each_other(
        tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae_dir = planted_sae(tmp_path / "step-00000001" / "planted")
    lm = load_model("tiny", device="cpu")
    ids = eval_ids(lm, corpus, split="eval", seq_len=SEQ, contexts=None, tokens=500)
    saes = [(load_sae(sae_dir), HOOK)]
    texts = [chr(i) for i in range(lm.vocab_size)]
    out = tmp_path / "browser"
    done, seen, problems = threading.Event(), set(), []

    def read() -> None:  # what a person reloading DIR/index.html would get, as fast as it goes
        while not done.is_set():
            if not (out / "index.html").exists():
                continue
            m = re.search(r'href="([^"/]+)/planted/index.html"', (out / "index.html").read_text())
            if m is None:
                problems.append("index.html names no build")
                continue
            try:
                doc = load_js(out / m.group(1) / "planted" / "index.js")
                load_js(out / m.group(1) / "planted" / "latents" / "0.js")
                load_js(out / m.group(1) / "tokens.js")
            except (OSError, ValueError) as exc:
                if (out / m.group(1)).exists():  # not pruned meanwhile: it was half there
                    problems.append(f"{m.group(1)}: {exc}")
                continue
            seen.add(m.group(1))
            assert doc["summary"]["sae"] == "planted"

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(5):
            built = build_browser(out, lm, ids, saes, label="step-00000001", texts=texts)
    finally:
        done.set()
        reader.join()
    assert problems == []
    assert len(seen) >= 2
    builds = sorted(p.name for p in out.iterdir() if p.name.startswith("b0"))
    assert builds == [f"b{i:06d}-step-00000001" for i in range(6 - KEEP_BUILDS, 6)]
    assert (out / "latest").read_text().strip() == builds[-1] == built.build.name
    assert not list(out.glob(".tmp-*"))


def trainer(seed: int) -> Trainer:
    torch.manual_seed(seed)
    return Trainer(SAEConfig(d_in=64, n_latents=64, k=4, input_normalization="layer_norm"),
                   TrainerConfig(), name="sae", hook="model.layers.2", model="tiny")


def test_the_evaluator_daemon_refreshes_the_browser_for_each_new_snapshot(tmp_path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "browser"
    cfg = EvaluatorConfig(checkpoint_dir=ckpt, corpus="synthetic:300", seq_len=16, contexts=4,
                          device="cpu", poll_seconds=0.1, metrics_port=0, features=out,
                          history=tmp_path / "history.jsonl")
    stop = threading.Event()
    metrics = EvaluatorMetrics()
    daemon = threading.Thread(target=run_evaluator, args=(cfg, stop, metrics))
    daemon.start()

    def newest() -> dict | None:
        try:
            build = out / (out / "latest").read_text().strip()
            return load_js(build / "sae" / "index.js")["summary"]  # type: ignore[index]
        except (OSError, ValueError):
            return None

    def wait(step: int) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            s = newest()
            if s is not None and s["step"] == step:
                return s
            time.sleep(0.1)
        raise AssertionError(f"no browser of step {step}")

    try:
        save_snapshot(ckpt, 3, {"sae": trainer(0)})
        first = wait(3)
        save_snapshot(ckpt, 7, {"sae": trainer(1)})
        second = wait(7)
    finally:
        stop.set()
        daemon.join(60)
    assert not daemon.is_alive()
    # the header carries the evaluation the daemon just made of the same contexts
    lines = [json.loads(x) for x in cfg.history.read_text().splitlines()]  # type: ignore[union-attr]
    assert [r["step"] for r in lines] == [3, 7]
    assert lines[1]["features"] == str(out / "index.html")
    assert second["delta_ce"] == pytest.approx(lines[1]["saes"]["sae"]["downstream"]["delta_ce"],
                                               rel=1e-3)
    assert first["tokens"] == second["tokens"] == 4 * 15
    assert second["hook"] == "model.layers.2" and second["corpus"] == "synthetic:300"


# -- hostile disks, eval.json and weights ------------------------------------------------------


def features_argv(sae: Path, out: Path, corpus: str, *extra: str) -> list[str]:
    return ["features", str(sae), "--out", str(out), "--corpus", corpus, "--seq-len", str(SEQ),
            "--tokens", "300", "--device", "cpu", *extra]


def assert_one_error_line(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error: "), res.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("free_kb", [0, 40])
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, free_kb: int) -> None:
    """No space (or 40 kB, less than a build) under a new --out: one line, exit 2, and the
    folder this run made is gone, so no half-written browser is left looking complete."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae = planted_sae(tmp_path / "step-00000001" / "planted")
    with tmpfs_at(tmp_path / "mnt", "1m") as mnt:
        fill(mnt)
        if free_kb:
            os.truncate(mnt / "fill", (mnt / "fill").stat().st_size - free_kb * 1024)
        out = mnt / "browser" / "new"
        res = run_cli(features_argv(sae, out, corpus), timeout=300)
        left = sorted(p.name for p in mnt.iterdir())
    assert_one_error_line(res, f"--out {out}: could not write (No space left on device)")
    assert left == ["fill"]


def test_a_build_that_fails_on_a_full_disk_leaves_the_previous_one_presented(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae = planted_sae(tmp_path / "step-00000001" / "planted")
    with tmpfs_at(tmp_path / "mnt", "2m") as mnt:
        out = mnt / "browser"
        first = run_cli(features_argv(sae, out, corpus), timeout=300)
        assert first.returncode == 0, first.stderr
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        builds = sorted(p.name for p in out.iterdir() if p.is_dir())
        fill(mnt)
        res = run_cli(features_argv(sae, out, corpus), timeout=300)
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == builds
        assert load_js(out / builds[0] / "planted" / "index.js")["summary"]["sae"] == "planted"
    assert_one_error_line(res, f"--out {out}: could not write (No space left on device)")
    assert after == before  # index.html and latest still name the first build; no temporary


@pytest.mark.parametrize(("doc", "warning"), [
    ({"downstream": 5, "explanations": {"per_latent": 7}},
     "downstream is int, not an object; explanations.per_latent is int, not a list"),
    ({"explanations": {"per_latent": [{"latent": 1, "patterns": 5}]}},
     "1 of the 1 explanations.per_latent entries malformed"),
    ({"downstream": {"delta_ce": "big", "loss_recovered": 0.5}, "tokens": [1],
      "explanations": {"per_latent": [{"latent": 1, "explanation": ["e"], "precision": 0.5,
                                       "recall": 1.0}, {"latent": "2"}]}},
     "downstream.delta_ce not a number; tokens is list, not an integer; 1 of the 2"),
    ([1, 2], None),
])
def test_a_malformed_eval_json_is_left_out_with_one_warning(tmp_path, doc, warning) -> None:
    """eval.json is optional: its malformed parts are left out of the browser (one warning
    line), the rest shown, the browser written."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae = planted_sae(tmp_path / "step-00000001" / "planted")
    (sae / "eval.json").write_text(json.dumps(doc))
    out = tmp_path / "browser"
    res = run_cli(features_argv(sae, out, corpus), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    if warning is None:  # not an object: read as no eval.json, as an unreadable one is
        assert res.stderr == ""
    else:
        assert res.stderr.splitlines() == [
            f"{sae / 'eval.json'}: left out of the browser, as malformed: "
            + res.stderr.split("as malformed: ", 1)[1].strip()]
        assert warning in res.stderr
    index = load_js(out / (out / "latest").read_text().strip() / "planted" / "index.js")
    kept = doc.get("downstream") if isinstance(doc, dict) else None
    assert index["summary"]["delta_ce"] is None
    assert index["summary"]["loss_recovered"] == (0.5 if isinstance(kept, dict) else None)
    assert index["summary"]["evaluated_tokens"] is None
    assert index["explanations"] == ({"1": {"text": "e", "precision": 0.5, "recall": 1.0}}
                                     if warning and "1 of the 2" in warning else {})


def test_non_finite_weights_are_one_line(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae = planted_sae(tmp_path / "step-00000001" / "planted")
    weights = load_file(str(sae / "sae.safetensors"))
    weights["b_dec"][0] = float("inf")
    save_file(weights, str(sae / "sae.safetensors"))
    res = run_cli(features_argv(sae, tmp_path / "browser", corpus), timeout=300)
    assert_one_error_line(res, "b_dec")
    assert not (tmp_path / "browser").exists()


def test_non_finite_activations_and_weights_are_feature_errors(tmp_path) -> None:
    """The browser's own checks, whatever the loader lets through: an inf in b_dec (loaded
    SAE changed in memory) is refused before encoding; inf or NaN codes are refused by the
    encoder and by the statistics (never a bincount crash)."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    lm = load_model("tiny", device="cpu")
    ids = eval_ids(lm, corpus, split="eval", seq_len=SEQ, contexts=None, tokens=300)
    loaded = load_sae(planted_sae(tmp_path / "step-00000001" / "planted"))
    with torch.no_grad():
        loaded.sae.b_dec[0] = float("inf")
    texts = [chr(i) for i in range(lm.vocab_size)]
    with pytest.raises(FeatureError, match=r"SAE planted: non-finite weights .* b_dec"):
        build_browser(tmp_path / "browser", lm, ids, [(loaded, HOOK)], label="x", texts=texts)
    assert not (tmp_path / "browser").exists()
    with pytest.raises(FeatureError, match="SAE planted: non-finite activations"):
        encode_contexts(lm.model, ids, [(loaded, HOOK)])
    for bad in (float("inf"), float("nan")):
        values = torch.tensor([[1.0, 0.5], [bad, 0.2]])
        codes = Codes(values, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), {})
        with pytest.raises(FeatureError, match="non-finite activations"):
            latent_stats(codes, torch.tensor([3, 4]), 4, 8, FeatureSettings())


def test_an_eval_json_that_is_no_file_is_refused_or_left_out_without_blocking(tmp_path) -> None:
    """A FIFO as the default eval.json blocked the build forever and /dev/zero grew the
    process without bound: read as every other snapshot file is, at most 64 MiB."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae = planted_sae(tmp_path / "step-00000001" / "planted")
    os.mkfifo(sae / "eval.json")
    res = run_cli(features_argv(sae, tmp_path / "browser", corpus), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "eval.json: not a regular file (a FIFO)" in res.stderr
    res = run_cli(features_argv(sae, tmp_path / "other", corpus, "--eval-json", "/dev/zero"),
                  timeout=300)
    assert_one_error_line(res, "--eval-json /dev/zero: not a regular file")


def test_a_dangling_temporary_link_does_not_stop_later_builds(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sae = planted_sae(tmp_path / "step-00000001" / "planted")
    out = tmp_path / "browser"
    assert run_cli(features_argv(sae, out, corpus), timeout=300).returncode == 0
    (out / ".tmp-b000009-gone").symlink_to(tmp_path / "nowhere")
    old = time.time() - 7200
    os.utime(out / ".tmp-b000009-gone", (old, old), follow_symlinks=False)
    res = run_cli(features_argv(sae, out, corpus), timeout=300)
    assert res.returncode == 0, res.stderr
    assert not os.path.lexists(out / ".tmp-b000009-gone")
    assert (out / "latest").read_text().startswith("b000002-")


def test_sigterm_during_a_build_removes_what_it_wrote(tmp_path) -> None:
    """SIGTERM while the build's files are written: exit 143 (not killed outright), the
    unfinished build removed, the previous one still presented."""
    big = Trainer(SAEConfig(d_in=64, n_latents=8192, k=32, input_normalization="layer_norm"),
                  TrainerConfig(), name="big", hook="model.layers.2", model="tiny")
    snap = save_snapshot(tmp_path / "ckpt", 1, {"big": big})
    out = tmp_path / "browser"
    argv = ["features", str(snap), "--out", str(out), "--corpus", "synthetic", "--seq-len", "64",
            "--tokens", "20000", "--device", "cpu"]
    assert run_cli(argv, timeout=300).returncode == 0
    presented = (out / "latest").read_text()
    for _ in range(3):
        proc = subprocess.Popen(saestream_cmd(*argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while not list(out.glob(".tmp-*")) and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        presented = (out / "latest").read_text()  # it ended first: try again
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".*.tmp-*"))
    assert (out / "latest").read_text() == presented
