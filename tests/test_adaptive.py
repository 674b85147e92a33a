"""Adaptive head budgets: a per-row count of selected KV groups (`group_count`) in the decode-attention kernels,
the mass-threshold selection (`SparsityConfig(budget="adaptive")`), decoding without recompiling as counts change,
and the calibration of the mass to a target density."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import assert_attention_close
from pallas_kernels import AttentionConfig, selective_decode_attention, selective_decode_attention_append
from pallas_kernels import decode_attention_persistent as attn_persistent
from pallas_kernels import decode_attention_triton as attn_triton


def _attention_inputs(seed, B, Hq, Hkv, S, D, K, dtype):
  """Random q/K/V, lengths 1..S (none a multiple of 16 but S itself), distinct groups per row sorted as a router
  would give them, and counts per row in [1, K] including 1 and K."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, Hq, D)).astype(np.float32)
  k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
  v = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
  lengths = rng.integers(1, S + 1, size=B)
  lengths[0], lengths[-1] = 1, S
  gidx = np.stack([rng.permutation(Hkv)[:K] for _ in range(B)])
  count = rng.integers(1, K + 1, size=B)
  count[0], count[-1] = K, 1
  cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
  return (cast(q), cast(k), cast(v), jnp.asarray(lengths, jnp.int32), jnp.asarray(gidx, jnp.int32),
          jnp.asarray(count, jnp.int32))


def _counted(gidx, count, Hkv):
  """[B, Hkv] bool: the groups of each row's counted slots."""
  gidx, count = np.asarray(gidx), np.asarray(count)
  sel = np.zeros((gidx.shape[0], Hkv), bool)
  for b in range(gidx.shape[0]):
    sel[b, gidx[b, :count[b]]] = True
  return sel


def _poison(q, k, v, lengths, gidx, count):
  """NaN in every value the kernels must not read: uncounted groups' queries and K/V, keys past each length."""
  B, Hq, _ = q.shape
  Hkv, S = k.shape[1], k.shape[2]
  sel = _counted(gidx, count, Hkv)
  dead = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]
  kv_dead = dead[:, None, :, None] | ~sel[:, :, None, None]
  q_dead = ~np.repeat(sel, Hq // Hkv, axis=1)[:, :, None]
  nan = jnp.asarray(np.nan, q.dtype)
  return jnp.where(q_dead, nan, q), jnp.where(kv_dead, nan, k), jnp.where(kv_dead, nan, v)


def _check_zero_unselected(out, gidx, count, Hq, Hkv):
  unselected = ~np.repeat(_counted(gidx, count, Hkv), Hq // Hkv, axis=1)
  assert np.all(np.asarray(out.astype(jnp.float32))[unselected] == 0.0)


def _fixed_k_reference(q, k, v, lengths, gidx, count, **kw):
  """Row by row count: the fixed-K path with K = the row's count (group_idx[:, :c], no counts)."""
  out = np.zeros(q.shape, np.float32)
  for c in np.unique(np.asarray(count)):
    rows = np.asarray(count) == c
    o = selective_decode_attention(q, k, v, lengths, gidx[:, :int(c)], implementation="xla", **kw)
    out[rows] = np.asarray(o.astype(jnp.float32))[rows]
  return out


PERSISTENT = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True)
DIRECT = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2)
SPLIT = AttentionConfig(block_k=16, num_splits=3, num_warps=4, num_stages=2)

KERNEL_CASES = [
    # B, Hq, Hkv, S, D, K, dtype, config
    (5, 4, 4, 77, 16, 4, jnp.float32, PERSISTENT),     # MHA, K = Hkv
    (4, 8, 4, 100, 32, 3, jnp.bfloat16, PERSISTENT),   # GQA G=2
    (4, 8, 2, 61, 16, 2, jnp.float16, DIRECT),         # GQA G=4
    (5, 6, 6, 77, 16, 5, jnp.float32, DIRECT),         # MHA
    (4, 8, 4, 100, 16, 3, jnp.float32, SPLIT),         # split-K + scatter
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c[:7])) + f"-{c[7].num_splits}"
                         + ("p" if c[7].persistent else ""))
def test_counted_kernels_match_xla_and_fixed_k(case):
  B, Hq, Hkv, S, D, K, dtype, config = case
  q, k, v, lengths, gidx, count = _attention_inputs(3, B, Hq, Hkv, S, D, K, dtype)
  ref = selective_decode_attention(q, k, v, lengths, gidx, implementation="xla", group_count=count)
  assert_attention_close(ref, _fixed_k_reference(q, k, v, lengths, gidx, count), dtype)
  _check_zero_unselected(ref, gidx, count, Hq, Hkv)
  pq, pk, pv = _poison(q, k, v, lengths, gidx, count)
  out = selective_decode_attention(pq, pk, pv, lengths, gidx, implementation="pallas", config=config,
                                   group_count=count)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_attention_close(out, ref, dtype)
  _check_zero_unselected(out, gidx, count, Hq, Hkv)


