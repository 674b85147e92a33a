"""Shared benchmark helpers: device copy bandwidth, provenance, JSON lines, timing."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import statistics
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def git_commit() -> str:
  """The short commit of this checkout (+dirty), or $POLAR_JAX_COMMIT when set (the device tool's copy of the
  working tree carries a stale .git, so device runs pass the commit they were launched from)."""
  if os.environ.get("POLAR_JAX_COMMIT"):
    return os.environ["POLAR_JAX_COMMIT"]
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=pathlib.Path(__file__).resolve().parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=10, cwd=pathlib.Path(__file__).resolve().parent)
    if out.returncode:
      return "uncommitted"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def provenance() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", dev.platform),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "commit": git_commit(),
      # compiler flags change the kernels XLA picks (e.g. cuBLAS vs Triton GEMMs): runs say which they used
      "xla_flags": os.environ.get("XLA_FLAGS") or None,
  }


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10, stat: str = "median") -> float:
  """Wall-clock seconds of `fn()` (blocked until ready) after warm-up: the median of `iters` calls, or with
  `stat="min"` the fastest (for differences of two long runs, where interference only ever adds time)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  if stat not in ("median", "min"):
    raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
  return min(times) if stat == "min" else statistics.median(times)


def copy_bandwidth_tbps(nbytes: int = 1 << 30, iters: int = 20) -> float:
  """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written.

  `iters` read-modify-write passes over one buffer run inside a single jitted `fori_loop`, so one dispatch is
  amortised over all of them (timing each 2 GB pass on its own, as before 2026-11-21 evening, read 5-20% low:
  the end-to-end roofline fractions came out above 1). Median of 3 timed calls after a warm-up.
  """
  n = nbytes // 2
  x = jnp.arange(n, dtype=jnp.float32).astype(jnp.bfloat16)

  @jax.jit
  def passes(a):
    # `+ 1` (not `* 1`, which XLA simplifies away; 1.0001 rounds to 1 in bfloat16).
    return jax.lax.fori_loop(0, iters, lambda _, y: y + jnp.bfloat16(1), a)

  seconds = time_fn(lambda: passes(x), warmup=1, iters=3)
  return 2 * iters * x.size * x.dtype.itemsize / seconds / 1e12


def append_jsonl(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")


def add_step_switches(parser) -> None:
  """The decode step's kernel switches shared by `e2e.py` and `profile_step.py` (for A/B runs in one call)."""
  parser.add_argument("--append-in-kernel", action="store_true",
                      help="the direct attention kernel writes the new K/V slots "
                           "(decode_attention_triton.APPEND_IN_KERNEL)")
  parser.add_argument("--no-rope-append", action="store_true",
                      help="XLA's RoPE fusion and K/V scatters instead of the fused rope_append kernel "
                           "(polar_jax.attention.FUSED_ROPE_APPEND)")
  parser.add_argument("--no-decode-matmul", action="store_true",
                      help="XLA's dots and residual adds for the decode projections instead of "
                           "pallas_kernels.skinny_matmul (polar_jax.layers.DECODE_MATMUL)")
  parser.add_argument("--norm-in-matmul", action="store_true",
                      help="the pre-norm RMSNorms inside the q|k|v and gate|up kernels (polar_jax.layers.NORM_IN_MATMUL)")
  parser.add_argument("--no-router-in-qkv", action="store_true",
                      help="a linear head router as its own XLA dot, not extra programs of the q|k|v kernel "
                           "(polar_jax.model.ROUTER_IN_QKV)")
  parser.add_argument("--no-glu-epilogue", action="store_true",
                      help="the gated MLP's act(gate) * up as an XLA fusion, not in the gate|up kernel's epilogue "
                           "(polar_jax.mlp.GLU_EPILOGUE)")
  parser.add_argument("--no-chained-counters", action="store_true",
                      help="o_proj / down_proj zero-fill their own split-K counters (polar_jax.layers.CHAINED_COUNTERS)")
  parser.add_argument("--attention-kernel", default="persistent", choices=["persistent", "direct"],
                      help="unsplit decode attention: the persistent kernel (default) or one direct program per "
                           "(row, group) (decode_attention_triton.PERSISTENT)")


def apply_step_switches(args) -> dict[str, Any]:
  """Sets the module switches from `add_step_switches`' flags; returns them as record fields."""
  from pallas_kernels import decode_attention_triton  # pylint: disable=import-outside-toplevel
  from polar_jax import attention, layers  # pylint: disable=import-outside-toplevel
  decode_attention_triton.APPEND_IN_KERNEL = args.append_in_kernel
  decode_attention_triton.PERSISTENT = args.attention_kernel == "persistent"
  attention.FUSED_ROPE_APPEND = not args.no_rope_append
  from polar_jax import mlp, model  # pylint: disable=import-outside-toplevel
  mlp.GLU_EPILOGUE = not args.no_glu_epilogue
  layers.DECODE_MATMUL = not args.no_decode_matmul
  layers.NORM_IN_MATMUL = args.norm_in_matmul
  layers.CHAINED_COUNTERS = not args.no_chained_counters
  model.ROUTER_IN_QKV = not args.no_router_in_qkv
  return dict(append_in_kernel=args.append_in_kernel, attention_kernel=args.attention_kernel,
              rope_append=not args.no_rope_append, decode_matmul=not args.no_decode_matmul,
              norm_in_matmul=args.norm_in_matmul, router_in_qkv=not args.no_router_in_qkv,
              glu_epilogue=not args.no_glu_epilogue, chained_counters=not args.no_chained_counters)
