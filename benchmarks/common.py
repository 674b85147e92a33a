"""Shared benchmark helpers: device copy bandwidth, provenance, JSON lines, timing."""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def git_commit() -> str:
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
  }


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> float:
  """Median wall-clock seconds of `fn()` (blocked until ready) after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def copy_bandwidth_tbps(nbytes: int = 1 << 30, iters: int = 20) -> float:
  """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
  n = nbytes // 2
  x = jnp.arange(n, dtype=jnp.float32).astype(jnp.bfloat16)
  copy = jax.jit(lambda a: a * jnp.bfloat16(1.0) + jnp.bfloat16(0.0))
  seconds = time_fn(lambda: copy(x), warmup=3, iters=iters)
  return 2 * x.size * x.dtype.itemsize / seconds / 1e12


def append_jsonl(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
