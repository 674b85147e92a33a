"""Public batch-union neuron selection: validation, dispatch.

  idx_k = union_topk(logits_RN, k, active_R=None)   # top-k of sum_r active_r * relu(logits[r]), ascending

The decode step's MLP neuron set for OPT-style ReLU MLPs (`polar_jax.sparse_decode`): the k neurons with the
highest union score over the batch's active rows, as `lax.top_k`'s set (ties: lower index first), in ascending
index order. "pallas": one multi-program kernel (`union_topk_triton`: the row sum, a 4-pass radix select with
grid barriers and the compaction); "xla": the reference (`union_topk_xla`: ~10 small kernels on GPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels import union_topk_triton as _triton
from pallas_kernels import union_topk_xla as _xla


def union_topk(logits_RN: jax.Array, k: int, active_R: jax.Array | None = None, *,
               implementation: str | None = None) -> jax.Array:
  """int32 `[k]`: see the module docstring. active_R: bool or 0/1 `[R]` (None: every row).

  Raises:
    ValueError: logits not a 2-D floating array, active_R not [R], or k outside [1, N].
  """
  if logits_RN.ndim != 2 or not jnp.issubdtype(logits_RN.dtype, jnp.floating):
    raise ValueError(f"logits must be a floating [rows, N] array, got {logits_RN.dtype} {logits_RN.shape}")
  r, n = logits_RN.shape
  if active_R is not None and active_R.shape != (r,):
    raise ValueError(f"active_R must have shape ({r},) (one flag per logit row), got {active_R.shape}")
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}]")
  if k == n:
    return jnp.arange(n, dtype=jnp.int32)
  if _platform.resolve_implementation(implementation) == "xla" or r == 0:
    return _xla.union_topk_xla(logits_RN, active_R, k)
  interpret = _platform.interpret_mode()
  programs, cols = _triton.layout(n, interpret=interpret)
  active = jnp.ones((r,), jnp.int32) if active_R is None else active_R
  return _triton.union_topk_triton(logits_RN, active, k, programs=programs, cols=cols, interpret=interpret)
