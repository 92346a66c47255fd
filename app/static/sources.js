// Jobs over several models (issue 12), as sections any job may have (EXTRA_SECTIONS, app.js):
// - several source models (distill_nearest / distill_weighted): the sources side by side, each with its
//   task similarity to the target, its weight in the student and its true accuracy (with eval data);
//   the source DistillNearest picks (the most similar) highlighted;
// - `auto`: every candidate method's label-free score beside its true accuracy (with eval data), the pick
//   highlighted and why;
// - every job: the label-free accuracy estimate as an estimate with its typical error, and the notes the
//   metrics carry (why entropy before/after can mislead).
"use strict";

const PICK_COLOR = "#13864f";

function pickRow(picked) {
  return picked ? ` class="pick" style="background:#e9f7ef;font-weight:600"` : "";
}

function sourcesSection(job) {
  const m = job.metrics;
  if (!m || !Array.isArray(m.sources) || !m.sources.length) return "";
  const refs = (job.spec && job.spec.models) || [];
  const sel = m.selected_source;
  const name = s => { const r = refs[s.index] || {}; return `#${s.index} ${r.architecture || "?"}`; };
  const labelled = m.sources.some(s => s.accuracy != null);
  const how = { labelled_centroids: "class centroids of the labelled target images",
    source_predictions: "each source's own predictions on the target" }[m.pseudo_labels] || m.pseudo_labels || "";
  const rows = m.sources.map(s => {
    const r = refs[s.index] || {};
    return `<tr data-source="${s.index}"${pickRow(s.index === sel)}><td class="mono">${esc(name(s))}</td><td>${esc(r.num_classes)}</td>
      <td data-similarity="${s.similarity}">${num(s.similarity)}</td><td data-weight="${s.weight}">${pct(s.weight)}</td>
      <td data-accuracy="${s.accuracy ?? ""}">${labelled ? pct(s.accuracy) : "–"}</td><td>${s.index === sel ? "◀ nearest (DistillNearest's pick)" : ""}</td></tr>`;
  }).join("");
  const best = labelled ? m.sources.filter(s => s.accuracy != null).reduce((a, b) => (b.accuracy > a.accuracy ? b : a)) : null;
  const oracle = best == null ? "" : best.index === sel
    ? ` With eval labels, it is also the most accurate source (${pct(best.accuracy)}).`
    : ` With eval labels, the most accurate source is ${esc(name(best))} (${pct(best.accuracy)}), not the most similar.`;
  const what = job.method === "distill_nearest"
    ? `DistillNearest distils only the most similar source, <b>${esc(name(m.sources[sel]))}</b>, into the student.`
    : `DistillWeighted distils every source, weighted by the softmax of the similarities; the most similar is <b>${esc(name(m.sources[sel]))}</b>.`;
  const chart = barChart("sources-chart", "Sources: weight in the student and accuracy on the eval data",
    m.sources.map(name), [{ name: "weight", color: COLORS.after, values: m.sources.map(s => s.weight) },
      ...(labelled ? [{ name: "source accuracy", color: COLORS.before, values: m.sources.map(s => s.accuracy) }] : [])],
    { pct: true, yMax: 1, xLabel: "source model" });
  return `<div class="card section" id="sources"><h2>Source models (${m.sources.length})</h2>
    <p>${what} Similarity: ${esc(m.similarity_metric || "")} (−ln of how much the target's classes overlap in the source's features, Gaussian Bhattacharyya coefficient; higher = the source separates the target's classes better), pseudo-labels from the ${esc(how)}.${oracle}</p>
    <div class="grid2"><div><table class="jobs" id="sources-table"><thead><tr><th>Source</th><th>Classes</th><th>Similarity</th><th>Weight</th><th>Accuracy${labelled ? "" : " (no eval data)"}</th><th></th></tr></thead>
    <tbody>${rows}</tbody></table>
    <p class="muted">The exported model is the student (${esc((job.spec.student || {}).architecture)}, ${esc((job.spec.student || {}).num_classes)} classes)${m.num_labelled ? `, trained with ${m.num_labelled} labelled target images` : ""}.</p></div>
    <div>${chart}</div></div></div>`;
}

