// adaptd dashboard: vanilla JS, no build step. Talks to the public REST API (/v1) and the job event
// stream (GET /v1/jobs/{id}/events, Server-Sent Events) like any other client.
"use strict";

const app = document.getElementById("app");
const TERMINAL = ["succeeded", "failed", "cancelled"];
const COLORS = { before: "#a3adba", after: "#2f6fed", loss: "#2f6fed", entropy: "#d9822b", bad: "#c9302c" };
// one colour per job in the compare view: distinct hues, in this order
const PALETTE = ["#2f6fed", "#d9822b", "#13864f", "#c9302c", "#7b4bd6", "#0f9bb3", "#b7791f", "#d64d9b"];
let teardown = () => {};   // stops the timers / streams of the current view

// API key (servers with ADAPTD_AUTH=keys): a 401 shows a sign-in form; the key is POSTed once to
// /v1/session, which answers with an HttpOnly session cookie that fetch, EventSource and download links
// send by themselves. The key is never put in a URL or kept by this script.
function signIn(message) {
  teardown();
  app.innerHTML = `<form id="signin" class="signin"><h2>Sign in</h2>
    <label>API key <input id="api-key" type="password" autocomplete="current-password" required></label>
    <button type="submit">Sign in</button><p class="error-box" id="signin-error" hidden></p></form>`;
  const error = document.getElementById("signin-error");
  if (message) { error.textContent = message; error.hidden = false; }
  document.getElementById("signin").addEventListener("submit", async ev => {
    ev.preventDefault();
    const r = await fetch("/v1/session", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ api_key: document.getElementById("api-key").value }) });
    if (r.ok) { route(); return; }
    error.textContent = "That key was not accepted."; error.hidden = false;
  });
}

// ---------- helpers ------------------------------------------------------------------------------

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts));
  if (r.status === 401) { signIn(); throw new Error("sign-in required"); }
  if (!r.ok) {
    let msg = `HTTP ${r.status}`;
    try { const e = (await r.json()).error; msg = `${e.code}: ${e.message}`; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.json();
}
const pct = v => (v == null ? "–" : (100 * v).toFixed(1) + "%");
const num = (v, d = 3) => (v == null ? "–" : Number(v).toFixed(d));
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function ago(iso) {
  if (!iso) return "–";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 60) return Math.max(0, Math.round(s)) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(iso).toLocaleString();
}
function duration(a, b) {
  if (!a) return "–";
  const s = ((b ? new Date(b) : new Date()) - new Date(a)) / 1000;
  return s < 60 ? s.toFixed(1) + " s" : s < 3600 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(2) + " h";
}
function hms(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.round(s); const m = Math.floor(s / 60), r = s % 60;
  return m >= 60 ? `${Math.floor(m / 60)}:${String(m % 60).padStart(2, "0")}:${String(r).padStart(2, "0")}` : `${m}:${String(r).padStart(2, "0")}`;
}
const badge = st => `<span class="badge ${esc(st)}" data-status="${esc(st)}">${esc(st)}</span>`;
function deltaHtml(before, after, higherIsBetter = true) {
  if (before == null || after == null) return "";
  const d = after - before, good = higherIsBetter ? d > 0 : d < 0;
  return `<span class="delta ${Math.abs(d) < 1e-9 ? "" : good ? "up" : "down"}">${d >= 0 ? "+" : "−"}${(100 * Math.abs(d)).toFixed(1)} pt</span>`;
}

// ---------- SVG charts -------------------------------------------------------------------------------

// integer: ticks on whole numbers only (steps, counts)
function niceTicks(lo, hi, n = 5, integer = false) {
  if (!(hi > lo)) { hi = lo + 1; }
  const span = hi - lo, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  let step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= step0) || 10 * mag;
  if (integer) step = Math.max(1, Math.ceil(step));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}
function fmtTick(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(1) : +v.toPrecision(4) + "";
}

