"""Public top-k index sets of score rows (the batch-union neuron selection): validation, dispatch.

  idx_rk = topk_select(scores_rn, k)    # per row, the k largest scores' indices, ascending; ties: lower index first

The same set per row as `jax.lax.top_k(scores_rn, k)[1]`, without its sort. "pallas": one program per row
(`topk_select_triton`) for rows of up to `TopkHeuristics.kernel_max_n` (4096) scores, where it measured faster;
longer rows (OPT-6.7B's 16384 neurons on one GPU) take the reference; "xla": a 4-pass radix select
(`topk_select_xla.topk_set`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels import topk_select_triton as _triton
from pallas_kernels import topk_select_xla as _xla


def topk_select(scores_rn: jax.Array, k: int, *, implementation: str | None = None,
                heuristics: _triton.TopkHeuristics = _triton.TopkHeuristics()) -> jax.Array:
  """int32 `[R, k]`: each row's k largest scores' indices in ascending order (see the module docstring).
  `heuristics`: which rows take the kernel under "pallas".

  Raises:
    ValueError: scores not a 2-D floating array, or k outside [1, N].
    TypeError: heuristics not a `TopkHeuristics`.
  """
  if not isinstance(heuristics, _triton.TopkHeuristics):
    raise TypeError(f"heuristics must be a TopkHeuristics, got {type(heuristics).__name__}")
  if scores_rn.ndim != 2:
    raise ValueError(f"scores must be 2-D [rows, N], got shape {scores_rn.shape}")
  if not jnp.issubdtype(scores_rn.dtype, jnp.floating):
    raise ValueError(f"scores must be floating point, got {scores_rn.dtype}")
  r, n = scores_rn.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}]")
  impl = _platform.resolve_implementation(implementation)
  if k == n:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (r, n))
  if impl == "pallas" and _platform.next_pow2(n) <= heuristics.kernel_max_n:
    return _triton.topk_select_triton(scores_rn.astype(jnp.float32), k, interpret=_platform.interpret_mode())
  return _xla.topk_set(scores_rn, k)
