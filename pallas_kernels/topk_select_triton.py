"""Top-k index sets of score rows (up to a few thousand scores in use) as one Pallas kernel on the Triton backend.

The batch-union neuron selection (`polar_jax.topk`) needs, per layer, the k largest of N scores as an index list
in ascending order. The XLA formulation (`topk_select_xla.topk_set`: 4 radix passes, cumsums, a scatter) is exact
but runs ~10 small kernels per layer, ~20 us at decode. Here one program per row does all of it on chip, which
wins for rows of up to `TopkHeuristics.kernel_max_n` scores (one SM's serial reductions lose to XLA's parallel
passes beyond; see there):

  1. keys: the float bits as int32 in the total order of `lax.top_k`'s comparator
     (`skey = bits ^ ((bits >> 31) & 0x7fffffff)`: -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN);
     padding (the row is padded to a power of two) gets the smallest key and comes last, so it is never taken
     before a real score;
  2. the k-th largest key T, bit by bit from the top (32 count-reductions over the row held in registers);
  3. selection as `lax.top_k`: every key > T, then keys == T in index order until k are taken;
  4. compaction: each taken column is stored at its rank among the taken (an exclusive cumsum); the others get
     distinct slots >= k, which the store's mask drops, so no two lanes ever write one slot.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform

MAX_N = 1 << 16           # longest row (padded) the kernel holds on chip
_INT_MIN = -(1 << 31)


@dataclasses.dataclass(frozen=True)
class TopkHeuristics:
  """Which rows `topk_select` sends to this kernel.

  Attributes:
    kernel_max_n: the longest row (padded to a power of two) that takes the kernel; longer rows take the XLA
      reference. Measured on an H100 (`kernels.py --only topk`, records "topk_select" in
      benchmarks/results/kernels.jsonl): the kernel's 32 serial count-reductions on one SM take ~28 us per row of
      16384 (XLA's 4-pass radix: ~28 us isolated, ~22 us in the OPT-6.7B step, where the kernel took ~43 us), but
      9.9 us for 4 rows of 4096 (XLA 22.7 us: the tensor-parallel per-shard union).
  """
  kernel_max_n: int = 1 << 12

  def __post_init__(self):
    if not 1 <= self.kernel_max_n <= MAX_N:
      raise ValueError(f"TopkHeuristics.kernel_max_n must lie in [1, {MAX_N}], got {self.kernel_max_n}")


def num_warps_for(n_padded: int) -> int:
  """Warps per program: ~64 keys per thread, 4 to 16 warps."""
  return max(4, min(16, n_padded // (64 * 32)))


def signed_keys(s: jax.Array) -> jax.Array:
  """int32 keys of float scores that compare, as signed integers, in `lax.top_k`'s float total order
  (-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN); for use inside kernels (also `skinny_matmul_triton`)."""
  bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _select_kernel(scores_ref, out_ref, *, n: int, k: int):
  n_pad = scores_ref.shape[-1]
  cols = jax.lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
  skey = signed_keys(scores_ref[...])
  skey = jnp.where(cols < n, skey, _INT_MIN)
  # the largest t with count(skey >= t) >= k, built in the offset (unsigned) order u = t ^ INT_MIN
  prefix_u = jnp.int32(0)
  for bit in range(31, -1, -1):
    cand_u = prefix_u | jnp.int32(-(1 << 31) if bit == 31 else 1 << bit)
    count = jnp.sum((skey >= (cand_u ^ _INT_MIN)).astype(jnp.int32))
    prefix_u = jnp.where(count >= k, cand_u, prefix_u)
  t = prefix_u ^ _INT_MIN
  gt = (skey > t).astype(jnp.int32)
  eq = (skey == t).astype(jnp.int32)
  need_eq = k - jnp.sum(gt)                                    # ties at T taken in index order
  eq_before = jnp.cumsum(eq) - eq
  take = (gt == 1) | ((eq == 1) & (eq_before < need_eq))
  take_i = take.astype(jnp.int32)
  taken_before = jnp.cumsum(take_i) - take_i
  pos = jnp.where(take, taken_before, k + cols - taken_before)  # distinct; < k exactly where taken
  plgpu.store(out_ref.at[pos], cols, mask=take)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def topk_select_triton(scores_rn: jax.Array, k: int, *, interpret: bool) -> jax.Array:
  """int32 `[R, k]`: per row, the indices of the k largest scores in ascending order (ties: lower index
  first); rows of at most `MAX_N` scores."""
  r, n = scores_rn.shape
  n_pad = _platform.next_pow2(n)
  if n_pad > MAX_N:
    raise ValueError(f"rows of {n} scores exceed the kernel's {MAX_N}; use the XLA implementation")
  scores = jnp.pad(scores_rn, ((0, 0), (0, n_pad - n))) if n_pad != n else scores_rn
  kernel = functools.partial(_select_kernel, n=n, k=k)
  return pl.pallas_call(
      kernel,
      grid=(r,),
      in_specs=[pl.BlockSpec((None, n_pad), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((None, k), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((r, k), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps_for(n_pad), num_stages=1),
      interpret=interpret,
      name="topk_select",
  )(scores)
