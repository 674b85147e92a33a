"""Results of `polar-eval`: JSON lines, per-item details, the markdown table, the plot and the critical density.

Files in the output directory (`polar-eval --out DIR`):

* `accuracy.jsonl`: one JSON object per (model, task, selector, density, mode, budget), appended. Keys: `model`,
  `task` ("ppl" or the MC task), `selector` ("dense" when every layer keeps every group, else router / oracle /
  random / static), `density`, `mode` ("engine" or "all_tokens"), `value` (accuracy: acc_norm for HellaSwag, acc
  otherwise; perplexity for ppl), `stderr`, `n` (documents, or scored tokens for ppl), `device`, `date`, `commit`,
  plus `metric`, `groups` (KV groups kept per row / of `num_groups`), `dense_layers`, `per_layer`, `limit`, `dtype`,
  `routers`, `acc`/`acc_norm` (MC), `windows` (ppl), `seed`, `shards` (1: the global per-row top-k; N > 1: balanced
  per-shard selection over N blocks of groups, as tensor parallelism over N devices selects; such records are a
  setting of their own, budget "shards=N", see `budget_key`).
  Critical-density summaries are appended as objects with `"kind": "critical_density"`.
* `details/<model>__<mode>__<task>__<selector>__<density>[__<budget>].json`: per-document correctness (MC) or
  per-window NLL (ppl), used for the paired comparisons in the table.
* `accuracy.md`: for each (model, mode) the latest record of each setting, like the paper's Table 1, the paired
  differences router - random / router - static / oracle - router, and the critical density.
* `accuracy.png` (`accuracy_<mode>.png` for other modes, `<model>_` prefixed for other models): average zero-shot
  accuracy, perplexity and each task vs density, one line per selector.

Critical density (per selector): the lowest evaluated density < 1 whose average zero-shot accuracy (mean over the
MC tasks evaluated at both that density and dense) is at least dense - 1 point and whose perplexity is at most
dense x 1.03 (when ppl was evaluated). None when no density qualifies. It is *decided* only when every verdict it
rests on (the chosen density passes, each lower one fails) holds beyond 2 standard errors of the difference to dense
(paired over the same documents / windows when the details are there), and one document of a task moves the average
accuracy by at most the 1-point tolerance (SciQ alone: at least 100 documents); else the summary says why not.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

ACC_TOLERANCE = 0.01       # within 1 point of dense
PPL_TOLERANCE = 0.03       # within +3% of dense
SELECTOR_ORDER = ("dense", "router", "oracle", "static", "random")
DECISION_Z = 2.0           # a verdict holds when the difference to dense is this many standard errors from the line
RESULTS_FILE = "accuracy.jsonl"
TABLE_FILE = "accuracy.md"


# ---- provenance ----------------------------------------------------------------------------------------------
def git_commit() -> str:
  """Short commit of the polar_jax checkout (+dirty), `$POLAR_JAX_COMMIT` if set, else "unknown"."""
  if os.environ.get("POLAR_JAX_COMMIT"):
    return os.environ["POLAR_JAX_COMMIT"]
  here = pathlib.Path(__file__).resolve().parent
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
    if out.returncode:
      return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10, cwd=here)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def provenance() -> dict[str, str]:
  import jax
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "") or dev.platform
  device = dev.platform if kind == dev.platform else f"{dev.platform}: {kind}"
  if dev.platform == "cpu":
    device += f" ({os.cpu_count()} cores)"
  return {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "commit": git_commit()}


# ---- writing -------------------------------------------------------------------------------------------------
def budget_label(per_layer) -> str:
  """"" for the uniform budget, else "L:d,L:d"."""
  if not per_layer:
    return ""
  items = per_layer.items() if isinstance(per_layer, dict) else per_layer
  return ",".join(f"{int(layer)}:{float(d):g}" for layer, d in sorted(items, key=lambda p: int(p[0])))


def shards_label(budget: str, shards: int | None) -> str:
  """A budget label with the balanced per-shard selection appended: ("", 3) -> "shards=3"; shards 1 -> unchanged."""
  if not shards or int(shards) <= 1:
    return budget
  return f"{budget} shards={int(shards)}" if budget else f"shards={int(shards)}"


def budget_key(rec: dict, *, with_shards: bool = True) -> str:
  """"" for the uniform budget, "adaptive" for an adaptive one ("adaptive per-layer" with a mass per layer), else
  the record's budget name (or its "L:d,..." text); balanced per-shard
  selection appends " shards=N" (so "shards=3" for a uniform budget), unless `with_shards` is False."""
  if rec.get("budget") == "adaptive":   # a calibrated mass threshold per row (`SparsityConfig(budget="adaptive")`)
    base = "adaptive per-layer" if rec.get("per_layer_mass") else "adaptive"
  elif not rec.get("per_layer"):
    base = ""
  else:
    name = rec.get("budget")
    base = name if name and name != "uniform" else budget_label(rec["per_layer"])
  return shards_label(base, rec.get("shards")) if with_shards else base


def details_name(rec: dict) -> str:
  parts = [rec["model"], rec["mode"], rec["task"], rec["selector"], f"{rec['density']:g}"]
  key = budget_key(rec)
  if key:
    import hashlib
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in key)
    parts.append(safe if len(safe) <= 40 else hashlib.sha1(key.encode()).hexdigest()[:10])
  return "__".join(parts) + ".json"


def append_records(out_dir, records: Iterable[dict], details: Sequence[Any] | None = None) -> pathlib.Path:
  """Appends `records` to `out_dir/accuracy.jsonl` (and writes each record's details, when given)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  records = list(records)
  path = out_dir / RESULTS_FILE
  with open(path, "a", encoding="utf-8") as f:
    for rec in records:
      f.write(json.dumps(rec, sort_keys=True) + "\n")
  if details is not None:
    (out_dir / "details").mkdir(exist_ok=True)
    for rec, det in zip(records, details):
      if det is not None and rec.get("kind") != "critical_density":
        (out_dir / "details" / details_name(rec)).write_text(json.dumps({"record": rec, **det}) + "\n")
  return path


def read_records(out_dir) -> list[dict]:
  path = pathlib.Path(out_dir) / RESULTS_FILE
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def latest(records: Iterable[dict]) -> dict[tuple, dict]:
  """The last record of each setting `(model, mode, task, selector, density, budget)` (file order = time order)."""
  out = {}
  for r in records:
    if r.get("kind") == "critical_density":
      continue
    out[(r["model"], r["mode"], r["task"], r["selector"], float(r["density"]), budget_key(r))] = r
  return out


# ---- analysis ------------------------------------------------------------------------------------------------
def _settings(recs: dict[tuple, dict], model: str, mode: str):
  """{(selector, density, budget): {task: record}} for one model and mode."""
  out: dict[tuple, dict] = {}
  for (m, md, task, sel, dens, budget), r in recs.items():
    if m == model and md == mode:
      out.setdefault((sel, dens, budget), {})[task] = r
  return out


def average_accuracy(by_task: dict[str, dict], tasks: Sequence[str]) -> float | None:
  vals = [by_task[t]["value"] for t in tasks if t in by_task]
  return float(np.mean(vals)) if tasks and len(vals) == len(tasks) else None


def critical_density(settings: dict[tuple, dict], selector: str, budget: str = "", out_dir=None) -> dict:
  """The critical density of `selector` (see the module docstring), with the numbers it was decided on.

  `decided` is False (and `undecided` says why) when too few documents were evaluated to tell the verdicts from
  noise; with `out_dir` the standard errors are paired (per-document details), else from the records' stderr.
  """
  dense = settings.get(("dense", 1.0, ""), {})
  mc = sorted(t for t in dense if t != "ppl")
  dense_acc = average_accuracy(dense, mc)
  dense_ppl = dense.get("ppl", {}).get("value")
  rows, best = [], None
  for (sel, dens, bud), by_task in sorted(settings.items(), key=lambda kv: kv[0][1]):
    if sel != selector or bud != budget or dens >= 1.0:
      continue
    acc = average_accuracy(by_task, mc)
    ppl = by_task.get("ppl", {}).get("value")
    ok_acc = acc is not None and dense_acc is not None and acc >= dense_acc - ACC_TOLERANCE - 1e-12
    ok_ppl = dense_ppl is None or (ppl is not None and ppl <= dense_ppl * (1 + PPL_TOLERANCE) + 1e-12)
    if dense_acc is None and dense_ppl is not None:   # ppl only
      ok_acc = True
    row = {"density": dens, "avg_acc": acc, "ppl": ppl, "passes": bool(ok_acc and ok_ppl)}
    row.update(_verdict_margin(out_dir, by_task, dense, mc, ok_acc, ok_ppl))
    rows.append(row)
    if ok_acc and ok_ppl and best is None:
      best = dens
  relied = [r for r in rows if best is None or r["density"] <= best]   # the chosen density and every lower one
  why = [f"density {r['density']:g}: {r['undecided']}" for r in relied if r["undecided"]]
  return {"selector": selector, "budget": budget, "critical_density": best, "dense_avg_acc": dense_acc,
          "dense_ppl": dense_ppl, "tasks": mc, "checked": rows, "decided": not why, "undecided": "; ".join(why)}


def _difference(out_dir, rec: dict, dense: dict) -> tuple[float, float]:
  """(difference rec - dense, its standard error): accuracy, or log perplexity ratio for ppl. Paired over the same
  documents / windows from the details in `out_dir` when they are there, else from the records' standard errors."""
  if out_dir is not None:
    d = paired_difference(out_dir, rec, dense)
    if d is not None:
      return d[0], d[1]
  if rec["task"] == "ppl":   # delta method: se(log ppl) = se(ppl) / ppl
    return (math.log(rec["value"] / dense["value"]),
            math.hypot(rec["stderr"] / rec["value"], dense["stderr"] / dense["value"]))
  return rec["value"] - dense["value"], math.hypot(rec["stderr"], dense["stderr"])


def _verdict_margin(out_dir, by_task: dict, dense: dict, mc: Sequence[str], ok_acc: bool, ok_ppl: bool) -> dict:
  """The differences to dense behind one density's pass / fail, and why that verdict is not decided ("" if it is)."""
  out: dict[str, Any] = {"acc_diff": None, "acc_diff_se": None, "ppl_log_ratio": None, "ppl_log_ratio_se": None}
  reasons = []
  if mc and all(t in by_task and t in dense for t in mc):
    diffs = [_difference(out_dir, by_task[t], dense[t]) for t in mc]
    diff = sum(d for d, _ in diffs) / len(mc)
    se = math.sqrt(sum(e * e for _, e in diffs)) / len(mc)
    out.update(acc_diff=diff, acc_diff_se=se)
    coarse = [f"{t} n={by_task[t]['n']}" for t in mc if 1.0 / (len(mc) * by_task[t]["n"]) > ACC_TOLERANCE + 1e-12]
    if coarse:
      reasons.append(f"too few documents ({', '.join(coarse)}): one document moves the average accuracy by more "
                     f"than the {100 * ACC_TOLERANCE:g}-point tolerance")
    elif abs(diff + ACC_TOLERANCE) < DECISION_Z * se:
      reasons.append(f"average accuracy {100 * diff:+.1f} ± {100 * se:.1f} points vs dense, within {DECISION_Z:g} "
                     f"standard errors of the -{100 * ACC_TOLERANCE:g}-point line it "
                     f"{'passes' if ok_acc else 'fails'}")
  if "ppl" in by_task and "ppl" in dense:
    d, se = _difference(out_dir, by_task["ppl"], dense["ppl"])
    out.update(ppl_log_ratio=d, ppl_log_ratio_se=se)
    line = math.log1p(PPL_TOLERANCE)
    if abs(line - d) < DECISION_Z * se:
      reasons.append(f"perplexity {100 * math.expm1(d):+.1f}% vs dense (standard error {100 * se:.1f}%), within "
                     f"{DECISION_Z:g} standard errors of the +{100 * PPL_TOLERANCE:g}% line it "
                     f"{'passes' if ok_ppl else 'fails'}")
  out["undecided"] = "; ".join(reasons)
  return out


def describe_critical(summary: dict) -> str:
  """A critical-density summary (`critical_density` / `critical_records`) as one line of text: the density, and
  when it is not decided, why and what to do."""
  value = summary["critical_density"]
  text = "none of those evaluated" if value is None else f"{value:g}"
  if summary.get("decided", True):
    return text
  return (f"{text}, NOT DECIDED (too few documents to tell it from noise: {summary['undecided']}; evaluate more, "
          "e.g. a larger --limit)")


def _load_details(out_dir, rec) -> dict | None:
  path = pathlib.Path(out_dir) / "details" / details_name(rec)
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def paired_difference(out_dir, a: dict, b: dict) -> tuple[float, float, int] | None:
  """(mean a - b, its paired standard error, n) from the per-item details of two records of one task."""
  da, db = _load_details(out_dir, a), _load_details(out_dir, b)
  if da is None or db is None:
    return None
  key = "nll_per_window" if a["task"] == "ppl" else "correct"
  x, y = np.asarray(da[key], np.float64), np.asarray(db[key], np.float64)
  if x.shape != y.shape or len(x) < 2:
    return None
  d = x - y
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), int(len(d))


