"""Sort-free exact top-k for the decode step's selections.

* `rank_topk(scores_rg, k)` (defined in `pallas_kernels.topk_select_xla`; the q|k|v kernel's side programs rank a
  router's scores the same way), a few scores per row (KV groups): equal to `jax.lax.top_k(scores_rg, k)[1]`
  exactly (order and ties included) for rows of up to `RANK_MAX_N` scores: each score's rank is its count of larger
  scores (ties: lower index first), and slot r takes the index of rank r, in one compare-and-reduce fusion of
  `[R, N, N]`. On GPU `lax.top_k` of 32 group scores is a sort kernel plus a slice (0.07 + 0.03 ms per LLaMA-2-7B
  B32 step, benchmarks/NOTES.md).
* `topk_rows(scores_rn, k)`, large k (the batch-union neuron selection, k in the thousands of N ~ 16k): the same
  *set* as `lax.top_k` (ties: lower index first) in ascending index order, by `pallas_kernels.topk_select`: a
  4-pass radix select in XLA (`topk_select_xla.topk_set`), or on GPU for rows of up to 4096 one Pallas program
  per row. `lax.top_k` there is a full sort of the row (~0.1 ms per layer); the order differs, not the set (the
  gathered MLP sums over the set, so only the float summation order changes).
Floats compare in the total order of `lax.top_k`'s comparator (-0.0 below +0.0, NaN beyond +-inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.topk_select import topk_select
from pallas_kernels.topk_select_xla import RANK_MAX_N, rank_topk  # noqa: F401  (re-exported)

METHODS = ("radix", "sort")


def topk_rows(scores_rn: jax.Array, k: int, method: str = "radix", implementation: str | None = None) -> jax.Array:
  """int32 `[R, k]`: each row's top-k indices by `method`: "radix" (`pallas_kernels.topk_select` with
  `implementation`, sort-free, ascending index order) or "sort" (`lax.top_k`, by descending score). The same
  sets exactly; only the order differs."""
  if method == "radix":
    return topk_select(scores_rn, k, implementation=implementation)
  if method == "sort":
    return jax.lax.top_k(scores_rn, k)[1].astype(jnp.int32)
  raise ValueError(f"unknown union method {method!r}; expected one of {METHODS}")


def union_scores(logits_bn: jax.Array, active_b: jax.Array | None, dtype=jnp.bfloat16) -> jax.Array:
  """`[N]`: the batch-union score `sum_b relu(logits)` over active rows, summed in float32 and returned in `dtype`
  (`DecodeOptions.union_dtype`). Rounded to bf16 (the default), the 16-bit keys take two radix passes instead of
  four (`topk_select_xla.key_bits`); neurons whose sums round to one bf16 value tie (lower index first). The paper's
  routers rank fp16 sums."""
  act = jax.nn.relu(logits_bn.astype(jnp.float32))
  if active_b is not None:
    act = jnp.where(active_b[:, None], act, 0.0)
  return act.sum(axis=0).astype(dtype)


def union_topk(logits_bn: jax.Array, active_b: jax.Array | None, k: int, method: str = "radix",
               implementation: str | None = None, dtype=jnp.bfloat16) -> jax.Array:
  """int32 `[k]`: the batch-union neuron set, top-k of `sum_b relu(logits)` over active rows ranked in `dtype`
  (ties: lower index first) by `method` (`topk_rows`: "radix", ascending indices, or "sort"; the same set)."""
  return topk_rows(union_scores(logits_bn, active_b, dtype)[None], k, method, implementation)[0]
