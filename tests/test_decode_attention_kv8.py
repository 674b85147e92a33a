"""Decode attention over an 8-bit KV cache (int8 and float8_e4m3fn, per-token scales): the Pallas kernels
(interpret mode on CPU: direct, persistent, split-K) against the XLA reference on the same quantised cache, with
NaN in every scale (and float8 value) the kernels must not read; the quantised reference against the float one
within a bound derived from the quantisation error; the quantised append; input validation."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KV8_DTYPES, assert_attention_close, poison_slots, quantise_cache
from pallas_kernels import AttentionConfig
from pallas_kernels import kv_quant
from pallas_kernels import selective_decode_attention
from pallas_kernels import selective_decode_attention_append

DIRECT = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2)
PERSISTENT = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True)
SPLIT = AttentionConfig(block_k=16, num_splits=3, num_warps=4, num_stages=2)


def _inputs(seed, B, Hq, Hkv, S, D, K, dtype, with_start):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, Hq, D)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, Hkv, S, D)) * rng.uniform(0.2, 3.0, (B, Hkv, S, 1)), dtype)
          for _ in range(2))
  lengths = rng.integers(1, S + 1, size=B)
  lengths[0], lengths[-1] = 1, S
  start = None
  if with_start:
    start = jnp.asarray(np.minimum(rng.integers(0, S, size=B), lengths - 1), jnp.int32)
  gidx = None if K is None else jnp.asarray(np.stack([rng.permutation(Hkv)[:K] for _ in range(B)]), jnp.int32)
  return q, k, v, jnp.asarray(lengths, jnp.int32), gidx, start


def _dead(lengths, gidx, start, Hkv, S):
  """bool [B, Hkv, S]: slots outside [start, length) and groups a row did not select."""
  pos = np.arange(S)[None, :]
  dead = pos >= np.asarray(lengths)[:, None]
  if start is not None:
    dead |= pos < np.asarray(start)[:, None]
  sel = np.ones((len(lengths), Hkv), bool)
  if gidx is not None:
    sel[:] = False
    sel[np.arange(len(lengths))[:, None], np.asarray(gidx)] = True
  return jnp.asarray(dead[:, None, :] | ~sel[:, :, None])


CASES = [
    # B, Hq, Hkv, S, D, K (None: dense), dtype, kv_start, config
    (3, 4, 4, 50, 16, 1, jnp.bfloat16, False, DIRECT),        # MHA, one group, S not a block multiple
    (3, 8, 2, 50, 32, None, jnp.bfloat16, True, DIRECT),      # GQA G=4, every group, sliding start
    (3, 8, 2, 50, 16, 1, jnp.float32, True, PERSISTENT),      # GQA, one group
    (3, 4, 4, 50, 16, None, jnp.bfloat16, False, PERSISTENT),  # MHA, dense
    (2, 4, 2, 50, 24, 2, jnp.bfloat16, False, DIRECT),        # head_dim 24 (padded lanes), K = Hkv
    (3, 8, 2, 70, 16, 1, jnp.bfloat16, True, SPLIT),          # split-K, one group
    (2, 4, 4, 50, 16, None, jnp.float32, False, SPLIT),       # split-K, dense
]


# Every case on each 8-bit dtype; one case per kernel and dtype runs in the fast suite, the rest are marked slow.
FAST = {(1, jnp.int8), (2, jnp.float8_e4m3fn), (5, jnp.float8_e4m3fn), (6, jnp.int8)}
KV8_CASES = [pytest.param(case, kv_dtype, marks=() if (i, kv_dtype) in FAST else pytest.mark.slow,
                          id="-".join(map(str, case[:8])) + f"-ns{case[8].num_splits}"
                          + ("-persistent" if case[8].persistent else "") + f"-{jnp.dtype(kv_dtype).name}")
             for i, case in enumerate(CASES) for kv_dtype in KV8_DTYPES]


@pytest.mark.parametrize("case,kv_dtype", KV8_CASES)
def test_pallas_kv8_matches_xla(case, kv_dtype):
  B, Hq, Hkv, S, D, K, dtype, with_start, config = case
  q, k, v, lengths, gidx, start = _inputs(1, B, Hq, Hkv, S, D, K, dtype, with_start)
  (kq, ks), (vq, vs) = quantise_cache(k, kv_dtype), quantise_cache(v, kv_dtype)
  ref = selective_decode_attention(q, kq, vq, lengths, gidx, kv_start=start, implementation="xla", k_scale=ks,
                                   v_scale=vs)
  dead = _dead(lengths, gidx, start, Hkv, S)
  pk, pks = poison_slots(kq, ks, dead)
  pv, pvs = poison_slots(vq, vs, dead)
  out = selective_decode_attention(q, pk, pv, lengths, gidx, kv_start=start, implementation="pallas",
                                   config=config, k_scale=pks, v_scale=pvs)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert_attention_close(out, ref, dtype)
  if gidx is not None:
    sel = ~np.asarray(dead).all(axis=2)
    assert np.all(np.asarray(out.astype(jnp.float32))[~np.repeat(sel, Hq // Hkv, axis=1)] == 0.0)


@pytest.mark.parametrize("kv_dtype", KV8_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("Hq,Hkv,K", [(4, 4, 2), (8, 2, None)])
def test_kv8_reference_within_quantisation_bound(kv_dtype, Hq, Hkv, K):
  """The 8-bit reference differs from the float32 one by at most what the stored error allows: with dk, dv the
  largest dequantisation errors and ds the largest score error, |out8 - out| <= dv + 2 max|v| (e^(2 ds) - 1) (the
  weights move by at most e^(2 ds) - 1 in l1 norm)."""
  q, k, v, lengths, gidx, start = _inputs(2, 3, Hq, Hkv, 40, 32, K, jnp.float32, True)
  (kq, ks), (vq, vs) = quantise_cache(k, kv_dtype), quantise_cache(v, kv_dtype)
  out8 = selective_decode_attention(q, kq, vq, lengths, gidx, kv_start=start, implementation="xla", k_scale=ks,
                                    v_scale=vs)
  out = selective_decode_attention(q, k, v, lengths, gidx, kv_start=start, implementation="xla")
  k_err = np.asarray(kv_quant.dequantise(kq, ks, jnp.float32) - k)
  v_err = np.abs(np.asarray(kv_quant.dequantise(vq, vs, jnp.float32) - v)).max()
  G = Hq // Hkv
  q_bkgd = np.asarray(q).reshape(3, Hkv, G, 32)
  ds = np.abs(np.einsum("bkgd,bksd->bkgs", q_bkgd, k_err)).max() * 32 ** -0.5
  bound = v_err + 2 * np.abs(np.asarray(v)).max() * np.expm1(2 * ds)
  diff = np.abs(np.asarray(out8) - np.asarray(out)).max()
  assert 0 < diff <= bound * (1 + 1e-4)
  qmax = kv_quant.QMAX[jnp.dtype(kv_dtype)]
  assert v_err <= np.abs(np.asarray(v)).max() * (0.5 / qmax if kv_dtype == jnp.int8 else 2.0 ** -4)


@pytest.mark.parametrize("kv_dtype", KV8_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantise_round_trip(kv_dtype):
  """Per-vector scales: the largest magnitude maps to QMAX exactly; zero vectors give scale 0 and decode to 0; the
  error per element is within half an int8 step, or float8's relative rounding (3 mantissa bits)."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 3, 64)).astype(np.float32) * np.array([1e-3, 1.0, 50.0])[None, :, None]
  x[0, 0] = 0.0
  values, scale = kv_quant.quantise(jnp.asarray(x), kv_dtype)
  assert values.dtype == kv_dtype and scale.dtype == jnp.float32 and scale.shape == (4, 3)
  qmax = kv_quant.QMAX[jnp.dtype(kv_dtype)]
  assert float(scale[0, 0]) == 0.0
  back = np.asarray(kv_quant.dequantise(values, scale, jnp.float32))
  assert np.all(back[0, 0] == 0)
  np.testing.assert_allclose(np.abs(np.asarray(values.astype(jnp.float32))).max(-1)[1:], qmax)
  amax = np.abs(x).max(-1, keepdims=True)
  if kv_dtype == jnp.int8:
    assert np.all(np.abs(back - x) <= amax / qmax * 0.5 * (1 + 1e-5))
  else:
    assert np.all(np.abs(back - x) <= np.maximum(np.abs(x) * 2.0 ** -4, amax / qmax * 2.0 ** -9) * (1 + 1e-5))


