"""gather_matmul_cols / gather_matmul_rows: Pallas kernels (interpret mode on CPU)
vs the XLA references, XLA references vs numpy float64, the tiling rules
(`GatherHeuristics`), and input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import GatherConfig
from pallas_kernels import GatherHeuristics
from pallas_kernels import gather_matmul_triton
from pallas_kernels import gather_matmul_cols
from pallas_kernels import gather_matmul_rows

TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (1e-2, 1e-2)}
N, D = 300, 200  # neurons, model dim (not multiples of any block)


def _weights(seed, dtype, n_idx, count):
  """Random weights and an idx whose padded tail points at NaN-poisoned rows."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(N)
  idx = perm[:n_idx].copy()
  c = n_idx if count is None else count
  poisoned = perm[n_idx:n_idx + 5]
  idx[c:] = rng.choice(poisoned, size=n_idx - c)
  w_in = rng.standard_normal((N, D)).astype(np.float32)
  w_out = rng.standard_normal((N, D)).astype(np.float32)
  b_in = rng.standard_normal(N).astype(np.float32)
  b_out = rng.standard_normal(D).astype(np.float32)
  cast = lambda a: jnp.asarray(a, dtype)
  clean = (cast(w_in), cast(w_out), cast(b_in))
  # Poison copies (never mutate a numpy array after handing it to JAX: the
  # host-to-device transfer may still be reading it).
  dirty = []
  for a in (w_in, w_out, b_in):
    a = a.copy()
    a[poisoned] = np.nan
    dirty.append(cast(a))
  return clean, dirty, cast(b_out), jnp.asarray(idx, jnp.int32)


def _assert_close(out, ref, dtype):
  rtol, atol = TOL[dtype]
  out = np.asarray(out.astype(jnp.float32))
  ref = np.asarray(ref.astype(jnp.float32))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref, rtol=rtol,
                             atol=atol * max(1.0, np.abs(ref).max()))


def _np_act(y, activation):
  from math import erf
  if activation == "relu":
    return np.maximum(y, 0)
  if activation == "gelu":
    return 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))
  if activation == "silu":
    return y / (1 + np.exp(-y))
  return y


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
def test_xla_references_match_numpy(activation):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, D))
  (w_in, w_out, b_in), _, b_out, idx = _weights(0, jnp.float32, 70, 50)
  h = gather_matmul_cols(jnp.asarray(x, jnp.float32), w_in, idx, b_in,
                         activation, count=jnp.int32(50), implementation="xla")
  i = np.asarray(idx)
  w1, w2 = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
  ref_h = _np_act(x @ w1[i].T + np.asarray(b_in, np.float64)[i], activation)
  ref_h[:, 50:] = 0
  np.testing.assert_allclose(np.asarray(h), ref_h, rtol=1e-5, atol=1e-4)
  y = gather_matmul_rows(h, w_out, idx, b_out, count=jnp.int32(50),
                         implementation="xla")
  ref_y = np.asarray(h, np.float64)[:, :50] @ w2[i[:50]] + np.asarray(b_out)
  np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-3)


SPLIT = GatherConfig(block_m=16, block_n=32, block_k=32, num_splits=3,
                     num_warps=4, num_stages=2)
# The M = 128 decode tiling (one M-block, 128-wide tiles, split reduction).
WIDE = GatherConfig(block_m=128, block_n=128, block_k=64, num_splits=2,
                    num_warps=8, num_stages=4)
CASES = [
    # M, k, count, activation, bias, dtype, config
    (1, 70, None, "relu", True, jnp.bfloat16, None),
    (3, 100, 37, "gelu", True, jnp.float32, None),
    (100, 200, 150, "silu", False, jnp.bfloat16, WIDE),
    (3, 70, 33, None, True, jnp.float32, SPLIT),
    (1, 100, 64, "relu", False, jnp.float32, SPLIT),
    (64, 45, None, "gelu", True, jnp.bfloat16, SPLIT),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_pallas_matches_xla(case):
  M, k, count, activation, use_bias, dtype, config = case
  (w_in, w_out, b_in), (pw_in, pw_out, pb_in), b_out, idx = _weights(
      M + k, dtype, k, count)
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.standard_normal((M, D)), dtype)
  cnt = None if count is None else jnp.int32(count)
  b_in = b_in if use_bias else None
  pb_in = pb_in if use_bias else None
  b_out = b_out if use_bias else None
  ref_h = gather_matmul_cols(x, w_in, idx, b_in, activation, count=cnt,
                             implementation="xla")
  h = gather_matmul_cols(x, pw_in, idx, pb_in, activation, count=cnt,
                         implementation="pallas", config=config)
  assert h.shape == (M, k) and h.dtype == dtype
  _assert_close(h, ref_h, dtype)
  if count is not None:
    assert np.all(np.asarray(h.astype(jnp.float32))[:, count:] == 0)
  # rows: h's padded positions hold NaN, which must never be added.
  if count is not None:
    ref_h = ref_h.at[:, count:].set(jnp.nan)
  ref_y = gather_matmul_rows(ref_h, w_out, idx, b_out, count=cnt,
                             implementation="xla")
  y = gather_matmul_rows(ref_h, pw_out, idx, b_out, count=cnt,
                         implementation="pallas", config=config)
  assert y.shape == (M, D) and y.dtype == dtype
  _assert_close(y, ref_y, dtype)