def test_counted_residuals_merge_to_the_output():
  """return_residuals with counts (split-K scatter): uncounted heads have l = 0, o = 0, and the merge of the
  residuals is the output."""
  q, k, v, lengths, gidx, count = _attention_inputs(4, 4, 8, 4, 100, 16, 3, jnp.float32)
  ref = selective_decode_attention(q, k, v, lengths, gidx, implementation="xla", group_count=count)
  for impl, cfg in (("xla", None), ("pallas", SPLIT)):
    o, m, l = selective_decode_attention(q, k, v, lengths, gidx, implementation=impl, config=cfg,
                                         group_count=count, return_residuals=True)
    unselected = ~np.repeat(_counted(gidx, count, 4), 2, axis=1)
    assert np.all(np.asarray(l)[unselected] == 0) and np.all(np.asarray(o)[unselected] == 0)
    np.testing.assert_allclose(np.asarray(attn_merge([(o, m, l)])), np.asarray(ref), rtol=1e-5, atol=1e-5)


def attn_merge(parts):
  from pallas_kernels import merge_attention_partials
  return merge_attention_partials(parts)


@pytest.mark.parametrize("num_sms,programs_per_sm", [(1, 1), (1, 3), (2, 2)])
def test_persistent_compacted_items_share_the_dynamic_total(num_sms, programs_per_sm):
  """1-6 programs over 5 rows x 3 slots: each takes ceil(total / programs) of the compacted counted items (some
  programs none, some spanning rows); poisoned uncounted groups are never read; their heads are exactly 0."""
  B, Hq, Hkv, S, D, K = 5, 8, 4, 100, 16, 3
  q, k, v, lengths, gidx, _ = _attention_inputs(5, B, Hq, Hkv, S, D, K, jnp.float32)
  count = jnp.asarray([3, 1, 2, 1, 3], jnp.int32)
  start = jnp.asarray([0, 0, 3, 0, 50], jnp.int32)
  lengths = jnp.asarray([1, 37, 100, 64, 65], jnp.int32)
  cfg = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True,
                        programs_per_sm=programs_per_sm)
  pq, pk, pv = _poison(q, k, v, lengths, gidx, count)
  out = attn_persistent.decode_attention_persistent(pq, pk, pv, lengths, gidx, start, scale=0.25, config=cfg,
                                                    interpret=True, num_sms=num_sms, group_count_B=count)
  ref = selective_decode_attention(q, k, v, lengths, gidx, kv_start=start, scale=0.25, implementation="xla",
                                   group_count=count)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  _check_zero_unselected(out, gidx, count, Hq, Hkv)


def test_compact_items_front_packs_the_counted_slots():
  items, total = attn_persistent.compact_items(jnp.asarray([2, 0, 3, 1]), 3)
  assert int(total[0]) == 6
  np.testing.assert_array_equal(np.asarray(items)[:6], [0, 1, 6, 7, 8, 9])


def test_direct_kernel_counts_raw():
  """The raw direct kernel (interpret mode fills outputs with NaN): every head written, uncounted ones 0."""
  q, k, v, lengths, gidx, count = _attention_inputs(6, 3, 8, 4, 50, 16, 3, jnp.float32)
  out = attn_triton.decode_attention_triton_direct(q, k, v, lengths, gidx, jnp.zeros((3,), jnp.int32), scale=0.25,
                                                   config=DIRECT, interpret=True, group_count_B=count)
  ref = selective_decode_attention(q, k, v, lengths, gidx, scale=0.25, implementation="xla", group_count=count)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  _check_zero_unselected(out, gidx, count, 8, 4)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_append_takes_counts(impl):
  B, Hq, Hkv, S, D, K = 3, 8, 4, 40, 16, 3
  q, k, v, lengths, gidx, count = _attention_inputs(7, B, Hq, Hkv, S, D, K, jnp.float32)
  lengths = jnp.asarray([0, 17, 39], jnp.int32)
  rng = np.random.default_rng(8)
  k_new = jnp.asarray(rng.standard_normal((B, Hkv, D)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((B, Hkv, D)), jnp.float32)
  out, kc, vc = selective_decode_attention_append(q, k_new, v_new, k, v, lengths, gidx, implementation=impl,
                                                  config=PERSISTENT if impl == "pallas" else None, group_count=count)
  ref = selective_decode_attention(q, kc, vc, lengths + 1, gidx, implementation="xla", group_count=count)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  _check_zero_unselected(out, gidx, count, Hq, Hkv)


def test_counts_are_traced_not_static():
  """New counts reuse the compiled program (the counts are a traced argument)."""
  q, k, v, lengths, gidx, count = _attention_inputs(9, 4, 8, 4, 50, 16, 3, jnp.float32)
  traces = []

  @jax.jit
  def f(count):
    traces.append(1)
    return selective_decode_attention(q, k, v, lengths, gidx, implementation="xla", group_count=count)

  a = f(count)
  b = f(jnp.asarray([1, 1, 1, 1], jnp.int32))
  assert len(traces) == 1
  assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bad, match", [
    (dict(group_count=jnp.asarray([1, 2], jnp.int32), group_idx=None), "needs group_idx"),
    (dict(group_count=jnp.asarray([1], jnp.int32)), "group_count must have shape"),
    (dict(group_count=jnp.asarray([1.0, 2.0])), "integer dtype"),
    (dict(group_count=jnp.asarray([0, 2], jnp.int32)), "must lie in \\[1, K=2\\]"),
    (dict(group_count=jnp.asarray([1, 3], jnp.int32)), "must lie in \\[1, K=2\\]"),
])
def test_bad_counts_raise(bad, match):
  q = jnp.ones((2, 4, 16), jnp.float32)
  kv = jnp.ones((2, 4, 32, 16), jnp.float32)
  kwargs = dict(group_idx=jnp.asarray([[0, 1], [2, 3]], jnp.int32))
  kwargs.update(bad)
  lengths = jnp.asarray([3, 32], jnp.int32)
  gidx = kwargs.pop("group_idx")
  with pytest.raises(ValueError, match=match):
    selective_decode_attention(q, kv, kv, lengths, gidx, **kwargs)
  with pytest.raises(ValueError, match=match):
    selective_decode_attention_append(q, q[:, :4], q[:, :4], kv, kv, lengths, gidx, **kwargs)


