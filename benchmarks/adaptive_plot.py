"""Perplexity against average realised density: uniform top-k vs adaptive head budgets, from `polar-eval` records.

Reads OUT/accuracy.jsonl (`polar-eval --tasks ppl ... --budget adaptive`), keeps the latest perplexity record of
each (model, selector, density, budget), and for each model draws one line per (selector, budget): x = the record's
average density over every layer (a dense layer counting 1; for adaptive budgets the density the calibrated mass
realised on held-out tokens), y = perplexity relative to dense in %, with error bars of one standard error of the
difference paired over the same windows (OUT/details), and the +3% line. It prints a markdown table per model and
each curve's critical density: the lowest average density whose perplexity is within +3% of dense (None when no
evaluated sparse point is).

  python benchmarks/adaptive_plot.py --results benchmarks/results/adaptive_cpu \
      --out benchmarks/results/adaptive_cpu/ppl_vs_density.png
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import Any

from polar_jax.evaluation import report

COLORS = {"router": "tab:blue", "oracle": "tab:green", "random": "tab:red", "static": "tab:orange"}
STYLES = {"": "-", "adaptive": "--", "adaptive per-layer": ":"}


def curves(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """{model: {"dense": record, "curves": {(selector, budget): [records sorted by average density]}}} of the latest
  perplexity records (uniform budgets: `budget` ""; adaptive: "adaptive" or "adaptive per-layer")."""
  out: dict[str, dict[str, Any]] = {}
  for (model, _, task, sel, _, budget), r in report.latest(records).items():
    if task != "ppl":
      continue
    m = out.setdefault(model, {"dense": None, "curves": {}})
    if sel == "dense":
      m["dense"] = r
    else:
      m["curves"].setdefault((sel, budget), []).append(r)
  for m in out.values():
    for recs in m["curves"].values():
      recs.sort(key=lambda r: r["avg_density"])
  return out


def relative(out_dir, rec: dict[str, Any], dense: dict[str, Any]) -> tuple[float, float]:
  """(perplexity / dense - 1, its standard error), both in %: paired over the windows when OUT/details has both
  records' per-window NLLs, else from the records' standard errors (delta method)."""
  d = report.paired_difference(out_dir, rec, dense)
  if d is None:
    d = (math.log(rec["value"] / dense["value"]),
         math.hypot(rec["stderr"] / rec["value"], dense["stderr"] / dense["value"]))
  return 100 * math.expm1(d[0]), 100 * math.exp(d[0]) * d[1]


def critical(recs: list[dict[str, Any]], dense_ppl: float) -> float | None:
  """The lowest average density of `recs` whose perplexity is within +3% of `dense_ppl`."""
  ok = [r["avg_density"] for r in recs if r["value"] <= dense_ppl * (1 + report.PPL_TOLERANCE) + 1e-12]
  return min(ok) if ok else None


def table(out_dir, model: str, m: dict[str, Any]) -> str:
  """A markdown table of one model's curves, then their critical densities."""
  dense = m["dense"]
  d = dense["value"]
  lines = [f"#### {model}: dense perplexity {d:.2f} ± {dense['stderr']:.2f} ({dense['n']:,} tokens)", "",
           "| selector | budget | density (target) | avg density | ppl | Δppl (paired s.e.) |",
           "|---|---|---|---|---|---|"]
  for (sel, budget), recs in sorted(m["curves"].items()):
    for r in recs:
      rel, se = relative(out_dir, r, dense)
      lines.append(f"| {sel} | {budget or 'uniform'} | {r['density']:g} | {r['avg_density']:.3f} | "
                   f"{r['value']:.2f} | {rel:+.1f}% ± {se:.1f} |")
  lines += ["", "| selector | budget | critical avg density (ppl within +3%) |", "|---|---|---|"]
  for (sel, budget), recs in sorted(m["curves"].items()):
    c = critical(recs, d)
    lines.append(f"| {sel} | {budget or 'uniform'} | {'none below 1' if c is None else f'{c:.3f}'} |")
  return "\n".join(lines) + "\n"


def plot(out_dir, data: dict[str, dict[str, Any]], out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  models = sorted(data)
  fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.4), squeeze=False)
  for ax, model in zip(axes[0], models):
    m = data[model]
    for (sel, budget), recs in sorted(m["curves"].items()):
      rel = [relative(out_dir, r, m["dense"]) for r in recs] + [(0.0, 0.0)]
      ax.errorbar([r["avg_density"] for r in recs] + [1.0], [v for v, _ in rel], yerr=[e for _, e in rel],
                  marker="o", ms=4, capsize=2, color=COLORS.get(sel, "gray"), linestyle=STYLES.get(budget, "-."),
                  label=f"{sel}, {budget or 'uniform top-k'}")
    ax.axhline(100 * report.PPL_TOLERANCE, color="gray", lw=0.8, ls=":", label="dense +3%")
    ax.set_yscale("symlog", linthresh=10)
    top = ax.get_ylim()[1]
    ax.set_yticks([t for t in (-5, 0, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= top])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g}" if v else "0"))
    ax.set_ylim(-5, top)
    ax.set_xlabel("average density (KV groups read / all, every layer)")
    ax.set_ylabel("perplexity vs dense (%)")
    ax.set_title(f"{model} ({m['dense']['num_groups']} groups, {m['dense']['n']:,} tokens, "
                 f"{m['dense']['device'].split(' (')[0]})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.tight_layout()
  tmp = out.with_name(out.stem + ".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", required=True, help="directory holding polar-eval's accuracy.jsonl")
  p.add_argument("--out", required=True, help="PNG to write")
  args = p.parse_args(argv)
  data = {k: v for k, v in curves(report.read_records(args.results)).items() if v["dense"] is not None}
  if not data:
    print(f"adaptive_plot: no perplexity records with a dense baseline in {args.results}", file=sys.stderr)
    return 2
  for model in sorted(data):
    print(table(args.results, model, data[model]))
  plot(args.results, data, pathlib.Path(args.out))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