// series: [{name, color, points: [[x, y]], width, opacity}]; markers: [{x, label}]
function lineChart(id, title, series, opts = {}) {
  const W = 560, H = 240, L = 52, R = 12, T = 10, B = 30;
  const all = series.flatMap(s => s.points).filter(p => p[1] != null && isFinite(p[1]));
  if (!all.length) return `<div id="${id}" class="chart-box"><h2>${esc(title)}</h2><div class="empty">${esc(opts.empty || "no data yet")}</div></div>`;
  let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
  if (opts.yZero) y0 = Math.min(0, y0);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 + 1e-3; y0 -= Math.abs(y0) * 0.1 + 1e-3; }
  const pad = (y1 - y0) * 0.05; y1 += pad; if (!opts.yZero) y0 -= pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let g = "";
  for (const t of niceTicks(y0, y1)) g += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(t)}" y2="${sy(t)}"/><text x="${L - 6}" y="${sy(t) + 4}" text-anchor="end">${fmtTick(t)}</text>`;
  const integerX = all.every(p => Number.isInteger(p[0]));
  for (const t of niceTicks(x0, x1, 6, integerX)) g += `<text class="xtick" x="${sx(t)}" y="${H - B + 16}" text-anchor="middle">${fmtTick(t)}</text>`;
  g += `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/><line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
  for (const m of opts.markers || []) {
    g += `<line x1="${sx(m.x)}" x2="${sx(m.x)}" y1="${T}" y2="${H - B}" stroke="${COLORS.bad}" stroke-dasharray="4 3"/><text x="${sx(m.x) + 3}" y="${T + 10}" fill="${COLORS.bad}">${esc(m.label)}</text>`;
  }
  let paths = "";
  for (const s of series) {
    let pts = s.points.filter(p => p[1] != null && isFinite(p[1]));
    if (!pts.length) continue;
    const n = pts.length;
    if (n > 1500) { const k = Math.ceil(n / 1500); pts = pts.filter((_, i) => i % k === 0 || i === n - 1); }
    const d = pts.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join("");
    paths += `<path class="series" data-series="${esc(s.name)}" data-points="${n}" d="${d}" fill="none" stroke="${s.color}" stroke-width="${s.width || 1.5}" stroke-opacity="${s.opacity ?? 1}" stroke-linejoin="round"/>`;
  }
  const legend = series.filter(s => s.legend !== false).map(s => `<span data-color="${s.color}"><i style="background:${s.color};opacity:${s.opacity ?? 1}"></i>${esc(s.name)}</span>`).join("");
  return `<div id="${id}" class="chart-box" data-points="${all.length}"><h2>${esc(title)}</h2><div class="legend">${legend}</div>` +
    `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">${g}${paths}` +
    `<text x="${(L + W - R) / 2}" y="${H - 2}" text-anchor="middle">${esc(opts.xLabel || "step")}</text></svg></div>`;
}

function ema(points, alpha) {
  let m = null;
  return points.filter(p => p[1] != null && isFinite(p[1])).map(([x, y]) => [x, m = (m == null ? y : alpha * y + (1 - alpha) * m)]);
}

// categories: labels; series: [{name, color, values}]
function barChart(id, title, categories, series, opts = {}) {
  const W = 560, H = 240, L = 46, R = 10, T = 10, B = 34;
  const vals = series.flatMap(s => s.values).filter(v => v != null);
  if (!vals.length) return `<div id="${id}" class="chart-box"><h2>${esc(title)}</h2><div class="empty">no data</div></div>`;
  const yMax = opts.yMax ?? (Math.max(...vals) * 1.08 || 1);
  const sy = v => T + (1 - v / yMax) * (H - T - B);
  const groupW = (W - L - R) / categories.length, barW = Math.max(2, (groupW * 0.8) / series.length);
  let g = "";
  for (const t of niceTicks(0, yMax, 4)) {
    if (t > yMax) continue;
    g += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(t)}" y2="${sy(t)}"/><text x="${L - 6}" y="${sy(t) + 4}" text-anchor="end">${opts.pct ? Math.round(100 * t) + "%" : fmtTick(t)}</text>`;
  }
  g += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
  let bars = "", refSvg = "";
  if (opts.refLine != null && opts.refLine <= yMax) {  // over the bars, so it shows where they reach it; named in the legend
    refSvg = `<line class="ref-line" x1="${L}" x2="${W - R}" y1="${sy(opts.refLine).toFixed(1)}" y2="${sy(opts.refLine).toFixed(1)}" stroke="#1c2430" stroke-dasharray="5 4" stroke-width="1.2"/>`;
  }
  const every = Math.ceil(categories.length / 24);
  categories.forEach((c, i) => {
    const gx = L + i * groupW + groupW * 0.1;
    series.forEach((s, k) => {
      const v = s.values[i];
      if (v == null) return;
      const y = sy(v), h = Math.max(0, H - B - y);
      bars += `<rect class="bar" data-series="${esc(s.name)}" data-category="${esc(c)}" data-value="${v}" x="${(gx + k * barW).toFixed(1)}" y="${y.toFixed(1)}" width="${(barW - 1).toFixed(1)}" height="${h.toFixed(1)}" fill="${s.color}"><title>${esc(s.name)} · ${esc(c)}: ${opts.pct ? pct(v) : v}</title></rect>`;
    });
    if (i % every === 0) g += `<text x="${(L + i * groupW + groupW / 2).toFixed(1)}" y="${H - B + 14}" text-anchor="middle">${esc(c)}</text>`;
  });
  const legend = series.map(s => `<span data-color="${s.color}"><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("");
  const ref = opts.refLine != null ? `<span><i class="dash"></i>${esc(opts.refLabel || "")}</span>` : "";
  return `<div id="${id}" class="chart-box"><h2>${esc(title)}</h2><div class="legend">${legend}${ref}</div>` +
    `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">${g}${bars}${refSvg}` +
    `<text x="${(L + W - R) / 2}" y="${H - 2}" text-anchor="middle">${esc(opts.xLabel || "class")}</text></svg></div>`;
}