# ---- selection and decoding ------------------------------------------------------------------------------------
from conftest import LLAMA_GQA_8H, LLAMA_MHA_8H  # noqa: E402
from polar_jax import fusion, generation as gen  # noqa: E402
from polar_jax.model import init_model  # noqa: E402
from polar_jax.routers.modules import Routers  # noqa: E402
from polar_jax.selection import GroupIndices, LinearRouter, keep_top_groups, mass_counts  # noqa: E402
from polar_jax.sparse_decode import make_decoder  # noqa: E402
from polar_jax.sparsity import SparsityConfig  # noqa: E402

PROMPTS = [[5, 9, 13, 2, 7, 7, 1], [3, 1], [11, 12, 13, 14, 15]]


def _routers(config, seed=0, scale=0.2):
  """Random head routers whose softmax scores spread: some rows need one group, others several."""
  routers = Routers.init(config)
  rng = np.random.default_rng(seed)
  routers.head.w_ldg[...] = rng.standard_normal(routers.head.w_ldg.shape).astype(np.float32) * scale
  routers.head.b_lg[...] = rng.standard_normal(routers.head.b_lg.shape).astype(np.float32)
  return routers


@pytest.fixture(scope="module")
def mha_model():
  return fusion.fuse_projections(init_model(LLAMA_MHA_8H, seed=3))


def test_mass_counts_smallest_prefix_reaching_the_mass():
  w = jnp.asarray([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.05, 0.0]])
  idx = jnp.asarray([[0, 1, 2], [3, 2, 1], [0, 1, 2]], jnp.int32)
  np.testing.assert_array_equal(mass_counts(w, idx, 0.79), [2, 3, 1])
  np.testing.assert_array_equal(mass_counts(w, idx, 0.95), [3, 3, 2])
  np.testing.assert_array_equal(mass_counts(w, idx, 1e-6, min_groups=2), [2, 2, 2])
  np.testing.assert_array_equal(mass_counts(w, idx, 1.0, min_groups=5), [3, 3, 3])   # capped at K


