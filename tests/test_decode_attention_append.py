"""selective_decode_attention_append: the new token's K/V written into every group's cache slot, then attention.

An XLA scatter writes the slots, then the Pallas kernels (interpret mode on CPU: direct, persistent, split-K)
attend. Each is checked against the XLA reference (output and both caches) with NaN in every cache value the kernel
must not read, including the slot being written."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import assert_attention_close as _assert_close
from pallas_kernels import AttentionConfig
from pallas_kernels import selective_decode_attention
from pallas_kernels import selective_decode_attention_append

DIRECT = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2)
PERSISTENT = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True)
SPLIT = AttentionConfig(block_k=16, num_splits=3, num_warps=4, num_stages=2)


def _inputs(seed, B, Hq, Hkv, S, D, K, dtype, *, with_start=False, full_row=False):
  rng = np.random.default_rng(seed)
  cast = lambda a: jnp.asarray(a, dtype)
  q = cast(rng.standard_normal((B, Hq, D)))
  k_new, v_new = (cast(rng.standard_normal((B, Hkv, D))) for _ in range(2))
  k, v = (cast(rng.standard_normal((B, Hkv, S, D))) for _ in range(2))
  cached = rng.integers(0, S, size=B)            # tokens already cached = the new token's slot
  cached[0] = 0                                  # an empty row: attends to the new token only
  if full_row:
    cached[-1] = S                               # a full row: the slot is dropped, S old keys attended
  start = None
  if with_start:
    start = jnp.asarray(np.minimum(rng.integers(0, S, size=B), cached), jnp.int32)
  gidx = None if K is None else jnp.asarray(np.stack([rng.permutation(Hkv)[:K] for _ in range(B)]), jnp.int32)
  return q, k_new, v_new, k, v, jnp.asarray(cached, jnp.int32), gidx, start


def _poisoned(k, v, cached, start):
  """NaN at every slot the op must not read: at and beyond the new token's slot (which it
  overwrites first) and before kv_start. Unselected groups keep their values: the test checks they are
  written back unchanged (and their new slot filled)."""
  S = k.shape[2]
  pos = np.arange(S)[None, :]
  dead = pos >= np.asarray(cached)[:, None]
  if start is not None:
    dead |= pos < np.asarray(start)[:, None]
  dead = dead[:, None, :, None]
  nan = jnp.asarray(np.nan, k.dtype)
  return jnp.where(dead, nan, k), jnp.where(dead, nan, v)


def _expected_caches(k, v, k_new, v_new, cached):
  """numpy: the caches with each row's slot `cached[b]` of every group set to the new token (dropped at S)."""
  k, v = np.array(k.astype(jnp.float32)), np.array(v.astype(jnp.float32))
  for b, slot in enumerate(np.asarray(cached)):
    if slot < k.shape[2]:
      k[b, :, slot] = np.asarray(k_new[b].astype(jnp.float32))
      v[b, :, slot] = np.asarray(v_new[b].astype(jnp.float32))
  return k, v


CASES = [
    # B, Hq, Hkv, S, D, K (None: dense), dtype, kv_start, full row, config
    (3, 4, 4, 77, 64, 1, jnp.float32, False, False, DIRECT),      # MHA, K = 1
    (3, 4, 4, 77, 64, None, jnp.bfloat16, False, True, DIRECT),   # dense, a full row
    (3, 8, 2, 100, 64, 1, jnp.bfloat16, True, False, DIRECT),     # GQA G=4, sliding start
    (2, 4, 2, 50, 80, 2, jnp.float32, True, True, DIRECT),        # head_dim 80 (padded lanes), K = Hkv
    (4, 6, 6, 129, 64, 5, jnp.float16, False, False, DIRECT),     # fp16, odd S
    (3, 8, 2, 100, 64, 1, jnp.bfloat16, True, True, PERSISTENT),  # the persistent kernel
    (3, 4, 4, 77, 64, None, jnp.bfloat16, False, True, PERSISTENT),
    (3, 8, 2, 100, 64, 1, jnp.bfloat16, True, True, SPLIT),       # split-K
    (2, 4, 4, 77, 64, None, jnp.float32, False, False, SPLIT),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:9])) + f"-ns{c[9].num_splits}"
                         + ("-persistent" if c[9].persistent else ""))