function candidatesSection(job) {
  const m = job.metrics;
  if (!m || !Array.isArray(m.candidates) || !m.candidates.length) return "";
  const labelled = m.candidates.some(c => c.accuracy_after != null);
  const rows = m.candidates.map(c => `<tr data-candidate="${esc(c.method)}"${pickRow(c.method === m.selected_method)}>
      <td class="mono">${esc(c.method)}</td><td data-score="${c.score}">${num(c.score, 4)}</td>
      <td>${pct(c.estimated_accuracy_after)}</td><td data-accuracy="${c.accuracy_after ?? ""}">${labelled ? pct(c.accuracy_after) : "–"}</td>
      <td>${c.method === m.selected_method ? "◀ picked" : ""}</td></tr>`).join("");
  let check = "";
  if (labelled) {
    const best = m.candidates.filter(c => c.accuracy_after != null).reduce((a, b) => (b.accuracy_after > a.accuracy_after ? b : a));
    const chosen = m.candidates.find(c => c.method === m.selected_method);
    const gap = chosen && chosen.accuracy_after != null ? best.accuracy_after - chosen.accuracy_after : null;
    check = gap == null ? "" : gap <= 0
      ? ` With eval labels, the pick is also the most accurate candidate (${pct(best.accuracy_after)}).`
      : ` With eval labels, the most accurate candidate is <b>${esc(best.method)}</b> (${pct(best.accuracy_after)}); the pick is ${(100 * gap).toFixed(1)} points below it.`;
  }
  const skipped = (m.skipped_candidates || []).length ? `<p class="muted">Not run (budget_s reached): ${esc(m.skipped_candidates.join(", "))}.</p>` : "";
  const chart = barChart("candidates-chart", "Candidates: label-free score and true accuracy", m.candidates.map(c => c.method),
    [{ name: `score (${m.criterion})`, color: COLORS.entropy, values: m.candidates.map(c => c.score) },
      ...(labelled ? [{ name: "accuracy after", color: COLORS.after, values: m.candidates.map(c => c.accuracy_after) }] : [])],
    { pct: true, yMax: 1, xLabel: "method" });
  return `<div class="card section" id="candidates"><h2>Candidate methods (${m.candidates.length})</h2>
    <p id="auto-why">Picked <b style="color:${PICK_COLOR}">${esc(m.selected_method)}</b>: the highest <span class="mono">${esc(m.criterion)}</span> score, computed on the unlabelled target alone (no labels used to choose); the exported model is its.${check}</p>
    <div class="grid2"><div><table class="jobs" id="candidates-table"><thead><tr><th>Method</th><th>Score</th><th>Estimated accuracy</th><th>Accuracy${labelled ? "" : " (no eval data)"}</th><th></th></tr></thead>
    <tbody>${rows}</tbody></table>${skipped}</div><div>${chart}</div></div></div>`;
}

// The label-free estimate with its typical error, and the explanations the metrics carry.
function estimateSection(job) {
  const m = job.metrics;
  if (!m || m.estimated_accuracy_after == null) return "";
  const err = m.estimated_accuracy_error;
  const notes = (m.notes || []).map(n => `<li>${esc(n)}</li>`).join("");
  const truth = m.accuracy_after != null ? ` The eval data's true accuracy is ${pct(m.accuracy_after)}.` : "";
  return `<div class="card section" id="estimate"><h2>Label-free accuracy estimate</h2>
    <p><b id="estimate-value">${pct(m.estimated_accuracy_after)}${err != null ? ` ± ${(100 * err).toFixed(1)} points` : ""}</b>
    <span class="muted">(${esc(m.estimator || "mean confidence")}${err != null ? "; the typical error is its mean absolute error over the digit benchmark's adapted models and students, BENCHMARKS.md" : ""})</span>.
    An estimate from the unlabelled target alone, not a measurement.${truth}</p>
    ${notes ? `<div class="warn-box" id="notes"><b>Reading entropy before → after</b><ul>${notes}</ul></div>` : ""}</div>`;
}

EXTRA_SECTIONS.push(sourcesSection, candidatesSection, estimateSection);
