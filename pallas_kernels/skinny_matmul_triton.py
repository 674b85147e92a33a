"""Skinny (decode) matmuls `y = x @ w (+ bias) (+ residual)` as one Pallas kernel on the Triton backend.

At decode batch sizes (M = B <= 64 rows) a projection streams its weight once and is bound by HBM bandwidth.
XLA splits such GEMMs over K (2-8 ways), writes float32 partials and sums them in the next fusion (the residual
add, the q/k/v consumers), at 2.4-2.8 TB/s on an H100 (benchmarks/NOTES.md). Here program
(m-block, split, n-block) streams the weight tile column `w[:, n-block]` over its share of K in `block_k` steps
(contiguous `pl.ds` slices, pipelined `num_stages` deep) against the L2-resident rows of x; split programs meet
through `_split_k.finish` (in-kernel, no XLA reduce), and the epilogue adds the bias and the residual and casts,
so the output is written once, already summed.
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
from pallas_kernels import _split_k
from pallas_kernels._online_softmax import precision
from pallas_kernels.topk_select_triton import signed_keys


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  block_m: int      # rows of x per program (power of two >= 16)
  block_n: int      # output columns per program (power of two)
  block_k: int      # reduction step (power of two)
  num_splits: int   # programs sharing one output tile's reduction
  num_warps: int = 4
  num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class MatmulHeuristics:
  """How `choose_config` picks a `MatmulConfig` from the static shapes. From `kernels.py --only matmul` on an H100
  (records "skinny_matmul" in benchmarks/results/kernels.jsonl): the fastest grids put every program on an SM at
  once, one program per SM streaming a long run of ~32 KB weight tiles 4 deep. The widest column tile that still
  gives >= `fill` x SMs programs wins (fewer, longer streams; fewer L2 re-reads of x); narrower grids split K
  until about one program per SM (split programs pay a float32 partial store and read).

  Attributes:
    fill: share of the SMs that the column tiles must occupy for a wide tile / no K split.
    tile_bytes: bytes of one weight tile (one pipeline stage).
    smem_bytes: shared memory the pipeline may take (of the H100's 227 KB per block, with room for the
      epilogue's scratch).
  """
  fill: float = 0.6
  tile_bytes: int = 32 << 10
  smem_bytes: int = 200 << 10


def choose_config(m: int, k: int, n: int, itemsize: int, num_sms: int | None = None,
                  heuristics: MatmulHeuristics = MatmulHeuristics()) -> MatmulConfig:
  """Tiling for `[m, k] @ [k, n]` by `heuristics`' rules: block_m up to 64 rows, block_n 256 / 128 / 64 (smaller
  for a narrower n), block_k for ~`tile_bytes` weight tiles, 4 stages within `smem_bytes`, splits for ~1
  program per SM."""
  h = heuristics
  num_sms = num_sms or _platform.num_sms()
  bm = max(16, min(64, _platform.next_pow2(m)))
  m_blocks = _platform.cdiv(m, bm)
  bn = min(64, max(16, _platform.next_pow2(n)))
  for wide in (256, 128):
    if wide <= n and m_blocks * _platform.cdiv(n, wide) >= h.fill * num_sms:
      bn = wide
      break
  tiles = m_blocks * _platform.cdiv(n, bn)
  bk = max(16, min(128, h.tile_bytes // (bn * itemsize), _platform.next_pow2(k + 1) // 2))   # <= K when K >= 16
  stages = 4
  while stages * (bm + bn) * bk * itemsize > h.smem_bytes:
    if stages > 2:
      stages -= 1
    else:
      bk //= 2
  k_blocks = _platform.cdiv(k, bk)
  ns = 1 if tiles >= h.fill * num_sms else max(1, min(round(num_sms / tiles), k_blocks // 2))
  ns = _platform.cdiv(k_blocks, _platform.cdiv(k_blocks, ns))   # no empty split
  return MatmulConfig(bm, bn, bk, ns, num_warps=4, num_stages=stages)


def _silu(y):
  return y / (1.0 + jnp.exp(-y))


def _kernel(x_ref, w_ref, b_ref, r_ref, w2_ref, b2_ref, g_ref, rsq_ref, rw_ref, *refs, cfg: MatmulConfig,
            side_bn: int, glu: bool, relu: bool, w_nk: bool, emit: int, rms_eps, side_topk, interpret: bool):
  """x_ref [M, K], w_ref [K, N] (w_nk: [N, K], tiles loaded [block_n, block_k]), b_ref [N], r_ref [M, N],
  w2_ref [K, N2], b2_ref [N2], g_ref [N] (a norm weight), rsq_ref [T, M] (each but x and w may be None; then the
  counters with splits), rw_ref [M] float32 row weights (then o_ref is [N]: sum_m rw[m] * y[m], one M block);
  relu: after the bias; outputs o_ref [M, N] (+ o2_ref [M, N2] float32 with w2; + o * g and the row sums of
  squares of o per column tile [N / block_n, M] with g; + workspace and counters with splits; with
  side_topk=(G, k) o2_ref is int32 [M, k], the top-k of the first G side columns; + zeroed counters with emit).
  Program (m, split, n): n < N / block_n streams a column tile of w, later ones of w2."""
  refs = list(refs)
  z_ref = refs.pop() if emit else None
  ws_ref = cnt_ref = None
  if cfg.num_splits > 1:       # input counters first; outputs workspace, counters last
    refs = refs[1:]
    ws_ref, cnt_ref = refs[-2:]
    refs = refs[:-2]
  o_ref, *refs = refs
  o2_ref = refs.pop(0) if w2_ref is not None else None
  ys_ref, sq_ref = refs if g_ref is not None else (None, None)
  pm, split, pn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if emit:   # zeroed split-K counters for the next skinny_matmul (no XLA zero-fill / copy kernel before it)
    @pl.when((pm == 0) & (split == 0) & (pn == 0))
    def _():
      z_ref[...] = jnp.zeros((emit,), jnp.int32)

  (m, kdim), n = x_ref.shape, w_ref.shape[0 if w_nk else 1]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  ws_m, rows_m = _split_k.tile_lanes(pm, bm, m)
  k_blocks = _platform.cdiv(kdim, bk)

  def stream(wr, width, tile, lo, hi, nk=False):
    """float32 [bm, width] of x @ wr[:, tile's columns] (nk: x @ wr[tile's rows, :].T) over K blocks [lo, hi),
    and the columns."""
    n_w = wr.shape[0] if nk else wr.shape[1]
    ws_n, cols_n = _split_k.tile_lanes(tile, width, n_w)
    full_hi = jnp.minimum(hi, kdim // bk)        # blocks wholly inside K: unmasked loads
    contract = (((1,), (1,)), ((), ())) if nk else (((1,), (0,)), ((), ()))

    def body(i, acc, masked):
      ks = i * bk + jnp.arange(bk, dtype=jnp.int32)
      if masked:                                 # the K tail: zero both operands past K
        live = ks < kdim
        ks = jnp.minimum(ks, kdim - 1)
        x = plgpu.load(x_ref.at[rows_m[:, None], ks[None, :]], mask=jnp.broadcast_to(live[None, :], (bm, bk)),
                       other=0)
        if nk:
          w = plgpu.load(wr.at[cols_n[:, None], ks[None, :]], mask=jnp.broadcast_to(live[None, :], (width, bk)),
                         other=0)
        else:
          w = plgpu.load(wr.at[ks[:, None], cols_n[None, :]], mask=jnp.broadcast_to(live[:, None], (bk, width)),
                         other=0)
      else:
        x = x_ref[rows_m[:, None], ks[None, :]]
        if nk:
          w = wr[pl.ds(tile * width, width), pl.ds(i * bk, bk)] if n_w % width == 0 else wr[cols_n[:, None],
                                                                                              ks[None, :]]
        else:
          w = wr[pl.ds(i * bk, bk), pl.ds(tile * width, width)] if n_w % width == 0 else wr[ks[:, None],
                                                                                              cols_n[None, :]]
      return acc + lax.dot_general(x, w.astype(x.dtype), contract, precision=precision(w),
                                   preferred_element_type=jnp.float32)

    acc = jnp.zeros((bm, width), jnp.float32)
    if kdim >= bk:                               # (a block wider than K is only ever the masked tail)
      acc = lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), acc)
    if kdim % bk:
      acc = lax.fori_loop(jnp.maximum(full_hi, lo), hi, functools.partial(body, masked=True), acc)
    return acc, ws_n, cols_n

  def row_scale():
    """float32 [bm, 1]: the deferred RMSNorm's factor of this program's rows, from the [T, M] partial squares."""
    t = rsq_ref.shape[0]
    ts = jnp.arange(_platform.next_pow2(t), dtype=jnp.int32)
    live = jnp.broadcast_to((ts < t)[:, None], (ts.shape[0], bm))
    sq = plgpu.load(rsq_ref.at[jnp.minimum(ts, t - 1)[:, None], rows_m[None, :]], mask=live, other=0.0)
    return lax.rsqrt(jnp.sum(sq, axis=0) / kdim + rms_eps)[:, None]

  def main():
    lo, hi = _split_k.split_range(k_blocks, split, cfg.num_splits)
    acc, ws_n, cols_n = stream(w_ref, bn, pn, lo, hi, nk=w_nk)

    def epilogue(y):
      if rsq_ref is not None:
        y = y * row_scale()
      if b_ref is not None:
        y = y + b_ref[cols_n].astype(jnp.float32)[None, :]
      if relu:
        y = jnp.maximum(y, 0.0)
      if rw_ref is not None:   # the rows' weighted column sums (a batch-union score): o_ref [N]
        wts = plgpu.load(rw_ref.at[rows_m], mask=ws_m < m, other=0.0)
        o_ref[cols_n] = jnp.sum(y * wts[:, None], axis=0).astype(o_ref.dtype)
        return
      if glu:   # neuron-interleaved columns (gate, up): out[:, j] = silu(gate_j) * up_j, half as wide
        gate, up = jnp.unstack(y.reshape(bm, bn // 2, 2), axis=-1)
        half = pn * (bn // 2) + jnp.arange(bn // 2, dtype=jnp.int32)
        o_ref[rows_m[:, None], half[None, :]] = (_silu(gate) * up).astype(o_ref.dtype)
        return
      if r_ref is not None:   # round to the output dtype first: the same sum as `residual + y` in that dtype
        y = (y.astype(o_ref.dtype).astype(jnp.float32)
             + r_ref[rows_m[:, None], cols_n[None, :]].astype(jnp.float32))
      out = y.astype(o_ref.dtype)
      o_ref[rows_m[:, None], cols_n[None, :]] = out
      if g_ref is not None:   # the next RMSNorm, deferred: o * g and this tile's share of each row's squares
        of = out.astype(jnp.float32)
        ys_ref[rows_m[:, None], cols_n[None, :]] = (of * g_ref[cols_n].astype(jnp.float32)[None, :]).astype(
            ys_ref.dtype)
        sq = of * of if n % bn == 0 else jnp.where((ws_n < n)[None, :], of * of, 0.0)
        sq_ref[pn, rows_m] = jnp.sum(sq, axis=1)

    _split_k.finish(acc, epilogue, ws_ref, cnt_ref, tile=pn * pl.num_programs(0) + pm, split=split, rows=ws_m,
                    cols=ws_n, num_splits=cfg.num_splits, interpret=interpret)

  if w2_ref is None:
    main()
    return
  n_tiles = _platform.cdiv(n, bn)
  pl.when(pn < n_tiles)(main)

  @pl.when(pn >= n_tiles)
  def _():
    acc, _, cols = stream(w2_ref, side_bn, pn - n_tiles, 0, k_blocks)
    if rsq_ref is not None:
      acc = acc * row_scale()
    if b2_ref is not None:
      acc = acc + b2_ref[cols].astype(jnp.float32)[None, :]
    if side_topk is None:
      o2_ref[rows_m[:, None], cols[None, :]] = acc
    else:
      _rank_topk_store(acc, rows_m, o2_ref, *side_topk)


def _rank_topk_store(s, rows_m, out_ref, g: int, k: int):
  """Stores each row's k highest of the first g scores of s [bm, P] (one program holds the whole row) into
  out_ref[rows, :k]: the indices by descending score, ties lower index first, in `lax.top_k`'s float total order
  (`topk_select_xla.rank_topk`: each score's rank is its count of scores above it; slot r takes rank r)."""
  p = s.shape[1]
  key = signed_keys(s)                                           # signed keys in the float total order
  j = jnp.arange(p, dtype=jnp.int32)
  ki, kj = key[:, :, None], key[:, None, :]                      # [bm, i, j]: does j rank above i?
  above = (kj > ki) | ((kj == ki) & (j[None, :] < j[:, None])[None])
  above = above & (j < g)[None, None, :]
  rank = jnp.where((j < g)[None, :], jnp.sum(above.astype(jnp.int32), axis=-1), p)
  slots = jnp.minimum(jnp.arange(_platform.next_pow2(k), dtype=jnp.int32), k - 1)   # (duplicates: the same value)
  hit = rank[:, None, :] == slots[None, :, None]                 # [bm, slot, j]: exactly one j per slot
  out_ref[rows_m[:, None], slots[None, :]] = jnp.sum(jnp.where(hit, j[None, None, :], 0), axis=-1)


def side_block(n2: int, block_n: int) -> int:
  """Column tile of the side weight: the main tile, or the side's own width rounded up to a power of two."""
  return min(block_n, max(16, _platform.next_pow2(n2)))


# Entries of the split-K counter buffers passed between calls (`counters_C`, `emit_counters`).
COUNTERS = 1024


@functools.partial(jax.jit, static_argnames=("out_dtype", "glu", "activation", "w_layout", "emit_counters",
                                             "rms_eps", "side_topk", "config", "interpret"))
def skinny_matmul_triton(x_MK, w_KN, bias_N, residual_MN, side_w_KP, side_b_P, counters_C=None, norm_scale_N=None,
                         rms_sq_TM=None, row_weights_M=None, *, out_dtype, glu: str | None,
                         activation: str | None = None, w_layout: str = "kn", emit_counters: bool = False,
                         rms_eps: float | None = None, side_topk: tuple[int, int] | None = None,
                         config: MatmulConfig, interpret: bool):
  """As `skinny_matmul_xla.skinny_matmul_xla` (x already in w's dtype; no splits with a side weight;
  glu "silu" needs N % block_n == 0 and no residual; activation "relu" only, not with glu;
  w_layout "nk": w_KN is given as [N, K], the side weight stays [K, P]). Grid (M blocks, splits, N blocks + side
  blocks).

  counters_C: a zeroed int32 [COUNTERS] buffer for the split-K counters (consumed), else they are zero-filled
  here. emit_counters: also return such a buffer, zeroed by this kernel, for the next call.
  norm_scale_N / rms_sq_TM, rms_eps: the deferred RMSNorm (`skinny_matmul_xla.skinny_matmul_xla`); with
  norm_scale_N the kernel also returns `(y * g, sq [N / block_n, M])` after the side product.
  side_topk=(G, k): the side result is int32 [M, k], `rank_topk(side[:, :G], k)` (needs the side weight in one
  column tile: P <= side_block(P, block_n))."""
  if w_layout not in ("kn", "nk"):
    raise ValueError(f"skinny_matmul_triton: w_layout must be 'kn' or 'nk', got {w_layout!r}")
  (m, _), n = x_MK.shape, w_KN.shape[1 if w_layout == "kn" else 0]
  if glu is not None and (glu != "silu" or n % config.block_n or residual_MN is not None):
    raise ValueError(f"skinny_matmul_triton: glu={glu!r} needs 'silu', N % block_n == 0 and no residual")
  if activation not in (None, "relu") or (activation is not None and glu is not None):
    raise ValueError(f"skinny_matmul_triton: activation={activation!r} must be None or 'relu', without glu")
  bm, bn, ns = config.block_m, config.block_n, config.num_splits
  m_blocks, n_blocks = pl.cdiv(m, bm), pl.cdiv(n, bn)
  side_bn = side_block(side_w_KP.shape[1], bn) if side_w_KP is not None else bn
  side_blocks = 0 if side_w_KP is None else pl.cdiv(side_w_KP.shape[1], side_bn)
  if ns > 1 and side_w_KP is not None:
    raise ValueError("skinny_matmul: a side weight needs num_splits == 1")
  if norm_scale_N is not None and glu is not None:
    raise ValueError("skinny_matmul_triton: norm_scale_N needs a plain output (no glu)")
  if (rms_sq_TM is None) != (rms_eps is None):
    raise ValueError("skinny_matmul_triton: rms_sq_TM and rms_eps go together")
  if side_topk is not None and not (side_w_KP is not None and side_blocks == 1
                                    and 1 <= side_topk[1] <= side_topk[0] <= side_w_KP.shape[1]):
    raise ValueError(f"skinny_matmul_triton: side_topk={side_topk} needs a side weight of at least G columns in one "
                     f"column tile ({side_bn}) and 1 <= k <= G")
  if row_weights_M is not None and (pl.cdiv(m, bm) != 1 or residual_MN is not None or glu is not None
                                    or side_w_KP is not None or norm_scale_N is not None):
    raise ValueError("skinny_matmul_triton: row_weights_M needs all M rows in one block (M <= block_m) and a plain "
                     "output (no residual, glu, side weight or norm_scale_N)")
  operands = [x_MK, w_KN, bias_N, residual_MN, side_w_KP, side_b_P, norm_scale_N, rms_sq_TM,
              None if row_weights_M is None else row_weights_M.astype(jnp.float32)]
  out_shape = [jax.ShapeDtypeStruct((n,) if row_weights_M is not None else (m, n // 2 if glu else n), out_dtype)]
  if side_w_KP is not None:
    out_shape.append(jax.ShapeDtypeStruct((m, side_w_KP.shape[1]), jnp.float32) if side_topk is None else
                     jax.ShapeDtypeStruct((m, side_topk[1]), jnp.int32))
  if norm_scale_N is not None:
    out_shape += [jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((n_blocks, m), jnp.float32)]
  aliases = {}
  if ns > 1:
    tiles = m_blocks * n_blocks
    counters = (counters_C if counters_C is not None and counters_C.shape[0] >= tiles
                else jnp.zeros((tiles,), jnp.int32))
    # alias indices count flattened inputs (no None); the counters are the output after the workspace
    aliases = {sum(a is not None for a in operands): len(out_shape) + 1}
    operands.append(counters)
    out_shape += [jax.ShapeDtypeStruct((ns, m_blocks * bm, n_blocks * bn), jnp.float32),
                  jax.ShapeDtypeStruct(counters.shape, counters.dtype)]
  if emit_counters:
    out_shape.append(jax.ShapeDtypeStruct((COUNTERS,), jnp.int32))
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
  outs = pl.pallas_call(
      functools.partial(_kernel, cfg=config, side_bn=side_bn, glu=glu is not None, relu=activation == "relu",
                        w_nk=w_layout == "nk", emit=COUNTERS if emit_counters else 0, rms_eps=rms_eps,
                        side_topk=side_topk, interpret=interpret),
      grid=(m_blocks, ns, n_blocks + side_blocks),
      in_specs=[None if a is None else whole(a.shape) for a in operands],
      out_specs=[whole(s.shape) for s in out_shape],
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="skinny_matmul",
  )(*operands)
  results = tuple(outs[:1 + (side_w_KP is not None) + 2 * (norm_scale_N is not None)])
  if emit_counters:
    results += (outs[-1],)
  return results if len(results) > 1 else results[0]
