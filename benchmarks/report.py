"""Markdown tables of the benchmark results (`benchmarks/results/*.jsonl`), for the README and notes.

  python benchmarks/report.py            # prints the kernel and end-to-end tables
"""

from __future__ import annotations

import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load(name: str) -> list[dict]:
  path = RESULTS / name
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def attention_table(recs: list[dict], version: str = "v2") -> str:
  rows = [r for r in recs if r.get("op") == "attention" and str(r.get("kernel_version", "")).startswith(version)]
  out = ["| Hq/Hkv | B | S | density | Pallas ms | TB/s | roofline | XLA gather-then-attend ms | XLA einsum (dense) ms |",
         "|---|---|---|---|---|---|---|---|---|"]
  key = lambda r: (r["Hq"], r["Hkv"], r["B"], r["S"], r["density"])
  by = {}
  for r in rows:
    by.setdefault(key(r), {})[r["impl"]] = r
  for k in sorted(by, key=lambda k: (-k[1], k[2], k[3], -k[4])):
    d = by[k]
    if "pallas" not in d:
      continue
    p = d["pallas"]
    g = d.get("xla_gather", {}).get("ms")
    e = d.get("xla_einsum", {}).get("ms")
    out.append(f"| {k[0]}/{k[1]} | {k[2]} | {k[3]} | {k[4]:g} | {p['ms']:.3f} | {p['tbps']:.2f} | "
               f"{p['roofline_frac']:.2f} | {'' if g is None else f'{g:.3f}'} | {'' if e is None else f'{e:.3f}'} |")
  return "\n".join(out)


def mlp_table(recs: list[dict], version: str = "v4b") -> str:
  rows = [r for r in recs if r.get("op") == "gather_mlp" and r.get("impl") == "pallas"
          and str(r.get("kernel_version", "")).startswith(version)]
  out = ["| M | density | Pallas ms (cols+rows) | ideal ms (bytes / copy bw) | roofline |", "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["M"], r["density"])):
    ideal = r["bytes"] / (r["copy_tbps"] * 1e12) * 1e3
    out.append(f"| {r['M']} | {r['density']:g} | {r['ms']:.4f} | {ideal:.4f} | {r['roofline_frac']:.2f} |")
  return "\n".join(out)


def e2e_table(recs: list[dict]) -> str:
  out = ["| model | system | B | prompt | density | decode tok/s | ms/step | roofline | device | date |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in recs:
    frac = "" if r.get("roofline_frac") is None else f"{r['roofline_frac']:.2f}"
    out.append(f"| {r['model']} | {r['system']} | {r['B']} | {r['prompt']} | {r['density']:g} | "
               f"{r['decode_tok_s']:.1f} | {r['ms_per_step']:.2f} | {frac} | {r['device']} | {r['date'][:10]} |")
  return "\n".join(out)


def main() -> int:
  kernels = load("kernels.jsonl")
  print("## Attention (v2 kernel)\n\n" + attention_table(kernels) + "\n")
  print("## Gathered MLP (v4b)\n\n" + mlp_table(kernels) + "\n")
  print("## End to end\n\n" + e2e_table(load("e2e.jsonl")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
