"""Where a decode step's GPU time goes, per kernel (a script, not a test).

Default (`--timing decode_loop`): prefills, compiles and warms up `generate`'s decode step as one greedy loop
(`e2e.DecodeLoop`), then traces one call of N2 steps under `jax.profiler.trace`; per-step time of kernel K =
time_K / N2 (the prefill ran before the trace). `--timing generate` (records before 2026-11-22 06:00 UTC) traces
two `generate` calls with N1 and N2 new tokens and takes (time_K(N2) - time_K(N1)) / (N2 - N1).

Kernels are grouped by name (XLA fusions by their HLO op name, Pallas kernels by theirs), or with `--instances`
kept apart (fusion.1479 and fusion.1826 are different fusions: read them in the `--hlo` dump, which writes the
compiled decode loop's HLO text), and printed with the share of the step and launches per step; a JSON line per
(density, kernel) goes to --out. Compare the dense and a sparse density to see what the selective step adds or
saves:

  python benchmarks/profile_step.py --model llama2-7b --batch 32 --prompt 2000 --densities 1 0.5 --out $OUT/p.jsonl
  python benchmarks/profile_step.py --instances --hlo $OUT/hlo --densities 0.5 --out $OUT/p.jsonl
  python benchmarks/profile_step.py --smoke        # tiny model on CPU (host-side ops only): checks the script
"""

from __future__ import annotations

import argparse
import collections
import glob
import pathlib
import re
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import e2e  # noqa: E402  (sets the memory fraction before jax starts)
from benchmarks import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from polar_jax.generation import generate  # noqa: E402


def kernel_group(name: str) -> str:
  """A stable label for a kernel: trailing numeric ids dropped (fusion.123 -> fusion)."""
  return re.sub(r"([._]\d+)+$", "", name)


def device_kernel_times(xplane_path: str, group=None, counts: dict[str, int] | None = None) -> dict[str, float]:
  """Total device nanoseconds per kernel group in one trace (GPU stream lines; on CPU the XLA thread pools).
  `group` maps a kernel name to its label (default `kernel_group`); `counts`, if given, gets launches per label."""
  group = group or kernel_group
  from jax.profiler import ProfileData
  data = ProfileData.from_file(xplane_path)
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    on_gpu = plane.name.startswith("/device:GPU")
    if not on_gpu and plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if on_gpu and not line.name.startswith("Stream"):
        continue            # "XLA Ops" / "XLA Modules" lines summarise the same kernels
      if not on_gpu and not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        if ev.name.startswith("ThreadpoolListener"):
          continue
        label = group(ev.name)
        totals[label] += ev.duration_ns
        if counts is not None:
          counts[label] = counts.get(label, 0) + 1
  return dict(totals)


def traced_totals(fn, setup=None, group=None, counts=None) -> dict[str, float]:
  """Per-kernel device ns of one traced `fn(*setup())` after an untraced compile and warm-up call; `setup` (run
  outside the trace) makes fresh arguments for each call (e.g. a prefilled cache that `fn` donates)."""
  setup = setup or (lambda: ())
  jax.block_until_ready(fn(*setup()))               # compile + warm up outside the trace
  args = setup()
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(fn(*args))
    paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not paths:
      raise RuntimeError("the profiler wrote no trace")
    return device_kernel_times(paths[0], group, counts)


def per_step(t1: dict[str, float], t2: dict[str, float], n1: int, n2: int) -> dict[str, float]:
  """Per-step milliseconds per kernel group from two traces with n1 < n2 new tokens (groups < 0 dropped)."""
  out = {}
  for k in set(t1) | set(t2):
    v = (t2.get(k, 0.0) - t1.get(k, 0.0)) / (n2 - n1) / 1e6
    if v > 0:
      out[k] = v
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama2-7b", choices=sorted(e2e.MODELS))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=2000)
  p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5])
  p.add_argument("--n1", type=int, default=8)
  p.add_argument("--n2", type=int, default=40)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR / "profile.jsonl")
  p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (kernels of every device are summed)")
  p.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up projections (default: fused)")
  p.add_argument("--mlp", default="dense", choices=["dense", "router"],
                 help="router: batch-union neurons (ReLU models; budgets from --mlp-topk-dir)")
  p.add_argument("--mlp-topk-dir", type=pathlib.Path,
                 default=pathlib.Path(__file__).resolve().parents[2] / "shared/reference-data/mlp_topk/opt-6.7b")
  p.add_argument("--mlp-dense-above", type=float, default=e2e.DENSE_FALLBACK_FRACTION,
                 help="mlp=router: budgets above this fraction of N run dense (SparsityConfig; default %(default)s)")
  p.add_argument("--router-dtype", default=None, choices=["float32", "bfloat16", "int8"],
                 help="routers' decode weights (SparsityConfig.router_dtype; default: the model's dtype)")
  common.add_decode_options(p)
  p.add_argument("--timing", default="decode_loop", choices=["decode_loop", "generate"],
                 help="decode_loop: one traced N2-step decode loop after an untraced prefill; generate: the "
                      "difference of two traced generate calls (N1 and N2 new tokens)")
  p.add_argument("--instances", action="store_true",
                 help="keep each kernel's own name (fusion.1479 and fusion.1826 apart) instead of grouping by name")
  p.add_argument("--hlo", type=pathlib.Path, default=None,
                 help="decode_loop: write the compiled decode loop's HLO text here (one file per density)")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  # A decode loop recorded as one command buffer (WHILE) hides its kernels from the profiler (a Llama-3.1 B32
  # step read 0.29 ms of kernels): profile the loop with XLA's default kinds, each step's kernels still in
  # graphs.
  options = common.decode_options(args).replace(loop_graph=False)
  return _profile(p, args, options)


