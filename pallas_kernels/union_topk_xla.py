"""The batch-union neuron set in plain XLA: the reference of `union_topk_triton` (same signature).

  idx_k = union_topk_xla(logits_RN, active_R, k)   # top-k of sum_r active_r * relu(logits[r]), ascending

The union score of neuron n is `sum_r relu(logits[r, n])` over the active rows (float32); the set is the k largest
(ties: lower index first: `lax.top_k`'s set), found by `topk_select_xla.topk_set` (4 radix passes, a cumsum and a
scatter: ~10 small kernels per decode layer on GPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.topk_select_xla import topk_set


def union_scores(logits_RN: jax.Array, active_R: jax.Array | None) -> jax.Array:
  """float32 `[N]`: `sum_r relu(logits[r])` over the active rows (all rows when active_R is None)."""
  act = jax.nn.relu(logits_RN.astype(jnp.float32))
  if active_R is not None:
    act = jnp.where(active_R.astype(bool)[:, None], act, 0.0)
  return act.sum(axis=0)


def union_topk_xla(logits_RN: jax.Array, active_R: jax.Array | None, k: int) -> jax.Array:
  """int32 `[k]`: the k highest union scores' indices in ascending order (see the module docstring)."""
  return topk_set(union_scores(logits_RN, active_R)[None], k)[0]
