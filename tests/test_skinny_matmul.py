"""skinny_matmul: the decode projections' kernel (Pallas in interpret mode on CPU, the real kernel on a GPU) vs a
float64 reference and vs its XLA reference: odd M / K / N (tails of every block), 1-16 K splits, bias and residual,
16- and 32-bit dtypes; the tiling heuristic's invariants; bad input; `Linear.decode` and the decode step with the
kernel on and off."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import MatmulConfig
from pallas_kernels import MatmulHeuristics
from pallas_kernels import Side
from pallas_kernels import skinny_matmul
from pallas_kernels import skinny_matmul_triton
from pallas_kernels.skinny_matmul import side_width
from polar_jax import fusion
from polar_jax import layers
from polar_jax.config import ModelConfig
from polar_jax.kv_cache import KVCache
from polar_jax.model import init_model
from polar_jax.options import DecodeOptions
from polar_jax.selection import GroupIndices, LinearRouter

LLAMA_GQA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
OPT = ModelConfig(model_type="opt", vocab_size=97, hidden_size=32, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=64, norm="layer",
                  norm_eps=1e-5, mlp="relu_mlp", activation="relu", attn_bias=True, o_bias=True, mlp_bias=True,
                  positions="learned", tie_word_embeddings=True, pre_norm=False)


def _inputs(seed, m, k, n, dtype, out_dtype, bias, residual):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  b = jnp.asarray(rng.standard_normal(n), dtype) if bias else None
  r = jnp.asarray(rng.standard_normal((m, n)), out_dtype) if residual else None
  return x, w, b, r


def _check(y, x, w, b, r, out_dtype):
  """|y - exact| within the output dtype's rounding (of x @ w + b, then of the residual sum) plus float32
  accumulation error over K."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  exact = x64 @ w64 + (0 if b is None else np.asarray(b, np.float64))
  eps_out = float(jnp.finfo(out_dtype).eps)
  mag = np.abs(x64) @ np.abs(w64)
  tol = 2 * eps_out * np.abs(exact) + 4 * x.shape[1] * float(jnp.finfo(jnp.float32).eps) * mag
  if r is not None:
    r64 = np.asarray(r, np.float64)
    exact = exact + r64
    tol = tol + 2 * eps_out * (np.abs(exact) + np.abs(r64))
  y64 = np.asarray(y, np.float64)
  assert y.dtype == out_dtype and y.shape == exact.shape
  assert np.all(np.isfinite(y64))
  err = np.abs(y64 - exact)
  assert np.all(err <= tol + 1e-30), f"max excess {np.max(err - tol)}"


CASES = [  # m, k, n, dtype, out dtype, bias, residual, config (None: the heuristic)
    (5, 300, 200, jnp.float32, jnp.float32, True, True, None),                      # every tail
    (32, 512, 384, jnp.bfloat16, jnp.bfloat16, False, True, MatmulConfig(32, 128, 128, 2)),
    (3, 256, 96, jnp.bfloat16, jnp.bfloat16, True, False, MatmulConfig(16, 32, 64, 3)),   # 3 splits of 4 blocks
    (16, 640, 256, jnp.bfloat16, jnp.float32, False, False, MatmulConfig(16, 64, 64, 4)),  # float32 out
    (1, 200, 64, jnp.float16, jnp.float16, True, True, MatmulConfig(16, 64, 64, 2, num_stages=2)),  # K tail split
    (70, 128, 48, jnp.bfloat16, jnp.bfloat16, False, True, MatmulConfig(64, 16, 32, 1)),  # two M blocks, M tail
    (8, 96, 1000, jnp.bfloat16, jnp.bfloat16, False, False, MatmulConfig(16, 256, 32, 1)),  # N tail
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c[:5]))
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_matches_exact(case, impl):
  m, k, n, dtype, out_dtype, bias, residual, cfg = case
  x, w, b, r = _inputs(0, m, k, n, dtype, out_dtype, bias, residual)
  out = skinny_matmul(x, w, b, r, out_dtype=out_dtype, implementation=impl, config=cfg)
  assert out.side is None and out.normed is None and out.sq_TM is None and out.counters is None
  _check(out.y, x, w, b, r, jnp.dtype(out_dtype))


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(str(v) for v in c[:5]))
def test_pallas_matches_xla_reference(case):
  """Same float32 sums up to order: the two may round `x @ w + b` to neighbouring values of the output dtype
  (one unit of its magnitude), and then the residual sum (one unit of the result's)."""
  m, k, n, dtype, out_dtype, bias, residual, cfg = case
  args = _inputs(1, m, k, n, dtype, out_dtype, bias, residual)
  y = np.asarray(skinny_matmul(*args, out_dtype=out_dtype, implementation="pallas", config=cfg).y, np.float64)
  ref = np.asarray(skinny_matmul(*args, out_dtype=out_dtype, implementation="xla").y, np.float64)
  no_res = np.asarray(skinny_matmul(*args[:3], out_dtype=out_dtype, implementation="xla").y, np.float64)
  eps = float(jnp.finfo(out_dtype).eps)
  x64, w64 = np.asarray(args[0], np.float64), np.asarray(args[1], np.float64)
  accumulation = 4 * k * float(jnp.finfo(jnp.float32).eps) * (np.abs(x64) @ np.abs(w64))
  assert np.all(np.abs(y - ref) <= eps * (np.abs(no_res) + np.abs(ref)) + accumulation)


