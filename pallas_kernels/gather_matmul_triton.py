"""Gathered matmuls as Pallas kernels on the Triton backend.

cols: out[M, k] = act(x[M, d] @ w_in[idx].T + bias[idx]); each program owns an
  (M-block, idx-block) output tile and a share of d; it gathers whole weight rows
  (contiguous along d) by index inside the kernel.
rows: out[M, d] = h[M, k] @ w_out[idx] + bias; each program owns an (M-block,
  d-block) tile and a share of the idx positions [0, count).
When the grid is small (decode: M is small) the reduction is split across
`num_splits` programs. Each writes its float32 partial tile to a workspace and
bumps a per-tile arrival counter; the last program to arrive sums the partials and
applies bias/activation/cast (serial split-K, as CUTLASS's semaphore: barrier,
then one release atomic). So every op is one Triton kernel (plus the zero fill of
the counters when split); no XLA epilogue. No gathered weight copy is ever
materialised, and weight rows at padded positions (>= count) are not read.
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
from pallas_kernels._split_k import finish as _finish
from pallas_kernels._split_k import split_range as _split_range
from pallas_kernels._split_k import tile_lanes as _tile_lanes
from pallas_kernels.gather_matmul_xla import apply_activation


@dataclasses.dataclass(frozen=True)
class GatherConfig:
  block_m: int  # rows of x / h per program (power of two >= 16)
  block_n: int  # output columns per program (idx positions for cols, d for rows)
  block_k: int  # reduction step (d for cols, idx positions for rows)
  num_splits: int  # programs sharing one output tile's reduction
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class GatherHeuristics:
  """How `choose_cols_config` / `choose_rows_config` pick a `GatherConfig` from the static shapes (defaults from
  H100 per-kernel timings, pallas_kernels/NOTES.md). A split costs ~1-1.5 us (partial store, barrier, atomic, the
  last program reading the other partials) whatever its size, so when each program streams little weight data
  the fastest grid is the one with the FEWEST splits that still puts about one program on every SM. Once a
  program streams >= `long_program_kb` that cost is a few %, and the widest tile wins (fewer L2 re-reads of
  x / h, longer contiguous weight segments: rows at density 1.0 bn 128 x 4 splits beat bn 64 x 2 splits by 3 %).

  Attributes:
    wave_fill: programs >= this share of the SMs fill the GPU well enough.
    long_program_kb: weight KB per program from which the widest candidate tile is taken.
  """
  wave_fill: float = 0.75
  long_program_kb: int = 512


def _block_m(m: int) -> int:
  """Rows per M-block: M > 64 runs several 64-row blocks, which read the same
  weight tiles at the same time (M-blocks are the fastest grid axis), so the
  weights come from HBM about once; _pick may still take one 128-row block."""
  return max(16, min(64, _platform.next_pow2(m)))


def min_splits(tiles: int, red_blocks: int, num_sms: int,
               heuristics: GatherHeuristics = GatherHeuristics()) -> int:
  """Fewest splits giving >= heuristics.wave_fill * num_sms programs, >= 2 blocks each."""
  ns = min(_platform.cdiv(int(heuristics.wave_fill * num_sms), tiles),
           max(1, red_blocks // 2))
  ns = max(1, ns)
  return _platform.cdiv(red_blocks, _platform.cdiv(red_blocks, ns))  # non-empty


def _pick(m, n_out, red, candidates, num_sms, itemsize, op, heuristics):
  """The first (widest) candidate (bm, bn, bk) whose programs stream
  >= heuristics.long_program_kb of weights, else the one needing the fewest splits
  (earlier wins ties). A 128-row M-block is only taken when it needs no split
  (its partial tiles are 4x larger and its grid 2x smaller)."""
  best = None
  for bm, bn, bk in candidates:
    tiles = _platform.cdiv(m, bm) * _platform.cdiv(n_out, bn)
    red_blocks = _platform.cdiv(red, bk)
    ns = min_splits(tiles, red_blocks, num_sms, heuristics)
    if bm >= 128 and ns > 1:
      continue
    program_kb = _platform.cdiv(red_blocks, ns) * bn * bk * itemsize / 1024
    if program_kb >= heuristics.long_program_kb:
      best = (bm, bn, bk, ns)
      break
    if best is None or ns < best[3]:
      best = (bm, bn, bk, ns)
  bm, bn, bk, ns = best
  return GatherConfig(bm, bn, bk, ns, num_warps=8 if bm >= 128 else 4,
                      num_stages=_stages(op, bm, itemsize))


def _stages(op: str, bm: int, itemsize: int) -> int:
  """Pipeline depth. Decode grids put ~1 program on each SM, so the depth alone
  keeps the weight loads in flight. rows' weight loads are indirect (index load,
  then gather), which costs Triton's pipeliner a stage: 5 stages give 2 weight
  tiles in flight, 3 stages only 1 (measured: 3 stages 5-15 % slower)."""
  if itemsize > 2:
    return 3
  if op == "rows":
    return 5
  return 5 if bm <= 32 else 4  # cols: 3-4 weight tiles in flight


def choose_cols_config(m: int, d: int, k: int, itemsize: int, num_sms: int | None = None,
                       heuristics: GatherHeuristics = GatherHeuristics()) -> GatherConfig:
  """Tiling of the cols op `[m, d] x w_in[idx: k].T` by `heuristics`' rules."""
  num_sms = num_sms or _platform.num_sms()
  bm = _block_m(m)
  if itemsize > 2:
    candidates = [(bm, 64, 64)]
  elif m > 64:  # bn >= 64 keeps the L2 re-reads of x at most 2x the weights
    candidates = [(128, 128, 64), (128, 64, 64), (64, 64, 128)]
  elif bm <= 32:
    candidates = [(bm, 64, 128), (bm, 32, 128)]
  else:
    candidates = [(bm, 64, 128)]
  return _pick(m, k, d, candidates, num_sms, itemsize, "cols", heuristics)


