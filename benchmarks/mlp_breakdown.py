"""Per-kernel CUPTI times of the gathered MLP (cols + rows) for chosen configs.

Where `kernels.py` reports one sum per MLP, this lists every kernel the op
launches (Pallas kernels, XLA fills/epilogues) with its median time, so a change
can be attributed. Configs: the heuristics ("pallas") and the named VARIANTS,
each a function (M, d, k) -> (cols config, rows config) or None where it does
not apply. One JSON line per (shape, config) in --out, `kernels.py`'s fields
plus "kernels": [[name, ms], ...] and "config".

  python3 benchmarks/mlp_breakdown.py --out $OUT/breakdown.jsonl    # on the GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)
import kernels as bench  # noqa: E402
from pallas_kernels import GatherConfig  # noqa: E402
from pallas_kernels import gather_matmul_triton as gmt  # noqa: E402
from pallas_kernels import _platform  # noqa: E402

D_MODEL, N_NEURONS = 4096, 16384


def _with_tiles(op, bm, bn, bk, warps, stages):
  """A config of the given tiles with the heuristic's split count."""
  def make(m, d, k):
    n_out, red = (k, d) if op == "cols" else (d, k)
    tiles = _platform.cdiv(m, bm) * _platform.cdiv(n_out, bn)
    ns = gmt.min_splits(tiles, _platform.cdiv(red, bk), _platform.num_sms())
    return GatherConfig(bm, bn, bk, ns, warps, stages)
  return make


def _heuristic(op):
  choose = gmt.choose_cols_config if op == "cols" else gmt.choose_rows_config
  return lambda m, d, k: choose(m, d, k, 2)


# name -> (cols maker, rows maker, shapes it runs on as (M, density)): the tile
# variants of the v4 tuning (each record stores the configs it ran).
VARIANTS = {
    "bm64": (_with_tiles("cols", 64, 64, 128, 4, 4),
             _with_tiles("rows", 64, 128, 128, 4, 5),
             [(128, 0.1), (128, 0.25), (128, 0.5)]),
    "bn64": (_with_tiles("cols", 128, 64, 64, 8, 4),
             _with_tiles("rows", 128, 64, 64, 8, 5),
             [(128, 0.1), (128, 0.25), (128, 0.5)]),
    "narrow": (_with_tiles("cols", 16, 32, 128, 4, 5),
               _with_tiles("rows", 16, 64, 128, 4, 5),
               [(1, 0.1), (8, 0.1)]),
    "narrow32": (_with_tiles("cols", 32, 32, 128, 4, 5),
                 _with_tiles("rows", 32, 64, 128, 4, 5),
                 [(32, 0.1), (32, 0.25)]),
}
HEURISTIC_SHAPES = [(1, 0.1), (32, 0.1), (32, 0.25), (128, 0.1), (128, 0.25),
                    (128, 0.5)]


def per_kernel(fn, arg_sets, iters):
  """[(kernel name, median ms per call of fn)], kernels of a name summed; the
  calls over arg_sets are independent, so XLA may interleave their kernels."""
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=import-outside-toplevel
  multi = jax.jit(lambda sets: [fn(*a) for a in sets])
  jax.block_until_ready(multi(arg_sets))
  _, runs = profiler.measure(multi, aggregate=False, iterations=iters)(arg_sets)
  totals = []
  for run in runs:
    per_name = {}
    for name, ms in run:
      per_name[name] = per_name.get(name, 0.0) + ms / len(arg_sets)
    totals.append(per_name)
  return [(name, statistics.median(t.get(name, 0.0) for t in totals))
          for name in totals[0]]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--label", default=None)
  args = parser.parse_args(argv)
  timer = bench.Timer(iters=args.iters, cupti=True)
  base = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
              commit=bench._commit())  # pylint: disable=protected-access
  base["copy_tbps"] = bench.copy_bandwidth(timer, 1 << 30)
  if args.label:
    base["kernel_version"] = args.label
  jobs = [("pallas", _heuristic("cols"), _heuristic("rows"), s)
          for s in HEURISTIC_SHAPES]
  jobs += [(f"pallas:{name}", cols, rows, s)
           for name, (cols, rows, shapes) in VARIANTS.items() for s in shapes]
  jobs.sort(key=lambda j: (j[3][1], j[3][0]))  # shares weights per density
  d, N = D_MODEL, N_NEURONS
  wsets, wkey = None, None
  for impl, make_cols, make_rows, (M, density) in jobs:
    k = round(density * N)
    sel_bytes = 2 * k * d * 2
    if wkey != density:
      wsets, wkey = None, density
      wsets = []
      for r in range(bench._copies(sel_bytes)):  # pylint: disable=protected-access
        ks = jax.random.split(jax.random.key(100 + r), 4)
        wsets.append((jax.random.normal(ks[0], (N, d), jnp.bfloat16) * 0.02,
                      jax.random.normal(ks[1], (N, d), jnp.bfloat16) * 0.02,
                      jax.random.normal(ks[2], (N,), jnp.bfloat16) * 0.02,
                      jax.random.normal(ks[3], (d,), jnp.bfloat16) * 0.02))
    idx = jnp.asarray(np.random.default_rng(k).permutation(N)[:k], jnp.int32)
    x = jax.random.normal(jax.random.key(M), (M, d), jnp.bfloat16)
    cfgs = (make_cols(M, d, k), make_rows(M, d, k))
    fn = bench._mlp_fn(idx, *cfgs)  # pylint: disable=protected-access
    try:
      kern = per_kernel(fn, [(x,) + w for w in wsets], args.iters)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{impl} M={M} density={density} failed: {type(e).__name__}: "
            f"{str(e)[:300]}")
      continue
    rec = dict(base, op="gather_mlp", impl=impl, M=M, d=d, N=N,
               density=density, dtype="bfloat16",
               ms=sum(t for _, t in kern), ms_wall=None, timer="cupti",
               bytes=sel_bytes, kernels=[[n, t] for n, t in kern],
               config=[dataclasses.asdict(c) for c in cfgs])
    rec = bench._finish(rec)  # pylint: disable=protected-access
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")
    parts = " ".join(f"{n[:22]}={t * 1e3:.1f}" for n, t in kern)
    print(f"{impl:16s} M={M:3d} dens={density:4.2f} {rec['ms'] * 1e3:6.1f} us "
          f"roof {rec['roofline_frac']:.2f} | {parts}", flush=True)


if __name__ == "__main__":
  main()