def test_splits_agree():
  """Every split count of one shape gives the one-split result up to float32 summation order."""
  x, w, _, r = _inputs(2, 4, 1024, 128, jnp.float32, jnp.float32, False, True)
  base = skinny_matmul(x, w, None, r, implementation="pallas", config=MatmulConfig(16, 64, 64, 1)).y
  for ns in (2, 3, 5, 16):
    y = skinny_matmul(x, w, None, r, implementation="pallas", config=MatmulConfig(16, 64, 64, ns)).y
    np.testing.assert_allclose(np.asarray(y), np.asarray(base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 16, 32, 64, 128])
@pytest.mark.parametrize("k, n", [(4096, 12288), (4096, 4096), (11008, 4096), (4096, 28672), (576, 960), (96, 40)])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_heuristic_invariants(m, k, n, itemsize):
  cfg = skinny_matmul_triton.choose_config(m, k, n, itemsize, num_sms=132)
  pow2 = lambda v: v & (v - 1) == 0  # noqa: E731
  assert all(pow2(v) and v >= 16 for v in (cfg.block_m, cfg.block_n, cfg.block_k))
  assert cfg.block_m >= min(m, 64) and cfg.block_n <= max(16, 2 * n)
  k_blocks = -(-k // cfg.block_k)
  assert 1 <= cfg.num_splits <= k_blocks
  assert (cfg.num_splits - 1) * -(-k_blocks // cfg.num_splits) < k_blocks      # no empty split
  smem = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * itemsize
  assert smem <= MatmulHeuristics().smem_bytes and cfg.num_stages >= 2


def test_heuristic_fills_the_gpu():
  """LLaMA-2-7B decode shapes: wide tiles without splits where columns fill the SMs, splits where they do not."""
  choose = lambda k, n: skinny_matmul_triton.choose_config(32, k, n, 2, num_sms=132)  # noqa: E731
  assert (choose(4096, 12288).block_n, choose(4096, 12288).num_splits) == (128, 1)   # q|k|v: 96 tiles
  assert (choose(4096, 22016).block_n, choose(4096, 22016).num_splits) == (256, 1)   # gate|up: 86 tiles
  assert (choose(4096, 4096).block_n, choose(4096, 4096).num_splits) == (64, 2)      # o: 64 tiles x 2


def test_heuristic_rules_move_the_tiling():
  """`MatmulHeuristics`' fields steer `choose_config`: a lower fill takes wider tiles without splits, smaller
  weight tiles a shorter block_k, less shared memory fewer stages."""
  choose = lambda rules, k=4096, n=4096: skinny_matmul_triton.choose_config(  # noqa: E731
      32, k, n, 2, num_sms=132, heuristics=rules)
  assert choose(MatmulHeuristics()) == skinny_matmul_triton.choose_config(32, 4096, 4096, 2, num_sms=132)
  wide = choose(MatmulHeuristics(fill=0.2))
  assert (wide.block_n, wide.num_splits) == (128, 1)                  # o: 32 tiles are 0.24 of the SMs
  assert choose(MatmulHeuristics(tile_bytes=8 << 10)).block_k == 64   # 64-wide tiles of 8 KB
  small = choose(MatmulHeuristics(smem_bytes=32 << 10))
  assert small.num_stages * (small.block_m + small.block_n) * small.block_k * 2 <= 32 << 10
  assert (small.num_stages, small.block_k) == (2, 64)                  # 2 stages first, then half the K step


FUSED_CASES = [  # m, k, n, p (side width), dtype, config
    (5, 300, 200, 32, jnp.float32, None),
    (32, 512, 384, 32, jnp.bfloat16, MatmulConfig(32, 128, 128, 1)),
    (3, 256, 96, 20, jnp.bfloat16, MatmulConfig(16, 32, 64, 1, num_stages=2)),   # side narrower than its tile
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(str(v) for v in c[:5]))
def test_side_weight(case):
  """A side weight streamed by extra programs of the kernel, vs the XLA reference: both products."""
  m, k, n, p, dtype, cfg = case
  rng = np.random.default_rng(5)
  x = jnp.asarray(3 * rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  side = Side(jnp.asarray(rng.standard_normal((k, p)) / np.sqrt(k), dtype), jnp.asarray(rng.standard_normal(p),
                                                                                      jnp.float32))
  got = skinny_matmul(x, w, side=side, implementation="pallas", config=cfg)
  ref = skinny_matmul(x, w, side=side, implementation="xla")
  assert got.y.dtype == dtype and got.side.dtype == jnp.float32 and got.side.shape == (m, p)
  eps = float(jnp.finfo(dtype).eps)
  xn = np.abs(np.asarray(x, np.float64))
  for g, r, wt in ((got.y, ref.y, w), (got.side, ref.side, side.w_KP)):
    bound = (np.abs(xn) @ np.abs(np.asarray(wt, np.float64))) * (8 * k * 1.2e-7)
    bound = bound + eps * np.abs(np.asarray(r, np.float64)) * (g.dtype != jnp.float32)   # output rounding
    assert np.all(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)) <= bound + 1e-6)


@pytest.mark.parametrize("m, k, n, dtype, cfg", [
    (5, 300, 256, jnp.float32, None), (32, 512, 512, jnp.bfloat16, MatmulConfig(32, 256, 64, 1)),
    (3, 256, 192, jnp.bfloat16, MatmulConfig(16, 64, 64, 2)),          # split K
    (3, 256, 200, jnp.bfloat16, MatmulConfig(16, 64, 64, 1))])         # N % block_n: the XLA path
def test_silu_glu_epilogue(m, k, n, dtype, cfg):
  """glu="silu": neuron-interleaved (gate, up) columns -> silu(gate) * up, half as wide, vs float64."""
  x, w, _, _ = _inputs(6, m, k, n, dtype, dtype, False, False)
  y = skinny_matmul(x, w, glu="silu", implementation="pallas", config=cfg).y
  assert y.shape == (m, n // 2) and y.dtype == dtype
  pre = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  gate, up = pre[:, 0::2], pre[:, 1::2]
  want = gate / (1 + np.exp(-gate)) * up
  mag = (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)))
  acc = 4 * k * 1.2e-7 * mag
  bound = 2 * float(jnp.finfo(dtype).eps) * np.abs(want) + acc[:, 1::2] * (np.abs(gate) + 1) + acc[:, 0::2] * (
      np.abs(up) + 1)
  assert np.all(np.abs(np.asarray(y, np.float64) - want) <= bound + 1e-6)


