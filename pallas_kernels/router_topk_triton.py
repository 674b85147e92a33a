"""The head router of the decode step (scores = x @ w + b, then each row's top-k groups) as one Pallas kernel
on the Triton backend.

In XLA the router was four small kernels per layer: a GEMM, its split-K sum with the bias, and the two reductions
of the sort-free rank top-k (`polar_jax.topk.rank_topk`). Measured on one H100 (session 8, `profile_step.py
--instances`, LLaMA-2-7B B32 density 0.5): 1.9 + 1.6 + 1.6 + 1.3 us per layer. Here each program takes
`rows_per_program` rows (a 16-row tile for the tensor-core dot; extra tile rows repeat the last real row and
store identical values), streams the router weight through a pipelined loop over the hidden dimension, adds the
bias, ranks the G scores of each row in registers (`lax.top_k`'s total order on the float bits, ties to the lower
index) and stores the k best group indices in descending score order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform

_INT_MIN = -(1 << 31)
TILE_ROWS = 16


def block_d_for(d: int) -> int:
  """Hidden-dimension chunk per loop iteration: the largest power of two <= 256 dividing d (>= 16)."""
  for bd in (256, 128, 64, 32, 16):
    if d % bd == 0:
      return bd
  return 0


def _kernel(x_ref, w_ref, b_ref, o_ref, *, k: int, rows_per_program: int, block_d: int):
  batch, d = x_ref.shape
  g = w_ref.shape[1]
  g_pad = _platform.next_pow2(g)
  k_pad = _platform.next_pow2(k)
  i = pl.program_id(0)
  rows_r = jnp.minimum(i * rows_per_program + jnp.minimum(jnp.arange(TILE_ROWS, dtype=jnp.int32),
                                                          rows_per_program - 1), batch - 1)
  cols_g = jnp.arange(g_pad, dtype=jnp.int32)
  cols_c = jnp.minimum(cols_g, g - 1)          # padded columns repeat the last group; ranked last below
  chunk = jnp.arange(block_d, dtype=jnp.int32)
  precision = lax.Precision.HIGHEST if w_ref.dtype == jnp.float32 else None

  def body(c, acc):
    x_rd = x_ref[rows_r[:, None], (c * block_d + chunk)[None, :]].astype(w_ref.dtype)
    w_dg = w_ref[(c * block_d + chunk)[:, None], cols_c[None, :]]
    return acc + lax.dot_general(x_rd, w_dg, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, d // block_d, body, jnp.zeros((TILE_ROWS, g_pad), jnp.float32))
  scores_rg = acc + b_ref[cols_c].astype(jnp.float32)[None, :]
  bits = lax.bitcast_convert_type(scores_rg, jnp.int32)
  keys_rg = bits ^ ((bits >> 31) & 0x7FFFFFFF)        # lax.top_k's total order as signed integers
  keys_rg = jnp.where((cols_g < g)[None, :], keys_rg, _INT_MIN)
  # rank of group i: groups j with a larger key, or an equal key and j < i (a permutation of 0..g_pad-1)
  ki, kj = keys_rg[:, :, None], keys_rg[:, None, :]
  before = (cols_g[None, :] < cols_g[:, None])[None]   # [1, i, j]: j < i
  rank_rg = jnp.sum(((kj > ki) | ((kj == ki) & before)).astype(jnp.int32), axis=2)
  slots_s = jnp.minimum(jnp.arange(k_pad, dtype=jnp.int32), k - 1)   # padded slots repeat slot k - 1
  hit = rank_rg[:, None, :] == slots_s[None, :, None]                  # one group per (row, slot)
  idx_rs = jnp.sum(jnp.where(hit, cols_g[None, None, :], 0), axis=2)
  o_ref[rows_r[:, None], slots_s[None, :]] = idx_rs


@functools.partial(jax.jit, static_argnames=("k", "rows_per_program", "interpret"))
def router_topk_triton(x_BD, w_DG, b_G, *, k: int, rows_per_program: int, interpret: bool):
  """As `router_topk_xla.router_topk_xla` (same signature and result, up to the accumulation order of the dot);
  needs `block_d_for(D) > 0`."""
  B, D = x_BD.shape
  G = w_DG.shape[1]
  block_d = block_d_for(D)
  if not block_d:
    raise ValueError(f"router_topk's kernel needs a hidden size divisible by 16, got {D}")
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  return pl.pallas_call(
      functools.partial(_kernel, k=k, rows_per_program=rows_per_program, block_d=block_d),
      grid=(_platform.cdiv(B, rows_per_program),),
      in_specs=[whole((B, D)), whole((D, G)), whole((G,))],
      out_specs=whole((B, k)),
      out_shape=jax.ShapeDtypeStruct((B, k), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name="router_topk",
  )(x_BD, w_DG, b_G.astype(jnp.float32))