def test_router_choose_sorted_by_score_with_counts():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((32, 8)) * 0.2, jnp.float32)
  b = jnp.zeros((8,), jnp.float32)
  heads = LinearRouter(w, b, k=5, mass=0.7).groups(x)
  scores = np.asarray(x @ w)
  np.testing.assert_array_equal(np.asarray(heads.idx_bk), np.argsort(-scores, axis=1, kind="stable")[:, :5])
  probs = np.exp(scores - scores.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  cum = np.cumsum(np.sort(probs, axis=1)[:, ::-1], axis=1)
  want = np.minimum(5, 1 + np.sum(cum[:, :4] < 0.7, axis=1))
  np.testing.assert_array_equal(np.asarray(heads.count_b), want)
  assert len(set(want.tolist())) > 1     # the case spreads over several counts
  assert LinearRouter(w, b, k=5).groups(x).count_b is None


def test_oracle_mass_keeps_the_fewest_groups_reaching_it():
  rng = np.random.default_rng(1)
  ctx = jnp.asarray(rng.standard_normal((5, 8, 4)) * rng.uniform(0.1, 3, (5, 8, 1)), jnp.float32)
  kept = np.asarray(keep_top_groups(ctx, 4, 3, mass=0.6))
  norms = np.linalg.norm(np.asarray(ctx).reshape(5, 4, 8), axis=-1)
  for b in range(5):
    order = np.argsort(-norms[b], kind="stable")
    cum = np.cumsum(norms[b][order]) / norms[b].sum()
    n = min(3, 1 + int(np.sum(cum[:2] < 0.6)))
    keep = np.zeros(4, bool)
    keep[order[:n]] = True
    np.testing.assert_array_equal(np.any(kept[b].reshape(4, 8) != 0, axis=-1), keep)
  np.testing.assert_array_equal(np.asarray(keep_top_groups(ctx, 4, 3, mass=1.0)),
                                np.asarray(keep_top_groups(ctx, 4, 3)))


def _block_counts(weights_bg, k, mass, shards, min_groups=1):
  """numpy: per row and block of G / shards groups, the fewest of the block's top k / shards reaching `mass` of
  the block's weight, and the groups they are."""
  b, g = weights_bg.shape
  gl, kl = g // shards, k // shards
  counts, kept = np.zeros((b, shards), int), np.zeros((b, g), bool)
  for r in range(b):
    for s in range(shards):
      w = weights_bg[r, s * gl:(s + 1) * gl]
      order = np.argsort(-w, kind="stable")[:kl]
      cum = np.cumsum(w[order]) / w.sum()
      counts[r, s] = min(kl, max(min(min_groups, kl), 1 + int(np.sum(cum[:kl - 1] < mass))))
      kept[r, s * gl + order[:counts[r, s]]] = True
  return counts, kept


def test_router_counts_per_shard_and_their_one_device_form():
  """Balanced over 2 shards, each shard counts within its own block's softmax; `rows()` lists the same groups,
  counted first, with the row's total."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((7, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((32, 8)) * 0.3, jnp.float32)
  b = jnp.asarray(rng.standard_normal(8) * 0.1, jnp.float32)
  heads = LinearRouter(w, b, k=6, shards=2, mass=0.6).groups(x)
  assert heads.count_b is None and heads.count_bs.shape == (7, 2)
  scores = np.asarray(x @ w + b)
  probs = np.exp(scores.reshape(7, 2, 4) - scores.reshape(7, 2, 4).max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).reshape(7, 8)
  want, kept = _block_counts(probs, 6, 0.6, 2)
  np.testing.assert_array_equal(np.asarray(heads.count_bs), want)
  assert len(set(want.ravel().tolist())) > 1     # the case spreads over several counts
  flat = heads.rows()
  count = np.asarray(flat.count_b)
  np.testing.assert_array_equal(count, want.sum(1))
  idx = np.asarray(flat.idx_bk)
  for r in range(7):
    assert sorted(idx[r, :count[r]].tolist()) == np.flatnonzero(kept[r]).tolist()
    assert sorted(idx[r].tolist()) == sorted(np.asarray(heads.idx_bk)[r].tolist())   # a permutation of the slots


def test_oracle_mass_per_shard():
  rng = np.random.default_rng(4)
  ctx = jnp.asarray(rng.standard_normal((5, 8, 4)) * rng.uniform(0.1, 3, (5, 8, 1)), jnp.float32)
  kept = np.asarray(keep_top_groups(ctx, 8, 6, shards=2, mass=0.5))
  norms = np.linalg.norm(np.asarray(ctx).reshape(5, 8, 4), axis=-1)
  want_counts, want = _block_counts(norms, 6, 0.5, 2)
  assert len(set(want_counts.ravel().tolist())) > 1
  np.testing.assert_array_equal(np.any(kept != 0, axis=-1), want)


@pytest.mark.parametrize("selector", ["router", "oracle"])
def test_adaptive_per_shard_bounds_equal_uniform_balanced_selection(mha_model, selector):
  """Balanced over 2 shards: mass 1.0 keeps each shard's 3 groups (the uniform balanced top-6's tokens), a tiny
  mass each shard's top group (the uniform balanced top-2's)."""
  routers = _routers(mha_model.config) if selector == "router" else None
  run = lambda **kw: gen.generate(mha_model, PROMPTS, max_new_tokens=6, routers=routers,  # noqa: E731
                                  sparsity=SparsityConfig(selector=selector, shards=2, **kw)).tokens
  np.testing.assert_array_equal(run(attn_groups=6, budget="adaptive", mass=1.0), run(attn_groups=6))
  tiny = run(attn_groups=6, budget="adaptive", mass=1e-6)
  np.testing.assert_array_equal(tiny, run(attn_groups=2))
  assert not np.array_equal(tiny, run(attn_groups=6))     # the counts mattered


@pytest.mark.parametrize("selector", ["router", "oracle"])
def test_adaptive_full_mass_equals_uniform_top_k(mha_model, selector):
  """mass 1.0 (or min_groups = K) keeps all K groups: the uniform top-K's tokens."""
  routers = _routers(mha_model.config) if selector == "router" else None
  uniform = gen.generate(mha_model, PROMPTS, max_new_tokens=6, routers=routers,
                         sparsity=SparsityConfig(attn_groups=5, selector=selector)).tokens
  for kw in (dict(mass=1.0), dict(mass=0.2, min_groups=5)):
    adaptive = gen.generate(mha_model, PROMPTS, max_new_tokens=6, routers=routers,
                            sparsity=SparsityConfig(attn_groups=5, selector=selector, budget="adaptive", **kw)).tokens
    np.testing.assert_array_equal(adaptive, uniform)


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["router", "oracle"])
def test_adaptive_tiny_mass_keeps_one_group(mha_model, selector):
  """mass tiny, min_groups 1: every row keeps exactly its top group: the tokens of the uniform top-1."""
  routers = _routers(mha_model.config) if selector == "router" else None
  top1 = gen.generate(mha_model, PROMPTS, max_new_tokens=6, routers=routers,
                      sparsity=SparsityConfig(attn_groups=1, selector=selector)).tokens
  adaptive = gen.generate(mha_model, PROMPTS, max_new_tokens=6, routers=routers,
                          sparsity=SparsityConfig(attn_groups=6, selector=selector, budget="adaptive",
                                                  mass=1e-6)).tokens
  np.testing.assert_array_equal(adaptive, top1)
  dense = gen.generate(mha_model, PROMPTS, max_new_tokens=6).tokens
  assert not np.array_equal(adaptive, dense)     # the selection mattered