@pytest.mark.slow
def test_gated_mlp_decode_matches_call():
  """GatedMLP.decode (fused gate|up with the silu epilogue, down_proj with the residual) == h + mlp(x)."""
  model = fusion.fuse_projections(init_model(LLAMA_GQA, seed=2))
  mlp = model.layers[0].mlp
  x = jax.random.normal(jax.random.key(3), (3, 64))
  h = jax.random.normal(jax.random.key(4), (3, 64))
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(h + mlp(x))
    for impl in ("pallas", "xla"):
      np.testing.assert_allclose(np.asarray(mlp.decode(x, residual_md=h, implementation=impl).y), ref, rtol=1e-5,
                                 atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_emitted_counters_feed_the_next_split_call(impl):
  """emit_counters: a zeroed int32 buffer comes back with the product; a split call given it as counters_C
  gives the same result as one that zero-fills its own."""
  x, w, _, r = _inputs(7, 4, 512, 128, jnp.float32, jnp.float32, False, True)
  y, _, _, _, zeros = skinny_matmul(x, w, emit_counters=True, implementation=impl, config=MatmulConfig(16, 64, 64, 1))
  assert zeros.dtype == jnp.int32 and zeros.shape == (skinny_matmul_triton.COUNTERS,)
  np.testing.assert_array_equal(np.asarray(zeros), 0)
  cfg = MatmulConfig(16, 64, 64, 4)
  a = skinny_matmul(y, w[:128], None, r, counters_C=zeros, implementation=impl, config=cfg).y
  b = skinny_matmul(y, w[:128], None, r, implementation=impl, config=cfg).y
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[K, N\\]"):
    skinny_matmul(x, jnp.ones((9, 16)))
  with pytest.raises(ValueError, match="bias"):
    skinny_matmul(x, w, jnp.ones((15,)))
  with pytest.raises(ValueError, match="residual"):
    skinny_matmul(x, w, None, jnp.ones((4, 16), jnp.bfloat16))
  with pytest.raises(ValueError, match="unknown implementation"):
    skinny_matmul(x, w, implementation="cuda")
  with pytest.raises(ValueError, match="side weight"):
    skinny_matmul(x, w, side=Side(jnp.ones((8, 4), jnp.bfloat16)))
  with pytest.raises(ValueError, match="glu must be"):
    skinny_matmul(x, w, glu="relu")
  with pytest.raises(ValueError, match="glu must be"):
    skinny_matmul(x, jnp.ones((8, 15)), glu="silu")                 # odd N
  with pytest.raises(ValueError, match="num_splits == 1"):
    skinny_matmul(x, w, side=Side(jnp.ones((8, 4))), implementation="pallas", config=MatmulConfig(16, 16, 16, 2))


def test_large_m_goes_to_xla():
  """Prefill-sized inputs take XLA's dot (same values as the reference)."""
  x, w, _, _ = _inputs(3, 200, 64, 32, jnp.float32, jnp.float32, False, False)
  np.testing.assert_array_equal(np.asarray(skinny_matmul(x, w, implementation="pallas").y),
                                np.asarray(skinny_matmul(x, w, implementation="xla").y))


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True])
def test_linear_decode_matches_call(bias):
  lin = layers.Linear(96, 80, bias=bias, dtype=jnp.float32, rngs=nnx.Rngs(0))
  if bias:
    lin.bias[...] = jnp.linspace(-1, 1, 80)
  x = jax.random.normal(jax.random.key(1), (3, 96))
  res = jax.random.normal(jax.random.key(2), (3, 80))
  ref = (np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64) + np.asarray(res, np.float64)
         + (np.asarray(lin.bias[...], np.float64) if bias else 0))   # not lin(x): XLA's float32 dot is TF32 on GPUs
  np.testing.assert_allclose(np.asarray(lin(x, residual=res)), ref, rtol=2e-3, atol=2e-3)
  for impl in ("pallas", "xla"):
    np.testing.assert_allclose(np.asarray(lin.decode(x, residual=res, implementation=impl).y), ref,
                               rtol=1e-5, atol=1e-5)