def test_pallas_append_matches_xla(case):
  B, Hq, Hkv, S, D, K, dtype, with_start, full_row, config = case
  q, k_new, v_new, k, v, cached, gidx, start = _inputs(3, B, Hq, Hkv, S, D, K, dtype, with_start=with_start,
                                                       full_row=full_row)
  ref, ref_k, ref_v = selective_decode_attention_append(q, k_new, v_new, k, v, cached, gidx, kv_start=start,
                                                        implementation="xla")
  pk, pv = _poisoned(k, v, cached, start)
  out, out_k, out_v = selective_decode_attention_append(q, k_new, v_new, pk, pv, cached, gidx, kv_start=start,
                                                        implementation="pallas", config=config)
  assert out.shape == q.shape and out.dtype == q.dtype
  _assert_close(out, ref, dtype)
  # The caches: the poisoned input with the new slots written (NaN == NaN for the dead slots), and the
  # reference's caches where nothing was poisoned.
  exp_k, exp_v = _expected_caches(pk, pv, k_new, v_new, cached)
  np.testing.assert_array_equal(np.asarray(out_k.astype(jnp.float32)), exp_k)
  np.testing.assert_array_equal(np.asarray(out_v.astype(jnp.float32)), exp_v)
  live = ~np.isnan(exp_k)
  np.testing.assert_array_equal(np.asarray(ref_k.astype(jnp.float32))[live], exp_k[live])
  if gidx is not None:       # heads of unselected groups are exactly 0
    sel = np.zeros((B, Hkv), bool)
    sel[np.arange(B)[:, None], np.asarray(gidx)] = True
    assert np.all(np.asarray(out.astype(jnp.float32))[~np.repeat(sel, Hq // Hkv, axis=1)] == 0)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_append_equals_write_then_attend(impl):
  """The op equals an explicit cache write followed by `selective_decode_attention` over lengths + 1."""
  q, k_new, v_new, k, v, cached, gidx, start = _inputs(5, 3, 8, 4, 60, 32, 2, jnp.float32, with_start=True)
  exp_k, exp_v = _expected_caches(k, v, k_new, v_new, cached)
  ref = selective_decode_attention(q, jnp.asarray(exp_k), jnp.asarray(exp_v), cached + 1, gidx, kv_start=start,
                                   implementation="xla")
  out, out_k, _ = selective_decode_attention_append(q, k_new, v_new, k, v, cached, gidx, kv_start=start,
                                                    implementation=impl, config=DIRECT if impl == "pallas" else None)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out_k), exp_k)


def test_append_under_jit_with_donated_caches():
  """Two steps in one jitted function with donated caches (the decode loop's pattern): each step sees the
  token the previous one appended."""
  q, k_new, v_new, k, v, cached, gidx, _ = _inputs(6, 2, 4, 4, 40, 32, 2, jnp.float32)
  cached = jnp.asarray([3, 10], jnp.int32)

  def steps(impl):
    fn = jax.jit(lambda k, v: _two(q, k_new, v_new, k, v, cached, gidx, impl), donate_argnums=(0, 1))
    return fn(jnp.array(k), jnp.array(v))

  (o1, o2, kc, vc), (r1, r2, rk, rv) = steps("pallas"), steps("xla")
  for a, b in ((o1, r1), (o2, r2), (kc, rk), (vc, rv)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # the second step's token sits at slot cached + 1
  np.testing.assert_array_equal(np.asarray(kc)[0, :, 4], np.asarray(k_new[0]) * 2)


def _two(q, k_new, v_new, k, v, cached, gidx, impl):
  cfg = DIRECT if impl == "pallas" else None
  o1, k, v = selective_decode_attention_append(q, k_new, v_new, k, v, cached, gidx, implementation=impl,
                                               config=cfg)
  o2, k, v = selective_decode_attention_append(q, k_new * 2, v_new * 2, k, v, cached + 1, gidx,
                                               implementation=impl, config=cfg)
  return o1, o2, k, v


@pytest.mark.parametrize("what", ["k_new", "lengths"])
def test_append_bad_inputs_raise(what):
  q, k_new, v_new, k, v, cached, gidx, _ = _inputs(8, 2, 4, 4, 20, 16, 1, jnp.float32)
  if what == "k_new":
    with pytest.raises(ValueError, match="k_new and v_new must be"):
      selective_decode_attention_append(q, k_new[:, :2], v_new, k, v, cached, gidx, implementation="xla")
  else:
    with pytest.raises(ValueError, match="the new token's slot"):
      selective_decode_attention_append(q, k_new, v_new, k, v, jnp.asarray([0, 21]), gidx, implementation="xla")