// ---------- job list ---------------------------------------------------------------------------------

function progressCell(j) {
  const p = j.progress;
  if (j.status === "running") {
    return `<span class="pbar"><span style="width:${(100 * p.fraction).toFixed(1)}%"></span></span> <span class="muted">${esc(p.phase || "")} ${p.done}/${p.total}</span>`;
  }
  return j.status === "succeeded" ? `<span class="muted">${p.total} batches</span>` : "";
}

// A job's name and tags, when the server gives them (older servers do not).
function nameTags(j) {
  const tags = Array.isArray(j.tags) ? j.tags : [];
  return (j.name ? ` <span class="job-name">${esc(j.name)}</span>` : "") + tags.map(t => ` <span class="tag">${esc(t)}</span>`).join("");
}
const errorCode = j => (j.error && j.error.code ? ` <span class="err-code mono" title="${esc(j.error.message)}">${esc(j.error.code)}</span>` : "");

function jobRow(j, selected) {
  const m = j.metrics || {};
  const acc = m.accuracy_before != null ? `${pct(m.accuracy_before)} → <b>${pct(m.accuracy_after)}</b> ${deltaHtml(m.accuracy_before, m.accuracy_after)}` : "–";
  const est = m.estimated_accuracy_after != null ? pct(m.estimated_accuracy_after) : "–";
  return `<tr class="job-row" data-job-id="${esc(j.id)}" data-status="${esc(j.status)}">
    <td><input type="checkbox" class="pick" value="${esc(j.id)}" aria-label="compare ${esc(j.id.slice(0, 8))}" ${selected ? "checked" : ""}></td>
    <td><a class="mono" href="#/jobs/${esc(j.id)}">${esc(j.id.slice(0, 8))}</a>${nameTags(j)}</td>
    <td>${esc(j.method)}</td><td>${badge(j.status)}${errorCode(j)}${m.collapse_detected ? ' <span class="badge collapse">collapse</span>' : ""}</td>
    <td>${progressCell(j)}</td><td title="${esc(j.created_at)}">${ago(j.created_at)}</td>
    <td>${duration(j.started_at, j.finished_at)}</td><td>${acc}</td><td>${est}</td>
    <td>${m.entropy_before != null ? num(m.entropy_before) + " → " + num(m.entropy_after) : "–"}</td></tr>`;
}