OPT_PRE_NORM = dataclasses.replace(OPT, pre_norm=True)   # OPT-1.3b and larger


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA_GQA, OPT, OPT_PRE_NORM], ids=["llama-gqa", "opt-post-norm", "opt"])
def test_decode_step_with_and_without_the_kernel(config, monkeypatch):
  """A fused tiny model's decode logits and caches with the projections (and residual adds) through
  skinny_matmul in interpret mode equal those of XLA's dots and adds; OPT's post-norm residuals too, and its
  ReLU MLP's fc1 from [N, d] rows (w_layout "nk") with fc2's residual in the kernel."""
  import pallas_kernels
  layouts = []
  real = pallas_kernels.skinny_matmul

  def spy(*args, **kwargs):
    layouts.append(kwargs.get("w_layout", "kn"))
    return real(*args, **kwargs)

  monkeypatch.setattr(pallas_kernels, "skinny_matmul", spy)
  model = fusion.fuse_projections(init_model(config, seed=4))
  tokens = jnp.asarray([[5, 7, 9, 11, 2], [3, 4, 0, 0, 0], [8, 1, 6, 0, 0]], jnp.int32)
  lengths = jnp.asarray([5, 2, 3], jnp.int32)
  _, cache = model.prefill(tokens, lengths, KVCache.init(config, 3, 16, jnp.float32))
  outs = {}
  for on in (True, False):
    with jax.default_matmul_precision("highest"):         # (XLA's float32 dots are TF32 on GPUs)
      logits, new = model.decode_step(jnp.asarray([1, 2, 3], jnp.int32), cache, options=_projections(on))
    outs[on] = (logits, new.k_bhsd[1])
  np.testing.assert_allclose(np.asarray(outs[True][0]), np.asarray(outs[False][0]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(outs[True][1]), np.asarray(outs[False][1]), rtol=1e-5, atol=1e-5)
  assert layouts.count("nk") == (config.num_layers if config.mlp == "relu_mlp" else 0)   # one fc1 per layer


def _projections(fused: bool, **kw) -> DecodeOptions:
  """The Pallas kernels (interpreted on CPU) with the projections on skinny_matmul, or on XLA's dots."""
  if fused:
    return DecodeOptions(kernels="pallas", **kw)
  return DecodeOptions(kernels="pallas", fused_projections=False, deferred_norm=False, router_in_qkv=False)


def _routed_decoder(options=None):
  """A fused tiny GQA model with a random head router, prefilled for 3 rows, and its density-0.5 decode step."""
  from polar_jax.routers import Routers
  from polar_jax.sparse_decode import make_decoder
  from polar_jax.sparsity import SparsityConfig
  routers = Routers.init(LLAMA_GQA)
  w = routers.head.w_ldg
  w.set_value(jax.random.normal(jax.random.key(1), w.shape, jnp.float32))
  model = fusion.fuse_projections(init_model(LLAMA_GQA, seed=4))
  tokens = jnp.asarray([[5, 9, 13, 2, 7, 1, 4], [3, 1, 0, 0, 0, 0, 0], [8, 8, 4, 60, 2, 11, 7]], jnp.int32)
  lengths = jnp.asarray([7, 2, 7], jnp.int32)
  _, cache = model.prefill(tokens, lengths, KVCache.init(LLAMA_GQA, 3, 16, jnp.float32))
  decode, state = make_decoder(model, SparsityConfig(attn_density=0.5), routers, batch=3,
                               options=options or _projections(True))
  return model, cache, decode, state


@pytest.mark.slow
def test_sparse_decode_router_in_the_qkv_kernel(monkeypatch):
  """Sparse decode with a head router: on the kernel path the router scores come out of the q|k|v kernel (a side
  weight) and the logits equal those of XLA's dots and router (same groups chosen)."""
  import pallas_kernels
  calls = []
  real = pallas_kernels.skinny_matmul

  widths = []

  def spy(*args, **kwargs):
    calls.append(kwargs.get("side") is not None)
    if calls[-1]:
      widths.append(kwargs["side"].w_KP.shape[1])
    return real(*args, **kwargs)

  monkeypatch.setattr(pallas_kernels, "skinny_matmul", spy)
  logits = {}
  for on in (True, False):
    model, cache, decode, state = _routed_decoder(_projections(on))
    with jax.default_matmul_precision("highest"):         # (XLA's float32 dots are TF32 on GPUs)
      logits[on], _ = decode(model, jnp.asarray([1, 2, 3], jnp.int32), cache, state)
  assert True in calls and False in calls    # the routed layer's q|k|v; layer 0 and the other projections
  g = LLAMA_GQA.num_kv_heads                 # the side weight is zero-padded to whole column tiles, scores sliced
  assert g < 16 and set(widths) == {side_width(g)} == {16}
  np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False]), rtol=1e-4, atol=1e-4)


