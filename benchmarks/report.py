"""Markdown tables of the benchmark results (`benchmarks/results/*.jsonl`), for the README and notes.

  python benchmarks/report.py            # prints the kernel and end-to-end tables
  python benchmarks/report.py --all-e2e  # every end-to-end setting's latest record, one line each
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GRID_DEVICE = "NVIDIA H100 80GB HBM3"     # the device of issue 6's one-GPU grid (benchmarks/e2e_grid.sh)


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


def latest_e2e(recs: list[dict]) -> dict[tuple, dict]:
  """The latest measured record per setting: (model, system, B, prompt, density, mlp, tp, device) -> record."""
  latest: dict[tuple, dict] = {}
  for r in sorted(recs, key=lambda r: r["date"]):
    if r.get("decode_tok_s") is None:
      continue
    key = (r["model"], r["system"], r["B"], r["prompt"], r["density"], r["mlp"], r.get("tp", 1), r["device"])
    latest[key] = r
  return latest


def e2e_table(recs: list[dict], keep=lambda r: True) -> str:
  """Every measured end-to-end record (latest per setting) that `keep` accepts, with the speed-up over our dense
  run of the same model/B/prompt/tp/device."""
  latest = latest_e2e(recs)
  dense = {(k[0], k[2], k[3], k[6], k[7]): r["decode_tok_s"] for k, r in latest.items()
           if k[1] == "polar_jax" and k[4] == 1.0 and k[5] == "dense"}
  out = ["| model | system | tp | B | prompt | attn density | MLP | projections | decode tok/s | x our dense | ms/step | "
         "roofline | device | date |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for k, r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][7], kv[0][6], kv[0][3], kv[0][2], kv[0][1],
                                                      -kv[0][4], kv[0][5])):
    if not keep(r):
      continue
    frac = "" if r.get("roofline_frac") is None else f"{r['roofline_frac']:.2f}"
    base = dense.get((k[0], k[2], k[3], k[6], k[7]))
    ratio = f"{r['decode_tok_s'] / base:.2f}" if base else ""
    proj = "" if r["system"] != "polar_jax" else ("fused" if r.get("fused") else "separate")   # polar_jax.fusion
    out.append(f"| {r['model']} | {r['system']} | {r.get('tp', 1)} | {r['B']} | {r['prompt']} | {r['density']:g} | "
               f"{r['mlp']} | {proj} | {r['decode_tok_s']:.1f} | {ratio} | {r['ms_per_step']:.2f} | {frac} | "
               f"{r['device'].replace('NVIDIA ', '')} | {r['date'][:10]} |")
  return "\n".join(out)


GRID_DENSITIES = (1.0, 0.625, 0.5, 0.25)


def e2e_grid_table(recs: list[dict], device: str) -> str:
  """The one-GPU grid on `device` (latest record per setting): a row per model / B / prompt / MLP, decode tok/s at
  each attention density with the ratio to our dense run (attention and MLP dense) of the same shape, Hugging Face
  static's tok/s where measured, the row's range of roofline fractions and its records' commits."""
  latest = {k: r for k, r in latest_e2e(recs).items() if k[7] == device and k[6] == 1 and r.get("devices", 1) == 1}
  rows: dict[tuple, dict] = {}
  for (model, system, b, prompt, density, mlp, _, _), r in latest.items():
    if system == "hf_static":
      rows.setdefault((model, b, prompt, "dense"), {})["hf"] = r
    else:
      rows.setdefault((model, b, prompt, mlp), {})[density] = r
  out = ["| model | B | prompt | MLP | HF static | attn 1 | 0.625 | 0.5 | 0.25 | roofline | commit |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (model, b, prompt, mlp), cells in sorted(rows.items()):
    ours = [cells[d] for d in GRID_DENSITIES if d in cells]
    if not ours:
      continue
    base = rows.get((model, b, prompt, "dense"), {}).get(1.0)
    def cell(d):
      r = cells.get(d)
      if r is None:
        return ""
      is_base = d == 1.0 and mlp == "dense"
      ratio = f" ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x)" if base and not is_base else ""
      return f"{r['decode_tok_s']:.1f}{ratio}"
    hf = f"{cells['hf']['decode_tok_s']:.1f}" if "hf" in cells else ""
    fracs = [r["roofline_frac"] for r in ours if r.get("roofline_frac") is not None]
    frac = f"{min(fracs):.2f}-{max(fracs):.2f}" if fracs else ""
    commits = ", ".join(sorted({r["commit"][:7] for r in ours}))
    out.append(f"| {model} | {b} | {prompt} | {'union' if mlp == 'router' else 'dense'} | {hf} | "
               + " | ".join(cell(d) for d in GRID_DENSITIES) + f" | {frac} | {commits} |")
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--all-e2e", action="store_true", help="only every end-to-end setting's latest record, a line each")
  args = p.parse_args(argv)
  e2e = load("e2e.jsonl")
  if args.all_e2e:
    print(e2e_table(e2e))
    return 0
  kernels = load("kernels.jsonl")
  print("## Attention (v2 kernel)\n\n" + attention_table(kernels) + "\n")
  print("## Gathered MLP (v4b)\n\n" + mlp_table(kernels) + "\n")
  grid_device = GRID_DEVICE if any(r["device"] == GRID_DEVICE for r in e2e) else None
  if grid_device:
    print(f"## End to end, one {grid_device.replace('NVIDIA ', '')}\n\n" + e2e_grid_table(e2e, grid_device) + "\n")
  print("## End to end, other devices and tensor parallel\n\n"
        + e2e_table(e2e, keep=lambda r: r["device"] != grid_device or r.get("devices", r.get("tp", 1)) > 1) + "\n")
  layer = load("layer.jsonl")
  print("## One decoder layer\n\n" + layer_table(layer) + "\n")
  print("## Router cost (all layers, one decode step)\n\n" + router_cost_table(layer))
  return 0


if __name__ == "__main__":
  sys.exit(main())