def test_adaptive_plans_carry_counts(mha_model):
  config = mha_model.config
  decode, state = make_decoder(mha_model, SparsityConfig(attn_density=0.75, budget="adaptive", mass=1e-6),
                               _routers(config))
  assert decode.groups == (None, 6) and decode.masses == (None, 1e-6)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, config.hidden_size)), jnp.float32)
  plans = decode.plans(mha_model, jnp.asarray([1, 2, 3]), jnp.asarray([4, 5, 6]), state)
  heads = plans[1].heads.groups(x)
  assert isinstance(heads, GroupIndices) and heads.idx_bk.shape == (3, 6)
  np.testing.assert_array_equal(np.asarray(heads.count_b), [1, 1, 1])


def test_counts_change_without_new_traces():
  """Counts are data: new router weights (other counts) and new steps reuse the compiled programs."""
  model = fusion.fuse_projections(init_model(LLAMA_GQA_8H, seed=4))
  sparsity = SparsityConfig(attn_groups=4, budget="adaptive", mass=0.6)
  runs = [gen.generate(model, PROMPTS, max_new_tokens=5, sparsity=sparsity, routers=_routers(model.config, s)).tokens
          for s in (0, 1)]
  before = gen.TRACE_COUNTS["generate"]
  for s in (2, 3):
    gen.generate(model, PROMPTS, max_new_tokens=5, sparsity=sparsity, routers=_routers(model.config, s))
  assert gen.TRACE_COUNTS["generate"] == before
  steps = gen.TRACE_COUNTS["step"]
  list(gen.stream(model, PROMPTS, max_new_tokens=5, sparsity=sparsity, routers=_routers(model.config, 5)))
  list(gen.stream(model, PROMPTS, max_new_tokens=5, sparsity=sparsity, routers=_routers(model.config, 6)))
  assert gen.TRACE_COUNTS["step"] - steps <= 1
  assert runs[0].shape == runs[1].shape
  # the counts of one router differ between rows and inputs under one trace
  router = LinearRouter(*[jnp.asarray(a) for a in (_routers(model.config).head.w_ldg[...][1],
                                                  _routers(model.config).head.b_lg[...][1])], k=4, mass=0.6)
  traces = []

  @jax.jit
  def counts(x):
    traces.append(1)
    return router.groups(x).count_b

  rng = np.random.default_rng(7)
  seen = {tuple(np.asarray(counts(jnp.asarray(rng.standard_normal((8, 32)), jnp.float32))).tolist())
          for _ in range(3)}
  assert len(traces) == 1 and len({c for cs in seen for c in cs}) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget="flexible"), "unknown budget"),
    (dict(budget="adaptive", mass=0.0), "mass must be"),
    (dict(budget="adaptive", mass=1.5), "mass must be"),
    (dict(budget="adaptive", mass=(0.5, True)), "mass of layer 1"),
    (dict(budget="adaptive", min_groups=0), "min_groups must be"),
    (dict(budget="adaptive", selector="random"), "needs selector 'router' or 'oracle'"),
])
def test_bad_adaptive_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SparsityConfig(**kwargs)


def test_per_layer_mass_and_layer_groups():
  cfg = SparsityConfig(attn_density=1.0, budget="adaptive", mass=(0.5, 0.7))
  assert cfg.layer_groups(LLAMA_MHA_8H) == (None, 8)       # density 1.0 still routes (Kmax = all groups)
  assert cfg.layer_masses(LLAMA_MHA_8H) == (None, 0.7)
  assert SparsityConfig(attn_density=1.0).layer_groups(LLAMA_MHA_8H) == (None, None)
  with pytest.raises(ValueError, match="3 per-layer values"):
    SparsityConfig(budget="adaptive", mass=(0.5, 0.7, 0.9)).layer_masses(LLAMA_MHA_8H)
  # balanced over 2 shards: 4 groups a shard, each keeping at most round(0.75 x 4) = 3 of its own (1.0: all 4)
  assert SparsityConfig(attn_density=0.75, budget="adaptive", shards=2).layer_groups(LLAMA_MHA_8H) == (None, 6)
  assert SparsityConfig(attn_density=1.0, budget="adaptive").layer_groups(LLAMA_MHA_8H, shards=2) == (None, 8)


# ---- calibration -----------------------------------------------------------------------------------------------
from polar_jax.routers import adaptive  # noqa: E402