def test_side_width():
  assert [side_width(p) for p in (1, 3, 8, 16, 17, 32, 33)] == [16, 16, 16, 16, 32, 32, 64]


@pytest.mark.slow
def test_attention_decode_linear_router():
  """Attention.decode(LinearRouter) takes each row's top groups of the scores the q|k|v kernel computes (the same
  output as attending to the float64 top groups given as indices), with the Pallas kernel and the XLA reference;
  without a fused q|k|v projection (or with fused_projections off) it refuses the router."""
  model = fusion.fuse_projections(init_model(LLAMA_GQA, seed=5))
  layer = model.layers[1]
  h = jax.random.normal(jax.random.key(8), (2, 64))
  caches = [jax.random.normal(jax.random.key(i), (2, 2, 8, 16)) for i in (10, 11)]
  lengths = jnp.asarray([3, 5], jnp.int32)
  w = jax.random.normal(jax.random.key(9), (64, 2))
  router = LinearRouter(w, jnp.zeros(2), k=1, side=(jnp.pad(w, ((0, 0), (0, 14))), jnp.zeros(16)))
  x = layer.attn_norm(h)
  want_groups = np.argmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64), axis=1)[:, None].astype(np.int32)
  for kernels in ("pallas", "xla"):
    options = DecodeOptions(kernels=kernels)
    assert layer.attn.fuses_router(router, options)
    with jax.default_matmul_precision("highest"):
      got = layer.attn.decode(x, lengths, *caches, router, options=options, residual_bd=h)
      want = layer.attn.decode(x, lengths, *caches, GroupIndices(jnp.asarray(want_groups)), options=options,
                               residual_bd=h)
    np.testing.assert_allclose(np.asarray(got.h), np.asarray(want.h), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.k_cache_bhsd), np.asarray(want.k_cache_bhsd))
  unfused = init_model(LLAMA_GQA, seed=5).layers[1]
  with pytest.raises(ValueError, match="needs the fused q\\|k\\|v kernel"):
    unfused.attn.decode(x, lengths, *caches, router)
  with pytest.raises(ValueError, match="needs the fused q\\|k\\|v kernel"):
    layer.attn.decode(x, lengths, *caches, router, options=_projections(False))


