"""topk_select: the Pallas kernel (interpret mode on CPU) and the XLA reference against lax.top_k's sets, on
random and tie-heavy rows of odd lengths, plus input validation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import TopkHeuristics
from pallas_kernels import topk_select
from pallas_kernels import topk_select_triton


def _rows(rng, n):
  """Random rows, rows with heavy ties, signed zeros, +-inf and NaNs; index 0 never in a top-k below n (its
  score is the row's lowest), so a slot left unwritten (interpret mode fills outputs with 0) cannot pass."""
  rows = [rng.normal(size=n), np.round(rng.normal(size=n)), np.maximum(rng.normal(size=n), 0.0),
          np.where(rng.random(n) < 0.5, 0.0, -0.0)]
  if n >= 8:
    rows.append(np.concatenate([[np.inf, np.nan, -np.inf, -0.0, 0.0, -np.nan], rng.normal(size=n - 6)]))
  s = np.stack(rows).astype(np.float32)
  s[:, 0] = np.array([0xFFFFFFFF], np.uint32).view(np.float32)[0]   # -NaN, every bit set: the lowest in the order
  return s


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 9, 300, 1000, 4096])
@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_topk_select_equals_lax_top_k_set(n, implementation):
  rng = np.random.default_rng(n)
  scores = _rows(rng, n)
  for k in sorted({1, 2, n // 7 or 1, n // 2, n - 1}):
    got = np.asarray(topk_select(jnp.asarray(scores), k, implementation=implementation))
    ref = np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])
    assert got.shape == (len(scores), k) and got.dtype == np.int32
    for g, r in zip(got, ref):
      assert (np.diff(g) > 0).all()                          # ascending, no repeats
      np.testing.assert_array_equal(g, np.sort(r))           # the same set, ties included


def test_topk_select_bf16_all_and_one_row():
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.normal(size=(1, 777)), jnp.bfloat16)   # bf16: many exact ties
  for impl in ("pallas", "xla"):
    got = np.asarray(topk_select(scores, 300, implementation=impl))[0]
    ref = np.sort(np.asarray(jax.lax.top_k(scores.astype(jnp.float32), 300)[1])[0])
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.asarray(topk_select(scores, 777, implementation=impl))[0], np.arange(777))


def test_topk_select_kernel_alone_matches_reference_under_jit():
  rng = np.random.default_rng(2)
  scores = jnp.asarray(rng.normal(size=(3, 2048)).astype(np.float32))
  got = jax.jit(lambda s: topk_select_triton.topk_select_triton(s, 1234, interpret=True))(scores)
  ref = np.sort(np.asarray(jax.lax.top_k(scores, 1234)[1]), axis=1)
  np.testing.assert_array_equal(np.asarray(got), ref)
  assert topk_select_triton.num_warps_for(16384) == 8 and topk_select_triton.num_warps_for(1 << 16) == 16


@pytest.mark.parametrize("bad, k, match", [
    (np.zeros((4,), np.float32), 1, "2-D"),
    (np.zeros((2, 4), np.int32), 1, "floating"),
    (np.zeros((2, 4), np.float32), 0, "k=0 must lie"),
    (np.zeros((2, 4), np.float32), 5, "k=5 must lie"),
])
def test_topk_select_bad_inputs_raise(bad, k, match):
  with pytest.raises(ValueError, match=match):
    topk_select(jnp.asarray(bad), k, implementation="pallas")
  with pytest.raises(ValueError, match="unknown implementation"):
    topk_select(jnp.zeros((2, 4)), 1, implementation="cuda")


def _runs_kernel(scores, k, **kw) -> bool:
  """Whether `topk_select(..., implementation="pallas")` runs the Pallas kernel (its pallas_call in the jaxpr)."""
  fn = lambda s: topk_select(s, k, implementation="pallas", **kw)  # noqa: E731
  return re.search(r"name=topk_select\b", str(jax.make_jaxpr(fn)(scores))) is not None


def test_topk_select_long_rows_take_the_reference():
  """Rows longer than `TopkHeuristics.kernel_max_n` (padded) take the XLA radix select, shorter ones the kernel;
  both give lax.top_k's sets."""
  limit = TopkHeuristics().kernel_max_n
  assert limit == 4096
  assert not _runs_kernel(jnp.zeros((2, limit + 1)), 700) and _runs_kernel(jnp.zeros((2, limit)), 700)
  rules = TopkHeuristics(kernel_max_n=256)
  scores = jnp.asarray(np.random.default_rng(3).normal(size=(2, 257)), jnp.float32)
  for n, kernel in ((257, False), (256, True), (200, True)):
    assert _runs_kernel(scores[:, :n], 70, heuristics=rules) == kernel
    got = np.asarray(topk_select(scores[:, :n], 70, implementation="pallas", heuristics=rules))
    np.testing.assert_array_equal(got, np.sort(np.asarray(jax.lax.top_k(scores[:, :n], 70)[1]), axis=1))


def test_topk_heuristics_bad_values_raise():
  with pytest.raises(ValueError, match="kernel_max_n must lie in"):
    TopkHeuristics(kernel_max_n=0)
  with pytest.raises(ValueError, match="kernel_max_n must lie in"):
    TopkHeuristics(kernel_max_n=topk_select_triton.MAX_N + 1)
  with pytest.raises(TypeError, match="heuristics must be a TopkHeuristics"):
    topk_select(jnp.zeros((2, 4)), 1, heuristics={"kernel_max_n": 4})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_scores_take_16bit_keys_and_keep_lax_top_k_sets(dtype):
  """16-bit floats rank on 16-bit keys (two radix passes): the same sets as lax.top_k on those values, with
  the heavy ties of bf16 sums, signed zeros, infinities and NaNs."""
  from pallas_kernels import topk_select_xla
  assert topk_select_xla.key_bits(dtype) == 16 and topk_select_xla.key_bits(jnp.float32) == 32
  rng = np.random.default_rng(7)
  rows = _rows(rng, 5000)[1:]                              # (row 0's all-ones NaN has no 16-bit twin)
  scores = jnp.asarray(rows, dtype)
  keys = np.asarray(topk_select_xla.sortable_keys(scores))
  assert keys.max() < (1 << 16)
  f = np.asarray(scores.astype(jnp.float32))
  finite = np.isfinite(f[0])
  for row_f, row_k in zip(f, keys):                         # in key order, the values never decrease
    fin = np.isfinite(row_f)
    assert (np.diff(row_f[fin][np.argsort(row_k[fin], kind="stable")]) >= 0).all()
  for k in (1, 700, 2500, 4999):
    got = np.asarray(topk_select(scores, k, implementation="xla"))
    ref = np.asarray(jax.lax.top_k(scores, k)[1])
    for g, r in zip(got, ref):
      np.testing.assert_array_equal(g, np.sort(r))
