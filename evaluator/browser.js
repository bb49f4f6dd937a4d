// The saestream feature browser: one page per SAE, routed by the URL's #hash
// (#q=TEXT&sort=KEY&desc=1&page=N for the index, #latent=ID for a latent), reading data files
// that are scripts calling SAEF.<name>(doc), since browsers refuse fetch() of file:// URLs.
// No network, no libraries. Text from the corpus is only ever set as textContent.
"use strict";

var SAEF = (function () {
  const S = { index: null, vocab: null, tokens: null, firesOn: null, pages: {}, scripts: {} };
  const PER_PAGE = 100;
  const view = () => document.getElementById("view");

  // -- loading data files ----------------------------------------------------------------------

  function load(src) {
    if (!S.scripts[src]) {
      S.scripts[src] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = src;
        s.onload = resolve;
        s.onerror = () => reject(new Error(src));
        document.head.appendChild(s);
      });
    }
    return S.scripts[src];
  }

  function gone(err) {
    view().replaceChildren(el("p", { class: "note error" },
      `Could not load ${err.message}: this build was probably replaced by a newer snapshot's `
      + "and removed. ", el("a", { href: "../../index.html" }, "Open the newest browser.")));
  }

  // -- small helpers ---------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }

  function pct(x) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0%";
    return (x * 100 < 0.01 ? (x * 100).toExponential(1) : fmt(x * 100)) + "%";
  }

  function text(id) {
    const t = S.vocab[id];
    if (t === undefined) return `#${id}`;
    return t === "" ? "∅" : t.replace(/\n/g, "↵").replace(/\t/g, "→");
  }

  function tokenChip(id) {
    return el("code", { class: "chip", title: `token id ${id}` }, text(id));
  }

  function params() {
    return new URLSearchParams(location.hash.slice(1));
  }

  function hasPage(id) {
    return S.rowOf.has(id) || S.deadPages.has(id);
  }

  function latentLink(id) {
    return hasPage(id) ? el("a", { href: `#latent=${id}`, class: "latent" }, String(id))
      : el("span", { class: "latent absent", title: "not in this browser" }, String(id));
  }

  // -- the summary header ----------------------------------------------------------------------

  function header() {
    const s = S.index.summary;
    const items = [
      ["model", s.model], ["hook", s.hook], ["SAE", s.sae],
      ["snapshot", s.step !== undefined && s.step !== null ? `step ${s.step}` : s.snapshot],
      ["k", s.k], ["latents", `${s.latents} (${s.alive} alive, ${s.dead} dead)`],
      ["tokens seen", `${s.tokens} (${s.corpus || "?"}, ${s.split || "?"} split)`],
      ["normalized MSE", fmt(s.normalized_mse)], ["L0", fmt(s.l0)],
      ["ΔCE", fmt(s.delta_ce)], ["loss recovered", fmt(s.loss_recovered)],
    ];
    const dl = el("dl", { class: "summary" });
    for (const [k, v] of items) {
      dl.append(el("div", { "data-field": k }, el("dt", {}, k), el("dd", {}, v ?? "–")));
    }
    const note = s.delta_ce === null || s.delta_ce === undefined
      ? " ΔCE and loss recovered: run `saestream eval` on the snapshot."
      : ` ΔCE and loss recovered measured by saestream eval`
        + (s.evaluated_tokens ? ` on ${s.evaluated_tokens} tokens.` : ".");
    document.getElementById("summary").replaceChildren(
      el("h1", {}, el("a", { href: "#" }, "saestream features"), ` — ${s.sae}`), dl,
      el("p", { class: "note" }, `Showing ${s.shown} latents: ${s.which}. Built ${s.built}, `
        + `saestream ${s.saestream_version}.${note}`));
  }

  // -- the index ---------------------------------------------------------------------------------

  const COLUMNS = [
    ["id", "latent"], ["count", "density"], ["max", "max"], ["mean", "mean when firing"],
    [null, "fires most on"], ["expl", "explanation"], ["precision", "precision"],
    ["recall", "recall"],
  ];

  function sortValue(key, row) {
    const L = S.index.latents;
    if (key === "expl") return S.expl[row] ? S.expl[row].text : "";
    if (key === "precision" || key === "recall") {
      const e = S.expl[row];
      return e && e[key] !== null ? e[key] : -1;
    }
    return L[key][row];
  }

  function showIndex() {
    const p = params();
    const input = el("input", { id: "search", type: "search", autocomplete: "off",
      placeholder: "latent id, token or text — e.g. 123 or Paris", value: p.get("q") || "" });
    const page = el("section", {},
      el("div", { class: "controls" }, input, el("span", { id: "count", class: "note" })),
      el("section", { id: "jump" }), el("section", { id: "tokenhits" }),
      el("table", { id: "table" }, el("thead", {}, el("tr", {})), el("tbody", {})),
      el("nav", { id: "pager" }), el("section", { id: "dead" }));
    view().replaceChildren(page);
    input.addEventListener("input", () => { setParams({ q: input.value, page: 0 }); results(); });
    input.addEventListener("keydown", (ev) => {
      const q = input.value.trim();
      if (ev.key === "Enter" && /^\d+$/.test(q) && hasPage(Number(q))) {
        location.hash = `latent=${q}`;
      }
    });
    results();
    deadList();
    input.focus();
  }

  function setParams(changes) {
    const p = params();
    for (const [k, v] of Object.entries(changes)) {
      if (v === "" || v === null || v === 0) p.delete(k); else p.set(k, v);
    }
    p.delete("latent");
    history.replaceState(null, "", "#" + p.toString());
  }

  function results() {
    const p = params();
    const q = (p.get("q") || "").trim();
    const sort = p.get("sort") || "count";
    const desc = p.get("desc") !== "0";
    const L = S.index.latents;
    let rows = [...L.id.keys()];
    if (/^\d+$/.test(q)) {
      rows = rows.filter((r) => L.id[r] === Number(q));
    } else if (q) {
      const needle = q.toLowerCase();
      rows = rows.filter((r) => S.haystack[r].includes(needle));
    }
    rows.sort((a, b) => {
      const x = sortValue(sort, a), y = sortValue(sort, b);
      return (x < y ? -1 : x > y ? 1 : L.id[a] - L.id[b]) * (desc ? -1 : 1);
    });
    const pages = Math.max(1, Math.ceil(rows.length / PER_PAGE));
    const at = Math.min(Number(p.get("page") || 0), pages - 1);
    document.getElementById("count").textContent =
      `${rows.length} of ${L.id.length} firing latents` + (q ? ` match “${q}”` : "");
    tableHead(sort, desc);
    const body = document.querySelector("#table tbody");
    body.replaceChildren(...rows.slice(at * PER_PAGE, (at + 1) * PER_PAGE).map(tableRow));
    pager(at, pages);
    jump(q);
    tokenHits(q);
  }

  function tableHead(sort, desc) {
    const tr = document.querySelector("#table thead tr");
    tr.replaceChildren(...COLUMNS.map(([key, label]) => {
      if (!key) return el("th", {}, label);
      const th = el("th", { class: "sortable", "data-sort": key },
        label + (key === sort ? (desc ? " ▼" : " ▲") : ""));
      th.addEventListener("click", () => {
        setParams({ sort: key, desc: key === sort && desc ? "0" : "1", page: 0 });
        results();
      });
      return th;
    }));
  }

  function tableRow(r) {
    const L = S.index.latents, s = S.index.summary, e = S.expl[r];
    const toks = el("td", { class: "tokens" });
    L.tokens[r].forEach((t, i) => {
      toks.append(tokenChip(t), el("small", {}, ` ${L.tokenCounts[r][i]} `));
    });
    return el("tr", { "data-latent": L.id[r] },
      el("td", {}, latentLink(L.id[r])),
      el("td", { title: `${L.count[r]} of ${s.tokens} tokens` }, pct(L.count[r] / s.tokens)),
      el("td", {}, fmt(L.max[r])), el("td", {}, fmt(L.mean[r])), toks,
      el("td", { class: "expl" }, e ? e.text : ""),
      el("td", {}, e ? fmt(e.precision) : ""), el("td", {}, e ? fmt(e.recall) : ""));
  }

  function pager(at, pages) {
    const nav = document.getElementById("pager");
    const go = (n) => { setParams({ page: n }); results(); };
    const prev = el("button", { type: "button" }, "← previous");
    const next = el("button", { type: "button" }, "next →");
    prev.disabled = at === 0;
    next.disabled = at >= pages - 1;
    prev.addEventListener("click", () => go(at - 1));
    next.addEventListener("click", () => go(at + 1));
    nav.replaceChildren(prev, el("span", {}, ` page ${at + 1} of ${pages} `), next);
  }

  function jump(q) {
    const box = document.getElementById("jump");
    box.replaceChildren();
    if (!/^\d+$/.test(q)) return;
    const id = Number(q);
    if (hasPage(id)) box.append(el("p", {}, el("a", { href: `#latent=${id}`, id: "jump-link" },
      `Open latent ${id} →`), S.deadPages.has(id) ? " (dead)" : ""));
    else box.append(el("p", { class: "note" }, id < S.index.summary.latents
      ? `Latent ${id} is not in this browser (${S.index.summary.which}).`
      : `The SAE has ${S.index.summary.latents} latents.`));
  }

  // which latents fire on a token: the tokens whose text is the query (spaces around it
  // ignored; case-insensitive when nothing matches exactly), their latents summed
  function tokenHits(q) {
    const box = document.getElementById("tokenhits");
    box.replaceChildren();
    if (!q || /^\d+$/.test(q)) return;
    load("fires_on.js").then(() => {
      if ((params().get("q") || "").trim() !== q) return;
      const occ = S.firesOn.occurrences;
      let toks = Object.keys(occ).filter((t) => (S.vocab[t] || "").trim() === q);
      if (!toks.length) {
        const lower = q.toLowerCase();
        toks = Object.keys(occ).filter((t) => (S.vocab[t] || "").trim().toLowerCase() === lower);
      }
      if (!toks.length) {
        box.append(el("p", { class: "note" }, `No token “${q}” among the tokens seen.`));
        return;
      }
      const total = toks.reduce((n, t) => n + occ[t], 0);
      const sums = new Map();
      for (const t of toks) {
        for (const [lat, n] of S.firesOn.latents[t]) sums.set(lat, (sums.get(lat) || 0) + n);
      }
      const ranked = [...sums.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, 20);
      const list = el("ol", { class: "hits" });
      for (const [lat, n] of ranked) {
        const r = S.rowOf.get(lat);
        const own = r !== undefined ? S.index.latents.count[r] : null;
        list.append(el("li", { "data-latent": lat }, latentLink(lat),
          ` fires on ${n} of ${total} (${pct(n / total)})`,
          own ? ` · ${pct(n / own)} of its firings` : "",
          r !== undefined && S.expl[r] ? ` · ${S.expl[r].text}` : ""));
      }
      box.append(el("h2", {}, "Latents firing on ", ...toks.map((t) => tokenChip(Number(t))),
        ` (${total} occurrences)`), list);
    }, gone);
  }

  function deadList() {
    const dead = S.index.dead, s = S.index.summary;
    const box = document.getElementById("dead");
    box.append(el("h2", {}, `Dead latents (${dead.length})`), el("p", { class: "note" },
      dead.length ? `Never fired on the ${s.tokens} tokens seen.` : "Every latent fired."));
    const list = el("p", { class: "deadlist" });
    dead.slice(0, 2000).forEach((id) => list.append(latentLink(id), " "));
    if (dead.length > 2000) list.append(`… and ${dead.length - 2000} more`);
    box.append(list);
  }

  // -- a latent ----------------------------------------------------------------------------------

  function showLatent(id) {
    view().replaceChildren(el("p", { class: "note" }, `loading latent ${id}…`));
    if (!hasPage(id)) {
      view().replaceChildren(el("p", { class: "note" }, `Latent ${id} is not in this browser `
        + `(${S.index.summary.which}). `, el("a", { href: "#" }, "All latents")));
      return;
    }
    const bundle = Math.floor(id / S.index.settings.bundle);
    Promise.all([load(`latents/${bundle}.js`), load("../tokens.js")]).then(() => {
      if (params().get("latent") !== String(id)) return;
      renderLatent(id, S.pages[id]);
    }, gone);
  }

  function renderLatent(id, page) {
    const r = S.rowOf.get(id), L = S.index.latents, s = S.index.summary;
    const max = r !== undefined ? L.max[r] : 0;
    const order = [...L.id, ...S.index.deadPages].sort((a, b) => a - b);
    const i = order.indexOf(id);
    const nav = el("nav", { class: "latentnav" }, el("a", { href: "#" }, "← all latents"),
      i > 0 ? el("a", { href: `#latent=${order[i - 1]}` }, `‹ ${order[i - 1]}`) : null,
      i < order.length - 1 ? el("a", { href: `#latent=${order[i + 1]}` }, `${order[i + 1]} ›`)
        : null);
    const stats = el("dl", { id: "stats", class: "summary" });
    const stat = (field, label, value, title) => stats.append(el("div", { "data-field": field,
      title }, el("dt", {}, label), el("dd", {}, value)));
    if (r === undefined) {
      stat("dead", "dead", `fired on none of the ${s.tokens} tokens seen`);
    } else {
      stat("density", "density", pct(L.count[r] / s.tokens), `${L.count[r]} of ${s.tokens} tokens`);
      stat("count", "fires on", `${L.count[r]} tokens`);
      stat("max", "max activation", fmt(max));
      stat("mean", "mean when firing", fmt(L.mean[r]));
      const e = S.expl[r];
      if (e) {
        stat("explanation", "explanation", e.text);
        stat("precision", "precision", fmt(e.precision));
        stat("recall", "recall", fmt(e.recall));
      }
    }
    const parts = [nav, el("h2", { id: "latent-title" }, `Latent ${id}`, r === undefined
      ? el("span", { class: "dead-badge" }, " dead") : null), stats];
    if (r !== undefined) {
      parts.push(el("h3", {}, "Activation histogram"), histogram(page.hist, max));
      parts.push(el("h3", {}, `Top activations (${page.top.length})`),
        contexts(page.top, max, "top"));
      parts.push(el("h3", {}, "Across the range: examples from each quantile band of its "
        + "firing activations"));
      const nb = page.bands.length;
      page.bands.forEach((b, k) => {
        if (!b.ex.length) return;
        parts.push(el("h4", {}, `Band ${k + 1} of ${nb} (${Math.round(100 * k / nb)}–`
          + `${Math.round(100 * (k + 1) / nb)}% from the top): activations ${fmt(b.lo)} – `
          + `${fmt(b.hi)}`), contexts(b.ex, max, `band${k + 1}`));
      });
    }
    parts.push(el("h3", {}, "Output tokens its decoder direction promotes and suppresses"));
    if (s.logit_effects) {
      parts.push(el("div", { class: "columns" },
        tokenList("promotes", page.promoted), tokenList("suppresses", page.suppressed)),
      el("p", { class: "note" }, "Decoder row through the final norm's gain and the unembedding "
        + "(logit per unit of the direction)."));
    } else {
      parts.push(el("p", { class: "note" }, `Not shown: hook ${s.hook} is not the residual `
        + "stream, so its direction does not reach the logits through the unembedding alone."));
    }
    parts.push(el("h3", {}, "Nearest latents by decoder cosine"));
    const near = el("ol", { class: "neighbours" });
    for (const [j, c] of page.neighbours) {
      near.append(el("li", {}, latentLink(j), ` cos ${fmt(c)}`));
    }
    parts.push(near);
    view().replaceChildren(...parts);
    window.scrollTo(0, 0);
  }

  function contexts(examples, max, section) {
    const T = S.tokens.seq_len, ids = S.tokens.ids, set = S.index.settings;
    const box = el("div", { class: "contexts" });
    for (const [c, p, acts] of examples) {
      const act = new Map(acts);
      const row = el("div", { class: "ctx", "data-section": section, "data-context": c,
        "data-position": p });
      row.append(el("span", { class: "val", title: "activation at the marked token" },
        fmt(act.get(p) || 0)));
      const line = el("span", { class: "line" });
      const from = Math.max(0, p - set.before), to = Math.min(T - 1, p + set.after);
      if (from > 0) line.append(el("span", { class: "ellipsis" }, "…"));
      for (let q = from; q <= to; q++) {
        const v = act.get(q) || 0;
        const tok = el("span", { class: "tok" + (q === p ? " focus" : ""), "data-act": v,
          "data-pos": q,
          title: q === 0 ? "position 0: never encoded" : `${fmt(v)} (token ${ids[c * T + q]})` },
          text(ids[c * T + q]));
        if (v > 0) {
          tok.style.backgroundColor = `rgba(255, 102, 0, ${Math.min(1, 0.1 + 0.9 * v / max)})`;
        }
        line.append(tok);
      }
      if (to < T - 1) line.append(el("span", { class: "ellipsis" }, "…"));
      row.append(line);
      box.append(row);
    }
    return box;
  }

  function histogram(counts, max) {
    const W = 600, H = 120, n = counts.length, top = Math.max(...counts, 1);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
    svg.setAttribute("class", "histogram");
    counts.forEach((c, i) => {
      const h = c ? Math.max(1, (H * c) / top) : 0;
      const bar = document.createElementNS(ns, "rect");
      bar.setAttribute("x", (i * W) / n + 1);
      bar.setAttribute("width", W / n - 2);
      bar.setAttribute("y", H - h);
      bar.setAttribute("height", h);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${c} tokens with activation in (${fmt((i * max) / n)}, `
        + `${fmt(((i + 1) * max) / n)}]`;
      bar.append(title);
      svg.append(bar);
    });
    for (const [x, label, anchor] of [[0, "0", "start"], [W, fmt(max), "end"]]) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x);
      t.setAttribute("y", H + 16);
      t.setAttribute("text-anchor", anchor);
      t.textContent = label;
      svg.append(t);
    }
    return svg;
  }

  function tokenList(title, pairs) {
    const ol = el("ol", { class: "logits" });
    for (const [t, v] of pairs) ol.append(el("li", {}, tokenChip(t), ` ${fmt(v)}`));
    return el("div", {}, el("h4", {}, title), ol);
  }

  // -- start ------------------------------------------------------------------------------------

  function route() {
    const id = params().get("latent");
    if (id !== null && /^\d+$/.test(id)) showLatent(Number(id));
    else showIndex();
  }

  function start() {
    const L = S.index.latents;
    S.rowOf = new Map(L.id.map((id, r) => [id, r]));
    S.deadPages = new Set(S.index.deadPages);
    S.expl = L.id.map((id) => S.index.explanations[id] || null);
    S.haystack = L.id.map((id, r) => [S.expl[r] ? S.expl[r].text : "",
      ...L.tokens[r].map((t) => S.vocab[t] || "")].join("\u0000").toLowerCase());
    header();
    window.addEventListener("hashchange", route);
    route();
  }

  return {
    index(doc) {
      S.index = doc;
      load("../vocab.js").then(start, gone);
    },
    vocab(doc) { S.vocab = doc; },
    tokens(doc) { S.tokens = doc; },
    firesOn(doc) { S.firesOn = doc; },
    latents(doc) { Object.assign(S.pages, doc); },
  };
})();