@pytest.mark.parametrize("m, p, g, k, cfg", [
    (5, 16, 8, 5, MatmulConfig(16, 64, 64, 1)),      # Llama-3.1's 8 groups at density 0.625, padded to 16
    (70, 32, 32, 16, MatmulConfig(64, 32, 32, 1)),   # LLaMA-2's 32 at 0.5; two M blocks
    (3, 20, 20, 1, MatmulConfig(16, 64, 64, 1)),     # one group kept, side width not a power of two
    (3, 32, 32, 3, MatmulConfig(16, 16, 64, 1)),     # side wider than the column tile: top-k after the kernel
])
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_side_topk(m, p, g, k, cfg, impl):
  """side_topk=(G, k): int32 [M, k] equal to lax.top_k of the first G side scores (order and ties included), with
  tied, negative-zero and padded (zero) columns; the main product unchanged."""
  rng = np.random.default_rng(8)
  kdim, n = 128, 64
  x = jnp.asarray(rng.standard_normal((m, kdim)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kdim, n)) / np.sqrt(kdim), jnp.float32)
  sw = rng.standard_normal((kdim, p)) / np.sqrt(kdim)
  sw[:, g:] = 0                                   # zero-padded columns past G (their score 0 can beat negatives)
  sw[:, min(1, g - 1)] = sw[:, 0]                 # two groups with equal scores: lower index first
  sb = np.zeros(p, np.float32)
  side = Side(jnp.asarray(sw, jnp.float32), jnp.asarray(sb))
  y, idx, *_ = skinny_matmul(x, w, side=side._replace(topk=(g, k)), implementation=impl, config=cfg)
  y_ref, scores, *_ = skinny_matmul(x, w, side=side, implementation=impl, config=cfg)
  assert idx.dtype == jnp.int32 and idx.shape == (m, k)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(jax.lax.top_k(scores[:, :g], k)[1]))


def test_side_topk_bad_input():
  x, w, sw = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((8, 16))
  with pytest.raises(ValueError, match="side_topk=\\(G, k\\)=\\(8, 9\\) needs"):
    skinny_matmul(x, w, side=Side(sw, topk=(8, 9)))
  with pytest.raises(ValueError, match="side_topk=\\(G, k\\)=\\(20, 2\\) needs"):
    skinny_matmul(x, w, side=Side(sw, topk=(20, 2)))               # G beyond the side weight's columns


