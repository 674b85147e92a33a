"""The deferred RMSNorm (`DecodeOptions.deferred_norm`): a residual-adding skinny_matmul also writes `h * g` and its
column tiles' partial squares of h (`norm_scale_N`), and the next projection normalises those rows in its
epilogue (`rms_sq_TM`, `rms_eps`), side weight and gated epilogue included. Kernel (Pallas interpret mode on CPU,
the real kernel on a GPU) and XLA reference vs float64; the decode step with the switch on equals it off, with
random norm weights, and runs no norm of its own after layer 0's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import MatmulConfig
from pallas_kernels import RmsInput
from pallas_kernels import Side
from pallas_kernels import skinny_matmul
from polar_jax import fusion
from polar_jax import layers
from polar_jax.config import ModelConfig
from polar_jax.kv_cache import KVCache
from polar_jax.model import init_model

LLAMA_GQA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
F32 = float(jnp.finfo(jnp.float32).eps)

PRODUCER_CASES = [  # m, k, n, dtype, config (None: the heuristic)
    (5, 300, 200, jnp.float32, MatmulConfig(16, 64, 64, 1)),       # N tail: 4 column tiles, the last partial
    (3, 256, 96, jnp.bfloat16, MatmulConfig(16, 32, 64, 3)),       # split K: the last program's epilogue
    (70, 128, 48, jnp.bfloat16, MatmulConfig(64, 16, 32, 1)),      # two M blocks, M tail
    (16, 512, 384, jnp.bfloat16, None),
]


@pytest.mark.parametrize("case", PRODUCER_CASES, ids=lambda c: "-".join(str(v) for v in c[:4]))
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_norm_scale_output(case, impl):
  """`(out, out * g, sq)`: out as without g; out * g within one rounding of the output dtype; sq summed over its
  tiles equals each row's sum of squares of out (float32 summation)."""
  m, k, n, dtype, cfg = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  r = jnp.asarray(rng.standard_normal((m, n)), dtype)
  g = jnp.asarray(1 + rng.standard_normal(n), dtype)
  out, _, xg, sq, _ = skinny_matmul(x, w, None, r, norm_scale_N=g, implementation=impl, config=cfg)
  plain = skinny_matmul(x, w, None, r, implementation=impl, config=cfg).y
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  assert xg.dtype == dtype and xg.shape == (m, n) and sq.dtype == jnp.float32 and sq.shape[1] == m
  o64 = np.asarray(out, np.float64)
  want = o64 * np.asarray(g, np.float64)
  eps = float(jnp.finfo(dtype).eps)
  # (XLA may keep out unrounded before the product: allow one rounding of out too)
  assert np.all(np.abs(np.asarray(xg, np.float64) - want) <= 2 * eps * np.abs(want) + 1e-30)
  sq_rows = np.sum(o64 * o64, axis=1)
  rtol = 4 * n * F32 if impl == "pallas" else 4 * eps   # (the reference may square the unrounded out)
  np.testing.assert_allclose(np.asarray(sq, np.float64).sum(axis=0), sq_rows, rtol=rtol)


CONSUMER_CASES = [  # m, k, n, t (squares' tiles), dtype, config, side width, bias, glu
    (5, 300, 200, 3, jnp.float32, MatmulConfig(16, 64, 64, 1), 16, True, None),     # t not a power of two
    (3, 256, 96, 4, jnp.bfloat16, MatmulConfig(16, 32, 64, 3), 0, False, None),     # split K
    (16, 512, 384, 8, jnp.bfloat16, None, 32, False, None),                          # router side programs
    (32, 512, 512, 1, jnp.bfloat16, MatmulConfig(32, 256, 64, 1), 0, False, "silu"),  # gated epilogue
    (3, 256, 192, 5, jnp.bfloat16, MatmulConfig(16, 64, 64, 2), 0, False, "silu"),    # gated, split K
]


