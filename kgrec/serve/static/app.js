// kgrec web page: plain JS, no build step. Every piece of data is inserted with textContent (never innerHTML).
"use strict";

const K = 12;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = { User: "#2f6fde", Item: "#e0782f", Brand: "#8a4fd3", Category: "#2e9e6a",
                 AttributeValue: "#c2417f", Entity: "#6b7380" };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function status(msg, isError = false) {
  const s = $("status");
  s.textContent = msg;
  s.className = isError ? "error" : "muted";
}

async function getJSON(url, opts) {
  const resp = await fetch(url, opts);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    let detail = body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    throw new Error(`${resp.status}: ${detail || resp.statusText}`);
  }
  return body;
}

const short = (s, n) => (s.length > n ? s.slice(0, n - 1) + "…" : s);

// ------------------------------------------------------------------------------------------------ results grid
let currentMode = null;  // "recommend" | "search"

function renderResults(results, mode) {
  currentMode = mode;
  const grid = $("results");
  grid.replaceChildren();
  for (const r of results) {
    const card = el("article", { class: "card", "data-item": r.item_id, tabindex: "0" });
    if (r.image_url) {
      card.append(el("img", { src: r.image_url, alt: r.title || r.item_id, loading: "lazy" }));
    } else {
      card.append(el("div", { class: "noimg" }, "no image"));
    }
    const meta = el("div", { class: "meta" });
    meta.append(el("div", { class: "title" }, r.title || r.item_id));
    const sub = el("div", { class: "sub" });
    sub.append(el("span", {}, `#${r.rank} · ${r.item_id}`));
    sub.append(el("span", {}, r.score === null ? "" : r.score.toFixed(3)));
    meta.append(sub);
    card.append(meta);
    const open = () => select(card, r);
    card.addEventListener("click", open);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    grid.append(card);
  }
  if (results.length) select(grid.firstElementChild, results[0]);
}

async function select(card, r) {
  for (const c of document.querySelectorAll(".card.selected")) c.classList.remove("selected");
  card.classList.add("selected");
  if (r.explanation) return renderExplanation(r.explanation, r);
  const user = $("user-picker").value;
  if (user) {
    try {
      const e = await getJSON(`/explain?user=${encodeURIComponent(user)}&item=${encodeURIComponent(r.item_id)}`);
      return renderExplanation(e, r);
    } catch (err) {
      status(`explanation unavailable: ${err.message}`, true);
    }
  }
  renderItemOnly(r);
}

// ------------------------------------------------------------------------------------------------ explanation
function renderItemOnly(r) {
  const panel = $("explanation");
  panel.replaceChildren(el("h2", {}, r.title || r.item_id));
  if (r.image_url) panel.append(el("img", { class: "hero", src: r.image_url, alt: r.title || r.item_id }));
  if (r.sources) {
    panel.append(el("h3", {}, "Match"));
    for (const [k, v] of Object.entries(r.sources)) panel.append(el("div", { class: "kv" }, `${k} similarity: ${v === null ? "–" : v.toFixed(3)}`));
  }
  panel.append(el("p", { class: "muted" }, "Pick a user to see why this item would suit them."));
}

function renderExplanation(e, r) {
  const panel = $("explanation");
  panel.replaceChildren(el("h2", {}, e.item_title || r.title || e.item_id));
  if (r.image_url) panel.append(el("img", { class: "hero", src: r.image_url, alt: r.title || r.item_id }));
  panel.append(sentence(e.sentence));

  panel.append(el("h3", {}, "Knowledge-graph paths"));
  if (e.paths && e.paths.length) {
    for (const p of e.paths) panel.append(pathGraph(p));
  } else {
    panel.append(el("p", { class: "muted" }, "No graph path connects this user and item within 3 hops."));
  }

  panel.append(el("h3", {}, "Why the ranker scored it"));
  panel.append(contributionChart(e.all_contributions || {}, e.features || []));
  for (const f of e.features || []) {
    const row = sentence(`+${f.contribution.toFixed(3)} · ${f.phrase}`);
    row.className = "kv";
    panel.append(row);
  }

  const m = e.modality || {};
  if (m.weights) {
    const w = m.weights;
    panel.append(el("h3", {}, "Modality weights"));
    panel.append(el("div", { class: "kv" },
      `text ${(w.text * 100).toFixed(0)}% · image ${(w.image * 100).toFixed(0)}% · graph ${(w.graph * 100).toFixed(0)}%` +
      (m.dominant ? ` (dominant: ${m.dominant})` : "")));
  }
}

// The explanation sentence marks item titles with *asterisks*: show them in italics (text nodes only, no HTML).
function sentence(text) {
  const p = el("p", { class: "sentence" });
  text.split("*").forEach((part, i) => p.append(i % 2 ? el("em", {}, part) : document.createTextNode(part)));
  return p;
}

