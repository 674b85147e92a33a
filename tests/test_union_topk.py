"""The batch-union neuron selection (`pallas_kernels.union_topk`): the kernel (interpreted on CPU: one program; on
a GPU also its multi-program grid with barriers) against the XLA reference and `lax.top_k`'s set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _platform
from pallas_kernels import union_topk_triton
from pallas_kernels.union_topk import union_topk
from pallas_kernels.union_topk_xla import union_scores, union_topk_xla

_GPU = _platform.is_gpu()


def _int_logits(rng, r, n, lo=-3, hi=4):
  """Small integers: every row sum is exact in float32 whatever the order, and ties are plentiful."""
  return jnp.asarray(rng.integers(lo, hi, size=(r, n)).astype(np.float32))


def _top_k_set(logits, active, k):
  return np.sort(np.asarray(jax.lax.top_k(union_scores(logits, active), k)[1]))


def _layouts(n):
  """The kernel layouts to check: one program (interpret mode's), and on a GPU the default multi-program grid
  plus a narrow one (many programs, columns past N in the last; at most 128 programs, all resident)."""
  if not _GPU:
    return [(1, _platform.next_pow2(n))]
  out = [union_topk_triton.layout(n, interpret=False)]
  out += [(_platform.cdiv(n, 64), 64)] if n <= 64 * 128 else []
  return out + ([(1, _platform.next_pow2(n))] if n <= 1024 else [])


@pytest.mark.parametrize("r,n,k", [(32, 1000, 300), (5, 777, 1), (3, 64, 63), (40, 4096, 1500), (1, 16384, 896)])
def test_kernel_equals_reference_and_top_k_on_exact_sums(r, n, k):
  rng = np.random.default_rng(r * n + k)
  logits = _int_logits(rng, r, n)
  active = jnp.asarray(rng.random(r) < 0.8).at[0].set(True)
  want = _top_k_set(logits, active, k)
  np.testing.assert_array_equal(np.asarray(union_topk_xla(logits, active, k)), want)
  for programs, cols in _layouts(n):
    got = np.asarray(union_topk_triton.union_topk_triton(logits, active, k, programs=programs, cols=cols,
                                                         interpret=_platform.interpret_mode()))
    np.testing.assert_array_equal(got, want, err_msg=f"{programs} programs of {cols} columns")
  np.testing.assert_array_equal(np.asarray(union_topk(logits, k, active, implementation="pallas")), want)


def test_ties_and_inactive_rows_follow_lax_top_k():
  """All-equal scores (every row inactive, or equal logits): the k lowest indices, as lax.top_k."""
  logits = _int_logits(np.random.default_rng(0), 6, 300)
  none = jnp.zeros((6,), bool)
  for got in (union_topk(logits, 17, none, implementation="pallas"), union_topk(logits, 17, none, implementation="xla")):
    np.testing.assert_array_equal(np.asarray(got), np.arange(17))
  flat = jnp.ones((4, 100), jnp.float32).at[:, 50:].set(2.0)   # 50 tied highest, then 50 tied lower
  np.testing.assert_array_equal(np.asarray(union_topk(flat, 60, implementation="pallas")),
                                np.concatenate([np.arange(10), np.arange(50, 100)]))
  # negative logits contribute nothing (relu), inactive rows nothing either
  logits = jnp.asarray([[-5.0, 1.0, 0.0, 3.0], [9.0, 9.0, 9.0, 9.0], [-1.0, 0.0, 2.0, -7.0]])
  active = jnp.asarray([True, False, True])
  np.testing.assert_array_equal(np.asarray(union_topk(logits, 2, active, implementation="pallas")), [2, 3])


def test_random_floats_differ_only_within_rounding_of_the_threshold():
  """Random float32 logits: the kernel sums the rows in its own order, so the set may only differ from the
  reference's where float64 union scores lie within float32 rounding of the k-th largest."""
  rng = np.random.default_rng(3)
  r, n, k = 32, 4096, 1200
  logits = jnp.asarray(rng.standard_normal((r, n)).astype(np.float32))
  got = set(np.asarray(union_topk(logits, k, implementation="pallas")).tolist())
  assert len(got) == k
  exact = np.maximum(np.asarray(logits, np.float64), 0).sum(0)
  kth = np.sort(exact)[::-1][k - 1]
  tol = 4 * r * np.finfo(np.float32).eps * np.abs(exact).max()
  for i in got ^ set(_top_k_set(logits, None, k).tolist()):
    assert abs(exact[i] - kth) <= tol, (i, exact[i], kth)
  assert all(exact[i] >= kth - tol for i in got)


def test_k_equal_to_n_and_bad_input():
  logits = jnp.ones((2, 40), jnp.float32)
  np.testing.assert_array_equal(np.asarray(union_topk(logits, 40, implementation="pallas")), np.arange(40))
  with pytest.raises(ValueError, match="k=0"):
    union_topk(logits, 0)
  with pytest.raises(ValueError, match="k=41"):
    union_topk(logits, 41)
  with pytest.raises(ValueError, match="active_R"):
    union_topk(logits, 3, jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="floating"):
    union_topk(jnp.ones((2, 40), jnp.int32), 3)
  with pytest.raises(ValueError, match="floating"):
    union_topk(jnp.ones((40,), jnp.float32), 3)
  with pytest.raises(ValueError, match="cover"):
    union_topk_triton.union_topk_triton(logits, jnp.ones((2,), jnp.int32), 3, programs=2, cols=16, interpret=True)
  with pytest.raises(ValueError, match="programs == 1"):
    union_topk_triton.union_topk_triton(logits, jnp.ones((2,), jnp.int32), 3, programs=2, cols=32, interpret=True)


def test_layout_puts_at_most_one_program_per_sm():
  assert union_topk_triton.layout(16384, interpret=False, num_sms=132) == (128, 128)
  assert union_topk_triton.layout(16384, interpret=False, num_sms=100) == (64, 256)
  assert union_topk_triton.layout(4096 + 1, interpret=False, num_sms=132) == (33, 128)
  programs, cols = union_topk_triton.layout(100_000, interpret=False, num_sms=132)
  assert programs <= 132 and programs * cols >= 100_000 and cols == 1024
  assert union_topk_triton.layout(100, interpret=False, num_sms=132) == (1, 128)
  assert union_topk_triton.layout(16384, interpret=True) == (1, 16384)