# ---- markdown ------------------------------------------------------------------------------------------------
def _fmt(r: dict | None, pct: bool = True) -> str:
  if r is None:
    return "–"
  if r["task"] == "ppl":
    return f"{r['value']:.3f} ± {r['stderr']:.3f}"
  return f"{100 * r['value']:.1f} ± {100 * r['stderr']:.1f}"


def markdown(out_dir, records: Sequence[dict] | None = None) -> str:
  """The whole `accuracy.md` for the records in `out_dir` (or `records`)."""
  out_dir = pathlib.Path(out_dir)
  recs = latest(read_records(out_dir) if records is None else records)
  lines = ["# Accuracy of Polar Sparsity decoding vs attention density", "",
           "Written by `polar-eval` (`polar_jax/evaluation`); see `polar_jax/evaluation/report.py` for the files "
           "and `polar_jax/evaluation/scorer.py` / `tasks.py` for the semantics. Accuracy in % (± standard error), "
           "acc_norm for HellaSwag, acc otherwise; perplexity (± delta-method standard error) on held-out "
           "LAMBADA + BoolQ windows. *density* = fraction of KV groups kept per row in every layer but the dense "
           "ones (layer 0); `groups` = KV groups kept / total. Selector *dense* = every group everywhere.", ""]
  for model, mode in sorted({(k[0], k[1]) for k in recs}):
    settings = _settings(recs, model, mode)
    tasks = sorted({t for by in settings.values() for t in by}, key=lambda t: (t == "ppl", t))
    mc = [t for t in tasks if t != "ppl"]
    any_rec = next(iter(next(iter(settings.values())).values()))
    lines += [f"## {model}, mode `{mode}`", "",
              f"Device: {any_rec.get('device')}, dtype {any_rec.get('dtype')}, commit {any_rec.get('commit')}, "
              f"date {any_rec.get('date')}; n = " +
              ", ".join(f"{t} {_n(settings, t)}" for t in tasks) + ".", ""]
    if mode == "engine":
      lines += ["Engine semantics: the context is prefilled densely, then each continuation token is fed through "
                "the sparse decode step (teacher forcing). The first continuation token is predicted by the dense "
                "prefill, so one-token answers (most of SciQ, many ARC-Easy answers) are scored as the engine "
                "generates them: densely.", ""]
    else:
      lines += ["all_tokens: every token (context and continuation) goes through the sparse decode step from an "
                "empty cache, as in the paper's masked-model evaluation.", ""]
    head = ["selector", "density", "groups", "budget", "avg density"] + mc + (["avg", "Δavg"] if mc else []) + (
        ["ppl", "Δppl"] if "ppl" in tasks else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = settings.get(("dense", 1.0, ""), {})
    dense_avg = average_accuracy(dense, mc)
    dense_ppl = dense.get("ppl", {}).get("value")
    order = sorted(settings, key=lambda s: (-s[1], SELECTOR_ORDER.index(s[0]) if s[0] in SELECTOR_ORDER else 99,
                                            s[2]))
    for key in order:
      sel, dens, budget = key
      by = settings[key]
      r0 = next(iter(by.values()))
      row = [sel, f"{dens:g}", f"{r0.get('groups', '?')}/{r0.get('num_groups', '?')}", budget or "uniform",
             "–" if r0.get("avg_density") is None else f"{r0['avg_density']:.3f}"]
      row += [_fmt(by.get(t)) for t in mc]
      if mc:
        avg = average_accuracy(by, mc)
        row += ["–" if avg is None else f"{100 * avg:.1f}",
                "–" if avg is None or dense_avg is None else f"{100 * (avg - dense_avg):+.1f}"]
      if "ppl" in tasks:
        p = by.get("ppl")
        row += [_fmt(p), "–" if p is None or dense_ppl is None else f"{100 * (p['value'] / dense_ppl - 1):+.1f}%"]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += _paired_section(out_dir, settings, tasks)
    lines += ["### Critical density", "",
              f"Lowest density < 1 with average zero-shot accuracy within {100 * ACC_TOLERANCE:.0f} point of dense "
              f"and perplexity within +{100 * PPL_TOLERANCE:.0f}% of dense.", ""]
    for sel in [s for s in SELECTOR_ORDER if s != "dense"]:
      for budget in sorted({k[2] for k in settings if k[0] == sel}):
        cd = critical_density(settings, sel, budget, out_dir)
        label = sel + (f" (budget {budget})" if budget else "")
        lines.append(f"- **{label}**: critical density {describe_critical(cd)} ({_checked(cd)})")
    lines.append("")
  return "\n".join(lines) + "\n"


def _checked(cd: dict) -> str:
  parts = []
  for c in cd["checked"]:
    txt = f"{c['density']:g}: avg " + ("–" if c["avg_acc"] is None else f"{100 * c['avg_acc']:.1f}")
    if c["ppl"] is not None:
      txt += f", ppl {c['ppl']:.3f}"
    parts.append(txt + (" pass" if c["passes"] else " fail"))
  return "; ".join(parts) or "no sparse density evaluated"


def _n(settings, task) -> str:
  for by in settings.values():
    if task in by:
      r = by[task]
      return f"{r['n']} tokens / {r.get('windows')} windows" if task == "ppl" else str(r["n"])
  return "?"


def _paired_cell(out_dir, a: dict, b: dict) -> str:
  d = paired_difference(out_dir, a, b)
  if d is None:
    return "–"
  if a["task"] == "ppl":
    # mean NLL per window difference: < 0 means a is better; shown as the perplexity ratio a / b - 1.
    return (f"{100 * (math.exp(d[0]) - 1):+.2f}% (z={d[0] / d[1]:+.1f})" if d[1] > 0 else
            f"{100 * (math.exp(d[0]) - 1):+.2f}%")
  return f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}" + (f" (z={d[0] / d[1]:+.1f})" if d[1] > 0 else "")


