"""Platform detection and implementation resolution shared by all kernels.

`implementation=None` resolves to "pallas" on a GPU backend and to "xla" elsewhere.
"pallas" on a non-GPU backend runs the Triton-style kernels in Pallas interpret mode
(slow, for tests). "xla" always runs the pure-XLA reference.
"""
from __future__ import annotations

import functools

import jax

IMPLEMENTATIONS = ("pallas", "xla")

# H100 SXM has 132 SMs; used when the device does not report its core count.
DEFAULT_NUM_SMS = 132


def is_gpu() -> bool:
  """True when the default JAX backend is a GPU (CUDA or ROCm)."""
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def resolve_implementation(implementation: str | None) -> str:
  """Maps None to the platform default and validates explicit choices."""
  if implementation is None:
    return "pallas" if is_gpu() else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown implementation {implementation!r}; expected one of "
        f"{IMPLEMENTATIONS} or None")
  return implementation


def interpret_mode() -> bool:
  """Pallas kernels run in interpret mode whenever no GPU backend is present."""
  return not is_gpu()


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
  """Streaming-multiprocessor count of the default device (132 if unknown)."""
  try:
    count = getattr(jax.devices()[0], "core_count", None)
  except RuntimeError:
    count = None
  return int(count) if count else DEFAULT_NUM_SMS


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (n >= 1)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def is_concrete(x) -> bool:
  """True when the values of `x` can be read on the host (not a tracer)."""
  return not isinstance(x, jax.core.Tracer)