function listView() {
  let filter = sessionStorage.getItem("adaptd.filter") || "";
  const picked = new Set(JSON.parse(sessionStorage.getItem("adaptd.picked") || "[]"));
  app.innerHTML = `<div class="jobhead"><h1>Jobs</h1><button id="compare" disabled>Compare selected</button><span class="spacer"></span>
    <label class="muted">status <select id="filter">${["", "queued", "running", "succeeded", "failed", "cancelled"].map(s => `<option value="${s}" ${s === filter ? "selected" : ""}>${s || "all"}</option>`).join("")}</select></label></div>
    <div id="jobs-table"><p class="muted">Loading…</p></div>
    <p class="muted">Refreshes every 2 s. Submit jobs with <span class="mono">adaptd submit</span>, the Python client or <span class="mono">POST /v1/jobs</span>.</p>`;
  let timer = null, alive = true;
  async function refresh() {
    try {
      const page = await api(`/v1/jobs?limit=100${filter ? "&status=" + filter : ""}`);
      if (!alive) return;
      const box = document.getElementById("jobs-table");
      box.innerHTML = page.items.length ? `<table class="jobs" id="jobs"><thead><tr><th></th><th>Job</th><th>Method</th><th>Status</th><th>Progress</th><th>Created</th><th>Run time</th><th>Accuracy before → after</th><th>Est. accuracy</th><th>Entropy before → after</th></tr></thead><tbody>${page.items.map(j => jobRow(j, picked.has(j.id))).join("")}</tbody></table>`
        : `<div class="card empty">No jobs${filter ? " with status " + esc(filter) : ""} yet.</div>`;
    } catch (e) {
      if (alive) document.getElementById("jobs-table").innerHTML = `<div class="error-box">Cannot load jobs: ${esc(e.message)}</div>`;
    }
    if (alive) timer = setTimeout(refresh, 2000);
  }
  const compareBtn = document.getElementById("compare");
  function syncCompare() {
    compareBtn.disabled = picked.size < 2;
    compareBtn.textContent = picked.size ? `Compare selected (${picked.size})` : "Compare selected";
    sessionStorage.setItem("adaptd.picked", JSON.stringify([...picked]));
  }
  document.getElementById("jobs-table").addEventListener("change", ev => {
    if (!ev.target.classList.contains("pick")) return;
    if (ev.target.checked) picked.add(ev.target.value); else picked.delete(ev.target.value);
    syncCompare();
  });
  compareBtn.onclick = () => { location.hash = `#/compare/${[...picked].join(",")}`; };
  syncCompare();
  document.getElementById("filter").addEventListener("change", ev => {
    filter = ev.target.value; sessionStorage.setItem("adaptd.filter", filter); clearTimeout(timer); refresh();
  });
  refresh();
  return () => { alive = false; clearTimeout(timer); };
}

// ---------- one job ----------------------------------------------------------------------------------

function kpi(id, label, value, sub, alert) {
  return `<div class="kpi${alert ? " alert" : ""}" id="${id}"><div class="label">${esc(label)}</div><div class="value">${value}</div><div class="sub">${sub || ""}</div></div>`;
}

// The label-free estimate's card text: an estimate, with the typical error its estimator reports.
const estSub = m => `label-free estimate (${esc(m.estimator || "mean confidence")})${m.estimated_accuracy_error != null ? ` ± ${(100 * m.estimated_accuracy_error).toFixed(1)} pts typical error` : ""}`;

function kpis(job) {
  const m = job.metrics;
  if (!m) return "";
  const t = m.target || {}, b = t.before || {}, a = t.after || {};
  const cards = [];
  if (m.accuracy_before != null) {
    cards.push(kpi("acc-before", "Accuracy before", pct(m.accuracy_before), "source model, labelled eval data"));
    cards.push(kpi("acc-after", "Accuracy after", pct(m.accuracy_after), deltaHtml(m.accuracy_before, m.accuracy_after) + " vs source"));
  } else {
    cards.push(kpi("acc-after", "Estimated accuracy", pct(m.estimated_accuracy_after), estSub(m) + "; no eval data given"));
  }
  cards.push(kpi("entropy", "Mean entropy", `${num(m.entropy_before)} → ${num(m.entropy_after)}`, "prediction entropy (nats), before → after"));
  const maxH = a.predicted_class_entropy_max || b.predicted_class_entropy_max;
  cards.push(kpi("class-entropy", "Predicted-class entropy", `${num(b.predicted_class_entropy)} → ${num(m.predicted_class_entropy_after)}`,
    `max ${num(maxH)}; ${m.collapse_detected ? "<b>collapse detected</b>" : "no collapse detected"}`, m.collapse_detected));
  if (m.accuracy_before != null) cards.push(kpi("est-acc", "Estimated accuracy", pct(m.estimated_accuracy_after), estSub(m)));
  const ece = m.eval && m.eval.before && m.eval.before.ece != null ? [m.eval.before.ece, m.eval.after.ece] : null;
  if (ece) cards.push(kpi("ece", "Calibration error (ECE)", `${pct(ece[0])} → ${pct(ece[1])}`, deltaHtml(ece[0], ece[1], false) + " · eval data, lower is better"));
  cards.push(kpi("agreement", "Agreement with source", pct(m.agreement_with_source), "same predicted class as the source model"));
  cards.push(kpi("throughput", "Images / s", m.images_per_second != null ? Math.round(m.images_per_second).toLocaleString() : "–", `${esc(m.device || "")} ${esc(m.precision || "")}`));
  cards.push(kpi("memory", "Peak memory", bytes(m.peak_memory_bytes), m.num_images != null ? `${m.num_images} target images` : ""));
  return `<div class="kpis">${cards.join("")}</div>`;
}

