"""selective_decode_attention: Pallas kernel (interpret mode on CPU) vs XLA reference,
XLA reference vs a float64 numpy brute force, residual merging, input validation; `config=` choosing the kernel."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import assert_attention_close as _assert_close
from pallas_kernels import AttentionConfig
from pallas_kernels import AttentionHeuristics
from pallas_kernels import decode_attention_persistent as attn_persistent
from pallas_kernels import decode_attention_triton as attn_triton
from pallas_kernels import merge_attention_partials
from pallas_kernels import selective_decode_attention


def _inputs(seed, B, Hq, Hkv, S, D, K, dtype, *, with_start=False):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, Hq, D)).astype(np.float32)
  k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
  v = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
  lengths = rng.integers(1, S + 1, size=B)
  lengths[0], lengths[-1] = 1, S  # lengths from 1 to S in one batch
  start = None
  if with_start:
    start = np.minimum(rng.integers(0, S, size=B), lengths - 1)
  group_idx = np.stack([rng.permutation(Hkv)[:K] for _ in range(B)])
  cast = lambda a: jnp.asarray(a, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(lengths, jnp.int32),
          jnp.asarray(group_idx, jnp.int32),
          None if start is None else jnp.asarray(start, jnp.int32))


def _poison(q, k, v, lengths, group_idx, kv_start):
  """NaN in every value the kernel must not read (or must mask)."""
  B, Hq, D = q.shape
  _, Hkv, S, _ = k.shape
  G = Hq // Hkv
  pos = np.arange(S)[None, :]
  dead = pos >= np.asarray(lengths)[:, None]
  if kv_start is not None:
    dead |= pos < np.asarray(kv_start)[:, None]
  sel = np.zeros((B, Hkv), bool)
  sel[np.arange(B)[:, None], np.asarray(group_idx)] = True
  kv_dead = dead[:, None, :, None] | ~sel[:, :, None, None]
  q_dead = ~np.repeat(sel, G, axis=1)[:, :, None]
  nan = jnp.asarray(np.nan, q.dtype)
  return (jnp.where(q_dead, nan, q), jnp.where(kv_dead, nan, k),
          jnp.where(kv_dead, nan, v))


def _numpy_attention(q, k, v, lengths, group_idx, kv_start, scale):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, Hq, D = q.shape
  Hkv = k.shape[1]
  G = Hq // Hkv
  out = np.zeros((B, Hq, D))
  for b in range(B):
    groups = range(Hkv) if group_idx is None else np.asarray(group_idx)[b]
    lo = 0 if kv_start is None else int(kv_start[b])
    hi = int(lengths[b])
    for g in groups:
      for h in range(g * G, (g + 1) * G):
        s = k[b, g, lo:hi] @ q[b, h] * scale
        p = np.exp(s - s.max())
        out[b, h] = p @ v[b, g, lo:hi] / p.sum()
  return out


@pytest.mark.parametrize("Hq,Hkv,K,with_start", [
    (4, 4, 2, False), (8, 2, 1, True), (16, 2, 2, False)])
def test_xla_reference_matches_numpy(Hq, Hkv, K, with_start):
  q, k, v, lengths, gidx, start = _inputs(0, 3, Hq, Hkv, 37, 16, K,
                                          jnp.float32, with_start=with_start)
  out = selective_decode_attention(q, k, v, lengths, gidx, kv_start=start,
                                   implementation="xla")
  ref = _numpy_attention(q, k, v, lengths, gidx, start, 16 ** -0.5)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


CASES = [
    # B, Hq, Hkv, S, D, K, dtype, kv_start, config
    (3, 4, 4, 777, 64, 1, jnp.float32, False, None),  # MHA, odd S, K = 1
    (2, 4, 4, 777, 128, 4, jnp.bfloat16, False, None),  # MHA, K = Hkv
    (3, 8, 2, 100, 64, 1, jnp.bfloat16, True, None),  # GQA G=4, sliding start
    (2, 16, 2, 130, 128, 2, jnp.float32, False, None),  # GQA G=8, K = Hkv
    (2, 4, 2, 50, 80, 1, jnp.float32, True, None),  # head_dim 80 (padded)
    (2, 8, 4, 70, 64, 3, jnp.float16, False, None),  # fp16
    (3, 8, 2, 777, 64, 1, jnp.bfloat16, True,
     AttentionConfig(block_k=16, num_splits=5, num_warps=4, num_stages=2)),
    (2, 4, 4, 777, 64, 2, jnp.float32, False,
     AttentionConfig(block_k=32, num_splits=3, num_warps=4, num_stages=2)),
    # num_splits=1: the direct kernel (every group's program, zeros for unselected ones)
    (3, 8, 2, 777, 64, 1, jnp.bfloat16, True,
     AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2)),
    (2, 4, 2, 50, 80, 2, jnp.float32, True,
     AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2)),
    (4, 6, 6, 129, 64, 5, jnp.float16, False,
     AttentionConfig(block_k=32, num_splits=1, num_warps=4, num_stages=2)),
    # persistent kernel: runs of (row, group) items per program, rows of lengths 1..S
    (3, 8, 2, 777, 64, 1, jnp.bfloat16, True,
     AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True)),
    (4, 6, 6, 129, 64, 5, jnp.float16, False,
     AttentionConfig(block_k=32, num_splits=1, num_warps=4, num_stages=2, persistent=True)),
    (2, 16, 2, 130, 128, 2, jnp.float32, True,
     AttentionConfig(block_k=64, num_splits=1, num_warps=4, num_stages=2, persistent=True)),
    (3, 8, 2, 777, 64, 2, jnp.bfloat16, True,
     AttentionConfig(block_k=32, num_splits=1, num_warps=4, num_stages=2, persistent=True, programs_per_sm=1)),
    # head_dim 80: not supported by the persistent kernel, the direct kernel runs instead
    (2, 4, 2, 50, 80, 2, jnp.float32, True,
     AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_pallas_matches_xla(case):
  B, Hq, Hkv, S, D, K, dtype, with_start, config = case
  q, k, v, lengths, gidx, start = _inputs(1, B, Hq, Hkv, S, D, K, dtype,
                                          with_start=with_start)
  ref = selective_decode_attention(q, k, v, lengths, gidx, kv_start=start,
                                   implementation="xla")
  pq, pk, pv = _poison(q, k, v, lengths, gidx, start)
  out = selective_decode_attention(pq, pk, pv, lengths, gidx, kv_start=start,
                                   implementation="pallas", config=config)
  assert out.dtype == q.dtype and out.shape == q.shape
  _assert_close(out, ref, dtype)
  G = Hq // Hkv
  sel = np.zeros((B, Hkv), bool)
  sel[np.arange(B)[:, None], np.asarray(gidx)] = True
  unselected = ~np.repeat(sel, G, axis=1)
  assert np.all(np.asarray(out.astype(jnp.float32))[unselected] == 0.0)


@pytest.mark.parametrize("splits,persistent", [(1, False), (3, False), (1, True)])
def test_dense_group_idx_none(splits, persistent):
  q, k, v, lengths, _, _ = _inputs(2, 2, 8, 2, 300, 64, 2, jnp.bfloat16)
  ref = selective_decode_attention(q, k, v, lengths, implementation="xla")
  cfg = AttentionConfig(block_k=32, num_splits=splits, num_warps=4, num_stages=2, persistent=persistent)
  out = selective_decode_attention(q, k, v, lengths, implementation="pallas", config=cfg)
  _assert_close(out, ref, jnp.bfloat16)


def test_raw_direct_kernel_writes_every_head():
  """Interpret mode fills outputs with NaN: the direct kernel writes every head, zeros for unselected groups,
  and also when a row selects one group several times or names it out of range (clamped, as documented)."""
  q, k, v, lengths, _, start = _inputs(7, 3, 8, 4, 100, 64, 2, jnp.float32)
  gidx = jnp.asarray([[1, 1], [0, 3], [7, -2]], jnp.int32)   # row 2: clamped to groups 3 and 0
  cfg = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2)
  out = attn_triton.decode_attention_triton_direct(
      q, k, v, lengths, gidx, jnp.zeros((3,), jnp.int32), scale=0.125, config=cfg, interpret=True)
  ref = selective_decode_attention(q, k, v, lengths, jnp.clip(gidx, 0, 3), scale=0.125,
                                   implementation="xla")
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[0, [0, 1, 4, 5, 6, 7]] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("num_sms,programs_per_sm", [(1, 1), (1, 2), (2, 2), (1, 3), (64, 2)])
def test_raw_persistent_kernel_writes_every_head(num_sms, programs_per_sm):
  """Interpret mode fills outputs with NaN. With 1-3 programs, each streams several (row, group) items, some
  spanning two rows, and zero-fills the unselected groups of several rows; rows of different lengths (one
  empty, one with a sliding start), a row naming one group twice and one naming groups out of range (clamped)."""
  B, Hq, Hkv, S, D = 5, 8, 4, 100, 64
  q, k, v, lengths, _, _ = _inputs(8, B, Hq, Hkv, S, D, 2, jnp.float32)
  lengths = jnp.asarray([0, 37, 100, 64, 65], jnp.int32)
  start = jnp.asarray([0, 5, 0, 63, 0], jnp.int32)
  gidx = jnp.asarray([[1, 2], [1, 1], [7, -2], [3, 0], [2, 1]], jnp.int32)
  cfg = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True,
                        programs_per_sm=programs_per_sm)
  out = attn_persistent.decode_attention_persistent(q, k, v, lengths, gidx, start, scale=0.125, config=cfg,
                                                    interpret=True, num_sms=num_sms)
  clamped = jnp.clip(gidx, 0, Hkv - 1)
  ref = selective_decode_attention(q, k, v, lengths, clamped, kv_start=start, scale=0.125, implementation="xla")
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[0] == 0)                           # empty row
  assert np.all(np.asarray(out)[1, [0, 1, 4, 5, 6, 7]] == 0)       # only group 1 (named twice)
  assert np.any(np.asarray(out)[1, 2:4] != 0)
  dense = attn_persistent.decode_attention_persistent(q, k, v, lengths, None, start, scale=0.125, config=cfg,
                                                      interpret=True, num_sms=num_sms)
  ref = selective_decode_attention(q, k, v, lengths, kv_start=start, scale=0.125, implementation="xla")
  np.testing.assert_allclose(np.asarray(dense), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_persistent_programs_and_limits():
  """Equal contiguous runs, no program without work; shapes it cannot take raise (and dispatch elsewhere)."""
  assert attn_persistent.num_programs(512, 1, 132) == (128, 4)
  assert attn_persistent.num_programs(1024, 1, 132) == (128, 8)
  assert attn_persistent.num_programs(160, 1, 132) == (80, 2)
  assert attn_persistent.num_programs(160, 2, 132) == (160, 1)
  assert attn_persistent.num_programs(5, 1, 132) == (5, 1)
  assert attn_persistent.supports(2048, 128, 64) and attn_persistent.supports(64, 64, 64)
  assert not attn_persistent.supports(2048, 80, 32) and not attn_persistent.supports(40, 64, 64)
  assert not attn_persistent.supports(4096, 128, 64, 128 * 32 * 4096 * 128)   # 32-bit element offsets
  q, k, v, lengths, gidx, _ = _inputs(9, 2, 4, 2, 50, 80, 1, jnp.float32)
  cfg = AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True)
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    attn_persistent.decode_attention_persistent(q, k, v, lengths, gidx, jnp.zeros((2,), jnp.int32), scale=0.1,
                                                config=cfg, interpret=True)


def test_choose_config_persistent():
  """Unsplit shapes take the persistent kernel when the heuristics and the shape allow; split shapes never do."""
  rules = AttentionHeuristics()
  cfg = attn_triton.choose_config(32, 16, 2048, 128, 2, num_sms=132)
  assert cfg.persistent and cfg.num_splits == 1 and cfg.num_stages == rules.persistent_stages
  assert cfg.programs_per_sm == rules.persistent_programs_per_sm
  assert not attn_triton.choose_config(32, 16, 2048, 80, 2, num_sms=132).persistent
  assert not attn_triton.choose_config(4, 16, 2048, 128, 2, num_sms=132).persistent  # split
  direct = attn_triton.choose_config(32, 16, 2048, 128, 2, num_sms=132,
                                     heuristics=AttentionHeuristics(persistent=False))
  assert not direct.persistent and direct.num_splits == 1 and direct.num_stages == 4
  other = AttentionHeuristics(persistent_stages=5, persistent_programs_per_sm=1)
  cfg = attn_triton.choose_config(32, 16, 2048, 128, 2, num_sms=132, heuristics=other)
  assert (cfg.persistent, cfg.num_stages, cfg.programs_per_sm) == (True, 5, 1)


def test_choose_config_direct_threshold():
  """Enough selected (row, group) programs per SM: no key split (the direct kernel); fewer: split keys."""
  rules = AttentionHeuristics(persistent=False)     # the direct kernel's pipeline-depth rule below
  choose = lambda work, s=4096, h=rules: attn_triton.choose_config(work, 1, s, 128, 2, num_sms=132,  # noqa: E731
                                                                   heuristics=h)
  per_sm = rules.direct_programs_per_sm
  assert choose(per_sm * 132).num_splits == 1 and choose(per_sm * 132 - 1).num_splits > 1
  splits = lambda work, s=2048: choose(work, s).num_splits  # noqa: E731
  assert splits(128) == 3 and splits(64) == 5     # ~2 programs per SM in all (measured: 8 splits were slower)
  assert splits(16) == 8 and splits(1) == 8        # capped: every split keeps >= 4 blocks of 64 keys
  assert splits(16, 512) == 2
  deep = rules.deep_pipeline_programs_per_sm * 132
  stages = lambda work: choose(work).num_stages  # noqa: E731
  assert stages(deep) == 4 and stages(deep + 5) == 4
  assert stages(deep - 5) == 4                 # 391 programs: last wave 127/132
  assert stages(300) == 3                      # 300: last wave 36/132
  assert stages(2 * 132 - 8) == 4              # 256 programs (LLaMA-2 B16 K16): last wave 124/132
  assert stages(320) == 3 and stages(160) == 3  # Llama-3.1 B64 K5, B32 K5: short last waves, 3 stages
  assert stages(132) == 4 and stages(264) == 4  # whole waves
  # Other rules move the thresholds: direct from 2 programs per SM, 4 stages only from a full last wave.
  other = AttentionHeuristics(persistent=False, direct_programs_per_sm=2, deep_pipeline_last_wave=1.0)
  assert choose(2 * 132, h=other).num_splits == 1 and choose(2 * 132 - 1, h=other).num_splits > 1
  assert choose(2 * 132 + 124, h=other).num_stages == 3 and choose(2 * 132 + 124).num_stages == 4
  assert choose(64, 2048, AttentionHeuristics(split_target_programs_per_sm=8)).num_splits == 8


def _kernel_names(fn, *args):
  """The Pallas kernels (their `name`s) in fn's jaxpr."""
  return set(re.findall(r"name=(selective_decode_attention\w*)", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize("config, kernel", [
    (None, "selective_decode_attention_persistent"),
    (AttentionHeuristics(), "selective_decode_attention_persistent"),
    (AttentionHeuristics(persistent=False), "selective_decode_attention_direct"),
    (AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2), "selective_decode_attention_direct"),
    (AttentionConfig(block_k=16, num_splits=2, num_warps=4, num_stages=2), "selective_decode_attention"),
])
def test_config_picks_the_kernel(config, kernel):
  """`config=`: the default rules, other rules (`AttentionHeuristics`) or a fixed `AttentionConfig` choose the
  kernel that runs (one whole key block per row here: no split by the rules), and each gives the reference."""
  q, k, v, lengths, gidx, _ = _inputs(10, 2, 4, 4, 64, 64, 2, jnp.float32)
  fn = lambda q, k, v: selective_decode_attention(q, k, v, lengths, gidx, implementation="pallas",  # noqa: E731
                                                  config=config)
  assert _kernel_names(fn, q, k, v) == {kernel}
  ref = selective_decode_attention(q, k, v, lengths, gidx, implementation="xla")
  _assert_close(fn(q, k, v), ref, jnp.float32)


def test_bad_config_raises():
  q, k, v, lengths, gidx, _ = _inputs(11, 2, 4, 4, 64, 64, 2, jnp.float32)
  for impl in ("pallas", "xla"):
    with pytest.raises(TypeError, match="config must be an AttentionConfig, an AttentionHeuristics or None"):
      selective_decode_attention(q, k, v, lengths, gidx, implementation=impl, config=dict(persistent=False))


def test_raw_kernel_writes_every_partial():
  """Interpret mode fills outputs with NaN: every partial must be written."""
  q, k, v, lengths, gidx, start = _inputs(3, 3, 8, 4, 200, 64, 2, jnp.float32)
  cfg = AttentionConfig(block_k=16, num_splits=4, num_warps=4, num_stages=2)
  o, m, l = attn_triton.decode_attention_triton(
      q, k, v, lengths, gidx, jnp.zeros((3,), jnp.int32), scale=0.125,
      config=cfg, interpret=True)
  assert o.shape == (3, 2, 2, 64) and m.shape == l.shape == (3, 2, 2)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in (o, m, l))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_residuals_merge_equals_plain(impl):
  B, S = 3, 120
  q, k, v, lengths, gidx, _ = _inputs(4, B, 8, 2, S, 64, 1, jnp.float32)
  plain = selective_decode_attention(q, k, v, lengths, gidx,
                                     implementation="xla")
  mid = jnp.maximum(lengths // 2, 1)
  first = selective_decode_attention(q, k, v, mid, gidx, implementation=impl,
                                     return_residuals=True)
  second = selective_decode_attention(q, k, v, lengths, gidx, kv_start=mid,
                                      implementation=impl,
                                      return_residuals=True)
  o, m, l = first
  assert o.dtype == m.dtype == l.dtype == jnp.float32
  assert o.shape == (B, 8, 64) and m.shape == l.shape == (B, 8)
  merged = merge_attention_partials([first, second])
  np.testing.assert_allclose(np.asarray(merged), np.asarray(plain),
                             rtol=1e-5, atol=1e-5)
  # Unselected heads: o = 0, l = 0, finite m; merging only them gives 0.
  sel = np.zeros((B, 2), bool)
  sel[np.arange(B)[:, None], np.asarray(gidx)] = True
  dead = ~np.repeat(sel, 4, axis=1)
  assert np.all(np.asarray(o)[dead] == 0) and np.all(np.asarray(l)[dead] == 0)
  assert np.all(np.isfinite(np.asarray(m)))
  empty = merge_attention_partials([(o * 0, m * 0 - 3e38, l * 0)] * 2)
  assert np.all(np.asarray(empty) == 0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_empty_key_range_gives_zero(impl):
  q, k, v, lengths, gidx, _ = _inputs(5, 2, 4, 4, 40, 64, 4, jnp.float32)
  start = lengths  # [length, length): nothing attended
  out = selective_decode_attention(q, k, v, lengths, gidx, kv_start=start,
                                   implementation=impl)
  assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_group_idx_clamped_under_jit(impl):
  q, k, v, lengths, gidx, _ = _inputs(6, 2, 4, 4, 40, 64, 1, jnp.float32)
  f = jax.jit(lambda g: selective_decode_attention(q, k, v, lengths, g,
                                                   implementation=impl))
  out = f(jnp.full((2, 1), 9, jnp.int32))
  ref = selective_decode_attention(q, k, v, lengths, jnp.full((2, 1), 3),
                                   implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5,
                             atol=1e-6)


def _bad_calls():
  q = jnp.ones((2, 8, 64), jnp.float32)
  kv = jnp.ones((2, 4, 32, 64), jnp.float32)
  n = jnp.array([3, 32], jnp.int32)
  g = jnp.array([[0], [1]], jnp.int32)
  sda = selective_decode_attention
  return {
      "q rank": (lambda: sda(q[0], kv, kv, n, g), "q must be"),
      "kv rank": (lambda: sda(q, kv[0], kv[0], n, g), "must be \\[B, Hkv"),
      "k/v shape": (lambda: sda(q, kv, kv[:, :, :16], n, g), "v_cache shape"),
      "batch": (lambda: sda(q[:1], kv, kv, n, g), "disagree"),
      "head_dim": (lambda: sda(q[..., :32], kv, kv, n, g), "disagree"),
      "Hq multiple": (lambda: sda(jnp.ones((2, 6, 64)), kv, kv, n, g),
                      "not a multiple"),
      "dtype": (lambda: sda(q.astype(jnp.bfloat16), kv, kv, n, g),
                "dtypes differ"),
      "int dtype": (lambda: sda(q.astype(jnp.int32), kv.astype(jnp.int32),
                                kv.astype(jnp.int32), n, g),
                    "unsupported dtype"),
      "lengths shape": (lambda: sda(q, kv, kv, n[:1], g), "lengths must have"),
      "lengths float": (lambda: sda(q, kv, kv, n.astype(jnp.float32), g),
                        "integer dtype"),
      "lengths range": (lambda: sda(q, kv, kv, n + 40, g), "lengths must lie"),
      "group rank": (lambda: sda(q, kv, kv, n, g[:, 0]), "group_idx must be"),
      "group batch": (lambda: sda(q, kv, kv, n, g[:1]), "group_idx must be"),
      "group float": (lambda: sda(q, kv, kv, n, g.astype(jnp.float32)),
                      "integer dtype"),
      "K too big": (lambda: sda(q, kv, kv, n, jnp.zeros((2, 5), jnp.int32)),
                    "1 <= K"),
      "K zero": (lambda: sda(q, kv, kv, n, jnp.zeros((2, 0), jnp.int32)),
                 "1 <= K"),
      "group range": (lambda: sda(q, kv, kv, n, g + 4), "values must lie"),
      "kv_start shape": (lambda: sda(q, kv, kv, n, g, kv_start=n[:1]),
                         "kv_start must have"),
      "implementation": (lambda: sda(q, kv, kv, n, g, implementation="cuda"),
                         "unknown implementation"),
  }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_bad_inputs_raise(name):
  call, match = _bad_calls()[name]
  with pytest.raises(ValueError, match=match):
    call()
