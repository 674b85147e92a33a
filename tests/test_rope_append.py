"""rope_append: the fused q/k RoPE + K/V cache write (Pallas in interpret mode on CPU) vs its XLA reference and
vs the model's own split / RoPE helpers; slots outside the cache dropped; caches updated in place under jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KV8_DTYPES, quantise_cache
from pallas_kernels import kv_quant
from pallas_kernels import rope_append
from polar_jax import fusion
from polar_jax import rope


def _inputs(seed, B, Hq, Hkv, S, D, dtype, with_rope=True):
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.standard_normal((B, (Hq + 2 * Hkv) * D)), dtype)
  positions = rng.integers(0, S, B)
  positions[0] = S - 1                                       # the last slot
  positions[-1] = S                                          # a full row: nothing written
  inv_freq = jnp.asarray(1.0 / 10000.0 ** (np.arange(0, D, 2) / D), jnp.float32) if with_rope else None
  caches = [jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype) for _ in range(2)]
  return qkv, jnp.asarray(positions, jnp.int32), inv_freq, *caches


def _model_reference(qkv, positions, inv_freq, k_cache, v_cache, Hq):
  """The unfused decode path's math: polar_jax.fusion.split_qkv, polar_jax.rope, a numpy slot write."""
  B, Hkv, S, D = k_cache.shape
  q, k, v = fusion.split_qkv(qkv, Hq, Hkv, D)
  q, k, v = q.reshape(B, 1, Hq, D), k.reshape(B, 1, Hkv, D), v.reshape(B, Hkv, D)
  if inv_freq is not None:
    cos, sin = rope.rope_cos_sin(positions[:, None], np.asarray(inv_freq))
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
  k_np, v_np = np.array(k_cache), np.array(v_cache)
  for b, p in enumerate(np.asarray(positions)):
    if 0 <= p < S:
      k_np[b, :, p], v_np[b, :, p] = np.asarray(k[b, 0]), np.asarray(v[b])
  return q[:, 0], k_np, v_np


CASES = [  # B, Hq, Hkv, S, D, dtype, rope
    (3, 8, 2, 20, 64, jnp.float32, True),     # GQA G=4
    (2, 4, 4, 9, 32, jnp.bfloat16, True),     # MHA, bf16
    (3, 9, 3, 12, 64, jnp.float32, True),     # G=3: padded query rows
    (2, 4, 4, 9, 32, jnp.float16, False),     # no rotation (OPT)
    (4, 16, 1, 7, 16, jnp.float32, True),     # one KV group (multi-query)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_matches_model_math(case, impl):
  B, Hq, Hkv, S, D, dtype, with_rope = case
  args = _inputs(0, B, Hq, Hkv, S, D, dtype, with_rope)
  q_ref, k_ref, v_ref = _model_reference(*args, Hq)
  q, k, v = rope_append(*args, num_heads=Hq, implementation=impl)
  assert q.shape == (B, Hq, D) and q.dtype == dtype and k.shape == args[3].shape
  # Same float32 formulas: equal up to the last bit of the output dtype (cos/sin may differ by an ulp).
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(q_ref, np.float32), **tol)
  np.testing.assert_allclose(np.asarray(k, np.float32), np.asarray(k_ref, np.float32), **tol)
  np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(v_ref, np.float32))
  untouched = np.asarray(args[3])[-1]                         # the full row (position S) kept its cache
  np.testing.assert_array_equal(np.asarray(k, np.float32)[-1], np.asarray(untouched, np.float32))


def test_pallas_equals_xla_under_jit_with_donated_caches():
  args = _inputs(1, 3, 8, 2, 20, 64, jnp.float32)
  ref = rope_append(*args, num_heads=8, implementation="xla")
  f = jax.jit(lambda qkv, p, inv, k, v: rope_append(qkv, p, inv, k, v, num_heads=8, implementation="pallas"),
              donate_argnums=(3, 4))
  out = f(*args[:3], jnp.array(args[3]), jnp.array(args[4]))
  for a, b in zip(out, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("what,match", [
    ("qkv", "qkv must be"), ("positions", "positions must be"), ("inv_freq", "inv_freq must have"),
    ("caches", "k_cache and v_cache"), ("heads", "not a multiple")])
def test_bad_inputs_raise(what, match):
  qkv, pos, inv, k, v = _inputs(2, 2, 4, 2, 8, 16, jnp.float32)
  hq = 4
  if what == "qkv":
    qkv = qkv[:, :-1]
  elif what == "positions":
    pos = pos.astype(jnp.float32)
  elif what == "inv_freq":
    inv = inv[:-1]
  elif what == "caches":
    v = v[:, :, :4]
  else:
    hq = 5
  with pytest.raises(ValueError, match=match):
    rope_append(qkv, pos, inv, k, v, num_heads=hq)


@pytest.mark.parametrize("kv_dtype", KV8_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_kv8_cache_written_quantised(kv_dtype, impl):
  """An 8-bit cache: the rotated key and the value are quantised into the slot with their scales (the model's math
  quantised: equal within one quantisation step and one bfloat16 rounding), every other slot unchanged."""
  B, Hq, Hkv, S, D = 3, 8, 2, 12, 32
  qkv, pos, inv, k, v = _inputs(3, B, Hq, Hkv, S, D, jnp.bfloat16)
  (kq, ks), (vq, vs) = quantise_cache(k, kv_dtype), quantise_cache(v, kv_dtype)
  q_ref, k_ref, v_ref = _model_reference(qkv, pos, inv, k, v, Hq)
  q, k8, v8, ks8, vs8 = rope_append(qkv, pos, inv, kq, vq, num_heads=Hq, implementation=impl, k_scale=ks,
                                    v_scale=vs)
  assert k8.dtype == v8.dtype == kv_dtype and ks8.dtype == vs8.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(q_ref, np.float32), rtol=1e-2, atol=1e-2)
  written = np.zeros((B, Hkv, S), bool)
  for b, p in enumerate(np.asarray(pos)):
    if p < S:
      written[b, :, p] = True
  for got, got_s, old, old_s, ref in ((k8, ks8, kq, ks, k_ref), (v8, vs8, vq, vs, v_ref)):
    back = np.asarray(kv_quant.dequantise(got, got_s, jnp.float32))
    ref = np.asarray(ref, np.float32)
    amax = np.abs(ref).max(-1, keepdims=True)
    step = amax / kv_quant.QMAX[jnp.dtype(kv_dtype)] if kv_dtype == jnp.int8 else np.maximum(np.abs(ref), amax / 64)
    # Within one rounding of the 8-bit value, plus one of the bfloat16 reference: the kernel may quantise the
    # rotated key before rounding it to bfloat16 (XLA on a GPU fuses the two).
    bf16_rounding = np.abs(ref) * float(jnp.finfo(jnp.bfloat16).eps)
    ok = np.abs(back - ref) <= step * (0.5 if kv_dtype == jnp.int8 else 2.0 ** -3) * 1.01 + bf16_rounding + 1e-6
    assert np.all(ok[written])
    np.testing.assert_array_equal(np.asarray(got_s)[~written], np.asarray(old_s)[~written])
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32))[~written],
                                  np.asarray(old.astype(jnp.float32))[~written])
