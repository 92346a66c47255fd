"""What `adaptd` prints: progress lines, job tables and views, the method listing. Pure functions of
the API's JSON (no HTTP here), so every command renders a job the same way."""
from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from typing import Callable, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "[" + "#" * full + "-" * (width - full) + "]"


class Line:
    """One status line on stderr. On a terminal it is redrawn in place (at most ~10 times a second);
    on a pipe or a log file each state (its `key`, e.g. status and phase) is printed once."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self.width = 0
        self.last_key: object = None
        self.last_draw = 0.0
        self.printed: set = set()

    def show(self, text: str, key: object = None, force: bool = False) -> None:
        if self.quiet:
            return
        if not self.tty:
            if key is None or key not in self.printed:
                self.printed.add(key)
                self.stream.write(text + "\n")
                self.stream.flush()
            return
        now = time.monotonic()
        if not force and key == self.last_key and now - self.last_draw < 0.1:
            return
        self.last_key, self.last_draw = key, now
        self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
        self.stream.flush()
        self.width = len(text)

    def done(self) -> None:
        """End the line on a terminal (the next output starts on a fresh one)."""
        if self.tty and self.width and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0


def transfer_progress(label: str, line: Line) -> Callable[[int, int], None]:
    t0 = time.monotonic()

    def update(sent: int, total: int) -> None:
        dt = max(time.monotonic() - t0, 1e-6)
        frac = sent / total if total else 1.0
        speed = sent / dt
        eta = (total - sent) / speed if speed > 0 and total else None
        line.show(f"{label:32.32s} {bar(frac)} {frac:6.1%}  {human_bytes(sent)}/{human_bytes(total)}  "
                  f"{human_bytes(speed)}/s  ETA {human_duration(eta)}", key=(label, sent >= total))

    return update


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else f"{v:.4g}"
    return str(v)


def progress_text(state: dict) -> str:
    """`running   adapting  [###---] 120/250 batches  830 img/s  ETA 0:05  loss 0.41  H 0.233`: counts
    only once the worker knows them (never `0/0`)."""
    total = state.get("total") or 0
    text = f"{state['status']:9s} {state.get('phase') or '':18s}"
    if total:
        text += f" {bar(state['done'] / total)} {state['done']}/{total} batches"
    if state.get("ips"):
        text += f"  {state['ips']:.0f} img/s  ETA {human_duration(state.get('eta'))}"
    step = state.get("step") or {}
    if step.get("loss") is not None:
        text += f"  loss {step['loss']:.4f}"
    if step.get("entropy") is not None:
        text += f"  H {step['entropy']:.3f}"
    return text.rstrip()


def summary_lines(job: dict) -> list[str]:
    """Human summary of a job: status, error, the metrics that say whether adaptation helped."""
    out = [f"job {job['id']}  {job['status']}  method {job['method']}"
           + (f"  name {job['name']}" if job.get("name") else "")]
    if job.get("error"):
        out.append(f"error {job['error']['code']}: {job['error']['message']}")
    m = job.get("metrics") or {}
    if m:
        if m.get("accuracy_before") is not None:
            delta = m["accuracy_after"] - m["accuracy_before"]
            out.append(f"accuracy   {fmt(m['accuracy_before'], True)} -> {fmt(m['accuracy_after'], True)}  "
                       f"({delta:+.1%})")
        for key, label in (("miou", "mIoU      "), ("dice", "Dice      "), ("pixel_accuracy", "pixel acc.")):
            if m.get(f"{key}_before") is not None and m.get(f"{key}_after") is not None:
                before, after = m[f"{key}_before"], m[f"{key}_after"]
                out.append(f"{label} {fmt(before, True)} -> {fmt(after, True)}  ({after - before:+.1%})")
        if m.get("map_before") is not None:  # detection (COCO mAP@[.5:.95] and mAP@.5)
            out.append(f"mAP        {fmt(m['map_before'], True)} -> {fmt(m['map_after'], True)}  "
                       f"({m['map_after'] - m['map_before']:+.1%})   mAP50 {fmt(m.get('map50_before'), True)} -> "
                       f"{fmt(m.get('map50_after'), True)}")
        if m.get("detections_per_image_after") is not None:
            out.append(f"detections per image {fmt(m.get('detections_per_image_before'))} -> "
                       f"{fmt(m['detections_per_image_after'])}   mean score {fmt(m.get('mean_score_before'))} -> "
                       f"{fmt(m.get('mean_score_after'))}")
        out.append(f"entropy    {fmt(m.get('entropy_before'))} -> {fmt(m.get('entropy_after'))}   "
                   f"agreement with source {fmt(m.get('agreement_with_source'), True)}")
        out.append(estimate_line(m))
        out.append(f"predicted-class entropy {fmt(m.get('predicted_class_entropy_after'))}   "
                   f"collapse detected: {fmt(m.get('collapse_detected'))}   "
                   f"{fmt(m.get('images_per_second'))} images/s")
        out += source_lines(job) + candidate_lines(m)
        out += [f"note       {text}" for text in m.get("notes") or []]
    return out


def estimate_line(m: dict) -> str:
    """The label-free accuracy estimate as what it is: an estimate, with the estimator's typical error."""
    est = m.get("estimated_accuracy_after")
    if est is None:
        return "estimated accuracy -"
    error = m.get("estimated_accuracy_error")
    spread = f" ± {100 * error:.1f} pts" if error is not None else ""
    how = m.get("estimator") or "label-free"
    typical = " (typical error on the digit benchmarks, BENCHMARKS.md)" if error is not None else ""
    return f"estimated accuracy {est:.1%}{spread}   label-free estimate, {how}{typical}"