def _random_scores(seed, t=3000, layers=3, groups=8):
  """Router scores whose softmax ranges from peaked to flat across tokens and layers."""
  rng = np.random.default_rng(seed)
  temp = rng.uniform(0.2, 3.0, size=(t, layers, 1)) * np.asarray([1.0, 0.5, 2.0])[:layers, None]
  return (rng.standard_normal((t, layers, groups)) * temp).astype(np.float32)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("per_layer", [False, True])
def test_calibration_hits_the_target_density(target, per_layer):
  scores = _random_scores(0)
  budget = adaptive.calibrate_mass(scores, target, (None, 8, 6), per_layer=per_layer)
  assert budget.mass[0] == 1.0 and budget.layer_density[0] is None
  assert abs(budget.realised_density - target) < 0.01
  if per_layer:
    assert all(abs(d - target) < 0.01 for d in budget.layer_density[1:])
    assert budget.mass[1] != budget.mass[2]
  # the same density from the SparsityConfig the budget makes, and on other tokens of the same distribution
  cfg = budget.sparsity(SparsityConfig(dense_layers=(0,)))
  model_cfg = dataclasses.replace(LLAMA_MHA_8H, num_layers=3)
  assert cfg.budget == "adaptive" and cfg.layer_groups(model_cfg) == (None, 8, 8)
  fresh = adaptive.calibrate_mass(_random_scores(1), target, (None, 8, 6), per_layer=per_layer)
  assert abs(fresh.realised_density - target) < 0.01


def test_calibration_counts_match_the_decode_selection():
  """The numpy counts of the calibration are the decode step's `mass_counts` on the same scores."""
  scores = _random_scores(2, t=64)[:, 1]
  idx = jnp.asarray(np.argsort(-scores, axis=1, kind="stable")[:, :6], jnp.int32)
  for mass in (0.3, 0.6, 0.9):
    want = mass_counts(jax.nn.softmax(jnp.asarray(scores), axis=-1), idx, mass)
    got = adaptive.counts_for_mass(adaptive.sorted_tail_shares(scores), mass, 6)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_masses_near_one_count_as_the_calibration_does():
  """Peaked router scores (trained routers reach +-17) need masses within 1e-4..1e-8 of 1 for middling densities: the
  float32 step counts them as the float64 calibration does (1 - a float32 cumulative share would round to 0 and
  keep nearly every group)."""
  rng = np.random.default_rng(6)
  scores = (rng.standard_normal((2000, 14)) * rng.uniform(2, 8, (2000, 1))).astype(np.float32)
  idx = jnp.asarray(np.argsort(-scores, axis=1, kind="stable"), jnp.int32)
  tails = adaptive.sorted_tail_shares(scores)
  densities = []
  for mass in (1 - 1e-4, 1 - 1e-6, 1 - 1e-8):
    want = adaptive.counts_for_mass(tails, mass, 14)
    got = np.asarray(mass_counts(jax.nn.softmax(jnp.asarray(scores), axis=-1), idx, mass))
    assert np.mean(got != want) <= 0.005, (mass, np.mean(got != want))
    densities.append(want.mean() / 14)
  assert densities[0] < densities[1] < densities[2] < 0.95      # the masses still tell densities apart


def test_per_shard_calibration_realises_the_router_counts():
  """Calibrated over 2 shards, the mass realises its density in the decode step's per-shard counts (`LinearRouter`
  with shards=2) on the same scores, near the target."""
  scores = _random_scores(5, t=400)                          # [T, 3 layers, 8 groups]
  budget = adaptive.calibrate_mass(scores, 0.45, (None, 6, 6), shards=2)
  assert budget.max_groups == (None, 6, 6) and abs(budget.realised_density - 0.45) < 0.02
  sparsity = SparsityConfig(attn_groups=6, dense_layers=(0,), budget="adaptive", mass=budget.mass, shards=2)
  three_layers = dataclasses.replace(LLAMA_MHA_8H, num_layers=3)
  assert abs(adaptive.realised_density(scores, sparsity, three_layers) - budget.realised_density) < 1e-9
  kept = []
  for layer in (1, 2):
    router = LinearRouter(jnp.eye(8, dtype=jnp.float32), jnp.zeros(8, jnp.float32), k=6, shards=2,
                          mass=budget.mass[layer])
    kept.append(np.asarray(router.groups(jnp.asarray(scores[:, layer])).count_bs).sum(1) / 8)
  # the bisection's mass sits on some token's cumulative share: float32 (step) vs float64 (calibration) may count
  # such a boundary token differently, 1 / (400 x 8 x 2) of density each
  np.testing.assert_allclose(np.mean(kept), budget.realised_density, atol=5 / (400 * 8 * 2))
  with pytest.raises(ValueError, match="divide by 3"):
    adaptive.calibrate_mass(scores, 0.5, (None, 6, 6), shards=3)


