"""Public head-router selection of the decode step: validation, dispatch.

  idx_BK = router_topk(x_BD, w_DG, b_G, k)   # lax.top_k(x @ w + b, k)[1], float32 scores

"pallas": one kernel (`router_topk_triton`: scores and ranking on chip) instead of XLA's GEMM, split-K sum and
rank top-k; "xla": the reference (`router_topk_xla`). The dot's accumulation order differs between the two, so
groups whose scores tie to within float32 rounding may be ordered differently.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels import router_topk_triton as _triton
from pallas_kernels import router_topk_xla as _xla

# Rows per program of the kernel. Chosen on one H100 (session 8, `kernels.py --only router`).
ROWS_PER_PROGRAM = 1


def router_topk(x_BD, w_DG, b_G, k: int, *, implementation: str | None = None,
                rows_per_program: int | None = None):
  """int32 `[B, k]`: each row's k highest-scoring groups by descending float32 score (ties: lower index first).

  Raises:
    ValueError: shapes that disagree, or k outside [1, G].
  """
  if x_BD.ndim != 2 or w_DG.ndim != 2 or x_BD.shape[1] != w_DG.shape[0] or b_G.shape != (w_DG.shape[1],):
    raise ValueError(f"router_topk needs x [B, D], w [D, G], b [G]; got {x_BD.shape}, {w_DG.shape}, {b_G.shape}")
  G = w_DG.shape[1]
  if not 1 <= k <= G:
    raise ValueError(f"k={k} must lie in [1, {G}]")
  impl = _platform.resolve_implementation(implementation)
  if impl == "pallas" and _triton.block_d_for(x_BD.shape[1]):
    return _triton.router_topk_triton(x_BD, w_DG, b_G, k=k, rows_per_program=rows_per_program or ROWS_PER_PROGRAM,
                                      interpret=_platform.interpret_mode())
  return _xla_jit(x_BD, w_DG, b_G, k=k)


_xla_jit = jax.jit(_xla.router_topk_xla, static_argnames=("k",))