def source_lines(job: dict) -> list[str]:
    """Several source models: each one's task similarity, weight and (with eval data) accuracy; the pick."""
    m = job.get("metrics") or {}
    if not m.get("sources"):
        return []
    refs = (job.get("spec") or {}).get("models") or []
    how = {"labelled_centroids": "labelled target images' class centroids",
           "source_predictions": "each source's own predictions"}.get(m.get("pseudo_labels"), m.get("pseudo_labels"))
    out = [f"sources    similarity {m.get('similarity_metric') or '?'} (higher = closer to the target; pseudo-labels: "
           f"{how}); {job['method']} selected #{m.get('selected_source')}"]
    for s in m["sources"]:
        ref = refs[s["index"]] if s["index"] < len(refs) else {}
        arch = f"{ref.get('architecture', '?')}/{ref.get('num_classes', '?')}"
        pick = "  <- selected" if s["index"] == m.get("selected_source") else ""
        out.append(f"  #{s['index']} {arch:18s} similarity {s['similarity']:8.3f}   weight {s['weight']:.3f}   "
                   f"accuracy {fmt(s.get('accuracy'), True)}{pick}")
    return out


def candidate_lines(m: dict) -> list[str]:
    """`auto`: every candidate's label-free score beside its true accuracy (with eval data), the pick and why."""
    if not m.get("candidates"):
        return []
    crit = m.get("criterion") or "?"
    out = [f"candidates criterion {crit} (label-free, higher is better); picked {m.get('selected_method')}"]
    for c in m["candidates"]:
        pick = "  <- picked" if c["method"] == m.get("selected_method") else ""
        out.append(f"  {c['method']:12s} score {c['score']:.4f}   accuracy {fmt(c.get('accuracy_after'), True)}{pick}")
    labelled = [c for c in m["candidates"] if c.get("accuracy_after") is not None]
    if labelled:
        best = max(labelled, key=lambda c: c["accuracy_after"])
        chosen = next((c for c in labelled if c["method"] == m.get("selected_method")), None)
        if chosen is not None:
            gap = best["accuracy_after"] - chosen["accuracy_after"]
            out.append(f"  with labels the best is {best['method']} ({best['accuracy_after']:.1%}); the pick is "
                       + ("the best" if gap <= 0 else f"{100 * gap:.1f} pts below it"))
    if m.get("skipped_candidates"):
        out.append(f"  skipped (budget_s): {', '.join(m['skipped_candidates'])}")
    return out


