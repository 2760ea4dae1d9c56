// camsweep explorer: the page is a view of the JSON API (/api/meta, /api/images,
// /api/image, /api/overlay, /api/photo). State lives in the URL hash, so a view can be
// bookmarked, reloaded and opened by tests. Data reaches the DOM only as textContent or
// attribute values: never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
let META = null;
const FILTERS = ["q", "map", "job", "class", "correct", "status", "per_class", "top"];
const SHOWN = ["job", "row", "file", "label_name", "pred_name", "correct", "score", "map",
               "status"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "cls") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function state() { return new URLSearchParams(location.hash.slice(1)); }
function setState(changes, keepOffset) {
  const s = state();
  for (const [k, v] of Object.entries(changes)) {
    if (v === null || v === undefined || v === "") s.delete(k); else s.set(k, v);
  }
  if (!keepOffset) s.delete("offset");
  const hash = s.toString();
  if (hash === location.hash.slice(1)) render(); else location.hash = hash;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 0.001 || a >= 1e5) ? v.toExponential(2) : v.toFixed(3);
  }
  return String(v);
}

async function api(path, params) {
  const url = path + (params ? "?" + params.toString() : "");
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function overlayUrl(job, row, map, size) {
  const s = state();
  const p = new URLSearchParams({row: row, map: map, size: size,
                                 alpha: s.get("alpha") || "0.5"});
  if (job !== "") p.set("job", job);
  if (s.get("cmap")) p.set("cmap", s.get("cmap"));
  return "/api/overlay?" + p.toString();
}

function fillSelect(select, values, labels, first) {
  select.replaceChildren();
  if (first) select.append(el("option", {value: first[0], text: first[1]}));
  values.forEach((v, i) => select.append(el("option", {value: v, text: labels ? labels[i] : v})));
}

async function init() {
  META = await api("/api/meta");
  $("summary").textContent = `${META.images} images · ${META.maps.length} map` +
    (META.maps.length === 1 ? "" : "s") + (META.sweep ? ` · ${META.jobs.length} jobs` : "");
  fillSelect($("map"), META.maps, null, ["all", "all maps"]);
  if (META.sweep) {
    $("job-box").hidden = false;
    fillSelect($("job"), META.jobs, META.jobs.map((j) => "job " + j), ["", "all jobs"]);
  }
  fillSelect($("sort"), META.columns);
  fillSelect($("range-col"), META.numeric, null, ["", "metric…"]);
  fillSelect($("worst-metric"), META.numeric);
  fillSelect($("cmap"), META.cmaps);
  fillSelect($("d-cmap"), META.cmaps);
  const dl = $("classes");
  META.classes.forEach((c) => dl.append(el("option", {value: c})));
  if (META.numeric.includes("deletion_auc")) $("worst-metric").value = "deletion_auc";
  bind();
  window.addEventListener("hashchange", render);
  await render();
}

function bind() {
  const on = (id, ev, fn) => $(id).addEventListener(ev, fn);
  let typing = null;
  on("q", "input", () => { clearTimeout(typing);
    typing = setTimeout(() => setState({q: $("q").value}), 250); });
  on("map", "change", () => setState({map: $("map").value}));
  on("job", "change", () => setState({job: $("job").value}));
  on("cls", "change", () => setState({class: $("cls").value}));
  on("correct", "change", () => setState({correct: $("correct").value}));
  on("status", "change", () => setState({status: $("status").value}));
  on("sort", "change", () => setState({sort: $("sort").value}));
  on("desc", "click", () => setState({desc: state().get("desc") === "1" ? "" : "1"}));
  on("limit", "change", () => setState({limit: $("limit").value}));
  on("view-grid", "click", () => setState({view: ""}, true));
  on("view-table", "click", () => setState({view: "table"}, true));
  const range = () => {
    const s = state();
    for (const k of [...s.keys()]) if (/^(min|max)_/.test(k)) s.delete(k);
    const col = $("range-col").value;
    if (col && $("range-min").value !== "") s.set("min_" + col, $("range-min").value);
    if (col && $("range-max").value !== "") s.set("max_" + col, $("range-max").value);
    s.delete("offset");
    location.hash = s.toString();
  };
  for (const id of ["range-col", "range-min", "range-max"]) on(id, "change", range);
  on("worst", "click", () => {
    const m = $("worst-metric").value;
    setState({sort: m, desc: META.higher_is_better.includes(m) ? "" : "1",
              top: $("worst-n").value || "20", per_class: "", status: "done"});
  });
  on("misclassified", "click", () => setState({correct: "0", top: "", per_class: ""}));
  on("per-class", "click", () => setState({per_class: $("per-class-n").value || "3",
                                           top: ""}));
  on("reset", "click", () => { location.hash = ""; });
  const live = (alpha, cmap) => () => setState({alpha: $(alpha).value, cmap: $(cmap).value},
                                              true);
  on("alpha", "change", live("alpha", "cmap"));
  on("cmap", "change", live("alpha", "cmap"));
  on("d-alpha", "input", live("d-alpha", "d-cmap"));
  on("d-cmap", "change", live("d-alpha", "d-cmap"));
  on("prev", "click", () => page(-1));
  on("next", "click", () => page(1));
  on("close", "click", () => setState({detail: ""}, true));
  $("detail").addEventListener("click", (e) => {
    if (e.target === $("detail")) setState({detail: ""}, true);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state().get("detail")) setState({detail: ""}, true);
  });
}

