// The segmentation view of a job (TASK_VIEWS.segmentation): mIoU / Dice / pixel accuracy before → after,
// the label-free signals per pixel (entropy, agreement with the source model, mask collapse), per-class IoU,
// predicted class proportions against the class-ratio prior, and example images with their masks before,
// after and the ground truth. Uses app.js's helpers (kpi, barChart, pct, num, esc, deltaHtml, bytes, COLORS).
"use strict";

const SEG = {
  PRIOR_COLOR: "#13864f",
  // class names: the eval data's when it has them, else "background" and the class indices
  names(job, k) {
    const given = job.metrics && job.metrics.eval && job.metrics.eval.class_names;
    return Array.from({ length: k }, (_, i) => (given && given[i] != null ? String(given[i]) : i === 0 ? "background" : String(i)));
  },
  // the prior the job adapted towards, averaged over the target images (sfda_prior), or null
  prior(job) {
    const m = job.metrics || {}, rep = m.method_report || {};
    if (Array.isArray(rep.prior_mean)) return rep.prior_mean;
    const p = (job.params || {}).class_ratio_prior;
    if (!Array.isArray(p) || !p.length) return null;
    const rows = Array.isArray(p[0]) ? p : [p];
    const mean = rows[0].map((_, c) => rows.reduce((s, r) => s + r[c] / r.reduce((a, b) => a + b, 0), 0) / rows.length);
    return mean;
  },
  opacity() {
    const v = parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--mask-opacity"));
    return isFinite(v) ? v : 0.65;
  },
  // KL(p ‖ q) in nats, as the method's loss measures it (ε keeps a 0 in the prior finite)
  kl(p, q) {
    if (!p || !q || p.length !== q.length) return null;
    const eps = 1e-10;
    return p.reduce((s, v, i) => s + (v > 0 ? v * (Math.log(v + eps) - Math.log(q[i] + eps)) : 0), 0);
  },
};

function segmentationKpis(job) {
  const m = job.metrics;
  if (!m) return "";
  const t = m.target || {}, b = t.before || {}, a = t.after || {};
  const cards = [];
  if (m.miou_before != null) {
    cards.push(kpi("miou", "mIoU", `${pct(m.miou_before)} → ${pct(m.miou_after)}`, deltaHtml(m.miou_before, m.miou_after) + " · labelled eval data"));
    cards.push(kpi("dice", "Dice (foreground)", `${pct(m.dice_before)} → ${pct(m.dice_after)}`, deltaHtml(m.dice_before, m.dice_after)));
    cards.push(kpi("pixel-acc", "Pixel accuracy", `${pct(m.pixel_accuracy_before)} → ${pct(m.pixel_accuracy_after)}`, deltaHtml(m.pixel_accuracy_before, m.pixel_accuracy_after)));
  } else {
    cards.push(kpi("miou", "mIoU", "–", "submit labelled <span class=\"mono\">eval_data</span> (masks) to score before and after"));
  }
  cards.push(kpi("entropy", "Mean pixel entropy", `${num(m.entropy_before)} → ${num(m.entropy_after)}`, "nats per pixel, label-free"));
  cards.push(kpi("agreement", "Agreement with source", pct(m.agreement_with_source), "pixels with the source model's class"));
  const n = m.num_images || 0;
  cards.push(kpi("collapse", "Mask collapse", m.collapse_detected ? "detected" : "none",
    `single-class masks ${b.single_class_images ?? "–"} → ${a.single_class_images ?? "–"} of ${n}; class entropy ${num(b.predicted_class_entropy)} → ${num(m.predicted_class_entropy_after)}`,
    m.collapse_detected));
  const prior = SEG.prior(job);
  if (prior) {
    const kb = SEG.kl(m.class_proportions_before, prior), ka = SEG.kl(m.class_proportions_after, prior);
    cards.push(kpi("kl-prior", "KL to the prior", `${num(kb)} → ${num(ka)}`, "predicted class proportions ‖ prior (nats); lower is closer"));
  }
  cards.push(kpi("throughput", "Images / s", m.images_per_second != null ? Math.round(m.images_per_second).toLocaleString() : "–", `${esc(m.device || "")} ${esc(m.precision || "")}`));
  cards.push(kpi("memory", "Peak memory", bytes(m.peak_memory_bytes), n ? `${n} target images` : ""));
  return `<div class="kpis">${cards.join("")}</div>`;
}