def test_calibration_out_of_reach_and_bad_input():
  scores = _random_scores(3, t=500)
  high = adaptive.calibrate_mass(scores, 1.0, (None, 4, 4))     # at most 4 of 8 groups: density 0.5
  assert high.mass[1] == 1.0 and abs(high.realised_density - 0.5) < 1e-6
  low = adaptive.calibrate_mass(scores, 0.01, (None, 4, 4), min_groups=2)
  assert abs(low.realised_density - 0.25) < 1e-6
  with pytest.raises(ValueError, match="target_density"):
    adaptive.calibrate_mass(scores, 0.0, (None, 4, 4))
  with pytest.raises(ValueError, match="max_groups has 2"):
    adaptive.calibrate_mass(scores, 0.5, (None, 4))
  with pytest.raises(ValueError, match="no routed layer"):
    adaptive.calibrate_mass(scores, 0.5, (None, None, None))


def test_heldout_scores_and_stored_budget(tmp_path):
  model = init_model(LLAMA_MHA_8H, seed=5)
  routers = _routers(model.config, 1)
  rng = np.random.default_rng(4)
  seqs = [rng.integers(1, 97, size=n).tolist() for n in (20, 33, 7)]
  scores = adaptive.heldout_router_scores(model, routers, seqs, max_tokens=50)
  assert scores.shape == (50, 2, 8) and np.all(np.isfinite(scores))
  budget = adaptive.calibrate_mass(scores, 0.5, SparsityConfig(budget="adaptive").layer_groups(model.config))
  path = adaptive.save_adaptive_budget(tmp_path, budget)
  assert path.name == adaptive.BUDGET_FILE
  assert adaptive.load_adaptive_budget(tmp_path) == budget
  other = adaptive.calibrate_mass(scores, 0.3, budget.max_groups, per_layer=True)
  adaptive.save_adaptive_budget(tmp_path, other)
  adaptive.save_adaptive_budget(tmp_path, budget)                   # replaces the first, keeps the other
  assert adaptive.load_adaptive_budget(tmp_path, 0.3) == other
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, per_layer=False) == budget
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, per_layer=True) is None
  assert adaptive.load_adaptive_budget(tmp_path / "none") is None
  mine = dataclasses.replace(budget, model=model.config.fingerprint(), mass=(1.0, 0.25))
  theirs = dataclasses.replace(budget, model="another-model", mass=(1.0, 0.75))
  adaptive.save_adaptive_budget(tmp_path, mine)
  adaptive.save_adaptive_budget(tmp_path, theirs)                   # another model's budget: both kept
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, per_layer=False, model=model.config) == mine
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, per_layer=False, model="another-model") == theirs
  assert adaptive.load_adaptive_budget(tmp_path, 0.3, model="another-model") == other   # no model recorded: any
  assert adaptive.AdaptiveBudget.from_json(json.loads(json.dumps(mine.to_json()))) == mine
  cfg = budget.sparsity()
  assert abs(adaptive.realised_density(scores, cfg, model.config) - budget.realised_density) < 1e-6
  sharded = adaptive.calibrate_mass(scores, 0.5, budget.max_groups, shards=2)
  adaptive.save_adaptive_budget(tmp_path, sharded)                  # another selection's budget: both kept
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, per_layer=False, model=model.config) == mine
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, shards=2) == sharded
  assert adaptive.AdaptiveBudget.from_json(json.loads(json.dumps(sharded.to_json()))) == sharded
  assert sharded.sparsity().shards == 2 and budget.sparsity().shards is None
  assert abs(adaptive.realised_density(scores, sharded.sparsity(), model.config) - sharded.realised_density) < 1e-6


def test_oracle_calibration_counts_match_the_oracle_selection(tmp_path):
  """The oracle's mass is calibrated on log group norms: their softmax is the norm share `mass_counts` takes, so
  the numpy counts are the decode step's counts on the same norms; the budget keeps its selector."""
  from polar_jax.routers.collect import layer_records
  model = init_model(LLAMA_MHA_8H, seed=5)
  rng = np.random.default_rng(6)
  seq = rng.integers(1, 97, size=40).tolist()
  scores = adaptive.heldout_oracle_scores(model, [seq], max_tokens=40)
  _, norms_btlg, _ = layer_records(model, jnp.asarray([seq], jnp.int32), jnp.asarray([40], jnp.int32),
                                   with_fired=False)
  norms_tg = np.asarray(norms_btlg, np.float32)[0, :, 1]
  idx = jnp.asarray(np.argsort(-norms_tg, axis=1, kind="stable")[:, :6], jnp.int32)
  for mass in (0.3, 0.6, 0.9):
    want = mass_counts(jnp.asarray(norms_tg), idx, mass)
    got = adaptive.counts_for_mass(adaptive.sorted_tail_shares(scores[:, 1]), mass, 6)
    np.testing.assert_array_equal(got, np.asarray(want))
  budget = adaptive.calibrate_mass(scores, 0.5, SparsityConfig(budget="adaptive").layer_groups(model.config),
                                   selector="oracle")
  assert budget.selector == "oracle" and budget.sparsity().selector == "oracle"
  assert budget.avg_density == pytest.approx((1.0 + budget.layer_density[1]) / 2)   # layer 0 dense counts 1
  router_budget = dataclasses.replace(budget, selector="router")
  adaptive.save_adaptive_budget(tmp_path, budget)
  adaptive.save_adaptive_budget(tmp_path, router_budget)              # another selector: both kept
  assert adaptive.load_adaptive_budget(tmp_path, 0.5, selector="oracle") == budget
  assert adaptive.load_adaptive_budget(tmp_path, 0.5) == router_budget
  with pytest.raises(ValueError, match="'router' or 'oracle'"):
    adaptive.calibration_scores(model, None, None, "random")


