"""Gathered-MLP implementation variants vs the target bound (1.25 x bytes / copy bandwidth + 10 us), on one GPU.

For M in {1, 8, 32, 128} and density in {0.1, 0.25, 0.5, 1.0} (d 4096, N 16384,
ReLU, bf16, cols + rows): each variant is first checked against the XLA
reference on random inputs (max relative error = max |out - ref| / max |ref|);
a variant that fails to compile, raises or misses the tolerance is reported
with `error` and not timed. The others are timed with `kernels.py`'s Timer
(CUPTI sum of every kernel of the op, inputs rotated beyond L2), next to the
device copy bandwidth measured in the same run, and compared with
  bound_ms = 1.25 * bytes / copy_bandwidth + 10 us,  bytes = 2 * k * d * 2.
One JSON line per (variant, M, density) is appended to --out with provenance
keys and op "gather_mlp_variant", impl, M, density, ms, bytes, bound_ms, meets.

  PYTHONPATH=$PWD python3 benchmarks/mlp_variants.py --out $OUT/mlp_variants.jsonl
  python benchmarks/mlp_variants.py --smoke --out /tmp/v.jsonl   # CPU, tiny
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)
from benchmarks import common  # noqa: E402
from pallas_kernels import gather_matmul_cols  # noqa: E402
from pallas_kernels import gather_matmul_rows  # noqa: E402

BOUND_FACTOR = 1.25
BOUND_FIXED_MS = 0.010
TOLERANCE = 2e-2  # bf16 inputs, float32 accumulation
MS = (1, 8, 32, 128)
DENSITIES = (0.1, 0.25, 0.5, 1.0)
D_MODEL, N_NEURONS = 4096, 16384


def mlp_bytes(k: int, d: int, itemsize: int = 2) -> int:
  """Bytes that must be read: the selected rows of both weights."""
  return 2 * k * d * itemsize


def bound_ms(nbytes: int, copy_tbps: float) -> float:
  """The target bound: 1.25 x bytes / copy bandwidth + 10 us, in ms."""
  return BOUND_FACTOR * nbytes / (copy_tbps * 1e12) * 1e3 + BOUND_FIXED_MS


def max_rel_err(out, ref) -> float:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  if not np.all(np.isfinite(out)):
    return float("inf")
  return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def _mlp(idx, impl):
  def fn(x, w1, w2, b1, b2):
    h = gather_matmul_cols(x, w1, idx, b1, "relu", implementation=impl)
    return gather_matmul_rows(h, w2, idx, b2, implementation=impl)
  return fn


# name -> function of idx returning fn(x, w1, w2, b1, b2). "fused" (one-launch
# cols->rows Triton kernel) is not implemented yet.
VARIANTS = {
    "pallas": lambda idx: _mlp(idx, "pallas"),
    "mosaic": lambda idx: _mlp(idx, "mosaic"),
}


def _error_head(e: BaseException, n: int = 300) -> str:
  return f"{type(e).__name__}: {str(e).strip()[:n]}"


def run_case(timer, base, name, make, sets, idx, ref, M, d, N, density,
             nbytes, sink):
  """Checks one variant on sets[0], then times it; returns the record."""
  rec = dict(base, op="gather_mlp_variant", impl=name, M=M, d=d, N=N,
             density=density, dtype="bfloat16", bytes=nbytes,
             bound_ms=bound_ms(nbytes, base["copy_tbps"]), ms=None,
             ms_wall=None, timer=None, meets=None, max_rel_err=None,
             error=None)
  t0 = time.perf_counter()
  try:
    fn = make(idx)
    out = jax.block_until_ready(jax.jit(fn)(*sets[0]))
    rec["max_rel_err"] = err = max_rel_err(out, ref)
    if not err <= TOLERANCE:
      raise AssertionError(f"max_rel_err {err:.3g} > {TOLERANCE}")
    ms, wall, how, _ = timer(fn, sets)
    rec.update(ms=ms, ms_wall=wall, timer=how, meets=bool(ms <= rec["bound_ms"]))
  except Exception as e:  # pylint: disable=broad-except
    rec["error"] = _error_head(e)
    print(f"  {name} M={M} density={density} FAILED: {rec['error']}",
          flush=True)
  rec["seconds"] = round(time.perf_counter() - t0, 2)
  if rec["ms"] is not None:
    rec["tbps"] = nbytes / (rec["ms"] * 1e-3) / 1e12
    rec["roofline_frac"] = rec["tbps"] / base["copy_tbps"]
    print(f"  {name:8s} M={M:3d} dens={density:4.2f} {rec['ms'] * 1e3:7.1f} us"
          f" bound {rec['bound_ms'] * 1e3:6.1f} us "
          f"{'MEETS' if rec['meets'] else 'miss '} err {rec['max_rel_err']:.1e}"
          f" ({rec['seconds']} s)", flush=True)
  sink(rec)
  return rec


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(
      _HERE, "results", "kernels_sweep.jsonl"))
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated subset of " + ",".join(VARIANTS))
  parser.add_argument("--ms", default=",".join(map(str, MS)))
  parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
  parser.add_argument("--budget-s", type=float, default=170.0,
                      help="stop starting new shapes after this many seconds")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes on CPU (pallas in interpret mode)")
  parser.add_argument("--label", default=None)
  args = parser.parse_args(argv)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  import kernels as bench  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  on_gpu = jax.default_backend() == "gpu"
  timer = bench.Timer(iters=2 if args.smoke else args.iters, cupti=on_gpu,
                      warmup=1 if args.smoke else 3)
  base = common.provenance()
  base["copy_tbps"] = bench.copy_bandwidth(timer, (1 << 20) if args.smoke
                                           else (1 << 30))
  if args.label:
    base["kernel_version"] = args.label
  print(f"{base['device']} jax {base['jax']}: copy {base['copy_tbps']:.2f} TB/s",
        flush=True)
  d, N = (64, 256) if args.smoke else (D_MODEL, N_NEURONS)
  ms_list = [int(m) for m in args.ms.split(",")]
  densities = [float(x) for x in args.densities.split(",")]
  names = [v for v in args.variants.split(",") if v]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def sink(rec):
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")

  records = []
  for density in densities:
    k = max(1, round(density * N))
    nbytes = mlp_bytes(k, d)
    idx = jnp.asarray(np.random.default_rng(k).permutation(N)[:k], jnp.int32)
    copies = 1 if args.smoke else bench._copies(nbytes)  # pylint: disable=protected-access
    wsets = []
    for r in range(copies):
      ks = jax.random.split(jax.random.key(100 + r), 4)
      wsets.append((jax.random.normal(ks[0], (N, d), jnp.bfloat16) * 0.02,
                    jax.random.normal(ks[1], (N, d), jnp.bfloat16) * 0.02,
                    jax.random.normal(ks[2], (N,), jnp.bfloat16) * 0.02,
                    jax.random.normal(ks[3], (d,), jnp.bfloat16) * 0.02))
    for M in ms_list:
      if time.perf_counter() - start > args.budget_s:
        print(f"budget of {args.budget_s} s spent: skipping M={M} "
              f"density={density}", flush=True)
        continue
      x = jax.random.normal(jax.random.key(M), (M, d), jnp.bfloat16)
      sets = [(x,) + w for w in wsets]
      ref = jax.jit(_mlp(idx, "xla"))(*sets[0])
      for name in names:
        records.append(run_case(timer, base, name, VARIANTS[name], sets, idx,
                                ref, M, d, N, density, nbytes, sink))
    del wsets
  print(f"done in {time.perf_counter() - start:.0f} s; "
        f"{sum(r['meets'] is True for r in records)}/{len(records)} meet the "
        "bound", flush=True)
  return records


if __name__ == "__main__":
  main()
