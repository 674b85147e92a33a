"""Serial split-K for the Triton-backend matmul kernels (gathered and skinny): the programs sharing one output
tile each reduce a contiguous share of the reduction blocks; the last to arrive adds the others' float32 partials
and runs the epilogue (as CUTLASS's semaphore split-K: partial store, barrier, one acq_rel atomic per program)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def split_range(num_blocks, split, num_splits):
  """[lo, hi) of the reduction blocks owned by `split` of `num_splits` (contiguous, the last may be short)."""
  per = (num_blocks + num_splits - 1) // num_splits
  lo = split * per
  return lo, jnp.minimum(lo + per, num_blocks)


def tile_lanes(pid, block, size):
  """Lanes of one output tile: unclamped (workspace) and clamped to [0, size)."""
  lanes = pid * block + jnp.arange(block, dtype=jnp.int32)
  # A clamp hides contiguity from Triton (no vector loads/stores): only clamp
  # when the tile can overrun. Duplicate lanes compute identical values.
  return lanes, (jnp.minimum(lanes, size - 1) if size % block else lanes)


def finish(acc, epilogue, ws_ref, cnt_ref, *, tile, split, rows, cols, num_splits, interpret):
  """Runs `epilogue` on the tile's full reduction.

  Split: store this program's float32 partial at `ws_ref[split, rows, cols]`, then arrive on the tile's counter
  `cnt_ref[tile]` (zeroed by the caller); the last program to arrive adds the other partials to its own and
  finishes.
  """
  if num_splits == 1:
    epilogue(acc)
    return
  ws_ref[split, rows[:, None], cols[None, :]] = acc
  if not interpret:
    plgpu.debug_barrier()  # all threads' partial stores precede the release
  arrived = plgpu.atomic_add(cnt_ref, tile, jnp.ones((), jnp.int32))  # acq_rel

  @pl.when(arrived == num_splits - 1)
  def _():
    def add(s, total):
      others = jnp.broadcast_to(s != split, acc.shape)
      part = plgpu.load(ws_ref.at[s, rows[:, None], cols[None, :]], mask=others, other=0.0, volatile=True)
      return total + part
    epilogue(lax.fori_loop(0, num_splits, add, acc))
