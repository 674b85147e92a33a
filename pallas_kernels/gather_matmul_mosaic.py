"""Gathered matmuls on the Pallas Mosaic GPU backend (Hopper, M <= 128): attempt.

Why a second backend (issue 3): the Triton kernels miss the bound at M = 128 for
densities <= 0.5 (NOTES.md, "Open"); the issue asks to try Mosaic GPU before
calling those targets blocked.

Hopper has no TMA row gather (Mosaic GPU's `copy_gmem_to_smem(x.at[idxs, ...])`
needs sm_100), and Mosaic's tiling transform refuses a one-row TMA box. So each
selected weight row is brought in as 128-byte TMA copies (one row x 64 bf16
columns, the width of a 128-byte swizzle atom row) written straight into the
swizzled SMEM tile that wgmma reads:
  * the stage buffer is a `RefUnion` of two views of the same bytes: `tiled`
    (Tiling (8, 64) + Swizzle 128, what wgmma takes) and `raw`, its physical
    shape [rows/8, cols/64, 8, 64] with only the swizzle transform;
  * row r, chunk j is copied to raw[r // 8, j, r % 8, :]: a 128-byte-aligned
    destination inside a 1024-byte-aligned swizzle atom, so the TMA unit's
    address-based 128B swizzle lands the row where the tiled view expects it.
One warpgroup issues the copies and runs wgmma on an S-stage ring of such
buffers (one barrier per stage counts every copy of the stage as an arrival).
Known cost risk: Pallas' copy_gmem_to_smem makes all 128 threads arrive on the
barrier for every copy, i.e. 128 mbarrier arrivals per 128 bytes of weights; if
that dominates, the next step is an `inline_mgpu` issue loop (one
arrive_expect_tx per stage, TMAs issued by 32 lanes in parallel).

Both ops are the same kernel, "acc[Mp, bn] += A[Mp, bk] @ gathered block":
  rows: A = h, reduction over idx positions; the block is W[idx[pos]] [bk, bn]
    (bk gathered rows, bn columns of d): `tiled` is used as is.
  cols: A = x, reduction over d; the block is W[idx[out]] [bn, bk] (bn gathered
    rows = this program's output neurons, bk columns of d): wgmma reads it
    transposed.
The reduction is split over `num_splits` programs which write float32 partials;
a small XLA epilogue sums them and applies bias / activation / count mask / cast.

Status: lowers on CPU (jax 0.10.2, lowering_platforms=("cuda",)); not yet run
on a GPU. GPU only: the public API raises on other backends.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _platform
from pallas_kernels.gather_matmul_xla import apply_activation

try:  # guarded: the package must import wherever Mosaic GPU is missing
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  _IMPORT_ERROR = None
except Exception as e:  # pylint: disable=broad-except
  pl = plgpu = None
  _IMPORT_ERROR = e

_SWIZZLE = 128  # bytes
_CHUNK = 64  # bf16 / fp16 elements per 128-byte swizzle row (one TMA copy)
_MAX_IDX_PER_PROGRAM = 4096  # rows: idx entries staged in SMEM (16 KB)


@dataclasses.dataclass(frozen=True)
class MosaicGatherConfig:
  block_n: int  # output columns per program (multiple of 64)
  block_k: int  # reduction step (multiple of 64)
  num_splits: int  # programs sharing one output tile's reduction
  num_stages: int  # SMEM ring depth


def available() -> tuple[bool, str]:
  """(True, "") when the Mosaic GPU path can run here, else (False, why)."""
  if _IMPORT_ERROR is not None:
    return False, f"jax.experimental.pallas.mosaic_gpu failed to import: {_IMPORT_ERROR!r}"
  if not _platform.is_gpu():
    return False, (f"implementation='mosaic' needs a CUDA GPU (Hopper); the default "
                   f"backend is {jax.default_backend()!r}")
  return True, ""


def check_inputs(a, w, m_max=128):
  """Raises ValueError for what the Mosaic kernels do not handle."""
  if a.shape[0] > m_max:
    raise ValueError(f"implementation='mosaic' handles M <= {m_max}, got M={a.shape[0]}")
  if jnp.dtype(w.dtype).itemsize != 2:
    raise ValueError(f"implementation='mosaic' needs bf16/fp16 weights, got {w.dtype}")
  if w.shape[1] % _CHUNK:
    raise ValueError(f"implementation='mosaic' needs d % {_CHUNK} == 0, got d={w.shape[1]}")


def _pad_m(m: int) -> int:
  return 64 if m <= 64 else 128  # wgmma rows come in 64s


def _splits(tiles: int, red_blocks: int, num_sms: int) -> int:
  """About one program per SM, >= 2 reduction blocks per split, no empty split."""
  ns = max(1, min(_platform.cdiv(num_sms, tiles), max(1, red_blocks // 2)))
  return _platform.cdiv(red_blocks, _platform.cdiv(red_blocks, ns))


def choose_rows_config(m, d, k, num_sms=None) -> MosaicGatherConfig:
  num_sms = num_sms or _platform.num_sms()
  bn, bk = 128, 64
  blocks = _platform.cdiv(k, bk)
  ns = _splits(_platform.cdiv(d, bn), blocks, num_sms)
  ns = max(ns, _platform.cdiv(blocks * bk, _MAX_IDX_PER_PROGRAM))
  return MosaicGatherConfig(bn, bk, ns, num_stages=4)


def choose_cols_config(m, d, k, num_sms=None) -> MosaicGatherConfig:
  num_sms = num_sms or _platform.num_sms()
  bn, bk = 128, 64
  ns = _splits(_platform.cdiv(k, bn), _platform.cdiv(d, bk), num_sms)
  return MosaicGatherConfig(bn, bk, ns, num_stages=4)


def _gather_kernel(count_ref, idx_ref, a_ref, w_ref, o_ref, a_smem, w_union, *,
                   mode, cfg, red_len):
  """One program: output tile `n` (bn wide), reduction split `s`.

  count_ref [1] i32, idx_ref [L / 64, 64] i32 (padded entries repeat a live
  row; each program stages its slice in SMEM once),
  a_ref [Mp, red_pad], w_ref [N, d], o_ref [ns, Mp, out_pad] f32.
  """
  bn, bk, ns, stages = cfg.block_n, cfg.block_k, cfg.num_splits, cfg.num_stages
  mp = a_ref.shape[0]
  w_tiled, w_raw = w_union
  n = lax.axis_index("n")
  s = lax.axis_index("s")

  count = count_ref[0]
  if mode == "rows":
    num_blocks = (count + bk - 1) // bk  # reduction blocks holding live rows
    live_tile = True
  else:
    num_blocks = jnp.int32(red_len // bk)
    live_tile = n * bn < count
  per = _platform.cdiv(_platform.cdiv(red_len, bk), ns)
  lo = s * per
  hi = jnp.minimum(lo + per, num_blocks)
  steps = jnp.where(live_tile, jnp.maximum(hi - lo, 0), 0)

  def body(idx_smem, barrier, acc_ref):
    def fetch(i):
      """Issues every copy of step i into its ring slot."""
      slot = i % stages
      blk = lo + i
      bar = barrier.at[slot]
      plgpu.copy_gmem_to_smem(a_ref.at[:, pl.ds(blk * bk, bk)], a_smem.at[slot],
                              bar)
      if mode == "rows":  # bk gathered rows x bn columns starting at n * bn
        def row(r, carry):
          p = i * bk + r  # position within this program's idx range
          wrow = idx_smem[p // _CHUNK, p % _CHUNK]
          for j in range(bn // _CHUNK):
            plgpu.copy_gmem_to_smem(
                w_ref.at[pl.ds(wrow, 1), pl.ds(n * bn + j * _CHUNK, _CHUNK)],
                w_raw.at[slot, r // 8, j, pl.ds(r % 8, 1), :], bar)
          return carry
        lax.fori_loop(0, bk, row, 0, unroll=8)
      else:  # bn gathered rows (this tile's neurons) x bk columns of d
        def row(r, carry):
          wrow = idx_smem[r // _CHUNK, r % _CHUNK]
          for j in range(bk // _CHUNK):
            plgpu.copy_gmem_to_smem(
                w_ref.at[pl.ds(wrow, 1), pl.ds(blk * bk + j * _CHUNK, _CHUNK)],
                w_raw.at[slot, r // 8, j, pl.ds(r % 8, 1), :], bar)
          return carry
        lax.fori_loop(0, bn, row, 0, unroll=8)

    for i in range(stages - 1):  # prologue: stages - 1 steps in flight
      @pl.when(i < steps)
      def _():
        fetch(i)

    def step(i, carry):
      slot = i % stages
      plgpu.barrier_wait(barrier.at[slot])
      b = w_tiled.at[slot]
      if mode == "cols":
        b = plgpu.transpose_ref(b, (1, 0))
      plgpu.wgmma(acc_ref, a_smem.at[slot], b)
      # Keep one wgmma in flight: the previous step's slot is free now.
      plgpu.wgmma_wait(1)

      @pl.when(i + stages - 1 < steps)
      def _():
        fetch(i + stages - 1)
      return carry

    lax.fori_loop(0, steps, step, 0)
    plgpu.wgmma_wait(0)
    return acc_ref[...]

  # This program's weight-row indices, staged once into SMEM (scalar reads
  # from GMEM inside the copy loop would each wait a full memory latency).
  if mode == "rows":
    idx_rows, idx_start = per * bk // _CHUNK, lo * bk // _CHUNK
  else:
    idx_rows, idx_start = bn // _CHUNK, n * bn // _CHUNK

  def scoped(idx_smem, idx_barrier, barrier):
    plgpu.copy_gmem_to_smem(idx_ref.at[pl.ds(idx_start, idx_rows), :],
                            idx_smem, idx_barrier.at[0])
    plgpu.barrier_wait(idx_barrier.at[0])
    return pl.run_scoped(functools.partial(body, idx_smem, barrier),
                         plgpu.ACC((mp, bn), jnp.float32))

  n_copies = 1 + (bk * (bn // _CHUNK) if mode == "rows" else
                  bn * (bk // _CHUNK))
  acc = pl.run_scoped(
      scoped, plgpu.SMEM((idx_rows, _CHUNK), jnp.int32),
      plgpu.Barrier(num_arrivals=1, num_barriers=1),
      plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages))

  def store(o_smem):
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, :, pl.ds(n * bn, bn)])
    plgpu.wait_smem_to_gmem(0)
  pl.run_scoped(store, plgpu.SMEM((mp, bn), jnp.float32))


def _call(a, w, idx_p, count_1, *, mode, cfg, out_len):
  """Runs the kernel; returns the float32 partials [ns, Mp, out_pad]."""
  bn, bk, stages = cfg.block_n, cfg.block_k, cfg.num_stages
  mp, red_pad = a.shape
  out_pad = _platform.cdiv(out_len, bn) * bn
  if bn % _CHUNK or bk % _CHUNK:
    raise ValueError(f"block_n and block_k must be multiples of {_CHUNK}: {cfg}")
  if mode == "rows":
    per = _platform.cdiv(_platform.cdiv(red_pad, bk), cfg.num_splits)
    if per * bk > _MAX_IDX_PER_PROGRAM:
      raise ValueError(f"{cfg}: {per * bk} idx entries per program > "
                       f"{_MAX_IDX_PER_PROGRAM}; raise num_splits")
    idx_len = cfg.num_splits * per * bk
  else:
    idx_len = out_pad
  idx_p = jnp.pad(idx_p, (0, idx_len - idx_p.shape[0]), mode="edge")
  idx_p = idx_p.reshape(idx_len // _CHUNK, _CHUNK)
  transforms = (plgpu.TilingTransform((8, _CHUNK)),
                plgpu.SwizzleTransform(_SWIZZLE))
  g_rows, g_cols = (bk, bn) if mode == "rows" else (bn, bk)
  w_union = plgpu.RefUnion(
      plgpu.SMEM((stages, g_rows, g_cols), w.dtype, transforms=transforms),
      plgpu.SMEM((stages, g_rows // 8, g_cols // _CHUNK, 8, _CHUNK), w.dtype,
                 transforms=(plgpu.SwizzleTransform(_SWIZZLE),)))
  kernel = plgpu.kernel(
      functools.partial(_gather_kernel, mode=mode, cfg=cfg, red_len=red_pad),
      out_type=jax.ShapeDtypeStruct((cfg.num_splits, mp, out_pad), jnp.float32),
      scratch_types=[
          plgpu.SMEM((stages, mp, bk), a.dtype, transforms=transforms),
          w_union,
      ],
      grid=(out_pad // bn, cfg.num_splits), grid_names=("n", "s"),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Lane))
  return kernel(count_1, idx_p, a, w)


def _live_idx(idx_k, count_1, length):
  """idx padded to `length`; positions >= count repeat the last live row (their
  products are zeroed through A or masked), so no padded row is ever read."""
  k = idx_k.shape[0]
  last = jnp.clip(count_1[0] - 1, 0, k - 1)
  pos = jnp.minimum(jnp.arange(length, dtype=jnp.int32), last)
  return jnp.take(idx_k, pos)


@functools.partial(jax.jit, static_argnames=("config",))
def gather_matmul_rows_mosaic(h_Mk, w_out_Nd, idx_k, bias_d, count_1, *,
                              config: MosaicGatherConfig):
  """h @ w_out[idx] + bias -> [M, d], idx positions >= count skipped."""
  m, k = h_Mk.shape
  n, d = w_out_Nd.shape
  if d % config.block_n:
    raise ValueError(f"d={d} must be a multiple of block_n={config.block_n}")
  idx_k = jnp.clip(idx_k.astype(jnp.int32), 0, n - 1)
  count_1 = jnp.clip(count_1, 0, k)
  kp = _platform.cdiv(k, config.block_k) * config.block_k
  live = jnp.arange(k, dtype=jnp.int32) < count_1[0]
  h = jnp.where(live[None, :], h_Mk, jnp.zeros((), h_Mk.dtype))
  h = jnp.pad(h, ((0, _pad_m(m) - m), (0, kp - k)))
  parts = _call(h, w_out_Nd, _live_idx(idx_k, count_1, kp), count_1,
                mode="rows", cfg=config, out_len=d)
  y = parts.sum(0)[:m, :d]
  if bias_d is not None:
    y = y + bias_d.astype(jnp.float32)[None, :]
  return y.astype(h_Mk.dtype)


@functools.partial(jax.jit, static_argnames=("activation", "config"))
def gather_matmul_cols_mosaic(x_Md, w_in_Nd, idx_k, bias_N, count_1, *,
                              activation, config: MosaicGatherConfig):
  """act(x @ w_in[idx].T + bias[idx]) -> [M, k]; 0 at positions >= count."""
  m, d = x_Md.shape
  n = w_in_Nd.shape[0]
  k = idx_k.shape[0]
  if d % config.block_k:
    raise ValueError(f"d={d} must be a multiple of block_k={config.block_k}")
  idx_k = jnp.clip(idx_k.astype(jnp.int32), 0, n - 1)
  count_1 = jnp.clip(count_1, 0, k)
  kp = _platform.cdiv(k, config.block_n) * config.block_n
  x = jnp.pad(x_Md, ((0, _pad_m(m) - m), (0, 0)))
  parts = _call(x, w_in_Nd, _live_idx(idx_k, count_1, kp), count_1,
                mode="cols", cfg=config, out_len=k)
  y = parts.sum(0)[:m, :k]
  if bias_N is not None:
    y = y + jnp.take(bias_N, idx_k).astype(jnp.float32)[None, :]
  y = apply_activation(y, activation)
  live = jnp.arange(k, dtype=jnp.int32) < count_1[0]
  return jnp.where(live[None, :], y, 0.0).astype(x_Md.dtype)