function progressBlock(job, live) {
  const p = job.progress;
  const extra = live && live.images_per_second ? ` · ${Math.round(live.images_per_second)} img/s · ETA ${hms(live.eta_s)}` : "";
  return `<div class="card" id="progress"><div class="row" style="justify-content:space-between"><b>${esc(p.phase || job.status)}</b>
    <span class="muted" id="progress-text">${p.done}/${p.total} batches (${(100 * p.fraction).toFixed(0)}%)${extra}</span></div>
    <div class="pbar big" style="margin-top:8px"><span style="width:${(100 * p.fraction).toFixed(1)}%"></span></div></div>`;
}

function curves(steps, events, finished) {
  const loss = steps.filter(s => s.loss != null).map(s => [s.step, s.loss]);
  const ent = steps.filter(s => s.entropy != null).map(s => [s.step, s.entropy]);
  const alpha = Math.min(0.5, 10 / Math.max(10, steps.length));
  const markers = (events || []).map(e => ({ x: e.step, label: e.reason || "collapse" }));
  const lossSeries = loss.length ? [{ name: "loss per step", color: COLORS.loss, points: loss, width: 1, opacity: 0.35 },
    { name: "smoothed", color: COLORS.loss, points: ema(loss, alpha), width: 2.2 }] : [];
  const entSeries = [{ name: "mean entropy per step", color: COLORS.entropy, points: ent, width: 1, opacity: 0.35 },
    { name: "smoothed", color: COLORS.entropy, points: ema(ent, alpha), width: 2.2 }];
  return `<div class="grid2 section"><div class="card">${lineChart("loss-chart", "Loss", lossSeries, { markers, empty: finished && steps.length ? "this method logs no loss (e.g. source, bn_adapt)" : "no steps yet" })}</div>` +
    `<div class="card">${lineChart("entropy-chart", "Prediction entropy", entSeries, { markers })}</div></div>`;
}

function histograms(job) {
  const m = job.metrics;
  if (!m || !m.target || !m.target.before) return "";  // a student distilled from sources of other classes has no "before"
  const b = m.target.before.predicted_class_histogram, a = m.target.after.predicted_class_histogram;
  const names = (m.eval && m.eval.class_names) || b.map((_, i) => String(i));
  const total = b.reduce((x, y) => x + y, 0) || 1;
  let html = `<div class="grid2 section"><div class="card">${barChart("hist-chart", "Predicted classes on the target data", names,
    [{ name: "before (source)", color: COLORS.before, values: b.map(v => v / total) }, { name: "after", color: m.collapse_detected ? COLORS.bad : COLORS.after, values: a.map(v => v / total) }],
    { pct: true, refLine: 1 / b.length, refLabel: `uniform ${pct(1 / b.length)}` })}</div>`;
  if (m.eval && m.eval.before && m.eval.before.per_class_accuracy) {
    html += `<div class="card">${barChart("perclass-chart", "Per-class accuracy (eval data)", names,
      [{ name: "before", color: COLORS.before, values: m.eval.before.per_class_accuracy }, { name: "after", color: COLORS.after, values: m.eval.after.per_class_accuracy }],
      { pct: true, yMax: 1 })}</div>`;
  } else {
    html += `<div class="card"><h2>Per-class accuracy</h2><div class="empty">Submit with labelled <span class="mono">eval_data</span> to see accuracy before and after.</div></div>`;
  }
  return html + "</div>";
}

// One `key = value` per line, long values wrapped, never a page-wide line of JSON.
function paramsHtml(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return `<span class="muted">defaults</span>`;
  return `<div class="params mono">${entries.map(([k, v]) => `<div><span class="muted">${esc(k)}</span> = ${esc(typeof v === "string" ? v : JSON.stringify(v))}</div>`).join("")}</div>`;
}

