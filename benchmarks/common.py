"""Shared benchmark helpers: device copy bandwidth, provenance, JSON lines, timing."""

from __future__ import annotations

import dataclasses
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


def add_decode_options(parser) -> None:
  """`DecodeOptions` as command-line flags (shared by `e2e.py` and `profile_step.py`, for A/B runs in one call):
  `--kernels`, `--no-<flag>` for each boolean option that defaults on, `--union-dtype`, `--union-method`."""
  from polar_jax.options import KERNELS, UNION_DTYPES, UNION_METHODS, DecodeOptions
  helps = {f.name: f.name.replace("_", " ") for f in dataclasses.fields(DecodeOptions)}
  parser.add_argument("--kernels", default="auto", choices=KERNELS, help="DecodeOptions.kernels (default: auto)")
  for name in ("fused_projections", "deferred_norm", "router_in_qkv", "loop_graph"):
    parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", default=True,
                        help=f"DecodeOptions({name}=False): turn off the {helps[name]}")
  parser.add_argument("--union-dtype", default="bfloat16", choices=UNION_DTYPES, help="DecodeOptions.union_dtype")
  parser.add_argument("--union-method", default="radix", choices=UNION_METHODS, help="DecodeOptions.union_method")


def decode_options(args):
  """The `DecodeOptions` of `add_decode_options`' flags (fused_projections off turns off what needs it too)."""
  from polar_jax.options import DecodeOptions
  fused = args.fused_projections
  return DecodeOptions(kernels=args.kernels, fused_projections=fused, deferred_norm=args.deferred_norm and fused,
                       router_in_qkv=args.router_in_qkv and fused, union_dtype=args.union_dtype,
                       union_method=args.union_method, loop_graph=args.loop_graph)


def options_record(options) -> dict[str, Any]:
  """A record's fields for its `DecodeOptions`."""
  return dataclasses.asdict(options)