function page(step) {
  const s = state();
  const limit = Number(s.get("limit") || 48);
  const offset = Math.max(0, Number(s.get("offset") || 0) + step * limit);
  setState({offset: offset || ""}, true);
}

function query() {
  const s = state();
  const p = new URLSearchParams();
  for (const k of FILTERS) if (s.get(k)) p.set(k, s.get(k));
  if (mapShown()) p.set("map", mapShown()); else p.delete("map");
  for (const [k, v] of s) if (/^(min|max)_/.test(k)) p.set(k, v);
  p.set("sort", s.get("sort") || "row");
  if (s.get("desc") === "1") p.set("desc", "1");
  p.set("limit", s.get("limit") || "48");
  p.set("offset", s.get("offset") || "0");
  return p;
}

// One tile per image: the first map unless the view asks for another, or for all ("all");
// a sweep shows every job's maps (a layer sweep has one map per job).
function mapShown() {
  const m = state().get("map") || (META.sweep ? "all" : META.maps[0] || "");
  return m === "all" ? "" : m;
}

function syncControls() {
  const s = state();
  $("q").value = s.get("q") || "";
  $("map").value = mapShown() || "all";
  $("job").value = s.get("job") || "";
  $("cls").value = s.get("class") || "";
  $("correct").value = s.get("correct") || "";
  $("status").value = s.get("status") || "";
  $("sort").value = s.get("sort") || "row";
  $("desc").textContent = s.get("desc") === "1" ? "descending" : "ascending";
  $("limit").value = s.get("limit") || "48";
  for (const id of ["alpha", "d-alpha"]) $(id).value = s.get("alpha") || "0.5";
  for (const id of ["cmap", "d-cmap"]) $(id).value = s.get("cmap") || "jet";
  const table = s.get("view") === "table";
  $("view-grid").classList.toggle("on", !table);
  $("view-table").classList.toggle("on", table);
  const ranged = [...s.keys()].find((k) => /^(min|max)_/.test(k));
  if (ranged) {
    const col = ranged.slice(4);
    $("range-col").value = col;
    $("range-min").value = s.get("min_" + col) || "";
    $("range-max").value = s.get("max_" + col) || "";
  }
}

let generation = 0;
async function render() {
  const mine = ++generation;
  syncControls();
  const s = state();
  const msg = $("message");
  try {
    const data = await api("/api/images", query());
    if (mine !== generation) return;
    msg.textContent = "";
    msg.classList.remove("error");
    const offset = Number(s.get("offset") || 0);
    const main = $("results");
    main.replaceChildren(s.get("view") === "table" ? table(data.rows) : grid(data.rows));
    main.dataset.total = data.total;
    main.dataset.shown = data.rows.length;
    $("page").textContent = data.total ? `${offset + 1}–${offset + data.rows.length} of ` +
      `${data.total}` : "no image matches";
    $("prev").disabled = offset <= 0;
    $("next").disabled = offset + data.rows.length >= data.total;
  } catch (e) {
    msg.textContent = e.message;
    msg.classList.add("error");
    $("results").replaceChildren();
  }
  await detail(s.get("detail"));
}