def test_eval_cli_adaptive_budget_needs_a_router_or_oracle_selector(tmp_path):
  from polar_jax.cli import eval as cli
  args = cli.parser().parse_args(["ckpt", "--out", str(tmp_path), "--budget", "adaptive", "--target-density", "0.5"])
  with pytest.raises(ValueError, match="router or the oracle selector"):
    cli.adaptive_budgets(args, None, None, None, ("random", "static"), (0,), tmp_path)
  with pytest.raises(ValueError, match="needs routers"):
    cli.adaptive_budgets(args, None, None, None, ("router", "oracle"), (0,), tmp_path)
  assert cli.parser().parse_args(["c", "--out", "o", "--per-layer-mass"]).per_layer_mass == "only"
  assert cli.parser().parse_args(["c", "--out", "o", "--per-layer-mass", "both"]).per_layer_mass == "both"
  uniform = cli.parser().parse_args(["ckpt", "--out", str(tmp_path), "--target-density", "0.5"])
  with pytest.raises(ValueError, match="needs --budget adaptive"):
    cli.adaptive_budgets(uniform, None, None, None, ("router",), (0,), tmp_path)


@pytest.mark.slow
def test_evaluate_records_an_adaptive_setting(tmp_path):
  """polar-eval's evaluate: a calibrated budget is one more router setting, its record carrying the budget, the
  target and the density realised on held-out tokens."""
  from polar_jax.evaluation import report
  from polar_jax.evaluation.run import evaluate

  class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
      return list(text.encode("utf-8"))

  config = dataclasses.replace(LLAMA_MHA_8H, vocab_size=260, max_position_embeddings=1024)
  model = init_model(config, seed=3)
  routers = _routers(config, 2)
  budget = adaptive.calibrate_adaptive(model, ByteTokenizer(), routers, 0.5, max_tokens=512)
  assert budget.model == model.config.fingerprint()
  assert budget.tokens == 512 and abs(budget.realised_density - 0.5) < 0.05
  oracle = adaptive.calibrate_adaptive(model, ByteTokenizer(), None, 0.5, max_tokens=512, selector="oracle",
                                       per_layer=True)
  assert oracle.selector == "oracle" and abs(oracle.realised_density - 0.5) < 0.05
  sharded = adaptive.calibrate_adaptive(model, ByteTokenizer(), routers, 0.5, max_tokens=512,
                                        sparsity=SparsityConfig(shards=2))
  assert sharded.shards == 2 and abs(sharded.realised_density - 0.5) < 0.05
  recs = evaluate(model, ByteTokenizer(), tasks=("arc_easy",), densities=(0.5,), selectors=("router",),
                  mode="all_tokens", limit=2, routers=routers, adaptive=[budget, oracle, sharded], progress=False,
                  model_name="tiny", max_rows=8)
  by_budget = {(r["selector"], r["budget"], r["shards"]): r for r in recs}
  assert set(by_budget) == {("router", "uniform", 1), ("router", "adaptive", 1), ("oracle", "adaptive", 1),
                            ("router", "adaptive", 2)}
  assert by_budget["router", "adaptive", 2]["mass"] == list(sharded.mass)
  by_budget = {(r["selector"], r["budget"]): r for r in recs if r["shards"] == 1}
  a = by_budget["router", "adaptive"]
  assert a["avg_density"] == round(budget.avg_density, 4) and a["target_density"] == 0.5
  assert a["routed_density"] == round(budget.realised_density, 4)
  assert a["mass"] == list(budget.mass) and report.budget_key(a) == "adaptive"
  o = by_budget["oracle", "adaptive"]
  assert report.budget_key(o) == "adaptive per-layer" and o["routers"] is None
  assert all(np.isfinite(r["value"]) for r in (a, o))


@pytest.mark.slow
def test_e2e_benchmark_times_adaptive_against_uniform(tmp_path):
  """benchmarks/e2e.py --budget uniform adaptive: one record of each budget per density, the adaptive one with the
  calibrated mass and a realised density near the requested one."""
  import json

  from benchmarks import e2e
  out = tmp_path / "e2e.jsonl"
  assert e2e.main(["--smoke", "--densities", "0.5", "--budget", "uniform", "adaptive", "--out", str(out)]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  keys = {(r["density"], r["budget"]) for r in recs}
  assert {(0.5, "uniform"), (0.5, "adaptive")} <= keys
  a = next(r for r in recs if r["budget"] == "adaptive" and r["density"] == 0.5)
  assert 0.0 < a["mass"] <= 1.0 and abs(a["realised_density"] - 0.5) < 0.1 and a["decode_tok_s"] > 0
