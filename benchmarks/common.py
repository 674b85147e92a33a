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


# The decode step's on/off kernel switches: (record field, module, attribute, default, help). A default-on switch
# is turned off by `--no-<field>`, a default-off one on by `--<field>` (dashes for underscores).
STEP_SWITCHES = (
    ("append_in_kernel", "pallas_kernels.decode_attention_triton", "APPEND_IN_KERNEL", False,
     "the direct attention kernel writes the new K/V slots"),
    ("rope_append", "polar_jax.attention", "FUSED_ROPE_APPEND", True,
     "the fused rope_append kernel (off: XLA's RoPE fusion and K/V scatters)"),
    ("rope_in_qkv", "polar_jax.attention", "ROPE_IN_QKV", False,
     "RoPE + K/V append in the q|k|v kernel's epilogue (pallas_kernels.qkv_rope_append)"),
    ("decode_matmul", "polar_jax.layers", "DECODE_MATMUL", True,
     "pallas_kernels.skinny_matmul for the decode projections (off: XLA's dots and residual adds)"),
    ("router_in_qkv", "polar_jax.model", "ROUTER_IN_QKV", True,
     "a linear head router as extra programs of the q|k|v kernel (off: its own XLA dot)"),
    ("router_topk_in_qkv", "polar_jax.model", "ROUTER_TOPK_IN_QKV", True,
     "with router_in_qkv, the router's per-row top-k in the side program's epilogue (off: an XLA fusion)"),
    ("glu_epilogue", "polar_jax.mlp", "GLU_EPILOGUE", True,
     "the gated MLP's act(gate) * up in the gate|up kernel's epilogue (off: an XLA fusion)"),
    ("chained_counters", "polar_jax.layers", "CHAINED_COUNTERS", True,
     "o_proj / down_proj take zeroed split-K counters from the q|k|v / gate|up kernels (off: zero-filled by XLA)"),
    ("deferred_norm", "polar_jax.layers", "DEFERRED_NORM", True,
     "RMSNorms in the projection kernels: o_proj / down_proj write h * g and h's squares, the next kernel scales "
     "its rows (off: RMSNorm as an XLA fusion)"),
    ("neuron_decode", "polar_jax.mlp", "NEURON_DECODE", True,
     "a dense ReLU MLP (OPT) on skinny_matmul: fc1 from its [N, d] rows with bias + ReLU, fc2 with bias + residual "
     "(off: XLA's split-K dots and fusions)"),
    ("union_in_router", "polar_jax.sparse_decode", "UNION_IN_ROUTER", True,
     "the batch-union neuron scores in the router up-projection kernel's epilogue (off: XLA's dots and fusions)"),
    ("union_bf16", "polar_jax.topk", "UNION_BF16", True,
     "rank the batch-union neuron scores rounded to bf16: two radix passes instead of four (off: float32)"),
    ("loop_graph", "polar_jax.compile_options", "LOOP_GRAPH", True,
     "the decode loop as one command buffer: XLA's default kinds + WHILE, CONDITIONAL (off: XLA's default kinds)"),
)


def _switch_flag(field: str, default: bool) -> str:
  return ("--no-" if default else "--") + field.replace("_", "-")


def add_step_switches(parser) -> None:
  """The decode step's kernel switches shared by `e2e.py` and `profile_step.py` (for A/B runs in one call)."""
  for field, module, attr, default, help_text in STEP_SWITCHES:
    parser.add_argument(_switch_flag(field, default), dest=field, action="store_false" if default else "store_true",
                        default=default, help=f"{'turn off: ' if default else ''}{help_text} ({module}.{attr})")
  parser.add_argument("--attention-kernel", default="persistent", choices=["persistent", "direct"],
                      help="unsplit decode attention: the persistent kernel (default) or one direct program per "
                           "(row, group) (decode_attention_triton.PERSISTENT)")


def apply_step_switches(args) -> dict[str, Any]:
  """Sets the module switches from `add_step_switches`' flags; returns them as record fields."""
  import importlib  # pylint: disable=import-outside-toplevel
  fields = {}
  for field, module, attr, _, _ in STEP_SWITCHES:
    setattr(importlib.import_module(module), attr, getattr(args, field))
    fields[field] = getattr(args, field)
  importlib.import_module("pallas_kernels.decode_attention_triton").PERSISTENT = args.attention_kernel == "persistent"
  return dict(fields, attention_kernel=args.attention_kernel)
