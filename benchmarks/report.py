"""Markdown tables of the benchmark results (`benchmarks/results/*.jsonl`): the README's, `docs/performance.md`.

  python benchmarks/report.py                                   # prints the kernel and end-to-end tables
  python benchmarks/report.py --all-e2e                         # every end-to-end setting's latest record
  python benchmarks/report.py --readme                          # prints the README's two tables
  python benchmarks/report.py --readme README.md                # rewrites them in README.md, between its markers
  python benchmarks/report.py --performance-md docs/performance.md   # writes every table, with how it was measured

Every number in the README's tables and in `docs/performance.md` comes from here: none is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GRID_DEVICE = "NVIDIA H100 80GB HBM3"     # the device of the one-GPU grid (benchmarks/e2e_grid.sh)
README_BATCH = 32                        # the README's performance table: batch 32 at each model's grid prompt
README_PROMPTS = {"opt-6.7b": 1900}      # OPT-6.7B's context is 2048 tokens; the others use 2000
README_PROMPT = 2000
ACCURACY_MODEL = "smollm2-135m"          # the README's accuracy table: the shipped routers' model, engine mode
ACCURACY_FILES = ("accuracy.jsonl", "accuracy_cpu_n200.jsonl")
README_BEGIN = "<!-- tables: python benchmarks/report.py --readme README.md -->"
README_END = "<!-- end of tables -->"


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


def paged_table(recs: list[dict]) -> str:
  """The selective paged kernel against the contiguous one, same call: each page size with the kernel's own
  heuristic config, and the fastest config the sweep found (either page size)."""
  rows = [r for r in recs if r.get("op") == "paged_attention"]
  by: dict[tuple, list[dict]] = {}
  for r in rows:
    by.setdefault((r["date"][:10], r["family"], r["Hq"], r["Hkv"], r["B"], r["S"], r["density"]), []).append(r)
  sizes = sorted({r["page_size"] for r in rows if r["impl"] == "paged"})
  head = " | ".join(f"page {p}: ms (ratio)" for p in sizes)
  out = [f"| Hq/Hkv | B | S | density | contiguous ms | TB/s | {head} | best paged ms (ratio) | best config |",
         "|---|---|---|---|---|---|" + "---|" * len(sizes) + "---|---|"]
  for k in sorted(by, key=lambda k: (k[0], -k[3], k[4], k[5], -k[6])):
    group = by[k]
    contiguous = [r for r in group if r["impl"] == "contiguous"]
    paged = [r for r in group if r["impl"] == "paged"]
    if not contiguous or not paged:
      continue
    c = contiguous[-1]
    cells = []
    for size in sizes:
      h = [r for r in paged if r["page_size"] == size and r.get("heuristic")]
      cells.append(f"{h[-1]['ms']:.4f} ({c['ms'] / h[-1]['ms']:.2f})" if h else "")
    best = min(paged, key=lambda r: r["ms"])
    cfg = ", ".join(f"{n} {v}" for n, v in (best.get("config") or {}).items() if n != "table_chunk")
    out.append(f"| {k[2]}/{k[3]} | {k[4]} | {k[5]} | {k[6]:g} | {c['ms']:.4f} | {c['tbps']:.2f} | "
               + " | ".join(cells) + f" | {best['ms']:.4f} ({c['ms'] / best['ms']:.2f}) | page {best['page_size']}, "
               f"{cfg} |")
  return "\n".join(out)


def _pcts(stats: dict | None, scale: float = 1000.0) -> str:
  if not stats or stats.get("p50") is None:
    return ""
  return f"{stats['p50'] * scale:.0f} / {stats['p99'] * scale:.0f}"


def serve_workload(r: dict) -> str:
  """How a serving run's requests came: all at once or Poisson arrivals at a rate, and a shared prefix with prefix
  caching on (the share of prompt tokens found cached) or off."""
  rate = r.get("rate")
  out = "at once" if rate is None or rate == float("inf") else f"{rate:g} req/s"
  if r.get("shared_prefix"):
    queries = r.get("prefix_cache_queries") or 0
    caching = r.get("prefix_caching", queries > 0)
    hit = f"cached, {r.get('prefix_cache_hits', 0) / queries:.0%} of prompt tokens hit" if caching and queries else \
        "caching off"
    out += f"; {r['shared_prefix']}-token shared prefix ({hit})"
  return out


def serve_table(recs: list[dict]) -> str:
  """Serving runs (`benchmarks/serve.py`, `serve_hf.py`) in the order measured."""
  out = ["| date | device | system | density | requests | arrivals | max_batch | KV | prompt chunks / round (key "
         "spans) | output tok/s | req/s | requests per decode step (mean / peak) | TTFT p50 / p99 ms | ITL p50 / p99 "
         "ms | compiled in run |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in recs:
    kv = r.get("kv_layout") or ""
    if kv == "paged" and r.get("num_pages"):
      kv += f" ({r['num_pages']} x {r.get('page_size')})"
    if kv and kv_storage(r):
      kv += f", {kv_storage(r)}"
    rps = r.get("request_throughput")
    rows = f"{r['decode_rows_mean']:.1f} / {r['decode_rows_peak']}" if "decode_rows_mean" in r else ""
    chunks = str(r.get("prefill_chunks_per_round", ""))
    if r.get("prefill_chunks_backlog", 0) > r.get("prefill_chunks_per_round", 1):
      chunks += f", {r['prefill_chunks_backlog']} on a backlog"
    if chunks and "prefill_key_spans" in r:
      chunks += f" ({r['prefill_key_spans']})"
    workload = serve_workload(r) if r["system"] != "polar_static" else ""
    out.append(f"| {r['date'][:10]} | {r['device'].replace('NVIDIA ', '')} | {r['system']} | {r.get('density', 1.0):g} | "
               f"{r['requests']} | {workload} | {r.get('max_batch', '')} | {kv} | {chunks} | "
               f"{r['output_tok_s']:.0f} | {'' if rps is None else f'{rps:.2f}'} | {rows} | "
               f"{_pcts(r.get('ttft_s'))} | {_pcts(r.get('itl_s'))} | {r.get('programs_compiled_during_run', '')} |")
  return "\n".join(out)


def prefill_table(recs: list[dict]) -> str:
  """Prompt chunks against the dense prefill of the same tokens (`benchmarks/prefill.py`), each call's rows."""
  out = ["| date | device | model | layout | chunk start | keys read | ms | tok/s | MFU | x dense prefill |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  base = {}
  for r in recs:
    call = (r["date"][:10], r["device"], r["commit"], r["model"])
    if r["system"] == "prefill":
      base[call] = r
      out.append(f"| {r['date'][:10]} | {r['device'].replace('NVIDIA ', '')} | {r['model']} | dense prefill | | "
                 f"{r['chunk']} | {r['ms']:.2f} | {r['tok_s']:.0f} | {r['mfu']:.2f} | 1 |")
      continue
    ratio = f"{r['ms'] / base[call]['ms']:.2f}" if call in base else ""
    out.append(f"| {r['date'][:10]} | {r['device'].replace('NVIDIA ', '')} | {r['model']} | {r['layout']} | "
               f"{r['start']} | {r.get('key_span', r['max_len'])} | {r['ms']:.2f} | {r['tok_s']:.0f} | "
               f"{r['mfu']:.2f} | {ratio} |")
  return "\n".join(out)


def mlp_table(recs: list[dict], version: str = "v4b") -> str:
  rows = [r for r in recs if r.get("op") == "gather_mlp" and r.get("impl") == "pallas"
          and str(r.get("kernel_version", "")).startswith(version)]
  out = ["| M | density | Pallas ms (cols+rows) | ideal ms (bytes / copy bw) | roofline |", "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["M"], r["density"])):
    ideal = r["bytes"] / (r["copy_tbps"] * 1e12) * 1e3
    out.append(f"| {r['M']} | {r['density']:g} | {r['ms']:.4f} | {ideal:.4f} | {r['roofline_frac']:.2f} |")
  return "\n".join(out)


def kv_storage(r: dict) -> str:
  """The KV cache's storage dtype of a record ("" for the model's dtype)."""
  kv = r.get("kv_dtype") or "model"
  return "" if kv in ("model", r.get("dtype", "bfloat16"), "bfloat16") else kv


def is_default_decode(r: dict) -> bool:
  """A record of the default decode step: the cache in the model's dtype and uniform head budgets."""
  return not kv_storage(r) and r.get("budget", "uniform") == "uniform"


def latest_e2e(recs: list[dict], keep=is_default_decode) -> dict[tuple, dict]:
  """The latest measured record per setting that `keep` accepts (default: the cache in the model's dtype, uniform
  budgets): (model, system, B, prompt, density, mlp, tp, device) -> record."""
  latest: dict[tuple, dict] = {}
  for r in sorted(recs, key=lambda r: r["date"]):
    if r.get("decode_tok_s") is None or not keep(r):
      continue
    key = (r["model"], r["system"], r["B"], r["prompt"], r["density"], r["mlp"], r.get("tp", 1), r["device"])
    latest[key] = r
  return latest


def e2e_variant_table(recs: list[dict]) -> str:
  """8-bit KV caches and adaptive budgets against the default decode step, grouped by the call that measured them
  (commit and device): decode tok/s and the ratio to that call's dense run with the cache in the model's dtype."""
  calls: dict[tuple, list[dict]] = {}
  for r in recs:
    if r.get("decode_tok_s") is not None and r["system"] == "polar_jax":
      calls.setdefault((r["commit"], r["device"], r["model"], r["B"], r["prompt"]), []).append(r)
  out = ["| model | B | prompt | KV cache | budget | density | decode tok/s | x dense (model dtype) | roofline | "
         "device | date | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (commit, device, model, b, prompt), rs in calls.items():
    if all(is_default_decode(r) for r in rs):
      continue
    base = [r for r in rs if is_default_decode(r) and r["density"] == 1.0 and r["mlp"] == "dense"]
    for r in rs:
      ratio = f"{r['decode_tok_s'] / base[-1]['decode_tok_s']:.2f}" if base else ""
      frac = "" if r.get("roofline_frac") is None else f"{r['roofline_frac']:.2f}"
      out.append(f"| {model} | {b} | {prompt} | {kv_storage(r) or r.get('dtype', 'bfloat16')} | "
                 f"{r.get('budget', 'uniform')} | {r['density']:g} | {r['decode_tok_s']:.1f} | {ratio} | {frac} | "
                 f"{device.replace('NVIDIA ', '')} | {r['date'][:10]} | {commit[:7]} |")
  return "\n".join(out)


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


def e2e_grid_table(recs: list[dict], device: str, keep=lambda model, b, prompt: True) -> str:
  """The one-GPU grid on `device` (latest record per setting): a row per model / B / prompt / MLP, decode tok/s at
  each attention density with the ratio to our dense run (attention and MLP dense) of the same shape, Hugging Face
  static's tok/s where measured, the row's range of roofline fractions and its records' commits. `keep(model, B,
  prompt)` selects the rows."""
  latest = {k: r for k, r in latest_e2e(recs).items() if k[7] == device and k[6] == 1 and r.get("devices", 1) == 1
            and keep(k[0], k[2], k[3])}
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


def date_range(recs: list[dict]) -> str:
  days = sorted({r["date"][:10] for r in recs if r.get("date")})
  return "" if not days else days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _grid_device(e2e: list[dict]) -> str | None:
  return GRID_DEVICE if any(r["device"] == GRID_DEVICE for r in e2e) else None


def readme_performance(e2e: list[dict]) -> str:
  """The README's performance table: the one-GPU grid at batch 32 and each model's grid prompt, with its caption."""
  device = _grid_device(e2e)
  if device is None:
    return "(no end-to-end records on the grid's device)"
  keep = lambda model, b, prompt: b == README_BATCH and prompt == README_PROMPTS.get(model, README_PROMPT)
  used = [r for r in latest_e2e(e2e).values() if r["device"] == device and r.get("tp", 1) == 1
          and keep(r["model"], r["B"], r["prompt"])]
  return (f"Decode tokens/s, batch {README_BATCH}, prompt {README_PROMPT} (OPT-6.7B {README_PROMPTS['opt-6.7b']}), "
          f"one {device.replace('NVIDIA ', '')}, measured {date_range(used)}; in parentheses the ratio to our dense "
          "run; \"union\" rows add OPT's MLP neuron union:\n\n"
          + e2e_grid_table(e2e, device, keep))


def load_accuracy() -> list[dict]:
  """Every accuracy record of `ACCURACY_FILES`, file by file (file order = time order within a file)."""
  return [r for name in ACCURACY_FILES for r in load(name)]


def accuracy_groups(recs: list[dict]) -> dict[tuple, dict[tuple, dict]]:
  """{(model, mode, device): {(selector, density, budget): {task: latest record}}}, critical-density summaries
  skipped (`budget` as `polar_jax.evaluation.report.budget_key`: "" for uniform budgets, "shards=N" for balanced
  per-shard selection)."""
  from polar_jax.evaluation.report import budget_key
  out: dict[tuple, dict[tuple, dict]] = {}
  for r in recs:
    if r.get("kind") == "critical_density":
      continue
    setting = (r["selector"], float(r["density"]), budget_key(r))
    out.setdefault((r["model"], r["mode"], r["device"]), {}).setdefault(setting, {})[r["task"]] = r
  return out


def accuracy_table(settings: dict[tuple, dict], *, budgets: bool = False) -> str:
  """Accuracy in % (± standard error) per task, their average, and perplexity with its change against dense."""
  tasks = sorted({t for by_task in settings.values() for t in by_task if t != "ppl"})
  has_ppl = any("ppl" in by_task for by_task in settings.values())
  dense = settings.get(("dense", 1.0, ""), {})
  head = ["selector", "density", "KV groups"] + (["budget", "avg density"] if budgets else []) + tasks
  head += ["avg"] if tasks else []
  head += ["ppl", "Δppl"] if has_ppl else []
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = {"dense": 0, "router": 1, "oracle": 2, "static": 3, "random": 4}
  for (sel, dens, budget), by_task in sorted(settings.items(), key=lambda kv: (-kv[0][1], kv[0][2],
                                                                                 order.get(kv[0][0], 9), kv[0][0])):
    any_rec = next(iter(by_task.values()))
    cells = [sel, f"{dens:g}", f"{any_rec['groups']}/{any_rec['num_groups']}"]
    if budgets:
      avg = any_rec.get("avg_density")
      cells += [budget or "uniform", "" if avg is None else f"{avg:.3f}"]
    vals = [by_task[t]["value"] for t in tasks if t in by_task]
    cells += [f"{100 * by_task[t]['value']:.1f} ± {100 * by_task[t]['stderr']:.1f}" if t in by_task else "–"
              for t in tasks]
    cells += [f"{100 * sum(vals) / len(vals):.1f}" if len(vals) == len(tasks) else "–"] if tasks else []
    if has_ppl:
      ppl, base = by_task.get("ppl"), dense.get("ppl")
      cells.append(f"{ppl['value']:.2f} ± {ppl['stderr']:.2f}" if ppl else "–")
      cells.append(f"{100 * (ppl['value'] / base['value'] - 1):+.1f}%" if ppl and base else "–")
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def _group_caption(group: tuple, settings: dict[tuple, dict]) -> str:
  model, mode, device = group
  recs = [r for by_task in settings.values() for r in by_task.values()]
  sizes: dict[str, set] = {}
  for r in recs:
    sizes.setdefault(r["task"], set()).add(r["n"])
  size = ", ".join(f"{t} " + "/".join(f"{n:,}" for n in sorted(ns)) + (" tokens" if t == "ppl" else "")
                   for t, ns in sorted(sizes.items()))
  return f"{model}, {mode} mode, {device}, {recs[0]['dtype']}, measured {date_range(recs)}; n = {size}"


def readme_accuracy(recs: list[dict]) -> str:
  """The README's accuracy table: the shipped routers' model, uniform budgets, on the device with the most
  zero-shot documents evaluated."""
  groups = {g: s for g, s in accuracy_groups(recs).items() if g[0] == ACCURACY_MODEL and g[1] == "engine"
            and ("dense", 1.0, "") in s}
  if not groups:
    return f"(no accuracy records of {ACCURACY_MODEL})"
  group = max(groups, key=lambda g: sum(r["n"] for s in groups[g].values() for r in s.values() if r["task"] != "ppl"))
  settings = {k: v for k, v in groups[group].items() if k[2] == ""}
  return _group_caption(group, settings) + ":\n\n" + accuracy_table(settings)


def readme_tables(e2e: list[dict], accuracy: list[dict]) -> str:
  return readme_performance(e2e) + "\n\n" + readme_accuracy(accuracy)


def replace_readme_tables(text: str, tables: str) -> str:
  """`text` with the part between `README_BEGIN` and `README_END` replaced by `tables`."""
  start, end = text.find(README_BEGIN), text.find(README_END)
  if start < 0 or end < start:
    raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} block")
  return text[:start + len(README_BEGIN)] + "\n" + tables + "\n" + text[end:]


PERFORMANCE_INTRO = """# Measured performance and accuracy

Generated by `python benchmarks/report.py --performance-md docs/performance.md` from `benchmarks/results/*.jsonl`;
do not edit by hand. `docs/design.md` says how the decode step works, `benchmarks/NOTES.md` what was tried.

How the end-to-end figures are measured (`benchmarks/e2e.py`): random bf16 weights and random routers of the
model's shape, layer 0 dense, greedy decoding, prefill excluded. A setting prefills once; each timed run decodes
from that cache rewound to the prompt lengths, with one compiled decode loop (the step `generate` runs), and
tokens/s = B x 64 / (t(72 new tokens) - t(8)), the fastest of the runs. `hf_static` is transformers' `generate`
with `cache_implementation="static"` in its own process on the same GPU. Roofline = (weight bytes + the selected
KV bytes) per step / step time / (copy bandwidth x devices), the copy bandwidth measured by a read+write copy in
the same process (it reads below the HBM peak, so a fraction above 1 means "at the roofline"). Rows are the latest
record of each setting; records of older commits ran older code (see their commit and date). The grid as a plot:
`benchmarks/results/e2e.png` (`python benchmarks/e2e.py --plot-only --plot benchmarks/results/e2e.png`).
"""


def performance_markdown(e2e: list[dict], kernels: list[dict], layer: list[dict], accuracy: list[dict],
                         serve: list[dict] | None = None) -> str:
  serve = load("serve.jsonl") if serve is None else serve
  parts = [PERFORMANCE_INTRO.rstrip()]
  device = _grid_device(e2e)
  if device:
    grid = [r for r in latest_e2e(e2e).values() if r["device"] == device and r.get("tp", 1) == 1]
    parts.append(f"## End to end, one {device.replace('NVIDIA ', '')} (`benchmarks/e2e_grid.sh`)\n\n"
                 f"Measured {date_range(grid)}. Decode tokens/s; in parentheses the ratio to our dense run of the "
                 "same shape; \"union\" rows add OPT's MLP neuron union to the attention density of the column; "
                 "roofline = the range over the row.\n\n" + e2e_grid_table(e2e, device))
  parts.append("## End to end, other devices and tensor parallel (`benchmarks/e2e.py --tp N`)\n\n"
               + e2e_table(e2e, keep=lambda r: r["device"] != device or r.get("devices", r.get("tp", 1)) > 1))
  if any(not is_default_decode(r) for r in e2e if r.get("decode_tok_s") is not None):
    parts.append("## End to end: 8-bit KV caches and adaptive budgets (`benchmarks/e2e.py --kv-dtype`, `--budget`)"
                 "\n\nEach call's records beside its dense run with the cache in the model's dtype (the ratio's "
                 "base); 8-bit caches store per-token float32 scales beside the values.\n\n" + e2e_variant_table(e2e))
  parts.append("## One decoder layer (`benchmarks/layer.py`)\n\nLLaMA-2-7B layer, cache of random values, 16 "
               "layer-steps per jitted loop, wall clock.\n\n" + layer_table(layer))
  parts.append("## Router cost, all layers of one decode step (`benchmarks/layer.py --router-cost`)\n\n"
               "\"isolated\": the routers alone on random inputs; \"insitu\": one routed layer minus the same layer "
               "with a fixed selection, times the routed layers (a difference of two timings: about ±0.1 ms from "
               "call to call). Records in the order measured.\n\n" + router_cost_table(layer))
  parts.append("## Selective decode attention (`benchmarks/kernels.py`)\n\nbf16, head size 128; ms is the CUPTI "
               "time of all kernels of the op.\n\n" + attention_table(kernels))
  parts.append("## Gathered MLP, columns + rows (`benchmarks/kernels.py`)\n\nd 4096, N 16384, ReLU, bf16.\n\n"
               + mlp_table(kernels))
  if any(r.get("op") == "paged_attention" for r in kernels):
    parts.append("## Selective paged decode attention (`benchmarks/kernels.py --only paged`)\n\nbf16, head size 128, "
                 "pages `[Hkv, num_pages, page_size, D]` in shuffled order; ratio = contiguous ms / paged ms in the "
                 "same call (1 = the contiguous kernel's bandwidth).\n\n" + paged_table(kernels))
  if serve:
    parts.append("## Serving (`benchmarks/serve.py`, `benchmarks/serve_hf.py`)\n\nRandom bf16 weights, prompts of "
                 "200-2000 random tokens and outputs of 32-512 (EOS ignored), all requests arriving at once unless "
                 "a rate is given; `polar_static`: `generate` in arrival-order batches of max_batch. TTFT and ITL "
                 "per request (ITL: each round's gap shared by the tokens it brought); records in the order "
                 "measured.\n\n" + serve_table(serve))
  prefill = load("prefill.jsonl")
  if prefill:
    parts.append("## Prompt chunks in the serving engine (`benchmarks/prefill.py`)\n\nRandom bf16 weights, one "
                 "chunk of 512 prompt tokens prefilled into a slot of a cache of 4096 tokens per row "
                 "(`serving.chunked_prefill`), against the dense prefill of a 512-token prompt; keys read: the "
                 "chunk's key span (the engine's: the smallest of 512, 1024, 2048, 4096 holding the chunk, or the "
                 "whole row). MFU: (2 x parameters x tokens + causal attention FLOPs) / time / 989 TFLOP/s.\n\n"
                 + prefill_table(prefill))
  acc = ["## Accuracy (`polar-eval`)\n\nAccuracy in % ± standard error (acc_norm for HellaSwag, acc otherwise), "
         "perplexity on held-out LAMBADA + BoolQ windows; density = fraction of KV groups kept per row in every layer "
         "but layer 0; engine mode: dense prefill, every scored token through the sparse decode step. Models "
         "`-mha9` / `-mha9i`: SmolLM2-135M as its equivalent MHA model (9 groups), grouped / interleaved over 3 "
         "shards; budget `shards=3`: balanced per-shard selection. Paired differences: "
         "`benchmarks/results/accuracy.md`. Adaptive head budgets against uniform top-k (perplexity, CPU): "
         "`docs/adaptive_budgets.md`."]
  for group, settings in sorted(accuracy_groups(accuracy).items()):
    budgets = any(k[2] for k in settings)
    acc.append(f"### {_group_caption(group, settings)}\n\n" + accuracy_table(settings, budgets=budgets))
  parts.append("\n\n".join(acc))
  return "\n\n".join(parts) + "\n"


def write_atomic(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--all-e2e", action="store_true", help="only every end-to-end setting's latest record, a line each")
  p.add_argument("--readme", nargs="?", const="-", metavar="README",
                 help="the README's performance and accuracy tables: printed, or rewritten in README between "
                      "its markers")
  p.add_argument("--performance-md", type=pathlib.Path, metavar="PATH", help="write every table to PATH")
  args = p.parse_args(argv)
  e2e = load("e2e.jsonl")
  if args.all_e2e:
    print(e2e_table(e2e))
    return 0
  if args.readme or args.performance_md:
    if args.readme == "-":
      print(readme_tables(e2e, load_accuracy()))
    elif args.readme:
      path = pathlib.Path(args.readme)
      try:
        text = replace_readme_tables(path.read_text(encoding="utf-8"), readme_tables(e2e, load_accuracy()))
      except (OSError, ValueError) as e:
        print(f"report.py: {path}: {e}", file=sys.stderr)
        return 2
      write_atomic(path, text)
    if args.performance_md:
      write_atomic(args.performance_md, performance_markdown(e2e, load("kernels.jsonl"), load("layer.jsonl"),
                                                             load_accuracy()))
    return 0
  kernels = load("kernels.jsonl")
  print("## Attention (v2 kernel)\n\n" + attention_table(kernels) + "\n")
  print("## Gathered MLP (v4b)\n\n" + mlp_table(kernels) + "\n")
  grid_device = _grid_device(e2e)
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