function open(r) {
  return () => setState({detail: (r.job === "" ? "" : r.job + ":") + r.row}, true);
}

function caption(r) {
  const sort = state().get("sort");
  const bits = [];
  if (META.labeled) bits.push(r.label_name || String(r.label));
  if (r.status === "done") bits.push((META.labeled ? "→ " : "") + (r.pred_name || r.pred));
  else bits.push(r.status);
  const line2 = [];
  if (!mapShown() && META.maps.length > 1) line2.push(r.map);
  if (META.sweep) line2.push("job " + r.job);
  if (sort && META.numeric.includes(sort)) line2.push(`${sort} ${fmt(r[sort])}`);
  return [bits.join(" "), line2.join(" · ")];
}

function grid(rows) {
  const box = el("div", {cls: "grid"});
  for (const r of rows) {
    const [a, b] = caption(r);
    const pic = r.status === "done"
      ? el("img", {src: overlayUrl(r.job, r.row, r.map, 320), loading: "lazy", alt: r.file})
      : el("div", {cls: "nopic", text: r.status === "failed" ? (r.error || "failed")
                                                               : "not computed"});
    const mark = r.correct === null ? "" : r.correct ? "ok" : "wrong";
    box.append(el("button", {cls: `card ${r.status} ${mark}`, type: "button",
                             title: r.path, onclick: open(r)},
      pic, el("span", {cls: "file", text: r.file}), el("span", {cls: "meta", text: a}),
      b ? el("span", {cls: "meta dim", text: b}) : null));
  }
  return box;
}

function table(rows) {
  const unlabeled = ["label", "label_name", "correct"];
  const cols = [...SHOWN.filter((c) => META.columns.includes(c) && (c !== "job" || META.sweep)
                                && (META.labeled || !unlabeled.includes(c))),
                ...META.swept, ...META.numeric];
  const s = state();
  const head = el("tr", {}, el("th", {text: ""}));
  for (const c of cols) {
    const sorted = (s.get("sort") || "row") === c;
    const arrow = sorted ? (s.get("desc") === "1" ? " ▼" : " ▲") : "";
    head.append(el("th", {cls: sorted ? "sorted" : "", title: "sort by " + c,
      onclick: () => setState({sort: c, desc: sorted && s.get("desc") !== "1" ? "1" : ""})},
      el("span", {text: c + arrow})));
  }
  const body = el("tbody");
  for (const r of rows) {
    const tr = el("tr", {cls: r.status, onclick: open(r)});
    tr.append(el("td", {cls: "thumb"}, r.status === "done"
      ? el("img", {src: overlayUrl(r.job, r.row, r.map, 96), loading: "lazy", alt: ""}) : null));
    for (const c of cols) {
      const v = r[c];
      const text = c === "correct" ? (v === null ? "–" : v ? "yes" : "no") : fmt(v);
      tr.append(el("td", {cls: typeof v === "number" ? "num" : "", text: text}));
    }
    body.append(tr);
  }
  return el("div", {cls: "table-wrap"}, el("table", {cls: "rows"}, el("thead", {}, head), body));
}

function chart(curve) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 240, H = 120, L = 34, B = 20;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  const pts = curve.x.map((x, i) => [x, curve.y[i]]).filter((p) => p[1] !== null);
  const ys = pts.map((p) => p[1]);
  const lo = Math.min(0, ...ys), hi = Math.max(...ys, lo + 1e-9);
  const x0 = Math.min(...curve.x), x1 = Math.max(...curve.x, x0 + 1e-9);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - 6);
  const sy = (y) => 6 + (1 - (y - lo) / (hi - lo)) * (H - B - 6);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
  };
  add("line", {x1: L, y1: H - B, x2: W - 6, y2: H - B, class: "axis"});
  add("line", {x1: L, y1: 6, x2: L, y2: H - B, class: "axis"});
  add("polyline", {points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
                   class: "curve"});
  add("text", {x: L - 4, y: 12, class: "tick end"}, fmt(hi));
  add("text", {x: L - 4, y: H - B, class: "tick end"}, fmt(lo));
  add("text", {x: L, y: H - 5, class: "tick"}, fmt(x0));
  add("text", {x: W - 6, y: H - 5, class: "tick end"}, fmt(x1));
  add("text", {x: (L + W) / 2, y: H - 5, class: "tick mid"}, curve.xlabel);
  const title = document.createElementNS(NS, "title");
  title.textContent = curve.description;
  svg.prepend(title);
  return el("figure", {cls: "curve-box"}, svg, el("figcaption", {text: curve.name}));
}