// A KG path user -> ... -> item as a small left-to-right graph: coloured nodes, labelled arrows.
function pathGraph(p) {
  const n = p.nodes.length, W = 380, H = 64, r = 9, margin = 46;
  const step = (W - 2 * margin) / Math.max(n - 1, 1);
  const x = (i) => margin + i * step, y = 24;
  const svg = svgEl("svg", { width: "100%", viewBox: `0 0 ${W} ${H}`, class: "path", role: "img", "aria-label": p.text });
  svg.append(svgEl("title", {}, p.text));
  const defs = svgEl("defs");
  const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "6", markerHeight: "6", orient: "auto-start-reverse" });
  marker.append(svgEl("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8a92a0" }));
  defs.append(marker);
  svg.append(defs);
  p.rels.forEach((rel, i) => {
    const x1 = x(i) + r + 2, x2 = x(i + 1) - r - 2;
    const line = svgEl("line", { x1, y1: y, x2, y2: y, stroke: "#8a92a0", "stroke-width": "1.5" });
    line.setAttribute(rel.forward ? "marker-end" : "marker-start", "url(#arrow)");
    svg.append(line);
    svg.append(svgEl("text", { x: (x1 + x2) / 2, y: y - 6, "text-anchor": "middle", fill: "#4b5261" }, rel.type));
  });
  p.nodes.forEach((node, i) => {
    const g = svgEl("g");
    g.append(svgEl("title", {}, `${node.label}: ${node.name} (${node.id})`));
    g.append(svgEl("circle", { cx: x(i), cy: y, r, fill: COLORS[node.label] || "#6b7380" }));
    g.append(svgEl("text", { x: x(i), y: y + r + 12, "text-anchor": "middle", fill: "#1d2330" }, short(node.name || node.id, 15)));
    g.append(svgEl("text", { x: x(i), y: y + r + 23, "text-anchor": "middle", fill: "#8a92a0" }, node.label));
    svg.append(g);
  });
  return svg;
}

// Horizontal bars of the largest SHAP contributions (positive pushes the score up, negative down).
function contributionChart(all, cited) {
  const citedNames = new Set(cited.map((f) => f.name));
  const rows = Object.entries(all).filter(([, v]) => v !== null && v !== 0)
    .sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 8);
  const W = 380, rowH = 16, labelW = 170, H = rows.length * rowH + 6;
  const svg = svgEl("svg", { width: "100%", viewBox: `0 0 ${W} ${Math.max(H, 20)}`, class: "contrib", role: "img",
                             "aria-label": "feature contributions" });
  if (!rows.length) {
    svg.append(svgEl("text", { x: 0, y: 14, fill: "#6b7380" }, "no contributions"));
    return svg;
  }
  const maxAbs = Math.max(...rows.map(([, v]) => Math.abs(v)));
  const mid = labelW + (W - labelW) / 2, half = (W - labelW) / 2 - 46;
  svg.append(svgEl("line", { x1: mid, y1: 0, x2: mid, y2: H, stroke: "#c5cbd5" }));
  rows.forEach(([name, v], i) => {
    const y = i * rowH + 3, w = (Math.abs(v) / maxAbs) * half;
    svg.append(svgEl("text", { x: labelW - 4, y: y + 10, "text-anchor": "end",
                               "font-weight": citedNames.has(name) ? "700" : "400", fill: "#1d2330" }, short(name, 28)));
    svg.append(svgEl("rect", { x: v >= 0 ? mid : mid - w, y, width: Math.max(w, 1), height: rowH - 4,
                               fill: v >= 0 ? "#2f6fde" : "#d0463c", rx: "2" }));
    svg.append(svgEl("text", { x: v >= 0 ? mid + w + 3 : mid - w - 3, y: y + 10, "text-anchor": v >= 0 ? "start" : "end",
                               fill: "#4b5261" }, (v >= 0 ? "+" : "") + v.toFixed(3)));
  });
  return svg;
}

// ------------------------------------------------------------------------------------------------ actions
async function onSearch(ev) {
  ev.preventDefault();
  const text = $("search-text").value.trim();
  const file = $("search-image").files[0];
  if (!text && !file) return status("type a query or choose an image", true);
  status("searching…");
  try {
    let body;
    if (file) {
      const form = new FormData();
      form.append("image", file);
      if (text) form.append("text", text);
      form.append("k", String(K));
      body = await getJSON("/search", { method: "POST", body: form });
    } else {
      body = await getJSON(`/search?text=${encodeURIComponent(text)}&k=${K}`);
    }
    renderResults(body.results, "search");
    status(`${body.results.length} results for ${file ? "the image" + (text ? " + text" : "") : `"${text}"`} in ${body.took_ms.toFixed(0)} ms`);
  } catch (err) {
    status(`search failed: ${err.message}`, true);
  }
}

async function onRecommend(ev) {
  ev.preventDefault();
  const user = $("user-picker").value;
  if (!user) return status("no user to recommend for", true);
  const query = $("user-query").value.trim();
  status("recommending…");
  try {
    let url = `/recommend?user=${encodeURIComponent(user)}&k=${K}&explain=true`;
    if (query) url += `&query=${encodeURIComponent(query)}`;
    const body = await getJSON(url);
    renderResults(body.results, "recommend");
    status(`${body.results.length} recommendations for ${user} in ${body.took_ms.toFixed(0)} ms`);
  } catch (err) {
    status(`recommend failed: ${err.message}`, true);
  }
}

async function init() {
  $("search-form").addEventListener("submit", onSearch);
  $("user-form").addEventListener("submit", onRecommend);
  try {
    const h = await getJSON("/health");
    $("health").textContent = `${h.items.toLocaleString()} items · ${h.users.toLocaleString()} users · ${h.store}`;
    const u = await getJSON("/users?limit=200");
    const picker = $("user-picker");
    for (const id of u.users) picker.append(el("option", { value: id }, id));
    document.body.dataset.ready = "true";
  } catch (err) {
    status(`cannot reach the service: ${err.message}`, true);
  }
}

init();
