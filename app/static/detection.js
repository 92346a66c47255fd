// Detection jobs (spec.task "detection"): mAP before → after, label-free detection signals, AP per class,
// TITAN's easy/hard variance split, and example images with their boxes drawn over them (before, after,
// ground truth; each layer toggled). Registered on app.js's TASK_VIEWS; reuses its helpers (kpi, barChart,
// pct, num, esc, deltaHtml, COLORS, PALETTE).
(function () {
  const SHOW = { before: true, after: true, truth: true };  // kept across re-renders
  const BOX_COLORS = { before: COLORS.before, after: COLORS.after, truth: "#13864f" };

  const style = document.createElement("style");
  style.textContent = `
    .det-gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }
    .det-example { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; font-size: 12.5px; }
    .det-example svg { width: 100%; height: auto; display: block; background: #eef1f5; image-rendering: pixelated; }
    .det-example rect { fill: none; stroke-width: 1.6; vector-effect: non-scaling-stroke; }
    .det-example text { paint-order: stroke; stroke: #fff; }
    .det-toggles label { margin-right: 14px; cursor: pointer; }
    .det-toggles i { display: inline-block; width: 12px; height: 0; border-top: 3px solid; vertical-align: 3px; margin: 0 4px; }
    #det-examples.hide-before .det-before, #det-examples.hide-after .det-after, #det-examples.hide-truth .det-truth { display: none; }
    table.det-table { border-collapse: collapse; font-size: 12.5px; }
    table.det-table td, table.det-table th { padding: 3px 10px 3px 0; text-align: left; }`;
  document.head.appendChild(style);

  const pair = (b, a, f) => `${f(b)} → ${f(a)}`;
  const nameOf = (names, label) => (names && names[label] != null ? names[label] : String(label));

  function kpis(job) {
    const m = job.metrics;
    if (!m) return "";
    const t = m.target || {}, b = t.before || {}, a = t.after || {};
    const cards = [];
    if (m.map_before != null) {
      cards.push(kpi("map", "mAP@[.5:.95]", pair(m.map_before, m.map_after, pct), deltaHtml(m.map_before, m.map_after) + " · COCO mAP, labelled eval data"));
      cards.push(kpi("map50", "mAP@.5", pair(m.map50_before, m.map50_after, pct), deltaHtml(m.map50_before, m.map50_after) + " · IoU ≥ 0.5"));
    } else {
      cards.push(kpi("map", "mAP", "–", "submit labelled <span class=\"mono\">eval_data</span> (COCO JSON or npz boxes) to score"));
    }
    cards.push(kpi("det-per-image", "Detections / image", pair(m.detections_per_image_before, m.detections_per_image_after, v => num(v, 2)),
      `score ≥ ${num(b.score_threshold ?? a.score_threshold, 2)}; ${a.images_without_detections ?? "–"} images without any after`));
    cards.push(kpi("mean-score", "Mean score", pair(m.mean_score_before, m.mean_score_after, v => num(v, 3)), "over every detection, before → after"));
    const maxH = a.predicted_class_entropy_max || b.predicted_class_entropy_max;
    cards.push(kpi("class-entropy", "Detected-class entropy", pair(b.predicted_class_entropy, m.predicted_class_entropy_after, num),
      `max ${num(maxH)}; ${m.collapse_detected ? "<b>collapse detected</b>" : "no collapse detected"}`, m.collapse_detected));
    cards.push(kpi("agreement", "Agreement with source", pct(m.agreement_with_source), "confident detections matched (same class, IoU ≥ 0.5)"));
    cards.push(kpi("throughput", "Images / s", m.images_per_second != null ? num(m.images_per_second, 1) : "–", `${esc(m.device || "")} ${esc(m.precision || "")}`));
    cards.push(kpi("memory", "Peak memory", bytes(m.peak_memory_bytes), m.num_images != null ? `${m.num_images} target images` : ""));
    return `<div class="kpis">${cards.join("")}</div>`;
  }

  function perClass(m) {
    const ev = m.eval || {};
    if (!ev.before || !ev.before.per_class_ap) {
      return `<div class="card"><h2>AP per class</h2><div class="empty">Submit with labelled <span class="mono">eval_data</span> to see AP per class before and after.</div></div>`;
    }
    const labels = [...new Set([...Object.keys(ev.before.per_class_ap), ...Object.keys(ev.after.per_class_ap || {})])].sort((x, y) => x - y);
    return `<div class="card">${barChart("det-ap-chart", "AP@[.5:.95] per class (eval data)", labels.map(l => nameOf(ev.class_names, l)),
      [{ name: "before", color: COLORS.before, values: labels.map(l => ev.before.per_class_ap[l]) },
        { name: "after", color: COLORS.after, values: labels.map(l => (ev.after.per_class_ap || {})[l]) }], { pct: true, yMax: 1 })}</div>`;
  }

  function detectedClasses(m) {
    const t = m.target || {};
    if (!t.before || !t.before.predicted_class_counts) return "";
    const b = t.before.predicted_class_counts, a = t.after.predicted_class_counts;
    const used = b.map((_, i) => i).filter(i => b[i] || a[i]);
    const names = m.eval && m.eval.class_names;
    return `<div class="card">${barChart("det-class-chart", "Confident detections per class (target data)", used.map(i => nameOf(names, i)),
      [{ name: "before (source)", color: COLORS.before, values: used.map(i => b[i]) },
        { name: "after", color: m.collapse_detected ? COLORS.bad : COLORS.after, values: used.map(i => a[i]) }])}</div>`;
  }

  // TITAN's split of the target set by detection variance (method_report.split; per-image variances are in
  // history.json) and the self-training methods' own records (pseudo-labels, teacher–student agreement).
  function selfTraining(job) {
    const m = job.metrics, r = m.method_report || {}, s = r.split;
    const rows = [["Pseudo-labels / image (mean)", r.pseudo_labels_per_image_mean, v => num(v, 2)],
      ["Teacher–student agreement (mean)", r.teacher_student_agreement_mean, pct],
      ["Teacher–student agreement (last)", r.teacher_student_agreement_last, pct],
      ["Discriminator accuracy (mean)", r.discriminator_accuracy_mean, pct]].filter(([, v]) => v != null);
    if (!rows.length && !(s && s.easy != null)) return "";
    const records = rows.length ? `<div class="card"><h2>Self-training</h2><dl class="kv">${rows.map(([k, v, f]) => `<dt>${k}</dt><dd>${f(v)}</dd>`).join("")}</dl></div>` : "";
    if (!s || s.easy == null) return `<div class="grid2 section">${records}</div>`;
    const q = s.variance_quantiles || {};
    const qs = Object.keys(q).sort((x, y) => parseFloat(x) - parseFloat(y));
    const total = (s.easy || 0) + (s.hard || 0) || 1;
    const facts = [["Easy (source-similar)", `${s.easy} images (${pct(s.easy / total)})`], ["Hard (source-dissimilar)", `${s.hard} images (${pct(s.hard / total)})`],
      ["Split quantile σ", num(s.split_quantile, 2)], ["Variance threshold", s.variance_threshold != null ? num(s.variance_threshold, 4) : "–"],
      ["Stochastic passes", esc(job.params && job.params.mc_passes != null ? job.params.mc_passes : "–")]];
    const split = `<div class="card" id="det-split"><h2>Easy / hard split (detection variance)</h2><dl class="kv">${facts.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl>
      ${qs.length ? barChart("det-variance-chart", "Per-image detection variance: quantiles", qs, [{ name: "variance", color: COLORS.after, values: qs.map(k => q[k]) }], { xLabel: "quantile", refLine: s.variance_threshold, refLabel: "easy ≥ threshold" }) : ""}
      <p class="muted">Images whose detections vary more across stochastic passes of the source model rank as source-similar ("easy"; TITAN).</p></div>`;
    return `<div class="grid2 section">${split}${records}</div>`;
  }

  function mapping(m) {
    const cm = m.eval && m.eval.category_mapping;
    if (!cm) return "";
    return `<div class="card section" id="det-mapping"><h2>COCO categories → model labels</h2><p class="muted">${esc(cm.rule)} · from <span class="mono">${esc(cm.source)}</span></p>
      <table class="det-table"><tr><th>category id</th><th>name</th><th>label</th><th>boxes</th></tr>${cm.categories.slice(0, 100).map(c =>
        `<tr><td>${esc(c.category_id)}</td><td>${esc(c.name)}</td><td>${esc(c.label)}</td><td>${esc(c.boxes)}</td></tr>`).join("")}</table></div>`;
  }

  // Box captions are sized to the thumbnail (its pixels are the SVG's units, whatever size it is shown at).
  function layer(side, boxes, names, fs) {
    if (!boxes) return "";
    return `<g class="det-${side}" data-count="${boxes.length}">${boxes.map(d => {
      const [x1, y1, x2, y2] = d.box;
      const text = `${nameOf(names, d.label)}${d.score != null ? " " + Math.round(100 * d.score) + "%" : ""}`;
      return `<rect data-label="${d.label}" x="${x1}" y="${y1}" width="${Math.max(0, x2 - x1)}" height="${Math.max(0, y2 - y1)}" stroke="${BOX_COLORS[side]}"><title>${side}: ${esc(text)}</title></rect>` +
        `<text x="${x1 + fs / 6}" y="${side === "truth" ? y2 - fs / 4 : Math.max(fs, y1 - fs / 5)}" fill="${BOX_COLORS[side]}">${esc(text)}</text>`;
    }).join("")}</g>`;
  }

  function gallery(ex) {
    if (!ex || ex.task !== "detection" || !ex.items || !ex.items.length) return "";
    const names = ex.class_names;
    const fs = it => Math.max(it.width, it.height) / 14;  // caption size: ~16 px at the gallery's width
    const hasTruth = ex.items.some(it => it.truth);
    const sides = ["before", "after", ...(hasTruth ? ["truth"] : [])];
    const toggles = sides.map(s => `<label><input type="checkbox" data-side="${s}" ${SHOW[s] ? "checked" : ""} onchange="detToggle(this)"><i style="border-color:${BOX_COLORS[s]}"></i>${s === "truth" ? "ground truth" : s}</label>`).join("");
    const hidden = sides.filter(s => !SHOW[s]).map(s => "hide-" + s).join(" ");
    const figs = ex.items.map(it => `<figure class="det-example" data-index="${it.index}" data-changed="${it.changed}">
        <svg viewBox="0 0 ${it.width} ${it.height}" role="img" aria-label="image ${it.index} with boxes" style="font-size:${fs(it)}px;stroke-width:${fs(it) / 5}px"><image href="${esc(it.image)}" width="${it.width}" height="${it.height}"/>
        ${layer("truth", it.truth, names, fs(it))}${layer("before", it.before, names, fs(it))}${layer("after", it.after, names, fs(it))}</svg>
        <figcaption>#${it.index} · ${it.before.length} → ${it.after.length} detections${it.truth ? ` · ${it.truth.length} true boxes` : ""}${it.changed ? ` · ${it.changed} changed` : ""}</figcaption></figure>`).join("");
    return `<div class="card section ${hidden}" id="det-examples"><h2>Examples (${ex.set === "eval" ? "eval" : "target"} data)</h2>
      <p class="muted">Detections scoring at least ${num(ex.score_threshold, 2)}. ${ex.changed} images changed their detections; those that changed most come first.</p>
      <div class="det-toggles">${toggles}</div><div class="det-gallery">${figs}</div></div>`;
  }

  window.detToggle = input => {
    SHOW[input.dataset.side] = input.checked;
    const box = document.getElementById("det-examples");
    if (box) box.classList.toggle("hide-" + input.dataset.side, !input.checked);
  };

  function body(job, examples) {
    const m = job.metrics;
    if (!m) return gallery(examples);
    return `<div class="grid2 section">${perClass(m)}${detectedClasses(m)}</div>${selfTraining(job)}${gallery(examples)}${mapping(m)}`;
  }

  TASK_VIEWS.detection = { kpis, body };
})();