def choose_rows_config(m: int, d: int, k: int, itemsize: int, num_sms: int | None = None,
                       heuristics: GatherHeuristics = GatherHeuristics()) -> GatherConfig:
  """Tiling of the rows op `[m, k] x w_out[idx: k]` by `heuristics`' rules."""
  num_sms = num_sms or _platform.num_sms()
  bm = _block_m(m)
  if itemsize > 2:
    candidates = [(bm, 64, 64)]
  elif bm <= 32:
    candidates = [(bm, 128, 128), (bm, 64, 128)]
  else:  # bn = 128 keeps the L2 re-reads of h at most 2x the weights
    candidates = [(bm, 128, 128)]
  return _pick(m, d, k, candidates, num_sms, itemsize, "rows", heuristics)


def _precision(a):
  """IEEE float32 dots for float32 inputs (Triton's default would be TF32)."""
  return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


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


def _cols_kernel(count_ref, idx_ref, x_ref, w_ref, b_ref, *refs, cfg,
                 activation, interpret):
  """x_ref [M, d], w_ref [N, d], idx_ref [k]; o_ref [M, k]."""
  if cfg.num_splits > 1:
    _, o_ref, ws_ref, cnt_ref = refs
  else:
    (o_ref,), ws_ref, cnt_ref = refs, None, None
  pm, split, pn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (m, d), n, k = x_ref.shape, w_ref.shape[0], idx_ref.shape[0]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  ws_m, rows_m = _tile_lanes(pm, bm, m)
  ws_n, pos_n = _tile_lanes(pn, bn, k)
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
                                 precision=_precision(w),
                                 preferred_element_type=jnp.float32)

  acc = jnp.zeros((bm, bn), jnp.float32)
  acc = lax.fori_loop(lo, hi_live, functools.partial(body, masked=False), acc)
  acc = lax.fori_loop(lo, hi_part, functools.partial(body, masked=True), acc)

  def epilogue(y):
    if b_ref is not None:
      y = y + b_ref[nidx].astype(jnp.float32)[None, :]
    y = jnp.where(live_n[None, :], _kernel_activation(y, activation), 0.0)
    o_ref[rows_m[:, None], pos_n[None, :]] = y.astype(o_ref.dtype)

  _finish(acc, epilogue, ws_ref, cnt_ref, tile=pn * pl.num_programs(0) + pm,
          split=split, rows=ws_m, cols=ws_n, num_splits=cfg.num_splits,
          interpret=interpret)