def test_count_zero_and_traced_count():
  (w_in, w_out, b_in), _, b_out, idx = _weights(7, jnp.float32, 40, None)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, D)), jnp.float32)

  @jax.jit
  def mlp(c):
    h = gather_matmul_cols(x, w_in, idx, b_in, "relu", count=c,
                           implementation="pallas")
    return h, gather_matmul_rows(h, w_out, idx, b_out, count=c,
                                 implementation="pallas")

  h, y = mlp(jnp.int32(0))
  assert np.all(np.asarray(h) == 0)
  np.testing.assert_allclose(np.asarray(y), np.broadcast_to(b_out, y.shape))
  h, y = mlp(jnp.int32(40))
  ref_h = gather_matmul_cols(x, w_in, idx, b_in, "relu", implementation="xla")
  _assert_close(h, ref_h, jnp.float32)


def test_heuristics_choose_the_tiling():
  """The rules' fields move the choice (OPT-6.7B's M32 d0.1 cols and dense rows
  on 132 SMs), and `config=GatherHeuristics(...)` runs the tiling they choose."""
  cols = gather_matmul_triton.choose_cols_config
  rows = gather_matmul_triton.choose_rows_config
  default = cols(32, 4096, 1638, 2, num_sms=132)
  assert default == cols(32, 4096, 1638, 2, num_sms=132,
                         heuristics=GatherHeuristics())
  assert (default.block_n, default.num_splits) == (32, 2)
  # A quarter of the SMs is enough: no split.
  assert cols(32, 4096, 1638, 2, num_sms=132,
              heuristics=GatherHeuristics(wave_fill=0.25)).num_splits == 1
  # Every program "long": the first (widest) candidate tile.
  assert cols(32, 4096, 1638, 2, num_sms=132,
              heuristics=GatherHeuristics(long_program_kb=1)).block_n == 64
  assert rows(32, 4096, 16384, 2, num_sms=132).block_n == 128
  assert rows(32, 4096, 16384, 2, num_sms=132,
              heuristics=GatherHeuristics(long_program_kb=1 << 20)).block_n == 64
  (w_in, w_out, b_in), _, b_out, idx = _weights(9, jnp.float32, 40, None)
  x = jnp.asarray(np.random.default_rng(9).standard_normal((3, D)), jnp.float32)
  rules = GatherHeuristics(wave_fill=0.25)
  h = gather_matmul_cols(x, w_in, idx, b_in, "relu", implementation="pallas",
                         config=rules)
  _assert_close(h, gather_matmul_cols(x, w_in, idx, b_in, "relu",
                                      implementation="xla"), jnp.float32)
  y = gather_matmul_rows(h, w_out, idx, b_out, implementation="pallas",
                         config=rules)
  _assert_close(y, gather_matmul_rows(h, w_out, idx, b_out,
                                      implementation="xla"), jnp.float32)
  for impl in ("pallas", "xla"):
    with pytest.raises(TypeError, match="config must be a GatherConfig"):
      gather_matmul_cols(x, w_in, idx, config={"num_splits": 1},
                         implementation=impl)
    with pytest.raises(TypeError, match="config must be a GatherConfig"):
      gather_matmul_rows(h, w_out, idx, config=rules.wave_fill,
                         implementation=impl)


def _bad_calls():
  x = jnp.ones((2, 8), jnp.float32)
  w = jnp.ones((10, 8), jnp.float32)
  idx = jnp.array([1, 2, 3], jnp.int32)
  h = jnp.ones((2, 3), jnp.float32)
  gc, gr = gather_matmul_cols, gather_matmul_rows
  return {
      "cols x rank": (lambda: gc(x[0], w, idx), "x must be 2-D"),
      "cols w rank": (lambda: gc(x, w[0], idx), "w_in must be 2-D"),
      "cols d": (lambda: gc(x, w[:, :4], idx), "disagree on d"),
      "cols dtype": (lambda: gc(x.astype(jnp.bfloat16), w, idx), "dtype"),
      "cols int x": (lambda: gc(x.astype(jnp.int32), w.astype(jnp.int32), idx),
                     "floating point"),
      "cols idx rank": (lambda: gc(x, w, idx[None]), "1-D"),
      "cols idx empty": (lambda: gc(x, w, idx[:0]), "non-empty"),
      "cols idx float": (lambda: gc(x, w, idx.astype(jnp.float32)),
                         "integer dtype"),
      "cols idx range": (lambda: gc(x, w, idx + 9), "idx values must lie"),
      "cols bias": (lambda: gc(x, w, idx, jnp.ones(8)), "bias must have"),
      "cols activation": (lambda: gc(x, w, idx, activation="tanh"),
                          "unknown activation"),
      "cols count range": (lambda: gc(x, w, idx, count=jnp.int32(4)),
                           "count=4"),
      "cols count shape": (lambda: gc(x, w, idx, count=jnp.ones(2, jnp.int32)),
                           "scalar"),
      "cols count float": (lambda: gc(x, w, idx, count=jnp.float32(1)),
                           "integer dtype"),
      "cols impl": (lambda: gc(x, w, idx, implementation="triton"),
                    "unknown implementation"),
      "rows impl": (lambda: gr(h, w, idx, implementation="mosaic"),
                    "unknown implementation"),
      "rows h rank": (lambda: gr(h[0], w, idx), "h must be 2-D"),
      "rows k": (lambda: gr(h[:, :2], w, idx), "columns but idx"),
      "rows dtype": (lambda: gr(h.astype(jnp.bfloat16), w, idx), "dtype"),
      "rows idx range": (lambda: gr(h, w, idx - 5), "idx values must lie"),
      "rows bias": (lambda: gr(h, w, idx, jnp.ones(10)), "bias must have"),
      "rows count range": (lambda: gr(h, w, idx, count=jnp.int32(-1)),
                           "count=-1"),
  }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_bad_inputs_raise(name):
  call, match = _bad_calls()[name]
  with pytest.raises(ValueError, match=match):
    call()