function segmentationCharts(job) {
  const m = job.metrics;
  if (!m || !m.class_proportions_before) return "";
  const k = m.class_proportions_before.length, names = SEG.names(job, k), prior = SEG.prior(job);
  const series = [{ name: "before (source)", color: COLORS.before, values: m.class_proportions_before },
    { name: "after", color: m.collapse_detected ? COLORS.bad : COLORS.after, values: m.class_proportions_after }];
  if (prior) series.push({ name: "prior", color: SEG.PRIOR_COLOR, values: prior });
  let html = `<div class="grid2 section"><div class="card">${barChart("proportions-chart", prior ? "Predicted class proportions vs the prior" : "Predicted class proportions (target data)", names, series, { pct: true })}</div>`;
  const ev = m.eval;
  if (ev && ev.before && ev.before.iou_per_class) {
    html += `<div class="card">${barChart("iou-chart", "Per-class IoU (eval data)", names,
      [{ name: "before", color: COLORS.before, values: ev.before.iou_per_class }, { name: "after", color: COLORS.after, values: ev.after.iou_per_class }],
      { pct: true, yMax: 1 })}</div>`;
  } else {
    html += `<div class="card"><h2>Per-class IoU</h2><div class="empty">Submit labelled <span class="mono">eval_data</span> (masks) to see IoU per class before and after.</div></div>`;
  }
  return html + "</div>";
}

// examples.json with kind "masks": each image beside its masks (ground truth, before, after), each mask
// drawn over the image; ignored pixels are transparent. Colours come with the file, so the legend matches.
function segmentationGallery(job, ex) {
  if (!ex || ex.kind !== "masks" || !ex.items || !ex.items.length) return "";
  const names = ex.class_names || SEG.names(job, ex.colours.length);
  const legend = ex.colours.map((c, i) => `<span data-class="${i}"><i style="background:${esc(c)}"></i>${esc(names[i] ?? i)}</span>`).join("");
  const cell = (it, label, mask, extra) => `<div class="segcell"><div class="segstack"><img src="${esc(it.image)}" alt="image ${it.index}">${mask ? `<img class="mask" data-mask="${label}" src="${esc(mask)}" alt="${label} mask ${it.index}">` : ""}</div><div class="muted">${label}${extra || ""}</div></div>`;
  const acc = side => (side.pixel_accuracy != null ? ` · ${pct(side.pixel_accuracy)}` : "");
  const rows = ex.items.map(it => `<div class="segrow" data-index="${it.index}" data-changed="${it.changed}">
      ${cell(it, "image", null, ` #${it.index}`)}${it.label ? cell(it, "truth", it.label.mask) : ""}
      ${cell(it, "before", it.before.mask, acc(it.before))}${cell(it, "after", it.after.mask, acc(it.after))}
      <div class="segnote muted">${pct(it.changed)} of pixels changed</div></div>`).join("");
  return `<div class="card section" id="examples"><h2>Examples (${ex.set === "eval" ? "eval" : "target"} data): masks before and after</h2>
    <p class="muted">${ex.changed} images changed their mask; those that changed most come first. Pixel accuracy per image when labelled.</p>
    <div class="legend" id="class-legend">${legend}</div>
    <label class="muted"><input type="range" id="mask-opacity" min="0" max="100" value="${Math.round(100 * SEG.opacity())}"> mask opacity</label>
    <div class="seggallery">${rows}</div></div>`;
}

TASK_VIEWS.segmentation = {
  kpis: segmentationKpis,
  body: (job, examples) => segmentationCharts(job) + segmentationGallery(job, examples),
};

// the opacity slider sets one CSS variable: it survives the page's re-renders
document.addEventListener("input", ev => {
  if (ev.target && ev.target.id === "mask-opacity") document.documentElement.style.setProperty("--mask-opacity", ev.target.value / 100);
});