def _rows_kernel(count_ref, idx_ref, h_ref, w_ref, b_ref, *refs, cfg,
                 interpret):
  """h_ref [M, k], w_ref [N, d], idx_ref [k]; o_ref [M, d]."""
  if cfg.num_splits > 1:
    _, o_ref, ws_ref, cnt_ref = refs
  else:
    (o_ref,), ws_ref, cnt_ref = refs, None, None
  pm, split, pn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (m, k), (n, d) = h_ref.shape, w_ref.shape
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  ws_m, rows_m = _tile_lanes(pm, bm, m)
  ws_n, cols_n = _tile_lanes(pn, bn, d)
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
                                 precision=_precision(w),
                                 preferred_element_type=jnp.float32)

  acc = jnp.zeros((bm, bn), jnp.float32)
  acc = lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), acc)
  acc = lax.fori_loop(jnp.maximum(full_hi, lo), hi,
                      functools.partial(body, masked=True), acc)

  def epilogue(y):
    if b_ref is not None:
      y = y + b_ref[cols_n].astype(jnp.float32)[None, :]
    o_ref[rows_m[:, None], cols_n[None, :]] = y.astype(o_ref.dtype)

  _finish(acc, epilogue, ws_ref, cnt_ref, tile=pn * pl.num_programs(0) + pm,
          split=split, rows=ws_m, cols=ws_n, num_splits=cfg.num_splits,
          interpret=interpret)


def _call(kernel, operands, out_rows, out_cols, out_dtype, cfg, interpret,
          name):
  """Grid (M-blocks, splits, N-blocks): M-blocks sharing a weight tile run
  together. Operands are mapped whole (Triton block specs are only pointer
  offsets); split calls add a float32 partial workspace and zeroed counters."""
  bm, bn, ns = cfg.block_m, cfg.block_n, cfg.num_splits
  m_blocks, n_blocks = pl.cdiv(out_rows, bm), pl.cdiv(out_cols, bn)
  out_shape = [jax.ShapeDtypeStruct((out_rows, out_cols), out_dtype)]
  aliases = {}
  if ns > 1:
    counters = jnp.zeros((m_blocks * n_blocks,), jnp.int32)
    # Alias indices count flattened inputs: a None bias is no input.
    aliases = {sum(a is not None for a in operands): 2}
    operands = [*operands, counters]
    out_shape += [
        jax.ShapeDtypeStruct((ns, m_blocks * bm, n_blocks * bn), jnp.float32),
        jax.ShapeDtypeStruct(counters.shape, counters.dtype)]
  whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * len(a.shape))
  outs = pl.pallas_call(
      kernel, grid=(m_blocks, ns, n_blocks),
      in_specs=[None if a is None else whole(a) for a in operands],
      out_specs=[whole(s) for s in out_shape], out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, name=name)(*operands)
  return outs[0]


@functools.partial(jax.jit, static_argnames=("activation", "config",
                                             "interpret"))
def gather_matmul_cols_triton(x_Md, w_in_Nd, idx_k, bias_N, count_1, *,
                              activation, config: GatherConfig, interpret: bool):
  """act(x @ w_in[idx].T + bias[idx]) -> [M, k]; 0 at positions >= count."""
  kernel = functools.partial(_cols_kernel, cfg=config, activation=activation,
                             interpret=interpret)
  return _call(kernel, [count_1, idx_k, x_Md, w_in_Nd, bias_N], x_Md.shape[0],
               idx_k.shape[0], x_Md.dtype, config, interpret,
               "gather_matmul_cols")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gather_matmul_rows_triton(h_Mk, w_out_Nd, idx_k, bias_d, count_1, *,
                              config: GatherConfig, interpret: bool):
  """h @ w_out[idx] + bias -> [M, d], idx positions >= count skipped."""
  kernel = functools.partial(_rows_kernel, cfg=config, interpret=interpret)
  return _call(kernel, [count_1, idx_k, h_Mk, w_out_Nd, bias_d], h_Mk.shape[0],
               w_out_Nd.shape[1], h_Mk.dtype, config, interpret,
               "gather_matmul_rows")