def job_view(job: dict) -> list[str]:
    """`adaptd status JOB`."""
    p = job["progress"]
    cancel = "  (cancel requested)" if job["cancel_requested"] and job["status"] == "running" else ""
    progress = (f"{p['done']}/{p['total']} batches ({p['fraction']:.0%}) {p['phase'] or ''}" if p["total"]
                else p["phase"] or "-")
    out = [f"id          {job['id']}",
           f"name        {job.get('name') or '-'}",
           f"tags        {', '.join(job.get('tags') or []) or '-'}",
           f"status      {job['status']}{cancel}",
           f"method      {job['method']}  {json.dumps(job['params'], separators=(',', ':'))}",
           f"created     {job['created_at']}",
           f"started     {job['started_at'] or '-'}",
           f"finished    {job['finished_at'] or '-'}",
           f"progress    {progress.rstrip()}"]
    out += summary_lines(job)[1:]
    out += [f"artifact    {a['name']}  {human_bytes(a['size'])}  sha256 {a['sha256'][:16]}…"
            for a in job["artifacts"]]
    return out


def job_table(items: list[dict]) -> list[str]:
    """`adaptd jobs`: short ids (any unique prefix is accepted back), one line per job."""
    rows = [("ID", "NAME", "STATUS", "METHOD", "CREATED", "PROGRESS", "ACCURACY", "TAGS")]
    for j in items:
        m = j.get("metrics") or {}
        acc = (f"{m['accuracy_before']:.1%}->{m['accuracy_after']:.1%}" if m.get("accuracy_before") is not None
               else f"mIoU {m['miou_before']:.1%}->{m['miou_after']:.1%}" if m.get("miou_before") is not None
               else f"mAP {m['map_before']:.1%}->{m['map_after']:.1%}" if m.get("map_before") is not None
               else "-")
        p = j["progress"]
        if j["status"] == "running":
            prog = (f"{p['done']}/{p['total']} " if p["total"] else "") + (p["phase"] or "")
        else:
            prog = f"{p['fraction']:.0%}"
        rows.append((j["id"][:8], j.get("name") or "-", j["status"], j["method"],
                     j["created_at"][:19].replace("T", " "), prog.strip() or "-", acc,
                     ",".join(j.get("tags") or []) or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _schema_type(prop: dict) -> str:
    if "enum" in prop:
        return "|".join(map(str, prop["enum"]))
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " or ".join(_schema_type(p) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array" and isinstance(prop.get("items"), dict):
        return f"list[{_schema_type(prop['items'])}]"
    return {"number": "float", "integer": "int", "boolean": "bool", "string": "str", "null": "null"}.get(t, t)


def method_listing(methods: list[dict]) -> list[str]:
    """`adaptd methods`: each method, its flags and its parameters with types and defaults."""
    out = []
    for m in methods:
        flags = [f for f, on in (("needs labels", m.get("needs_labels")),
                                 ("needs source statistics", m.get("needs_source_statistics")),
                                 ("needs source_data", m.get("needs_source_data")),
                                 ("updates weights", m.get("updates_weights"))) if on]
        cost = m.get("cost") or {}
        if m["kind"] in ("sfda", "oneshot") and cost:
            flags.append(f"{cost['epochs']} epochs by default (--epochs)")
        out.append(f"{m['name']}  ({m['kind']}{'; ' + ', '.join(flags) if flags else ''})")
        out += [f"    {text}" for text in textwrap.wrap(m["description"], 96)]
        for name, prop in ((m.get("params_schema") or {}).get("properties") or {}).items():
            default = json.dumps(prop["default"]) if "default" in prop else "(required)"
            out.append(f"    --param {name}=…  {_schema_type(prop)}, default {default}")
            out += [f"          {text}" for text in textwrap.wrap(prop.get("description", ""), 88)]
        out.append("")
    return out


def log_line(row: dict) -> str:
    """One line of `adaptd logs`."""
    return f"{row['at'][11:23]}  {row['level']:7s} {row['message']}"