def _profile(p, args, options) -> int:
  if args.smoke:
    args.model, args.batch, args.prompt, args.n1, args.n2, args.dtype = "tiny", 2, 16, 2, 6, "float32"
  config = e2e.MODELS[args.model]
  model = e2e.prepared_model(config, jnp.dtype(args.dtype), tp=args.tp, fuse=not args.no_fuse)
  if args.mlp == "router" and config.mlp != "relu_mlp":
    p.error(f"--mlp router needs a ReLU model; {args.model} has {config.mlp}")
  topk = e2e.read_mlp_topk(args.mlp_topk_dir) if args.mlp == "router" else None
  routers = e2e.random_routers(config, mlp_topk=topk) if any(d < 1 for d in args.densities) or topk else None
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.prompt)).astype(np.int32)
  prov = common.provenance()
  for density in args.densities:
    setting = e2e.Setting(args.model, args.batch, args.prompt, density, args.mlp, args.mlp_dense_above,
                          args.router_dtype)
    sparsity = e2e.sparsity_for(setting)
    sparse = sparsity is not None
    group = (lambda name: name) if args.instances else kernel_group
    counts: dict[str, int] = {}
    if args.timing == "decode_loop":
      loop = e2e.DecodeLoop(model, ids, sparsity, routers, max_new_tokens=args.n2, options=options)
      if args.hlo is not None:
        args.hlo.mkdir(parents=True, exist_ok=True)
        (args.hlo / f"{args.model}_B{args.batch}_p{args.prompt}_d{density:g}_{args.mlp}.hlo.txt").write_text(
            loop.compiled_text(*loop.prefill()))
      totals = traced_totals(lambda tok, cache: loop.decode(tok, cache, args.n2), loop.prefill, group, counts)
      steps = {k: v / args.n2 / 1e6 for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0}
      launches = {k: c / args.n2 for k, c in counts.items()}
    else:
      kw: dict[str, Any] = dict(options=options)
      if sparsity is not None:
        kw.update(sparsity=sparsity, routers=routers)
      t1 = traced_totals(lambda: generate(model, ids, max_new_tokens=args.n1, **kw).tokens, group=group)
      t2 = traced_totals(lambda: generate(model, ids, max_new_tokens=args.n2, **kw).tokens, group=group)
      steps = per_step(t1, t2, args.n1, args.n2)
      launches = {}
    total = sum(steps.values())
    print(f"\n{args.model} B{args.batch} prompt {args.prompt} density {density:g} mlp {args.mlp} tp {args.tp}: "
          f"{total:.3f} ms of kernels per step" + (" (summed over devices)" if args.tp > 1 else ""))
    for name, ms in list(steps.items())[:args.top]:
      per = f" x{launches[name]:5.2f}" if name in launches else ""
      print(f"  {ms:8.4f} ms {100 * ms / total:5.1f}%{per}  {name[:110]}")
    common.append_jsonl(args.out, [dict(prov, kind="step_profile", model=args.model, B=args.batch,
                                        prompt=args.prompt, density=density, mlp=args.mlp, tp=args.tp,
                                        mlp_dense_above=args.mlp_dense_above if sparse and args.mlp == "router"
                                        else None, router_dtype=(args.router_dtype or args.dtype) if sparse
                                        else None,
                                        fused=not args.no_fuse, **common.options_record(options),
                                        kernel=name, ms_per_step=ms, launches_per_step=launches.get(name),
                                        timing=args.timing, instances=args.instances,
                                        step_kernel_ms=total) for name, ms in steps.items()])
  return 0


if __name__ == "__main__":
  sys.exit(main())