def _paired_section(out_dir, settings, tasks) -> list[str]:
  """Paired differences (same documents / windows) between selectors at each density."""
  pairs = [("router", "random"), ("router", "static"), ("oracle", "router")]
  rows = []
  for dens in sorted({k[1] for k in settings if k[1] < 1.0}, reverse=True):
    for budget in sorted({k[2] for k in settings}):
      for a, b in pairs:
        ra, rb = settings.get((a, dens, budget)), settings.get((b, dens, budget))
        if not ra or not rb:
          continue
        cells = [_paired_cell(out_dir, ra[t], rb[t]) if t in ra and t in rb else "–" for t in tasks]
        rows.append([f"{a} − {b}", f"{dens:g}", budget or "uniform"] + cells)
  # balanced per-shard selection vs the global top-k: the same selector, density and budget
  for (sel, dens, budget), by in sorted(settings.items(), key=lambda kv: (-kv[0][1], kv[0])):
    r0 = next(iter(by.values()))
    if (r0.get("shards") or 1) <= 1:
      continue
    base = budget_key(r0, with_shards=False)
    glob = settings.get((sel, dens, base))
    if not glob:
      continue
    cells = [_paired_cell(out_dir, by[t], glob[t]) if t in by and t in glob else "–" for t in tasks]
    rows.append([f"{sel}: {budget} − global", f"{dens:g}", base or "uniform"] + cells)
  if not rows:
    return []
  head = ["comparison", "density", "budget"] + tasks
  return (["### Paired differences", "",
           "Same documents (windows for ppl), so the standard error is the paired one: accuracy points (z = "
           "difference / paired standard error; |z| > 2 is significant at about 5%); for ppl, the perplexity "
           "ratio of the first selector over the second (negative = first is better). `X: shards=N − global`: "
           "selector X with balanced per-shard selection over N shards (tensor parallelism) vs its global top-k.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
          ["| " + " | ".join(r) + " |" for r in rows] + [""])


# ---- plot ----------------------------------------------------------------------------------------------------
def plot_name(model: str, mode: str, default_model: str = "smollm2-135m") -> str:
  """`accuracy.png` (default model, engine mode), else `accuracy[_<model>][_<mode>].png`."""
  parts = ["accuracy"] + ([model] if model != default_model else []) + ([mode] if mode != "engine" else [])
  return "_".join(parts) + ".png"


def plot(out_dir, records: Sequence[dict] | None = None) -> list[pathlib.Path]:
  """One PNG per (model, mode): average accuracy, perplexity and each task vs density, a line per selector."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out_dir = pathlib.Path(out_dir)
  recs = latest(read_records(out_dir) if records is None else records)
  written = []
  colors = {"router": "tab:blue", "oracle": "tab:green", "static": "tab:orange", "random": "tab:red",
            "dense": "black"}
  for model, mode in sorted({(k[0], k[1]) for k in recs}):
    settings = _settings(recs, model, mode)
    tasks = sorted({t for by in settings.values() for t in by}, key=lambda t: (t == "ppl", t))
    mc = [t for t in tasks if t != "ppl"]
    panels = (["avg"] if mc else []) + (["ppl"] if "ppl" in tasks else []) + mc
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    dense = settings.get(("dense", 1.0, ""), {})
    selectors = [s for s in SELECTOR_ORDER if s != "dense" and any(k[0] == s for k in settings)]
    budgets = sorted({k[2] for k in settings})
    for ax, panel in zip(axes.ravel(), panels):
      for si, sel in enumerate(selectors):
        for budget in budgets:
          # a budget's point sits at its average density (KV groups kept over all layers)
          pts = sorted(((next(iter(by.values())).get("avg_density") or k[1]) if budget else k[1], by)
                       for k, by in settings.items() if k[0] == sel and k[2] == budget)
          if dense:
            pts = pts + [(1.0, dense)]
          xs, ys, es = [], [], []
          for dens, by in pts:
            if panel == "avg":
              v = average_accuracy(by, mc)
              e = None if v is None else math.sqrt(sum(by[t]["stderr"] ** 2 for t in mc)) / len(mc)
            elif panel in by:
              v, e = by[panel]["value"], by[panel]["stderr"]
            else:
              v = None
            if v is not None:
              scale = 1.0 if panel == "ppl" else 100.0
              xs.append(dens + 0.006 * (si - (len(selectors) - 1) / 2))   # side by side error bars
              ys.append(v * scale)
              es.append(e * scale)
          if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors.get(sel),
                        linestyle="-" if not budget else "--", label=sel + (f" [{budget}]" if budget else ""))
      if panel == "ppl":
        ax.set_yscale("log")
      if panel == "ppl" and dense.get("ppl"):
        ax.axhline(dense["ppl"]["value"] * (1 + PPL_TOLERANCE), color="gray", lw=0.8, ls=":", label="dense +3%")
      if panel == "avg" and average_accuracy(dense, mc) is not None:
        ax.axhline(100 * (average_accuracy(dense, mc) - ACC_TOLERANCE), color="gray", lw=0.8, ls=":",
                   label="dense − 1 pt")
      ax.set_title({"avg": "average zero-shot accuracy", "ppl": "held-out perplexity"}.get(panel, panel))
      ax.set_xlabel("attention density (KV groups kept; budgets: average)")
      ax.set_ylabel("perplexity" if panel == "ppl" else "accuracy (%)")
      ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
      ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    fig.suptitle(f"{model}: Polar Sparsity accuracy vs density (mode {mode})")
    fig.tight_layout()
    path = out_dir / plot_name(model, mode)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def write_report(out_dir) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """Rewrites `accuracy.md` and the plots from `accuracy.jsonl`."""
  out_dir = pathlib.Path(out_dir)
  md = out_dir / TABLE_FILE
  md.write_text(markdown(out_dir), encoding="utf-8")
  return md, plot(out_dir)


def critical_records(out_dir, model: str, mode: str, selectors: Sequence[str], budget: str = "") -> list[dict]:
  """Critical-density summaries for `selectors` from the latest records, as JSON-lines objects."""
  settings = _settings(latest(read_records(out_dir)), model, mode)
  out = []
  for sel in selectors:
    if sel == "dense":
      continue
    cd = critical_density(settings, sel, budget, out_dir)
    out.append({"kind": "critical_density", "model": model, "mode": mode, **cd, **provenance()})
  return out