function details(job) {
  const m = job.metrics || {}, o = job.spec.options || {}, mdl = job.spec.model || job.spec.student || {};
  const rows = [["Job id", `<span class="mono">${esc(job.id)}</span>`], ["Method", esc(job.method)],
    ["Params", paramsHtml(job.params)],
    ["Model", `${esc(mdl.architecture)} · ${esc(mdl.num_classes)} classes`],
    ...(mdl.arch_kwargs && Object.keys(mdl.arch_kwargs).length ? [["Architecture kwargs", paramsHtml(mdl.arch_kwargs)]] : []),
    ["Options", paramsHtml(o)],
    ["Created", `${esc(job.created_at)} (${ago(job.created_at)})`], ["Run time", duration(job.started_at, job.finished_at)],
    ["Attempts", esc(job.attempts)]];
  if (m.batchnorm_recalibration_batches != null) rows.push(["BN recalibration", `${m.batchnorm_recalibration_batches} batches`]);
  if (m.online && m.online.accuracy != null) rows.push(["Online accuracy", pct(m.online.accuracy)]);
  return `<div class="card"><h2>Details</h2><dl class="kv">${rows.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl></div>`;
}

// examples.json: a few images with their predictions before and after (right / wrong when labelled)
function gallery(ex) {
  if (!ex || !ex.items || !ex.items.length) return "";
  const name = c => (ex.class_names && ex.class_names[c] != null ? ex.class_names[c] : String(c));
  const verdict = (it, side) => (it.label == null ? "" : it[side].class === it.label ? " right" : " wrong");
  const cards = ex.items.map(it => `<figure class="example" data-index="${it.index}" data-before="${it.before.class}" data-after="${it.after.class}">
      <img src="${esc(it.image)}" alt="image ${it.index}">
      <figcaption>${it.label != null ? `<div>label <b>${esc(name(it.label))}</b></div>` : `<div class="muted">#${it.index}</div>`}
      <div class="pred${verdict(it, "before")}">before ${esc(name(it.before.class))} <span class="muted">${pct(it.before.confidence)}</span></div>
      <div class="pred${verdict(it, "after")}">after <b>${esc(name(it.after.class))}</b> <span class="muted">${pct(it.after.confidence)}</span></div></figcaption></figure>`).join("");
  return `<div class="card section" id="examples"><h2>Examples (${ex.set === "eval" ? "eval" : "target"} data)</h2>
    <p class="muted">${ex.changed} images changed their predicted class; up to half of those shown come first.</p><div class="gallery">${cards}</div></div>`;
}

function artifacts(job) {
  if (!job.artifacts.length) return "";
  return `<div class="card artifacts" id="artifacts"><h2>Downloads</h2>${job.artifacts.map(a =>
    `<a href="${esc(`/v1/jobs/${job.id}/artifacts/${a.name}`)}" download>${esc(a.name)}</a> <span class="muted">${bytes(a.size)}</span>`).join(" &nbsp; ")}</div>`;
}

// Views by task: app/static/<task>.js registers `TASK_VIEWS[task] = {kpis(job), body(job, examples)}`;
// classification's is this file's own. Sections any job may have (several source models, auto's
// candidates) are pushed onto EXTRA_SECTIONS by their own files: (job) => html.
const CLASSIFICATION_VIEW = { kpis, body: (job, examples) => histograms(job) + gallery(examples) };
const TASK_VIEWS = { classification: CLASSIFICATION_VIEW };
const EXTRA_SECTIONS = [];
function taskView(job) { return TASK_VIEWS[(job.spec && job.spec.task) || "classification"] || CLASSIFICATION_VIEW; }

function jobView(id) {
  let job = null, steps = [], events = [], examples = null, live = null, es = null, alive = true, pending = false, poll = null;
  app.innerHTML = `<p class="muted">Loading job ${esc(id)}…</p>`;

  function render() {
    pending = false;
    if (!alive || !job) return;
    const m = job.metrics || {}, view = taskView(job);
    const collapsed = m.collapse_detected ? `<div class="warn-box">Collapse guard fired: ${esc((m.collapse && m.collapse.events || []).map(e => `step ${e.step}: ${e.reason} → ${e.action}`).join("; "))}</div>` : "";
    const err = job.error ? `<div class="error-box" id="job-error"><b>${esc(job.error.code)}</b>: ${esc(job.error.message)}</div>` : "";
    app.innerHTML = `<div class="jobhead"><a href="#/">← Jobs</a><h1>${esc(job.method)} <span class="mono muted">${esc(job.id.slice(0, 8))}</span>${nameTags(job)}</h1>
      <span id="job-status">${badge(job.status)}</span>${m.collapse_detected ? '<span class="badge collapse">collapse</span>' : ""}<span class="spacer"></span>
      ${TERMINAL.includes(job.status) ? "" : `<button class="danger" id="cancel">Cancel</button>`}</div>
      ${err}${collapsed}
      ${job.status === "running" || job.status === "queued" ? progressBlock(job, live) : ""}
      ${view.kpis(job)}${curves(steps, events, TERMINAL.includes(job.status))}${view.body(job, examples)}${EXTRA_SECTIONS.map(f => f(job)).join("")}${artifacts(job)}${details(job)}`;
    const btn = document.getElementById("cancel");
    if (btn) btn.onclick = async () => { btn.disabled = true; try { job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); schedule(); } catch (e) { alert(e.message); } };
  }
  function schedule() { if (!pending) { pending = true; setTimeout(render, 150); } }  // coalesce bursts of events

  async function loadFinal() {
    job = await api(`/v1/jobs/${id}`);
    if (job.artifacts.some(a => a.name === "history.json")) {
      try {
        const h = await api(`/v1/jobs/${id}/artifacts/history.json`);
        steps = h.steps || []; events = h.collapse_events || [];
      } catch (_) { /* keep the live steps */ }
    }
    if (job.artifacts.some(a => a.name === "examples.json")) {
      try { examples = await api(`/v1/jobs/${id}/artifacts/examples.json`); } catch (_) { /* no gallery */ }
    }
    render();
    document.body.dataset.ready = "1";
  }

  function stream() {
    if (!window.EventSource) { poll = setInterval(async () => { job = await api(`/v1/jobs/${id}`); if (TERMINAL.includes(job.status)) { clearInterval(poll); loadFinal(); } else schedule(); }, 2000); return; }
    es = new EventSource(`/v1/jobs/${id}/events`);
    es.addEventListener("status", ev => { job = JSON.parse(ev.data); schedule(); });
    es.addEventListener("progress", ev => {
      live = JSON.parse(ev.data);
      if (job) { job.progress = { done: live.done, total: live.total, fraction: live.fraction, phase: live.phase }; job.status = live.status || job.status; }
      schedule();
    });
    es.addEventListener("step", ev => { steps.push(JSON.parse(ev.data)); schedule(); });
    es.addEventListener("end", () => { es.close(); es = null; loadFinal(); });
  }

  (async () => {
    try {
      job = await api(`/v1/jobs/${id}`);
      // Finished with curves stored: history.json. Still running, or stopped early (failed, cancelled):
      // the event stream, which replays the live steps the worker published and ends at once if done.
      if (TERMINAL.includes(job.status) && job.artifacts.some(a => a.name === "history.json")) await loadFinal();
      else { render(); stream(); }
    } catch (e) {
      if (alive) app.innerHTML = `<div class="error-box">Cannot load job ${esc(id)}: ${esc(e.message)}</div><a href="#/">← Jobs</a>`;
    }
  })();
  return () => { alive = false; if (es) es.close(); if (poll) clearInterval(poll); };
}

// ---------- compare jobs -----------------------------------------------------------------------------

const COMPARE_ROWS = [  // [label, value(job, metrics), format, higher is better (for the best-of-row mark)]
  ["Method", j => j.method, esc], ["Status", j => j.status, badge],
  ["Accuracy before", (j, m) => m.accuracy_before, pct, true], ["Accuracy after", (j, m) => m.accuracy_after, pct, true],
  ["ECE before", (j, m) => m.eval && m.eval.before && m.eval.before.ece, pct, false], ["ECE after", (j, m) => m.eval && m.eval.after.ece, pct, false],
  ["Estimated accuracy", (j, m) => m.estimated_accuracy_after, pct, true],
  ["Mean entropy after", (j, m) => m.entropy_after, v => num(v), false],
  ["Agreement with source", (j, m) => m.agreement_with_source, pct],
  ["Collapse", (j, m) => m.collapse_detected, v => (v == null ? "–" : v ? "detected" : "no")],
  ["Images / s", (j, m) => m.images_per_second, v => (v == null ? "–" : Math.round(v).toLocaleString()), true],
  ["Run time", j => duration(j.started_at, j.finished_at), esc],
  ["Params", j => j.params, paramsHtml], ["Options", j => j.spec.options, paramsHtml],
];

function compareView(ids) {
  let alive = true;
  app.innerHTML = `<p class="muted">Loading ${ids.length} jobs…</p>`;
  (async () => {
    try {
      const jobs = await Promise.all(ids.map(id => api(`/v1/jobs/${id}`)));
      const histories = await Promise.all(jobs.map(j => (j.artifacts.some(a => a.name === "history.json")
        ? api(`/v1/jobs/${j.id}/artifacts/history.json`).catch(() => ({ steps: [] })) : { steps: [] })));
      if (!alive) return;
      const color = i => PALETTE[i % PALETTE.length];
      const label = j => `${j.name || j.method} ${j.id.slice(0, 8)}`;
      const head = jobs.map((j, i) => `<th data-job-id="${esc(j.id)}"><i class="swatch" style="background:${color(i)}"></i><a class="mono" href="#/jobs/${esc(j.id)}">${esc(j.id.slice(0, 8))}</a>${nameTags(j)}</th>`).join("");
      const rows = COMPARE_ROWS.map(([name, get, fmt, higher]) => {
        const vals = jobs.map(j => get(j, j.metrics || {}));
        const nums = vals.filter(v => typeof v === "number");
        const best = higher == null || nums.length < 2 || new Set(nums).size === 1 ? null : (higher ? Math.max(...nums) : Math.min(...nums));
        return `<tr data-row="${esc(name)}"><th>${esc(name)}</th>${vals.map((v, i) => `<td class="${v === best ? "best" : ""}">${fmt(v)}${name === "Status" ? errorCode(jobs[i]) : ""}</td>`).join("")}</tr>`;
      }).join("");
      const smooth = pts => ema(pts, Math.min(0.5, 10 / Math.max(10, pts.length)));
      const series = key => histories.map((h, i) => ({ name: label(jobs[i]), color: color(i), width: 2,
        points: smooth((h.steps || []).filter(s => s[key] != null).map(s => [s.step, s[key]])) }));
      const loss = series("loss").filter(s => s.points.length);
      app.innerHTML = `<div class="jobhead"><a href="#/">← Jobs</a><h1>Compare ${jobs.length} jobs</h1></div>
        <div class="card section"><table class="jobs compare" id="compare-table"><thead><tr><th></th>${head}</tr></thead><tbody>${rows}</tbody></table></div>
        <div class="grid2 section"><div class="card">${lineChart("compare-entropy", "Prediction entropy (smoothed)", series("entropy"))}</div>
        <div class="card">${lineChart("compare-loss", "Loss (smoothed)", loss, { empty: "none of these methods logs a loss" })}</div></div>
        ${compareAccuracy(jobs, color)}`;
      document.body.dataset.ready = "1";
    } catch (e) {
      if (alive) app.innerHTML = `<div class="error-box">Cannot compare: ${esc(e.message)}</div><a href="#/">← Jobs</a>`;
    }
  })();
  return () => { alive = false; };
}

function compareAccuracy(jobs, color) {
  const withEval = jobs.map((j, i) => [j, i]).filter(([j]) => j.metrics && j.metrics.eval);
  if (!withEval.length) return "";
  const first = withEval[0][0].metrics;
  const names = first.eval.class_names || first.eval.after.per_class_accuracy.map((_, c) => String(c));
  return `<div class="grid2 section"><div class="card">${barChart("compare-perclass", "Per-class accuracy after (eval data)", names,
    withEval.map(([j, i]) => ({ name: `${j.name || j.method} ${j.id.slice(0, 8)}`, color: color(i), values: j.metrics.eval.after.per_class_accuracy })),
    { pct: true, yMax: 1 })}</div></div>`;
}

// ---------- routing ----------------------------------------------------------------------------------

function route() {
  teardown();
  delete document.body.dataset.ready;
  const h = location.hash;
  const cmp = h.match(/^#\/compare\/([\w,-]+)/);
  const m = h.startsWith("#/") ? h.match(/^#\/jobs\/([\w-]+)/) : location.pathname.match(/^\/jobs\/([\w-]+)/);
  teardown = cmp ? compareView(cmp[1].split(",").filter(Boolean)) : m ? jobView(m[1]) : listView();
}
window.addEventListener("hashchange", route);
route();
