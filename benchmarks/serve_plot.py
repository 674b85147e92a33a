"""Throughput against latency of the serving systems in `serve.jsonl` (`benchmarks/serve.py`, `serve_hf.py`).

One point per record of the chosen runs (default: the latest date's records of the named model): output tokens/s
on x; time to first token and end-to-end latency (p50, with p99 as the bar's top) on y, log scale. Static batching
reports no per-request latency and is drawn as a vertical line at its throughput.

  python benchmarks/serve_plot.py --results benchmarks/results/serve.jsonl --out benchmarks/results/serve.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

def label(r: dict[str, Any]) -> str:
  """A record's system, with its density, KV cache, prompt chunks per round and arrival rate where they matter."""
  name = r["system"]
  if name == "polar_engine" and r.get("density", 1.0) < 1.0:
    name = f"polar_engine_sparse (density {r['density']})"
  elif name == "polar_static" and r.get("density", 1.0) < 1.0:
    name = f"polar_static (density {r['density']})"
  name += f", max_batch {r['max_batch']}" if r.get("max_batch") else ""
  if r.get("kv_layout"):
    kv = r.get("kv_dtype")
    name += f", {r['kv_layout']}" + (f" {kv}" if kv and kv != r.get("dtype", "bfloat16") else "")
  if r.get("prefill_chunks_per_round", 1) > 1:
    name += f", {r['prefill_chunks_per_round']} chunks/round"
  if r.get("prefill_chunks_backlog", 0) > r.get("prefill_chunks_per_round", 1):
    name += f", {r['prefill_chunks_backlog']} on a backlog"
  name += f", {r['requests']} requests" if r.get("requests") else ""
  return name + (f", {r['rate']:g} req/s" if r.get("rate") else "")


def select(records: list[dict[str, Any]], model: str, day: str | None) -> list[dict[str, Any]]:
  recs = [r for r in records if r.get("model") == model]
  day = day or max((r["date"][:10] for r in recs), default=None)
  return [r for r in recs if r["date"].startswith(day or "")]


def plot(records: list[dict[str, Any]], out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "e2e_s", "end-to-end latency")):
    for i, r in enumerate(records):
      color = f"C{i % 10}"
      if not r.get(key) or r[key].get("p50") is None:
        ax.axvline(r["output_tok_s"], color=color, ls="--", label=label(r) + " (no per-request latency)")
        continue
      p50, p99 = r[key]["p50"], r[key]["p99"]
      ax.errorbar([r["output_tok_s"]], [p50], yerr=[[0], [p99 - p50]], fmt="o", color=color, capsize=3,
                  label=label(r))
    ax.set(xlabel="output tokens/s", ylabel=f"{title} p50 (bar: p99), s", yscale="log", title=title)
    ax.grid(alpha=0.3)
  first = records[0]
  fig.suptitle(f"{first['model']} on {first['device']}, prompts "
               f"{first['prompt_len'][0]}-{first['prompt_len'][1]}, outputs {first['output_len'][0]}-"
               f"{first['output_len'][1]} tokens ({first['date'][:10]})", fontsize=10)
  axes[1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  tmp = out.with_name(out.name + ".tmp.png")
  fig.savefig(tmp, dpi=120)
  tmp.replace(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", type=pathlib.Path, required=True)
  p.add_argument("--model", default="llama2-7b")
  p.add_argument("--date", default=None, help="YYYY-MM-DD of the runs to plot (default: the latest)")
  p.add_argument("--out", type=pathlib.Path, required=True)
  args = p.parse_args(argv)
  records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
  chosen = select(records, args.model, args.date)
  if not chosen:
    p.error(f"no {args.model} records{' on ' + args.date if args.date else ''} in {args.results}")
  plot(chosen, args.out)
  print(f"wrote {args.out} ({len(chosen)} records)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
