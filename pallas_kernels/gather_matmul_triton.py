"""Gathered matmuls as Pallas kernels on the Triton backend.

cols: out[M, k] = act(x[M, d] @ w_in[idx].T + bias[idx]); each program owns an
  (M-block, idx-block) output tile and a share of d; it gathers whole weight rows
  (contiguous along d) by index inside the kernel.
rows: out[M, d] = h[M, k] @ w_out[idx] + bias; each program owns an (M-block,
  d-block) tile and a share of the idx positions [0, count).
When the grid is small (decode: M is small) the reduction is split across
programs; the float32 partials are summed by a small XLA epilogue. With one split
the bias/activation epilogue is fused in the kernel. No gathered weight copy is
ever materialised, and weight rows at padded positions (>= count) are not read.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform
from pallas_kernels.gather_matmul_xla import apply_activation


@dataclasses.dataclass(frozen=True)
class GatherConfig:
  block_m: int  # rows of x / h per program (power of two >= 16)
  block_n: int  # output columns per program (idx positions for cols, d for rows)
  block_k: int  # reduction step (d for cols, idx positions for rows)
  num_splits: int  # programs sharing one output tile's reduction
  num_warps: int
  num_stages: int


def _block_m(m: int) -> int:
  return max(16, min(64, _platform.next_pow2(m)))


def _splits(base_programs: int, reduction_blocks: int, num_sms: int,
            waves: int = 4) -> int:
  splits = _platform.cdiv(waves * num_sms, base_programs)
  return max(1, min(splits, reduction_blocks // 4))


def choose_cols_config(m: int, d: int, k: int, itemsize: int,
                       num_sms: int | None = None) -> GatherConfig:
  num_sms = num_sms or _platform.num_sms()
  bm, bn = _block_m(m), 64
  bk = 128 if itemsize <= 2 else 64
  base = _platform.cdiv(m, bm) * _platform.cdiv(k, bn)
  splits = _splits(base, _platform.cdiv(d, bk), num_sms, waves=2)
  return GatherConfig(bm, bn, bk, splits, num_warps=4, num_stages=3)


def choose_rows_config(m: int, d: int, k: int, itemsize: int,
                       num_sms: int | None = None) -> GatherConfig:
  num_sms = num_sms or _platform.num_sms()
  bm = _block_m(m)
  bn = 64
  bk = 128 if itemsize <= 2 else 64
  base = _platform.cdiv(m, bm) * _platform.cdiv(d, bn)
  return GatherConfig(bm, bn, bk, _splits(base, _platform.cdiv(k, bk), num_sms),
                      num_warps=4, num_stages=3)


def _erf(x):
  """Abramowitz-Stegun 7.1.26 erf (|error| < 1.5e-7); Triton has no erf."""
  a = jnp.abs(x)
  t = 1.0 / (1.0 + 0.3275911 * a)
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (
      -1.453152027 + t * 1.061405429))))
  return jnp.sign(x) * (1.0 - poly * jnp.exp(-a * a))


def _kernel_activation(y, activation):
  if activation == "gelu":
    return 0.5 * y * (1.0 + _erf(y * 0.7071067811865476))
  if activation == "silu":
    return y / (1.0 + jnp.exp(-y))
  return apply_activation(y, activation)


def _split_range(num_blocks, split, num_splits):
  per = (num_blocks + num_splits - 1) // num_splits
  lo = split * per
  return lo, jnp.minimum(lo + per, num_blocks)


def _cols_kernel(count_ref, idx_ref, x_ref, w_ref, b_ref, o_ref, *, cfg,
                 activation, fused):
  """x_ref [M, d], w_ref [N, d], idx_ref [k]; o_ref [M, k] (or one f32 split)."""
  pm, pn, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (m, d), n, k = x_ref.shape, w_ref.shape[0], idx_ref.shape[0]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  # Output dims are clamped (duplicate lanes compute identical values).
  rows_m = jnp.minimum(pm * bm + jnp.arange(bm, dtype=jnp.int32), m - 1)
  pos_n = jnp.minimum(pn * bn + jnp.arange(bn, dtype=jnp.int32), k - 1)
  count = jnp.minimum(count_ref[0], k)
  live_n = pos_n < count
  nidx = jnp.clip(idx_ref[pos_n], 0, n - 1)
  lo, hi = _split_range((d + bk - 1) // bk, split, cfg.num_splits)
  # idx block wholly live: unmasked weight loads; partly live: masked loads;
  # wholly padded: no loads at all.
  all_live = (pn + 1) * bn <= count
  hi_live = jnp.where(all_live, hi, lo)
  hi_part = jnp.where(all_live | (pn * bn >= count), lo, hi)

  def body(i, acc, masked):
    cols = i * bk + jnp.arange(bk, dtype=jnp.int32)
    if d % bk:
      x_mask = jnp.broadcast_to((cols < d)[None, :], (bm, bk))
      cols = jnp.minimum(cols, d - 1)
      x = plgpu.load(x_ref.at[rows_m[:, None], cols[None, :]], mask=x_mask,
                     other=0)
    else:
      x = x_ref[rows_m[:, None], cols[None, :]]
    w_index = (nidx[:, None], cols[None, :])
    if masked:
      w = plgpu.load(w_ref.at[w_index], other=0,
                     mask=jnp.broadcast_to(live_n[:, None], (bn, bk)))
    else:
      w = w_ref[w_index]
    return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = jnp.zeros((bm, bn), jnp.float32)
  acc = lax.fori_loop(lo, hi_live, functools.partial(body, masked=False), acc)
  acc = lax.fori_loop(lo, hi_part, functools.partial(body, masked=True), acc)
  if fused:
    if b_ref is not None:
      acc = acc + b_ref[nidx].astype(jnp.float32)[None, :]
    acc = _kernel_activation(acc, activation)
    acc = jnp.where(live_n[None, :], acc, 0.0)
  o_ref[rows_m[:, None], pos_n[None, :]] = acc.astype(o_ref.dtype)


def _rows_kernel(count_ref, idx_ref, h_ref, w_ref, b_ref, o_ref, *, cfg, fused):
  """h_ref [M, k], w_ref [N, d], idx_ref [k]; o_ref [M, d] (or one f32 split)."""
  pm, pn, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (m, k), (n, d) = h_ref.shape, w_ref.shape
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  rows_m = jnp.minimum(pm * bm + jnp.arange(bm, dtype=jnp.int32), m - 1)
  cols_n = jnp.minimum(pn * bn + jnp.arange(bn, dtype=jnp.int32), d - 1)
  count = jnp.minimum(count_ref[0], k)
  lo, hi = _split_range((count + bk - 1) // bk, split, cfg.num_splits)
  full_hi = jnp.minimum(hi, count // bk)  # blocks wholly below count

  def body(i, acc, masked):
    pos = i * bk + jnp.arange(bk, dtype=jnp.int32)
    if masked:
      live = pos < count  # reduction mask on unclamped positions
      pos = jnp.minimum(pos, k - 1)
    nidx = jnp.clip(idx_ref[pos], 0, n - 1)
    h_index = (rows_m[:, None], pos[None, :])
    w_index = (nidx[:, None], cols_n[None, :])
    if masked:
      h = plgpu.load(h_ref.at[h_index], other=0,
                     mask=jnp.broadcast_to(live[None, :], (bm, bk)))
      w = plgpu.load(w_ref.at[w_index], other=0,
                     mask=jnp.broadcast_to(live[:, None], (bk, bn)))
    else:
      h, w = h_ref[h_index], w_ref[w_index]
    return acc + lax.dot_general(h, w, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = jnp.zeros((bm, bn), jnp.float32)
  acc = lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), acc)
  acc = lax.fori_loop(jnp.maximum(full_hi, lo), hi,
                      functools.partial(body, masked=True), acc)
  if fused and b_ref is not None:
    acc = acc + b_ref[cols_n].astype(jnp.float32)[None, :]
  o_ref[rows_m[:, None], cols_n[None, :]] = acc.astype(o_ref.dtype)


def _call(kernel, grid, operands, out_rows, out_cols, out_dtype, cfg,
          interpret, name):
  """Maps every operand whole (Triton block specs are only pointer offsets)."""
  whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  in_specs = [None if a is None else whole(a) for a in operands]
  ns = cfg.num_splits
  if ns == 1:
    out_shape = jax.ShapeDtypeStruct((out_rows, out_cols), out_dtype)
    out_spec = pl.BlockSpec((out_rows, out_cols), lambda *_: (0, 0))
  else:
    out_shape = jax.ShapeDtypeStruct((ns, out_rows, out_cols), jnp.float32)
    out_spec = pl.BlockSpec((None, out_rows, out_cols),
                            lambda i, j, s: (s, 0, 0))
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_spec,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, name=name)(*operands)


@functools.partial(jax.jit, static_argnames=("activation", "config",
                                             "interpret"))
def gather_matmul_cols_triton(x_Md, w_in_Nd, idx_k, bias_N, count_1, *,
                              activation, config: GatherConfig, interpret: bool):
  """act(x @ w_in[idx].T + bias[idx]) -> [M, k]; 0 at positions >= count."""
  m, k = x_Md.shape[0], idx_k.shape[0]
  grid = (pl.cdiv(m, config.block_m), pl.cdiv(k, config.block_n),
          config.num_splits)
  fused = config.num_splits == 1
  kernel = functools.partial(_cols_kernel, cfg=config, activation=activation,
                             fused=fused)
  out = _call(kernel, grid, [count_1, idx_k, x_Md, w_in_Nd, bias_N], m, k,
              x_Md.dtype, config, interpret, "gather_matmul_cols")
  if fused:
    return out
  y_Mk = jnp.sum(out, axis=0)
  idx_k = jnp.clip(idx_k, 0, w_in_Nd.shape[0] - 1)
  if bias_N is not None:
    y_Mk = y_Mk + jnp.take(bias_N, idx_k).astype(jnp.float32)[None, :]
  y_Mk = apply_activation(y_Mk, activation)
  live_k = jnp.arange(k, dtype=jnp.int32) < count_1[0]
  return jnp.where(live_k[None, :], y_Mk, 0.0).astype(x_Md.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gather_matmul_rows_triton(h_Mk, w_out_Nd, idx_k, bias_d, count_1, *,
                              config: GatherConfig, interpret: bool):
  """h @ w_out[idx] + bias -> [M, d], idx positions >= count skipped."""
  m, d = h_Mk.shape[0], w_out_Nd.shape[1]
  grid = (pl.cdiv(m, config.block_m), pl.cdiv(d, config.block_n),
          config.num_splits)
  fused = config.num_splits == 1
  kernel = functools.partial(_rows_kernel, cfg=config, fused=fused)
  out = _call(kernel, grid, [count_1, idx_k, h_Mk, w_out_Nd, bias_d], m, d,
              h_Mk.dtype, config, interpret, "gather_matmul_rows")
  if fused:
    return out
  y_Md = jnp.sum(out, axis=0)
  if bias_d is not None:
    y_Md = y_Md + bias_d.astype(jnp.float32)[None, :]
  return y_Md.astype(h_Mk.dtype)