let shownDetail = null;
async function detail(key) {
  const box = $("detail");
  if (!key) { box.hidden = true; shownDetail = null; document.body.classList.remove("modal");
              return; }
  const [job, row] = key.includes(":") ? key.split(/:(?=[^:]*$)/) : ["", key];
  if (shownDetail === key) {  // opacity or colormap changed: new pictures only
    for (const img of box.querySelectorAll("img.overlay")) {
      img.src = overlayUrl(img.dataset.job, img.dataset.row, img.dataset.map, 512);
    }
    return;
  }
  const p = new URLSearchParams({row: row});
  if (job) p.set("job", job);
  let d;
  try { d = await api("/api/image", p); } catch (e) {
    $("message").textContent = e.message;
    $("message").classList.add("error");
    box.hidden = true;
    return;
  }
  shownDetail = key;
  box.hidden = false;
  document.body.classList.add("modal");
  $("detail-title").textContent = d.file;
  const facts = el("dl", {cls: "facts"});
  const fact = (k, v) => facts.append(el("dt", {text: k}), el("dd", {text: v}));
  fact("path", d.path);
  if (d.label >= 0) fact("label", `${d.label_name || ""} (${d.label})`);
  if (d.status === "done") {
    fact("prediction", `${d.pred_name || ""} (${d.pred})` +
         (d.correct === null ? "" : d.correct ? " · correct" : " · wrong"));
    fact("explained", `class ${d.target}, score ${fmt(d.score)}`);
  } else {
    fact("status", d.status + (d.error ? ": " + d.error : ""));
  }
  if (d.size[0] > 0) fact("size", `${d.size[0]} × ${d.size[1]}`);
  const topk = el("table", {cls: "topk"}, el("thead", {}, el("tr", {},
    el("th", {text: "top-k"}), el("th", {text: "class"}), el("th", {text: "p"}))));
  d.topk.forEach((t, i) => topk.append(el("tr", {}, el("td", {text: String(i + 1)}),
    el("td", {text: `${t.name} (${t.class})`}), el("td", {cls: "num", text: fmt(t.prob)}))));
  const pq = new URLSearchParams(p);
  pq.set("size", "512");
  const photoQ = new URLSearchParams(pq);
  photoQ.set("crop", "1");
  const done = d.status === "done";  // other rows have no photo or box to show
  const head = el("div", {cls: "detail-head"}, facts, d.topk.length ? topk : null,
    done ? el("figure", {cls: "photo"}, el("img", {src: "/api/photo?" + pq.toString(),
                                                   alt: "the photo"}),
      el("figcaption", {text: "photo"})) : null,
    done ? el("figure", {cls: "photo"}, el("img", {src: "/api/photo?" + photoQ.toString(),
                                                   alt: "the region the model saw"}),
      el("figcaption", {text: "as the model saw it"})) : null);
  const views = el("div", {cls: "views"});
  for (const v of d.views) {
    const title = (META.sweep ? `job ${v.job} · ` : "") + v.map;
    const swept = Object.entries(v.swept).map(([k, x]) => `${k}=${x}`).join(" ");
    const values = el("table", {cls: "values"});
    for (const [k, x] of Object.entries(v.values)) {
      if (x !== null) values.append(el("tr", {}, el("th", {text: k}),
                                        el("td", {cls: "num", text: fmt(x)})));
    }
    const pic = v.status === "done"
      ? el("img", {cls: "overlay", src: overlayUrl(v.job, v.row, v.map, 512), alt: title,
                   "data-job": v.job, "data-row": String(v.row), "data-map": v.map})
      : el("div", {cls: "nopic", text: v.status});
    views.append(el("section", {cls: "view"}, el("h3", {text: title}),
      swept ? el("p", {cls: "dim", text: swept}) : null, pic, values,
      el("div", {cls: "curves"}, ...v.curves.map(chart))));
  }
  $("detail-body").replaceChildren(head, views);
}

init().catch((e) => { $("message").textContent = e.message; $("message").classList.add("error"); });
