"""The batch-union neuron set as one multi-program Pallas kernel on the Triton backend.

  idx_k = union_topk_triton(logits_RN, active_R, k, programs=P, interpret=False)

OPT's neuron routers give float32 logits `[R, N]` (R decode rows, N = 16384 neurons for OPT-6.7B); the decode step
gathers the MLP rows of the k highest union scores `sum_r active_r * relu(logits[r])`. In XLA that is a reduce,
4 radix passes, cumsums, a select and a scatter: ~10 kernels and ~36 us per layer in the OPT-6.7B B32 step
(benchmarks/NOTES.md, session 12), while one program per row (`topk_select_triton`) is slow on 16384 scores
(one SM's serial reductions). Here P programs (at most one per SM, ~128 columns each) share the work and meet at grid
barriers (an atomic counter in a zeroed int32 buffer; P is at most the SM count, so all programs are resident):

  1. each program sums its columns' relu(logits) over the active rows, in registers;
  2. radix select of the k-th largest key (the float bits in `lax.top_k`'s total order, 4 bits per pass, 8 passes):
     a program counts its keys >= each of the 16 thresholds of the next digit, adds the counts to the pass's
     global histogram (atomics), waits at the barrier, then reads the histogram and keeps the largest digit whose
     count is still >= k (every program computes the same digit);
  3. each program publishes its counts of keys > T and == T, waits, and takes every key > T plus the keys == T in
     index order until k are taken (`lax.top_k`'s ties), storing each taken column at its rank among the taken
     (the earlier programs' counts plus an in-register cumsum), so the indices come out ascending.

Interpret mode runs the programs one after another, so a barrier there would wait forever: it runs one program
(`programs=1`). Summation order over the rows is the kernel's own: the set can differ from the XLA reference's
where two union scores are within float32 rounding of each other at the threshold.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform

# Measured on an H100 (`results/kernels_sweep.jsonl`, op union_topk; N 16384, 32 rows, k 4480; XLA's reference
# 28.9 us): 8-bit digits cost ~6.5 us per pass and 128 columns (the [256, 128] compare and its reduction), 2-bit
# digits ~2.5 us per pass in fixed costs (barrier, histogram read); 4-bit digits over 128 columns per program were
# the fastest, 26.5 us (512 columns 28.9).
PROGRAM_COLS = 128         # columns per program (a power of two), more where N needs more than the SMs
DIGIT_BITS = 4             # radix digit of one pass (32 / DIGIT_BITS passes, 2**DIGIT_BITS thresholds each)
DIGIT_CHUNK = 16           # thresholds counted per step (bounds the [thresholds, columns] compare in registers)
ROW_BLOCK = 16             # logit rows loaded per step
NUM_WARPS = 8
_PASSES = 32 // DIGIT_BITS
_DIGITS = 1 << DIGIT_BITS
_INT_MIN = -(1 << 31)
# the sync buffer (int32, zeroed by the caller): [0] the barrier counter; from _HIST the passes' histograms; then
# each program's count of keys > T, then of keys == T
_BAR = 0
_HIST = 16
_COUNTS = _HIST + _PASSES * _DIGITS


def layout(n: int, *, interpret: bool, num_sms: int | None = None) -> tuple[int, int]:
  """(programs, columns per program) for N scores: ~PROGRAM_COLS columns each, at most one program per SM (the
  barriers need every program resident); one program in interpret mode."""
  if interpret:
    return 1, _platform.next_pow2(n)
  num_sms = num_sms or _platform.num_sms()
  cols = max(PROGRAM_COLS, _platform.next_pow2(_platform.cdiv(n, num_sms)))
  cols = min(cols, _platform.next_pow2(n))
  return _platform.cdiv(n, cols), cols


def _barrier(sync_ref, target, interpret: bool):
  """Waits until `target` arrivals in all (this program's one included). The atomics are acq_rel: the counts
  added before arriving are visible to every program after it leaves. (Interpret mode runs one program, whose
  arrival is the last: no wait, and its interpreter has no while loops over refs.)"""
  if interpret:
    plgpu.atomic_add(sync_ref, jnp.int32(_BAR), jnp.int32(1))
    return
  plgpu.debug_barrier()              # every thread's atomics precede the arrival
  arrived = plgpu.atomic_add(sync_ref, jnp.int32(_BAR), jnp.int32(1)) + 1
  lax.while_loop(lambda c: c < target, lambda c: plgpu.atomic_add(sync_ref, jnp.int32(_BAR), jnp.int32(0)), arrived)
  plgpu.debug_barrier()


def _kernel(logits_ref, active_ref, sync_in_ref, out_ref, sync_ref, *, k: int, programs: int, cols: int,
            interpret: bool):
  del sync_in_ref                    # aliased to sync_ref
  r, n = logits_ref.shape
  p = pl.program_id(0)
  col = p * cols + jnp.arange(cols, dtype=jnp.int32)
  live = col < n
  col_c = jnp.minimum(col, n - 1)

  def add_rows(i, acc):
    rows = i * ROW_BLOCK + jnp.arange(ROW_BLOCK, dtype=jnp.int32)
    ok_r = rows < r
    rows_c = jnp.minimum(rows, r - 1)
    x = plgpu.load(logits_ref.at[rows_c[:, None], col_c[None, :]], mask=ok_r[:, None] & live[None, :], other=0.0)
    a = plgpu.load(active_ref.at[rows_c], mask=ok_r, other=0)
    return acc + jnp.sum(jnp.where((a != 0)[:, None], jnp.maximum(x, 0.0), 0.0), axis=0)

  score = lax.fori_loop(0, _platform.cdiv(r, ROW_BLOCK), add_rows, jnp.zeros((cols,), jnp.float32))
  bits = lax.bitcast_convert_type(score, jnp.int32)
  skey = bits ^ ((bits >> 31) & 0x7FFFFFFF)     # signed keys in lax.top_k's float total order
  skey = jnp.where(live, skey, _INT_MIN)        # padding: the smallest key, after every real column

  # the largest t with count(skey >= t) >= k, built digit by digit in the offset (unsigned) order u = t ^ INT_MIN
  prefix_u = jnp.int32(0)
  for i in range(_PASSES):
    shift = 32 - DIGIT_BITS * (i + 1)
    base = _HIST + i * _DIGITS
    for j in range(_DIGITS // DIGIT_CHUNK):
      d = j * DIGIT_CHUNK + jnp.arange(DIGIT_CHUNK, dtype=jnp.int32)
      cand = (prefix_u | (d << shift)) ^ _INT_MIN
      cnt = jnp.sum((skey[None, :] >= cand[:, None]).astype(jnp.int32), axis=1)
      plgpu.atomic_add(sync_ref, pl.ds(base + j * DIGIT_CHUNK, DIGIT_CHUNK), cnt)
    _barrier(sync_ref, (i + 1) * programs, interpret)
    hist = plgpu.load(sync_ref.at[pl.ds(base, _DIGITS)], volatile=True)
    digit = jnp.sum((hist >= k).astype(jnp.int32)) - 1   # counts fall with the digit; hist[0] >= k
    prefix_u = prefix_u | (digit << shift)
  t = prefix_u ^ _INT_MIN

  gt = (skey > t).astype(jnp.int32)
  eq = (skey == t).astype(jnp.int32)
  plgpu.atomic_add(sync_ref, _COUNTS + p, jnp.sum(gt))
  plgpu.atomic_add(sync_ref, _COUNTS + programs + p, jnp.sum(eq))
  _barrier(sync_ref, (_PASSES + 1) * programs, interpret)
  ps = jnp.arange(_platform.next_pow2(programs), dtype=jnp.int32)
  ok_p = ps < programs
  ps_c = jnp.minimum(ps, programs - 1)
  gts = plgpu.load(sync_ref.at[_COUNTS + ps_c], mask=ok_p, other=0, volatile=True)
  eqs = plgpu.load(sync_ref.at[_COUNTS + programs + ps_c], mask=ok_p, other=0, volatile=True)
  gt_before = jnp.sum(jnp.where(ps < p, gts, 0))
  eq_before = jnp.sum(jnp.where(ps < p, eqs, 0))
  need_eq = k - jnp.sum(gts)                     # ties at T taken in index order
  eq_ahead = eq_before + jnp.cumsum(eq) - eq      # keys == T in columns before this one
  take = (gt == 1) | ((eq == 1) & (eq_ahead < need_eq))
  take_i = take.astype(jnp.int32)
  pos = gt_before + jnp.minimum(eq_before, need_eq) + jnp.cumsum(take_i) - take_i
  pos = jnp.where(take, pos, k + col)             # distinct slots; the taken ones < k
  plgpu.store(out_ref.at[pos], col, mask=take)


def sync_size(programs: int) -> int:
  """int32 entries of the zeroed sync buffer for `programs` programs."""
  return _COUNTS + 2 * programs


@functools.partial(jax.jit, static_argnames=("k", "programs", "cols", "interpret"))
def union_topk_triton(logits_RN: jax.Array, active_R: jax.Array, k: int, *, programs: int, cols: int,
                      interpret: bool) -> jax.Array:
  """int32 `[k]`: the k highest union scores' indices, ascending (as `union_topk_xla.union_topk_xla`, up to the
  rows' summation order). `(programs, cols)` from `layout`; interpret mode needs programs == 1."""
  r, n = logits_RN.shape
  if programs * cols < n or cols != _platform.next_pow2(cols):
    raise ValueError(f"union_topk_triton: {programs} programs of {cols} columns (a power of two) must cover N={n}")
  if interpret and programs != 1:
    raise ValueError("union_topk_triton: interpret mode runs programs one after another; its grid barriers need "
                     "programs == 1")
  sync = jnp.zeros((sync_size(programs),), jnp.int32)
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  out, _ = pl.pallas_call(
      functools.partial(_kernel, k=k, programs=programs, cols=cols, interpret=interpret),
      grid=(programs,),
      in_specs=[whole((r, n)), whole((r,)), whole(sync.shape)],
      out_specs=[whole((k,)), whole(sync.shape)],
      out_shape=[jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct(sync.shape, jnp.int32)],
      input_output_aliases={2: 1},
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="union_topk",
  )(logits_RN.astype(jnp.float32), active_R.astype(jnp.int32), sync)
  return out