@pytest.mark.slow
def test_sparse_decode_router_topk_in_the_kernel(monkeypatch):
  """The decode step with the router's scores and top-k in the q|k|v kernel's side program (side topk=(G, k) in every
  routed layer) gives the same logits as the router's own dot and top-k (`router_in_qkv=False`: no side weight)."""
  import pallas_kernels
  asked = []
  real = pallas_kernels.skinny_matmul

  def spy(*args, **kwargs):
    if kwargs.get("side") is not None:
      asked.append(kwargs["side"].topk)
    return real(*args, **kwargs)

  monkeypatch.setattr(pallas_kernels, "skinny_matmul", spy)
  logits = {}
  for on in (True, False):
    model, cache, decode, state = _routed_decoder(_projections(True, router_in_qkv=on))
    asked.clear()
    with jax.default_matmul_precision("highest"):
      logits[on], _ = decode(model, jnp.asarray([1, 2, 3], jnp.int32), cache, state)
    assert asked == ([(LLAMA_GQA.num_kv_heads, 1)] * (LLAMA_GQA.num_layers - 1) if on else [])
  np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False]), rtol=1e-5, atol=1e-5)


NK_CASES = [  # m, k, n, dtype, bias, residual, relu, config (None: the heuristic)
    (5, 300, 200, jnp.float32, True, True, True, None),                               # every tail
    (32, 512, 384, jnp.bfloat16, True, False, True, MatmulConfig(32, 128, 128, 1)),    # OPT fc1's shape class
    (3, 256, 96, jnp.bfloat16, False, True, False, MatmulConfig(16, 32, 64, 3)),      # 3 K splits
    (1, 200, 1000, jnp.float16, True, False, True, MatmulConfig(16, 256, 64, 2)),     # K and N tails, split
]


@pytest.mark.parametrize("case", NK_CASES, ids=lambda c: "-".join(str(v) for v in c[:4]))
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_nk_layout_and_relu(case, impl):
  """w_layout="nk" (w given as [N, K], OPT's fc1 rows) with activation="relu": relu(x @ w.T + b) (+ residual)
  vs float64; the residual is added after the activation, as fc2's epilogue would."""
  m, k, n, dtype, bias, residual, relu, cfg = case
  x, w, b, r = _inputs(8, m, k, n, dtype, dtype, bias, residual)
  w_nk = jnp.asarray(w.T)                                    # a different memory layout, the same matrix
  y = skinny_matmul(x, w_nk, b, r, activation="relu" if relu else None, w_layout="nk", implementation=impl,
                    config=cfg).y
  if not relu:
    _check(y, x, w, b, r, jnp.dtype(dtype))
    return
  pre = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + (0 if b is None else np.asarray(b, np.float64))
  want = np.maximum(pre, 0) + (0 if r is None else np.asarray(r, np.float64))
  eps = float(jnp.finfo(dtype).eps)
  mag = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
  tol = 4 * eps * (np.abs(want) + np.abs(pre)) + 4 * k * float(jnp.finfo(jnp.float32).eps) * mag
  assert y.shape == (m, n) and y.dtype == dtype
  assert np.all(np.abs(np.asarray(y, np.float64) - want) <= tol + 1e-30)
  if r is None:
    assert np.all(np.asarray(y, np.float64) >= 0)           # ReLU applied


