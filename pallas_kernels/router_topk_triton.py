"""The head router of the decode step (scores = x @ w + b, then each row's top-k groups) as one Pallas kernel
on the Triton backend.

In XLA the router was four small kernels per layer: a GEMM, its split-K sum with the bias, and the two reductions
of the sort-free rank top-k (`polar_jax.topk.rank_topk`). Measured on one H100 (session 8, `profile_step.py
--instances`, LLaMA-2-7B B32 density 0.5): 1.9 + 1.6 + 1.6 + 1.3 us per layer. Here each program takes
16 rows (the tensor-core dot's tile; a last partial block overlaps the one before it), streams the router
weight through a pipelined loop of contiguous tiles over the hidden dimension, adds the bias, ranks the G scores of each row in registers (`lax.top_k`'s total order on the float bits, ties to the lower
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


def supports(batch: int, d: int, g: int) -> bool:
  """Shapes the kernel takes: >= 16 rows, a hidden size divisible by 16, a power-of-two group count >= 16 (the
  tensor-core dot's smallest tile)."""
  return batch >= TILE_ROWS and block_d_for(d) > 0 and g >= 16 and g == _platform.next_pow2(g)


def _kernel(x_ref, w_ref, b_ref, o_ref, *, k: int, block_d: int):
  batch, d = x_ref.shape
  g = w_ref.shape[1]
  k_pad = _platform.next_pow2(k)
  # Rows [r0, r0 + 16): the last block overlaps the one before it when B is not a multiple of 16 (its rows are
  # computed twice and store identical values), so every load is a whole contiguous tile.
  r0 = jnp.minimum(pl.program_id(0) * TILE_ROWS, batch - TILE_ROWS)
  rows_r = r0 + jnp.arange(TILE_ROWS, dtype=jnp.int32)
  cols_g = jnp.arange(g, dtype=jnp.int32)
  precision = lax.Precision.HIGHEST if w_ref.dtype == jnp.float32 else None

  def body(c, acc):
    x_rd = x_ref[pl.ds(r0, TILE_ROWS), pl.ds(c * block_d, block_d)].astype(w_ref.dtype)
    w_dg = w_ref[pl.ds(c * block_d, block_d), :]
    return acc + lax.dot_general(x_rd, w_dg, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, d // block_d, body, jnp.zeros((TILE_ROWS, g), jnp.float32))
  scores_rg = acc + b_ref[...].astype(jnp.float32)[None, :]
  bits = lax.bitcast_convert_type(scores_rg, jnp.int32)
  keys_rg = bits ^ ((bits >> 31) & 0x7FFFFFFF)        # lax.top_k's total order as signed integers
  # rank of group i: groups j with a larger key, or an equal key and j < i (a permutation of 0..g-1)
  ki, kj = keys_rg[:, :, None], keys_rg[:, None, :]
  before = (cols_g[None, :] < cols_g[:, None])[None]   # [1, i, j]: j < i
  rank_rg = jnp.sum(((kj > ki) | ((kj == ki) & before)).astype(jnp.int32), axis=2)
  slots_s = jnp.minimum(jnp.arange(k_pad, dtype=jnp.int32), k - 1)   # padded slots repeat slot k - 1
  hit = rank_rg[:, None, :] == slots_s[None, :, None]                  # one group per (row, slot)
  idx_rs = jnp.sum(jnp.where(hit, cols_g[None, None, :], 0), axis=2)
  o_ref[rows_r[:, None], slots_s[None, :]] = idx_rs


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def router_topk_triton(x_BD, w_DG, b_G, *, k: int, interpret: bool):
  """As `router_topk_xla.router_topk_xla` (same result, up to the accumulation order of the dot); needs
  `supports(B, D, G)`."""
  B, D = x_BD.shape
  G = w_DG.shape[1]
  if not supports(B, D, G):
    raise ValueError(f"router_topk's kernel needs >= {TILE_ROWS} rows, a hidden size divisible by 16 and a "
                     f"power-of-two group count >= 16; got B={B}, D={D}, G={G}")
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  return pl.pallas_call(
      functools.partial(_kernel, k=k, block_d=block_d_for(D)),
      grid=(_platform.cdiv(B, TILE_ROWS),),
      in_specs=[whole((B, D)), whole((D, G)), whole((G,))],
      out_specs=whole((B, k)),
      out_shape=jax.ShapeDtypeStruct((B, k), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4),
      interpret=interpret,
      name="router_topk",
  )(x_BD, w_DG, b_G.astype(jnp.float32))