@pytest.mark.parametrize("case", CONSUMER_CASES, ids=lambda c: "-".join(str(v) for v in c[:5]) + f"-{c[8]}")
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_rms_rows(case, impl):
  """x = h * g with h's squares as t partial sums: both products equal float64 `rmsnorm(h) @ w (+ b)` within the
  rounding of x to its dtype, float32 accumulation and the output's rounding."""
  m, k, n, t, dtype, cfg, p, bias, glu = case
  rng = np.random.default_rng(1)
  eps_norm = 1e-5
  h = np.asarray(jnp.asarray(3 * rng.standard_normal((m, k)), dtype), np.float64)
  g = np.asarray(jnp.asarray(1 + 0.5 * rng.standard_normal(k), dtype), np.float64)
  x = jnp.asarray(h * g, dtype)
  cuts = np.sort(rng.choice(np.arange(1, k), t - 1, replace=False)) if t > 1 else []
  sq = jnp.asarray(np.stack([np.sum(c * c, axis=1) for c in np.split(h, cuts, axis=1)]), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  b = jnp.asarray(rng.standard_normal(n), dtype) if bias else None
  side = None
  if p:
    side = Side(jnp.asarray(rng.standard_normal((k, p)) / np.sqrt(k), dtype),
                jnp.asarray(rng.standard_normal(p), jnp.float32))
  out = skinny_matmul(x, w, b, glu=glu, rms=RmsInput(sq, eps_norm), implementation=impl, config=cfg, side=side)
  got = (out.y,) if side is None else (out.y, out.side)
  rs = 1 / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps_norm)
  xn = h * g * rs
  eps = float(jnp.finfo(dtype).eps)
  for y, wt, bt in zip(got, (w, side and side.w_KP), (b, side and side.b_P)):
    w64 = np.asarray(wt, np.float64)
    pre = xn @ w64 + (0 if bt is None else np.asarray(bt, np.float64))
    err_pre = (eps * np.abs(xn) @ np.abs(w64)) + 4 * k * F32 * (np.abs(xn) @ np.abs(w64)) + 1e-6
    if glu is not None and y.dtype != jnp.float32:
      gate, up = pre[:, 0::2], pre[:, 1::2]
      want = gate / (1 + np.exp(-gate)) * up
      bound = 2 * eps * np.abs(want) + err_pre[:, 1::2] * (np.abs(gate) + 1) + err_pre[:, 0::2] * (np.abs(up) + 1)
    else:
      want = pre
      bound = err_pre + (eps * np.abs(want) if y.dtype != jnp.float32 else 0)
    assert y.shape == want.shape
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= bound), np.max(np.abs(np.asarray(y) - want) - bound)


def test_chain_matches_rmsnorm_then_matmul():
  """Producer then consumer (pallas) vs XLA's residual add, RMSNorm module and dot, in bfloat16."""
  from polar_jax.layers import RMSNorm
  from flax import nnx
  rng = np.random.default_rng(2)
  m, k, d, n = 16, 256, 192, 320
  ctx = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w_o = jnp.asarray(rng.standard_normal((k, d)) / np.sqrt(k), jnp.bfloat16)
  res = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((d, n)) / np.sqrt(d), jnp.bfloat16)
  norm = RMSNorm(d, eps=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  norm.scale.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(d), jnp.bfloat16))
  h, _, xg, sq, _ = skinny_matmul(ctx, w_o, None, res, norm_scale_N=norm.scale[...], implementation="pallas")
  got = skinny_matmul(xg, w, rms=RmsInput(sq, norm.eps), implementation="pallas").y
  ref = skinny_matmul(norm(h), w, implementation="xla").y
  bf = float(jnp.finfo(jnp.bfloat16).eps)
  mag = np.abs(np.asarray(norm(h), np.float64)) @ np.abs(np.asarray(w, np.float64))
  assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)) <= 3 * bf * mag)


def _random_norms(model, seed):
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    for norm in (layer.attn_norm, layer.mlp_norm):
      norm.scale.set_value(jnp.asarray(1 + 0.5 * rng.standard_normal(norm.scale.shape), norm.scale[...].dtype))
  return model