def test_nk_bad_input():
  x = jnp.ones((4, 8))
  with pytest.raises(ValueError, match="w_layout must be"):
    skinny_matmul(x, jnp.ones((8, 16)), w_layout="km")
  with pytest.raises(ValueError, match=r"w \[N, K\]"):
    skinny_matmul(x, jnp.ones((8, 16)), w_layout="nk")         # K must be w's second axis
  with pytest.raises(ValueError, match="activation must be"):
    skinny_matmul(x, jnp.ones((8, 16)), activation="gelu")
  with pytest.raises(ValueError, match="activation must be"):
    skinny_matmul(x, jnp.ones((8, 16)), activation="relu", glu="silu")


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True])
def test_neuron_mlp_decode_matches_call(bias):
  """NeuronMLP.decode (fc1 from its [N, d] rows with bias + ReLU in the kernel, fc2 with bias + residual) ==
  h + mlp(x), on both implementations; for an activation the kernel does not take it is the XLA expression."""
  model = init_model(dataclasses.replace(OPT, mlp_bias=bias), seed=5)
  mlp = model.layers[0].mlp
  if bias:
    mlp.b_in_n[...] = jnp.linspace(-0.5, 0.5, OPT.intermediate_size)
    mlp.b_out_d[...] = jnp.linspace(-1, 1, OPT.hidden_size)
  x = jax.random.normal(jax.random.key(3), (3, OPT.hidden_size))
  h = jax.random.normal(jax.random.key(4), (3, OPT.hidden_size))
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(h + mlp(x))
    assert mlp.decodes_in_kernels
    for impl in ("pallas", "xla"):
      np.testing.assert_allclose(np.asarray(mlp.decode(x, residual_md=h, implementation=impl).y), ref, rtol=1e-5,
                                 atol=1e-5)
    gelu = init_model(dataclasses.replace(OPT, mlp_bias=bias, activation="gelu"), seed=5).layers[0].mlp
    assert not gelu.decodes_in_kernels
    np.testing.assert_array_equal(np.asarray(gelu.decode(x, residual_md=h).y), np.asarray(h + gelu(x)))


ROW_SUM_CASES = [  # m, k, n, dtype, out dtype, relu, w_layout, config (None: the heuristic)
    (5, 300, 200, jnp.float32, jnp.float32, True, "kn", None),                             # every tail
    (32, 256, 1000, jnp.bfloat16, jnp.bfloat16, True, "kn", MatmulConfig(32, 128, 64, 1)),  # N tail
    (64, 128, 512, jnp.bfloat16, jnp.float32, False, "kn", MatmulConfig(64, 64, 32, 2)),    # K split, M 64
    (3, 200, 96, jnp.bfloat16, jnp.bfloat16, True, "nk", MatmulConfig(16, 32, 64, 2)),      # K tail, split, "nk"
]


@pytest.mark.parametrize("case", ROW_SUM_CASES, ids=lambda c: "-".join(str(v) for v in c[:7]))
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_row_weights_give_weighted_column_sums(case, impl):
  """row_weights_M: `[N]` = sum_m wts[m] * act(x @ w + b)[m] (a batch-union score: 0/1 weights of active rows;
  general weights too) vs float64; weights of zero drop a row even where its product is huge."""
  m, k, n, dtype, out_dtype, relu, layout, cfg = case
  x, w, b, _ = _inputs(9, m, k, n, dtype, dtype, True, False)
  x = x.at[0].multiply(1e4) if m > 1 else x                  # row 0 dominates unless its weight drops it
  rng = np.random.default_rng(m)
  for wts in (jnp.asarray(np.arange(m) % 3 != 0, jnp.float32),          # row 0 inactive
              jnp.asarray(rng.uniform(0.5, 2.0, m), jnp.float32)):
    y = skinny_matmul(x, w.T if layout == "nk" else w, b, activation="relu" if relu else None, w_layout=layout,
                      row_weights_M=wts, out_dtype=out_dtype, implementation=impl, config=cfg).y
    pre = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    act = np.maximum(pre, 0) if relu else pre
    w64 = np.asarray(wts, np.float64)
    want = w64 @ act
    mag = np.abs(w64) @ (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)) + np.abs(pre))
    tol = 2 * float(jnp.finfo(out_dtype).eps) * np.abs(want) + (4 * k + 2 * m) * 1.2e-7 * mag
    assert y.shape == (n,) and y.dtype == out_dtype
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= tol + 1e-30)


def test_row_weights_beyond_one_block_go_to_xla_and_bad_input():
  x, w, b, _ = _inputs(10, 70, 64, 48, jnp.float32, jnp.float32, True, False)   # 70 rows > block_m 64
  wts = jnp.ones((70,), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(skinny_matmul(x, w, b, activation="relu", row_weights_M=wts, implementation="pallas").y),
      np.asarray(skinny_matmul(x, w, b, activation="relu", row_weights_M=wts, implementation="xla").y))
  with pytest.raises(ValueError, match="row_weights_M must have shape"):
    skinny_matmul(x, w, row_weights_M=jnp.ones((69,)))
  with pytest.raises(ValueError, match="row_weights_M must have shape"):
    skinny_matmul(x, w, None, jnp.ones((70, 48)), row_weights_M=wts)                  # with a residual