APPEND_CASES = [(DIRECT, 1), (PERSISTENT, None), (SPLIT, 2)]


@pytest.mark.parametrize("kv_dtype", KV8_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("config,K", APPEND_CASES, ids=["direct", "persistent", "split"])
def test_append_kv8_matches_xla(kv_dtype, config, K):
  """The new token is quantised into its slot (values and scale) by both paths; attention over the result agrees."""
  B, Hq, Hkv, S, D = 3, 8, 2, 40, 16
  q, k, v, _, gidx, _ = _inputs(4, B, Hq, Hkv, S, D, K, jnp.bfloat16, False)
  rng = np.random.default_rng(5)
  k_new, v_new = (jnp.asarray(rng.standard_normal((B, Hkv, D)), jnp.bfloat16) for _ in range(2))
  cached = jnp.asarray([0, 17, S - 1], jnp.int32)
  (kq, ks), (vq, vs) = quantise_cache(k, kv_dtype), quantise_cache(v, kv_dtype)
  ref = selective_decode_attention_append(q, k_new, v_new, kq, vq, cached, gidx, implementation="xla", k_scale=ks,
                                          v_scale=vs)
  dead = jnp.asarray(np.arange(S)[None, None, :] >= np.asarray(cached)[:, None, None]) & jnp.ones((B, Hkv, S), bool)
  pk, pks = poison_slots(kq, ks, dead)
  pv, pvs = poison_slots(vq, vs, dead)
  out = selective_decode_attention_append(q, k_new, v_new, pk, pv, cached, gidx, implementation="pallas",
                                          config=config, k_scale=pks, v_scale=pvs)
  assert len(out) == len(ref) == 5
  assert_attention_close(out[0], ref[0], jnp.bfloat16)
  expect_k, expect_ks = kv_quant.quantise(k_new, kv_dtype)
  rows = np.arange(B)
  for got in (out, ref):
    np.testing.assert_array_equal(np.asarray(got[1][rows, :, np.asarray(cached)].astype(jnp.float32)),
                                  np.asarray(expect_k.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(got[3][rows, :, np.asarray(cached)]), np.asarray(expect_ks))
  live = ~np.asarray(dead)
  np.testing.assert_array_equal(np.asarray(out[4])[live], np.asarray(vs)[live])


def test_kv8_bad_inputs_raise():
  q = jnp.ones((2, 4, 16), jnp.bfloat16)
  kv = jnp.ones((2, 4, 8, 16), jnp.int8)
  scale = jnp.ones((2, 4, 8), jnp.float32)
  n = jnp.array([3, 8], jnp.int32)
  sda = selective_decode_attention
  with pytest.raises(ValueError, match="pass its scales"):
    sda(q, kv, kv, n)
  with pytest.raises(ValueError, match="k_cache_scale must be float32"):
    sda(q, kv, kv, n, k_scale=scale[..., :4], v_scale=scale)
  with pytest.raises(ValueError, match="k_cache_scale must be float32"):
    sda(q, kv, kv, n, k_scale=scale.astype(jnp.bfloat16), v_scale=scale)
  with pytest.raises(ValueError, match="not an 8-bit dtype"):
    sda(q, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), n, k_scale=scale, v_scale=scale)
  with pytest.raises(ValueError, match="dtypes differ"):
    sda(q, kv, kv.astype(jnp.float8_e4m3fn), n, k_scale=scale, v_scale=scale)