@pytest.mark.slow
@pytest.mark.parametrize("sparse", ["dense", "router", "router_own_dot"])
def test_decode_step_with_and_without_deferred_norms(sparse, monkeypatch):
  """The decode step (fused tiny LLaMA, random norm weights; dense, a head router in the q|k|v kernel, or a router
  as its own dot, which reads the normed input) gives the same logits and caches with the norms deferred as with
  RMSNorm fusions, and calls no RMSNorm but the final one (layer 0's input is made from h directly) and, for a
  router as its own dot, the attention norm of each routed layer (its input)."""
  from polar_jax.options import DecodeOptions
  from polar_jax.routers import Routers
  from polar_jax.sparse_decode import make_decoder
  from polar_jax.sparsity import SparsityConfig
  model = _random_norms(fusion.fuse_projections(init_model(LLAMA_GQA, seed=4)), 5)
  tokens = jnp.asarray([[5, 9, 13, 2, 7, 1, 4], [3, 1, 0, 0, 0, 0, 0], [8, 8, 4, 60, 2, 11, 7]], jnp.int32)
  lengths = jnp.asarray([7, 2, 7], jnp.int32)
  _, cache = model.prefill(tokens, lengths, KVCache.init(LLAMA_GQA, 3, 16, jnp.float32))
  routers = Routers.init(LLAMA_GQA)
  w = routers.head.w_ldg
  w.set_value(jax.random.normal(jax.random.key(1), w.shape, jnp.float32))
  sparsity = None if sparse == "dense" else SparsityConfig(attn_density=0.5)

  def step(deferred):
    options = DecodeOptions(kernels="pallas", deferred_norm=deferred, router_in_qkv=sparse != "router_own_dot")
    decode, state = make_decoder(model, sparsity, None if sparse == "dense" else routers, batch=3, options=options)
    return decode(model, jnp.asarray([1, 2, 3], jnp.int32), cache, state)

  calls = []
  real_call = layers.RMSNorm.__call__
  monkeypatch.setattr(layers.RMSNorm, "__call__", lambda self, x: calls.append(1) or real_call(self, x))
  outs, counts = {}, {}
  for on in (True, False):
    calls.clear()
    with jax.default_matmul_precision("highest"):         # (XLA's float32 dots are TF32 on GPUs)
      logits, new = step(on)
    outs[on], counts[on] = (logits, new.k_bhsd[2], new.v_bhsd[1]), len(calls)
  routed_inputs = LLAMA_GQA.num_layers - 1 if sparse == "router_own_dot" else 0
  assert counts == {True: 1 + routed_inputs, False: 2 * LLAMA_GQA.num_layers + 1}
  for a, b in zip(outs[True], outs[False]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_bad_input():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  with pytest.raises(ValueError, match="rms_sq_TM .* and rms_eps go together"):
    skinny_matmul(x, w, rms=RmsInput(jnp.ones((1, 4)), None))
  with pytest.raises(ValueError, match="rms_sq_TM must be float32 \\[T, 4\\]"):
    skinny_matmul(x, w, rms=RmsInput(jnp.ones((1, 5)), 1e-5))
  with pytest.raises(ValueError, match="norm_scale_N must have shape \\(16,\\)"):
    skinny_matmul(x, w, norm_scale_N=jnp.ones(8))
  with pytest.raises(ValueError, match="norm_scale_N needs a plain output"):
    skinny_matmul(x, w, norm_scale_N=jnp.ones(16), glu="silu")
  model = init_model(LLAMA_GQA, seed=0)   # unfused: this layer cannot defer its norms
  cache = KVCache.init(LLAMA_GQA, 4, 8, jnp.float32)
  with pytest.raises(ValueError, match="need a layer that defers its norms"):
    model.layers[0].decode(jnp.ones((4, 64)), jnp.zeros(4, jnp.int32), cache.k_bhsd[0], cache.v_bhsd[0],
                           next_norm=jnp.ones(64))
