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
  """Every measured end-to-end record (latest per setting), with the speed-up over our dense run of the same
  model/B/prompt/tp/device."""
  latest: dict[tuple, dict] = {}
  for r in sorted(recs, key=lambda r: r["date"]):
    if r.get("decode_tok_s") is None:
      continue
    key = (r["model"], r["system"], r["B"], r["prompt"], r["density"], r["mlp"], r.get("tp", 1), r["device"])
    latest[key] = r
  dense = {(k[0], k[2], k[3], k[6], k[7]): r["decode_tok_s"] for k, r in latest.items()
           if k[1] == "polar_jax" and k[4] == 1.0 and k[5] == "dense"}
  out = ["| model | system | tp | B | prompt | attn density | MLP | projections | decode tok/s | x our dense | ms/step | "
         "roofline | device | date |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for k, r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][7], kv[0][6], kv[0][3], kv[0][2], kv[0][1],
                                                      -kv[0][4], kv[0][5])):
    frac = "" if r.get("roofline_frac") is None else f"{r['roofline_frac']:.2f}"
    base = dense.get((k[0], k[2], k[3], k[6], k[7]))
    ratio = f"{r['decode_tok_s'] / base:.2f}" if base else ""
    proj = "" if r["system"] != "polar_jax" else ("fused" if r.get("fused") else "separate")   # polar_jax.fusion
    out.append(f"| {r['model']} | {r['system']} | {r.get('tp', 1)} | {r['B']} | {r['prompt']} | {r['density']:g} | "
               f"{r['mlp']} | {proj} | {r['decode_tok_s']:.1f} | {ratio} | {r['ms_per_step']:.2f} | {frac} | "
               f"{r['device'].replace('NVIDIA ', '')} | {r['date'][:10]} |")
  return "\n".join(out)


def layer_table(recs: list[dict]) -> str:
  out = ["| model | B | S | attn density | MLP | ms / layer-step | GB | TB/s | roofline | x dense |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in recs:
    if r.get("kind") != "layer":
      continue
    out.append(f"| {r['model']} | {r['B']} | {r['S']} | {r['density']:g} | {r['mlp']} | {r['ms']:.3f} | "
               f"{r['bytes'] / 1e9:.2f} | {r['tbps']:.2f} | {r['roofline_frac']:.2f} | {r['speedup_vs_dense']:.2f} |")
  return "\n".join(out)


def router_cost_table(recs: list[dict]) -> str:
  out = ["| model | B | MLP | method | head layers | neuron layers | router weight GB read | router ms / step |",
         "|---|---|---|---|---|---|---|---|"]
  for r in recs:
    if r.get("kind") != "router_cost":
      continue
    gb = f"{r['router_bytes'] / 1e9:.2f}" if r.get("router_bytes") else ""
    out.append(f"| {r['model']} | {r['B']} | {r['mlp']} | {r['method']} | {r['head_layers']} | "
               f"{r['neuron_layers']} | {gb} | {r['router_ms']:.3f} |")
  return "\n".join(out)


def main() -> int:
  kernels = load("kernels.jsonl")
  print("## Attention (v2 kernel)\n\n" + attention_table(kernels) + "\n")
  print("## Gathered MLP (v4b)\n\n" + mlp_table(kernels) + "\n")
  print("## End to end\n\n" + e2e_table(load("e2e.jsonl")) + "\n")
  layer = load("layer.jsonl")
  print("## One decoder layer\n\n" + layer_table(layer) + "\n")
  print("## Router cost (all layers, one decode step)\n\n" + router_cost_table(layer))
  return 0


if __name__ == "__main__":
  sys.exit(main())
