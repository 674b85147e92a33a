"""Top-k index sets of long score rows in plain XLA: the reference of `topk_select_triton` (same signature).

`jax.lax.top_k` with k in the thousands over N = 16384 lowers to a full sort of the row on GPU (XLA's TopK custom
kernel only covers small k): a long chain of small bitonic-merge kernels, ~0.1 ms per layer. `topk_set` returns the
same *set* of indices from a few data-parallel reductions:

  1. radix select of the k-th largest value: the scores as order-preserving uint32 keys, 8 bits per pass
     (4 passes; 2 for 16-bit floats, whose keys have 16 bits); a pass counts, for each of the 256 values of the
     next digit, the keys >= that threshold
     (a `[R, 256, N]` compare-and-count reduction) and keeps the largest digit whose count is still >= k;
  2. selection: every key > T plus the lowest-index keys == T until k are taken (lax.top_k's tie rule:
     lower index first), so the set equals `lax.top_k(scores, k)[1]`'s exactly, ties included;
  3. compaction into a static `[R, k]` array by an inclusive cumsum of the selection and a scatter.

The indices come out in ascending index order, not by descending score as from `lax.top_k`.
Floats compare in the total order of `lax.top_k`'s comparator (-0.0 below +0.0, NaN beyond +-inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RADIX_BITS = 8                 # digit width of one radix-select pass (key_bits / RADIX_BITS passes)
_SIGN = 0x80000000

RANK_MAX_N = 256               # rank_topk's `[R, N, N]` compares up to this many scores per row; sort beyond


def rank_topk(scores_rn: jax.Array, k: int) -> jax.Array:
  """int32 `[R, k]`: each row's k highest scores' indices by descending score, ties lower index first: the same
  array as `jax.lax.top_k(scores_rn, k)[1]` (same float total order), without a sort for N <= `RANK_MAX_N`."""
  r, n = scores_rn.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}]")
  if n > RANK_MAX_N:
    return jax.lax.top_k(scores_rn, k)[1].astype(jnp.int32)
  keys = sortable_keys(scores_rn)
  ki, kj = keys[:, :, None], keys[:, None, :]                           # [R, i, j]: does j rank above i?
  lower = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]              # [i, j]: j < i
  rank_rn = jnp.sum((kj > ki) | ((kj == ki) & lower[None]), axis=-1, dtype=jnp.int32)   # a permutation of 0..n-1
  slots = jnp.arange(k, dtype=jnp.int32)
  cols = jnp.arange(n, dtype=jnp.int32)
  hit_rkn = rank_rn[:, None, :] == slots[None, :, None]                # exactly one n per (row, slot)
  return jnp.sum(jnp.where(hit_rkn, cols[None, None, :], 0), axis=-1, dtype=jnp.int32)


def key_bits(dtype) -> int:
  """Significant bits of `sortable_keys` for scores of `dtype`: 16 for 16-bit floats, else 32."""
  return 16 if jnp.dtype(dtype).itemsize == 2 else 32


def sortable_keys(scores: jax.Array) -> jax.Array:
  """uint32 keys in the total order `lax.top_k`'s comparator uses on floats: -NaN < -inf < ... < -0.0 < +0.0
  < ... < +inf < +NaN. 16-bit floats (bf16, fp16) get keys below 2^16 (`key_bits`), others the float32 bits."""
  if key_bits(scores.dtype) == 16:
    i = jax.lax.bitcast_convert_type(scores, jnp.uint16).astype(jnp.uint32)
    return jnp.where(i >= 0x8000, ~i & 0xFFFF, i | 0x8000)
  i = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  sign = jnp.uint32(_SIGN)
  return jnp.where(i >= sign, ~i, i | sign)


def kth_largest_key(keys_rn: jax.Array, k: int, bits: int = 32) -> jax.Array:
  """uint32 `[R]`: each row's k-th largest key of `bits` significant bits (radix select, `bits / RADIX_BITS`
  compare-and-count passes)."""
  r = keys_rn.shape[0]
  digits = jnp.arange(1 << RADIX_BITS, dtype=jnp.uint32)
  prefix = jnp.zeros((r,), jnp.uint32)
  for shift in range(bits - RADIX_BITS, -1, -RADIX_BITS):
    cand_rj = prefix[:, None] + (digits << shift)[None, :]             # the next digit's thresholds
    cnt_rj = jnp.sum(keys_rn[:, None, :] >= cand_rj[:, :, None], axis=-1, dtype=jnp.int32)
    # cnt is non-increasing in the digit and cnt[0] >= k (invariant): the largest digit with cnt >= k
    digit = jnp.sum(cnt_rj >= k, axis=-1, dtype=jnp.int32) - 1
    prefix = prefix + (digit.astype(jnp.uint32) << shift)
  return prefix


def topk_set(scores_rn: jax.Array, k: int) -> jax.Array:
  """int32 `[R, k]`: per row, the indices of its k largest scores (ties: lower index first), in ascending
  index order. The same set per row as `jax.lax.top_k(scores_rn, k)[1]` (see the module docstring)."""
  r, n = scores_rn.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}]")
  if k == n:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (r, n))
  keys = sortable_keys(scores_rn)
  t_r1 = kth_largest_key(keys, k, key_bits(scores_rn.dtype))[:, None]
  gt = (keys > t_r1).astype(jnp.int32)
  eq = (keys == t_r1).astype(jnp.int32)
  if n < (1 << 15):           # one cumsum of both counts, packed in the two halves of an int32
    c = jnp.cumsum(gt + (eq << 16), axis=-1)
    c_gt, c_eq = c & 0xFFFF, c >> 16
  else:
    c_gt, c_eq = jnp.cumsum(gt, axis=-1), jnp.cumsum(eq, axis=-1)
  before_gt, before_eq = c_gt - gt, c_eq - eq                        # exclusive counts
  need_eq = k - c_gt[:, -1:]                                          # ties taken at the threshold
  take = (gt == 1) | ((eq == 1) & (before_eq < need_eq))
  taken_before = before_gt + jnp.minimum(before_eq, need_eq)
  cols = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (r, n))
  # taken: its slot; not taken: a distinct slot >= k (dropped), so the scatter's indices are unique
  pos = jnp.where(take, taken_before, k + cols - taken_before)
  rows = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[:, None], (r, n))
  return jnp.zeros((r, k), jnp.int32).at[rows, pos].set(cols, mode="drop", unique_indices=True)
