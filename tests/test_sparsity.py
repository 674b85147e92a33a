"""Polar Sparsity decoding on tiny models: settings, dense equivalence, oracle, kernels, ragged batches, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import generation as gen
from polar_jax.attention import group_norms, keep_top_groups
from polar_jax.config import ModelConfig
from polar_jax.kv_cache import KVCache
from polar_jax.model import init_model
from polar_jax.options import DecodeOptions
from polar_jax.routers import RouterMismatchError, Routers
from polar_jax.selection import DENSE_HEADS, GroupIndices
from polar_jax.sparse_decode import SparseDecode, make_decoder
from polar_jax.sparsity import SparsityConfig, groups_for_density, neuron_budgets

GQA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=128)
MHA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=128)
OPT = ModelConfig(model_type="opt", vocab_size=97, hidden_size=32, intermediate_size=512, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=128, norm="layer",
                  norm_eps=1e-5, mlp="relu_mlp", activation="relu", attn_bias=True, o_bias=True, mlp_bias=True,
                  positions="learned", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def gqa():
  return init_model(GQA, seed=1)


def _prompts(seed=0, lengths=(5, 11, 2, 17), vocab=97):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def random_routers(config, seed=0, scale=3.0):
  """Routers with random weights (selections that differ across rows, layers and steps)."""
  r = Routers.init(config, seed=seed)
  rng = np.random.default_rng(seed)
  r.head.w_ldg[...] = (scale * rng.standard_normal(r.head.w_ldg.shape)).astype(np.float32)
  return r


# ---- settings ---------------------------------------------------------------------------------------
def test_groups_kept_round_half_up():
  assert groups_for_density(0.67, 3) == 2
  assert groups_for_density(0.5, 32) == 16
  assert groups_for_density(0.625, 8) == 5
  assert groups_for_density(0.5, 3) == 2           # 1.5 rounds up
  assert groups_for_density(0.01, 8) == 1          # at least one
  assert groups_for_density(1.0, 4) == 4
  cfg = SparsityConfig(attn_density=0.5, per_layer={2: 0.25})
  assert cfg.per_layer == ((2, 0.25),) and hash(cfg) == hash(SparsityConfig(attn_density=0.5, per_layer=((2, 0.25),)))
  assert cfg.layer_groups(GQA) == (None, 2, 1)     # layer 0 dense by default; per_layer overrides
  assert SparsityConfig(attn_groups=3, dense_layers=()).layer_groups(GQA) == (3, 3, 3)
  assert SparsityConfig(attn_density=1.0, dense_layers=()).layer_groups(GQA) == (None, None, None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_density=0.0), r"attn_density must be a number in \(0, 1\]"),
    (dict(attn_density=1.5), r"attn_density must be a number in \(0, 1\]"),
    (dict(attn_density=-0.2), r"attn_density must be a number in \(0, 1\]"),
    (dict(attn_density="half"), r"attn_density must be a number in \(0, 1\]"),
    (dict(per_layer={1: 2.0}), r"per_layer density of layer 1 must be a number in \(0, 1\]"),
    (dict(attn_groups=0), "attn_groups must be an integer >= 1"),
    (dict(selector="best"), "unknown selector"),
    (dict(mlp="sparse"), "unknown mlp mode"),
])
def test_bad_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SparsityConfig(**kwargs)


def test_settings_that_do_not_fit_the_model(gqa):
  with pytest.raises(ValueError, match="attn_groups=5 exceeds the model's 4 KV groups"):
    gen.generate(gqa, [[1, 2]], max_new_tokens=2, sparsity=SparsityConfig(attn_groups=5, selector="random"))
  with pytest.raises(ValueError, match=r"layer indices \[7\] out of range"):
    gen.generate(gqa, [[1, 2]], max_new_tokens=2, sparsity=SparsityConfig(0.5, dense_layers=(7,), selector="random"))
  with pytest.raises(ValueError, match="mlp='router' needs a ReLU fc1/fc2 MLP"):
    gen.generate(gqa, [[1, 2]], max_new_tokens=2, sparsity=SparsityConfig(mlp="router"))
  with pytest.raises(ValueError, match="selector='router' needs trained routers"):
    gen.generate(gqa, [[1, 2]], max_new_tokens=2, sparsity=SparsityConfig(0.5))
  with pytest.raises(ValueError, match="routers were given without sparsity"):
    gen.generate(gqa, [[1, 2]], max_new_tokens=2, routers=Routers.init(GQA))


def test_routers_of_another_model_raise(gqa):
  other = Routers.init(MHA)
  with pytest.raises(RouterMismatchError, match="trained for another model: router fingerprint"):
    gen.generate(gqa, [[1, 2]], max_new_tokens=2, sparsity=SparsityConfig(0.5), routers=other)


# ---- density 1.0 is the dense path --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", [OPT, MHA, GQA], ids=["opt", "llama-mha", "gqa"])
def test_density_one_equals_dense(config):
  model = init_model(config, seed=2)
  prompts = _prompts(3)
  dense = gen.generate(model, prompts, max_new_tokens=8).tokens
  for cfg in (SparsityConfig(attn_density=1.0, dense_layers=()),
              SparsityConfig(attn_density=1.0, selector="oracle", per_layer={0: 1.0}),
              SparsityConfig(attn_groups=config.num_kv_heads)):
    out = gen.generate(model, prompts, max_new_tokens=8, sparsity=cfg, routers=random_routers(config))
    np.testing.assert_array_equal(out.tokens, dense)


# ---- oracle ------------------------------------------------------------------------------------------
def _brute_force_top_groups(ctx_bhd: np.ndarray, num_groups: int, k: int) -> list[set[int]]:
  """Per row, the set of k groups with the largest summed output norm, by enumerating all subsets."""
  b, hq, _ = ctx_bhd.shape
  r = hq // num_groups
  out = []
  for row in range(b):
    norms = [np.sqrt(sum(float(np.sum(ctx_bhd[row, g * r + j].astype(np.float64) ** 2)) for j in range(r)))
             for g in range(num_groups)]
    best = max(itertools.combinations(range(num_groups), k), key=lambda s: sum(norms[i] for i in s))
    out.append(set(best))
  return out


def test_oracle_keeps_the_brute_force_top_groups():
  ctx = jax.random.normal(jax.random.key(0), (5, 8, 4)) * jnp.arange(1, 9)[None, :, None] % 3.0
  kept = np.asarray(keep_top_groups(ctx, 4, 2))
  for row, groups in enumerate(_brute_force_top_groups(np.asarray(ctx), 4, 2)):
    heads = {h for h in range(8) if h // 2 in groups}
    for h in range(8):
      np.testing.assert_array_equal(kept[row, h], np.asarray(ctx)[row, h] if h in heads else 0.0)
  np.testing.assert_allclose(np.asarray(group_norms(ctx, 4))[0, 1], np.linalg.norm(np.asarray(ctx)[0, 2:4]),
                             rtol=1e-6)


def test_oracle_decode_step_matches_numpy_selection(gqa):
  """Layer by layer: dense context -> numpy brute-force top groups -> selective attention, vs the oracle step."""
  k = 2
  prompts = np.asarray(_prompts(4, (6, 6, 6)), np.int32)
  cache = KVCache.init(GQA, 3, 16, jnp.float32)
  _, cache = jax.jit(gqa.prefill)(jnp.asarray(prompts), jnp.full((3,), 6, jnp.int32), cache)
  tok = jnp.asarray([5, 17, 42], jnp.int32)
  oracle = SparseDecode(groups=(None, k, k), selector="oracle")
  logits_oracle, _ = jax.jit(lambda c: oracle(gqa, tok, c))(cache)

  def numpy_groups(ctx):
    return np.asarray([sorted(s) for s in _brute_force_top_groups(np.asarray(ctx), 4, k)], np.int32)

  @jax.jit
  def by_hand(cache):
    h = gqa.embed_tokens(tok, cache.lengths_b)
    for i, layer in enumerate(gqa.layers):
      x = layer.attn_norm(h)
      kc, vc = cache.k_bhsd[i], cache.v_bhsd[i]
      heads = DENSE_HEADS
      if i > 0:
        ctx = layer.attn.decode(x, cache.lengths_b, kc, vc).context_bhd
        heads = GroupIndices(jax.pure_callback(numpy_groups, jax.ShapeDtypeStruct((3, k), jnp.int32), ctx))
      a = layer.attn.decode(x, cache.lengths_b, kc, vc, heads).h
      h = layer._mlp_block(h + a, layer.mlp)
    return gqa.logits(h)

  np.testing.assert_allclose(np.asarray(logits_oracle), np.asarray(by_hand(cache)), rtol=1e-5, atol=1e-5)


# ---- kernels -----------------------------------------------------------------------------------------
def _opt_with_sparse_firing(seed=0):
  model = init_model(OPT, seed=seed)
  for layer in model.layers:                          # ~10% of neurons fire, 128 never fire
    b = np.full((OPT.intermediate_size,), -0.03, np.float32)
    b[-128:] = -100.0
    layer.mlp.b_in_n[...] = b
    layer.mlp.b_out_d[...] = np.linspace(-0.05, 0.05, OPT.hidden_size).astype(np.float32)   # an fc2 bias
  return model


def _opt_routers(model_config, k=128):
  r = random_routers(model_config, seed=5)
  b = np.zeros(r.neuron.b_ln.shape, np.float32)
  b[:, -128:] = -1e4                                  # never-firing neurons rank last
  r.neuron.b_ln[...] = b
  r.mlp_topk = {bs: (k,) * model_config.num_layers for bs in (1, 2, 4, 8)}
  return r


@pytest.mark.slow
def test_pallas_path_equals_xla_path():
  """Same selections (KV groups and batch-union neurons) through the Pallas kernels (interpret mode on CPU)
  and the XLA references; the kernels' own tests cover GQA group layouts."""
  model = _opt_with_sparse_firing()
  cfg, routers = SparsityConfig(0.5, mlp="router"), _opt_routers(OPT)
  prompts = np.asarray(_prompts(6, (7, 7)), np.int32)
  cache = KVCache.init(model.config, 2, 16, jnp.float32)
  _, cache = model.prefill(jnp.asarray(prompts), jnp.full((2,), 7, jnp.int32), cache)
  tok = jnp.asarray([3, 9], jnp.int32)
  outs = {}
  for impl in ("xla", "pallas"):
    decode, state = make_decoder(model, cfg, routers, batch=2, options=DecodeOptions(kernels=impl))
    assert isinstance(decode, SparseDecode) and decode.options.implementation == impl
    outs[impl] = jax.jit(lambda c, s, d=decode: d(model, tok, c, s, jnp.ones((2,), bool)))(cache, state)
  np.testing.assert_allclose(np.asarray(outs["pallas"][0]), np.asarray(outs["xla"][0]), rtol=2e-4, atol=2e-4)
  for a, b in zip(outs["pallas"][1].k_bhsd, outs["xla"][1].k_bhsd):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ---- batching ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("selector", ["router", "random", "oracle"])
def test_left_padded_ragged_batch_equals_each_prompt_alone(gqa, selector):
  prompts = _prompts(7, (4, 13, 2, 9))
  t = max(map(len, prompts))
  ids = np.zeros((4, t), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):] = p
    mask[i, t - len(p):] = 1
  cfg = SparsityConfig(0.5, dense_layers=(), selector=selector, seed=3)
  routers = random_routers(GQA)
  batch = gen.generate(gqa, ids, mask, max_new_tokens=8, sparsity=cfg, routers=routers).tokens
  for i, p in enumerate(prompts):
    alone = gen.generate(gqa, [p], max_new_tokens=8, sparsity=cfg, routers=routers).tokens
    np.testing.assert_array_equal(batch[i], alone[0])


def test_stream_equals_generate_and_router_weights_do_not_recompile(gqa):
  prompts = _prompts(8, (5, 3))
  cfg = SparsityConfig(0.5, dense_layers=())
  a = gen.generate(gqa, prompts, max_new_tokens=6, sparsity=cfg, routers=random_routers(GQA, seed=1))
  before = gen.TRACE_COUNTS["generate"]
  b = gen.generate(gqa, prompts, max_new_tokens=6, sparsity=cfg, routers=random_routers(GQA, seed=2))
  assert gen.TRACE_COUNTS["generate"] == before          # new weights, same program
  assert (a.tokens != b.tokens).any()
  steps = list(gen.stream(gqa, prompts, max_new_tokens=6, sparsity=cfg, routers=random_routers(GQA, seed=2)))
  np.testing.assert_array_equal(np.stack(steps, axis=1), b.tokens)


# ---- neuron budgets and the dense fallback ----------------------------------------------------------
def test_neuron_budgets_and_dense_fallback():
  table = {1: (128, 512), 4: (256, 384), 16: (410, 128)}
  assert neuron_budgets(table, 1, 512, 0.8) == (128, None)     # 512 > 0.8 * 512: dense
  assert neuron_budgets(table, 3, 512, 0.8) == (256, 384)      # next calibrated size up (4)
  assert neuron_budgets(table, 16, 512, 0.8) == (None, 128)    # 410 > 409.6: dense
  assert neuron_budgets(table, 17, 512, 0.8) == (None, None)   # beyond the table: dense
  assert neuron_budgets(table, 3, 512) == (256, None)          # the default 0.6: 384 > 307.2
  assert neuron_budgets(table, 3, 512, dense_above=0.5) == (256, None)    # 384 > 256: dense
  assert neuron_budgets(table, 1, 512, dense_above=1.0) == (128, 512)     # never dense within N
  for bad in (0, 0.0, 1.5, -0.2, True, "0.5"):
    with pytest.raises(ValueError, match="mlp_dense_above"):
      SparsityConfig(mlp="router", mlp_dense_above=bad)
  with pytest.raises(ValueError, match="unknown router_dtype"):
    SparsityConfig(router_dtype="int4")


def test_mlp_dense_above_sets_which_layers_route():
  model = _opt_with_sparse_firing()
  routers = _opt_routers(OPT, k=128)
  routers.mlp_topk = {bs: (128, 320) for bs in (1, 2, 4, 8)}        # 128 / 512 and 320 / 512 neurons
  decode, state = make_decoder(model, SparsityConfig(0.5, mlp="router", mlp_dense_above=0.8), routers, batch=3)
  assert decode.neuron_k == (128, 320)
  decode, state = make_decoder(model, SparsityConfig(0.5, mlp="router"), routers, batch=3)   # default 0.6
  assert decode.neuron_k == (128, None)
  decode, state = make_decoder(model, SparsityConfig(0.5, mlp="router", mlp_dense_above=0.5), routers, batch=3)
  assert decode.neuron_k == (128, None) and state["neuron"][1] is None     # layer 1: dense MLP, no router copy
  prompts = _prompts(4, (6, 9, 3))
  cfg = SparsityConfig(0.5, mlp="router", mlp_dense_above=0.5)
  mixed = gen.generate(model, prompts, max_new_tokens=5, sparsity=cfg, routers=routers).tokens
  assert mixed.shape == (3, 5)


def test_int8_neuron_routers_quantize_within_half_a_step():
  from polar_jax.routers.modules import decode_neuron_logits, quantize_int8_columns
  rng = np.random.default_rng(3)
  w = rng.normal(size=(48, 40)).astype(np.float32) * np.linspace(0.01, 3, 40, dtype=np.float32)
  w[:, 7] = 0.0                                                      # an all-zero column
  q, s = quantize_int8_columns(jnp.asarray(w))
  q, s = np.asarray(q), np.asarray(s)
  assert q.dtype == np.int8 and np.abs(q).max() <= 127 and s[7] == 0 and (q[:, 7] == 0).all()
  assert (np.abs(q.astype(np.float32) * s - w) <= s / 2 * (1 + 1e-6) + 1e-12).all()
  assert (np.abs(q).max(axis=0)[s > 0] == 127).all()                 # each column uses the full range
  # the int8 decode copy gives the logits of its dequantized weights (float32 input: exact products)
  routers = _opt_routers(OPT)
  from polar_jax.routers.modules import decode_neuron_layers
  (r8,) = decode_neuron_layers(routers.neuron, [True], jnp.int8)
  assert r8.w_down_dr.dtype == r8.w_up_rn.dtype == jnp.int8 and r8.s_up_n.shape == (OPT.intermediate_size,)
  x = jnp.asarray(rng.normal(size=(5, OPT.hidden_size)), jnp.float32)
  got = np.asarray(decode_neuron_logits(r8, x))
  wd = np.asarray(r8.w_down_dr, np.float64) * np.asarray(r8.s_down_r, np.float64)
  wu = np.asarray(r8.w_up_rn, np.float64) * np.asarray(r8.s_up_n, np.float64)
  want = (np.asarray(x, np.float64) @ wd) @ wu + np.asarray(r8.b_n, np.float64)
  eps = np.finfo(np.float32).eps
  bound = 8 * eps * ((np.abs(np.asarray(x, np.float64)) @ np.abs(wd)) @ np.abs(wu) + np.abs(want))
  assert (np.abs(got - want) <= bound).all()
  # and those logits are within the quantization error of the float32 routers'
  wd32, wu32 = np.asarray(routers.neuron.w_down_ldr[0], np.float64), np.asarray(routers.neuron.w_up_lrn[0], np.float64)
  exact = (np.asarray(x, np.float64) @ wd32) @ wu32 + np.asarray(routers.neuron.b_ln[0], np.float64)
  ax = np.abs(np.asarray(x, np.float64))
  err_low = ax @ np.broadcast_to(np.asarray(r8.s_down_r) / 2, wd.shape)          # |x| . max |w - q s|
  q_bound = ((ax @ np.abs(wd32) + err_low) @ np.broadcast_to(np.asarray(r8.s_up_n) / 2, wu.shape)
             + err_low @ np.abs(wu32))
  assert (np.abs(got - exact) <= q_bound + bound).all()
  assert np.abs(got - exact).max() > 0                               # it is quantized


@pytest.mark.slow
def test_int8_router_dtype_decodes_like_its_dequantized_float_routers():
  from polar_jax.routers.modules import quantize_int8_columns
  model = _opt_with_sparse_firing()
  routers = _opt_routers(OPT, k=8)                    # 8 of ~50 firing neurons: the selection shows in the tokens
  prompts = _prompts(4, (6, 9, 3))
  cfg8 = SparsityConfig(0.5, mlp="router", router_dtype="int8")
  decode, state = make_decoder(model, cfg8, routers, batch=3)
  assert state["neuron"][1].w_up_rn.dtype == jnp.int8 and state["head"][1][0].dtype == jnp.float32   # model's
  got = gen.generate(model, prompts, max_new_tokens=6, sparsity=cfg8, routers=routers).tokens
  deq = _opt_routers(OPT, k=8)                        # the same routers with the int8 values in float32
  for name in ("w_down_ldr", "w_up_lrn"):
    w = np.asarray(getattr(deq.neuron, name)[...])
    getattr(deq.neuron, name)[...] = np.stack([np.asarray(q, np.float32) * np.asarray(s)
                                               for q, s in map(quantize_int8_columns, w)])
  want = gen.generate(model, prompts, max_new_tokens=6, sparsity=SparsityConfig(0.5, mlp="router"),
                      routers=deq).tokens
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_sparse_mlp_union_covering_all_firing_neurons_equals_dense():
  model = _opt_with_sparse_firing()
  prompts = _prompts(9, (5, 8, 3))
  dense = gen.generate(model, prompts, max_new_tokens=6)
  routers = _opt_routers(OPT, k=128)
  routers.mlp_topk = {bs: (384, 384) for bs in (1, 2, 4)}      # 384 <= 0.8 N: sparse; holds every live neuron
  cfg = SparsityConfig(1.0, mlp="router", mlp_dense_above=0.8)
  decode, _ = make_decoder(model, cfg, routers, batch=3)
  assert decode.neuron_k == (384, 384)
  out = gen.generate(model, prompts, max_new_tokens=6, sparsity=cfg, routers=routers)
  np.testing.assert_array_equal(out.tokens, dense.tokens)
  routers.mlp_topk = {bs: (512, 512) for bs in (1, 2, 4)}      # over budget: the dense step itself
  decode, _ = make_decoder(model, cfg, routers, batch=3)
  assert decode == gen.DenseDecode()
  routers.mlp_topk = {bs: (128, 128) for bs in (1, 2, 4)}      # a real cut changes the output
  cut = gen.generate(model, prompts, max_new_tokens=6, sparsity=cfg, routers=routers)
  assert (cut.tokens != dense.tokens).any()


def test_sparse_mlp_matches_numpy_union_reference():
  model = _opt_with_sparse_firing()
  mlp = model.layers[0].mlp
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, OPT.hidden_size)))
  idx = np.random.default_rng(0).choice(OPT.intermediate_size, 128, replace=False).astype(np.int32)
  w_in, b_in = np.asarray(mlp.w_in_nd[...]), np.asarray(mlp.b_in_n[...])
  w_out, b_out = np.asarray(mlp.w_out_nd[...]), np.asarray(mlp.b_out_d[...])
  ref = np.maximum(x @ w_in[idx].T + b_in[idx], 0) @ w_out[idx] + b_out      # fc2 bias kept
  np.testing.assert_allclose(np.asarray(mlp.sparse(jnp.asarray(x), jnp.asarray(idx))), ref, rtol=1e-5, atol=1e-5)


# ---- the batch-union neuron selection (sort-free radix top-k set) -----------------------------------
def _structured_scores(rng, n):
  """Score vectors like the union's: many exact zeros, heavy ties, -0.0, +-inf, a few huge values."""
  relu_sum = np.maximum(rng.normal(size=(4, n)), 0).sum(0)
  ties = rng.integers(0, 3, n).astype(np.float32)
  signed_zero = np.where(rng.random(n) < 0.5, 0.0, -0.0).astype(np.float32)
  spiky = np.where(rng.random(n) < 0.01, 1e30, rng.normal(size=n) * 1e-30)
  extremes = np.concatenate([[np.inf, -np.inf, 0.0, -0.0], rng.normal(size=n - 4)])
  return np.stack([relu_sum, ties, signed_zero, spiky, extremes]).astype(np.float32)


@pytest.mark.parametrize("n", [9, 512, 16384])
def test_topk_set_equals_lax_top_k_set(n):
  from pallas_kernels.topk_select_xla import topk_set
  rng = np.random.default_rng(n)
  scores = np.concatenate([rng.normal(size=(2, n)).astype(np.float32), _structured_scores(rng, n)])
  for k in sorted({1, 2, n // 7 or 1, n // 2, int(0.79 * n), n - 1, n}):
    got = np.asarray(topk_set(jnp.asarray(scores), k))
    ref = np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])
    assert got.shape == (len(scores), k) and got.dtype == np.int32
    for g, r in zip(got, ref):
      assert (np.diff(g) > 0).all()                          # ascending, no repeats
      np.testing.assert_array_equal(g, np.sort(r))           # the same set, ties included


@pytest.mark.parametrize("n", [1, 5, 32, 40, 300])
def test_rank_topk_equals_lax_top_k(n):
  from polar_jax.sharding import balanced_topk
  from polar_jax.topk import RANK_MAX_N, rank_topk
  rng = np.random.default_rng(n)
  scores = rng.normal(size=(3, n)).astype(np.float32)
  if n >= 9:
    scores = np.concatenate([scores, _structured_scores(rng, n)])
    scores[-1, 4:8] = [np.nan, -np.nan, np.nan, 1e-45]             # NaNs rank beyond +-inf, as in lax.top_k
  for k in sorted({1, 2 if n > 1 else 1, n // 2 or 1, n}):
    got = np.asarray(rank_topk(jnp.asarray(scores), k))
    ref = np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)                   # same indices in the same order, ties included
  if n % 4 == 0:                                              # balanced (tensor-parallel) selection, 4 shards
    got = np.asarray(balanced_topk(jnp.asarray(scores), n // 2, 4)).reshape(len(scores), 4, -1)
    ref = np.asarray(jax.lax.top_k(jnp.asarray(scores).reshape(len(scores), 4, -1), n // 8)[1])
    np.testing.assert_array_equal(got - (np.arange(4) * (n // 4))[None, :, None], ref)
  assert (n > RANK_MAX_N) == (n == 300)                       # 300 takes the sort fallback
  with pytest.raises(ValueError, match="must lie in"):
    rank_topk(jnp.asarray(scores), n + 1)


@pytest.mark.slow
def test_union_topk_radix_and_sort_select_the_same_neurons():
  from polar_jax.sharding import balanced_union_topk
  from polar_jax.topk import union_topk
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(32, 2048)).astype(np.float32) - 1.5)
  active = jnp.asarray(rng.random(32) < 0.7)
  for act in (None, active):
    for k in (128, 1637):   # a few of 2048 and most of them
      radix, sort = union_topk(logits, act, k), union_topk(logits, act, k, method="sort")
      np.testing.assert_array_equal(np.asarray(radix), np.sort(np.asarray(sort)))
      kernel = union_topk(logits, act, k, implementation="pallas")             # the GPU path, interpreted
      np.testing.assert_array_equal(np.asarray(kernel), np.asarray(radix))
      br = np.asarray(balanced_union_topk(logits, act, k - k % 4, 4)).reshape(4, -1)
      bs = np.asarray(balanced_union_topk(logits, act, k - k % 4, 4, method="sort")).reshape(4, -1)
      np.testing.assert_array_equal(br, np.sort(bs, axis=1))
      bk = balanced_union_topk(logits, act, k - k % 4, 4, implementation="pallas")
      np.testing.assert_array_equal(np.asarray(bk).reshape(4, -1), br)
  with pytest.raises(ValueError, match="unknown union method"):
    union_topk(logits, None, 8, method="approx")


@pytest.mark.slow
def test_union_methods_decode_the_same_tokens_and_router_weights_follow_model_dtype():
  model = _opt_with_sparse_firing()
  routers = _opt_routers(OPT, k=128)
  cfg = SparsityConfig(0.5, mlp="router")
  prompts = _prompts(4, (6, 9, 3))
  decode, state = make_decoder(model, cfg, routers, batch=3)
  assert decode.options.union_method == "radix"
  w_down, w_up, b, s_down, s_up = state["neuron"][0]      # float32 model: the float32 weights themselves
  assert w_down.dtype == w_up.dtype == b.dtype == jnp.float32 and s_down is None and s_up is None
  np.testing.assert_array_equal(np.asarray(w_up), np.asarray(routers.neuron.w_up_lrn[0]))
  radix = gen.generate(model, prompts, max_new_tokens=6, sparsity=cfg, routers=routers).tokens
  sort = gen.generate(model, prompts, max_new_tokens=6, sparsity=cfg, routers=routers,   # top_k order: same set
                      options=DecodeOptions(union_method="sort")).tokens
  np.testing.assert_array_equal(radix, sort)
  _, state = make_decoder(model, cfg, routers, batch=3, router_dtype=jnp.bfloat16)
  w_down, w_up, b, _, _ = state["neuron"][1]
  assert w_down.dtype == w_up.dtype == jnp.bfloat16 and b.dtype == jnp.float32
  w_dg, b_g = state["head"][1]
  assert w_dg.dtype == jnp.bfloat16 and b_g.dtype == jnp.float32
  with pytest.raises(ValueError, match="union_method must be one of"):
    make_decoder(model, cfg, routers, batch=3, options=DecodeOptions(union_method="approx"))


def test_generate_cli_builds_the_mlp_and_router_settings():
  from polar_jax.cli import generate as cli
  args = cli.parser().parse_args(["some/model", "--prompt", "hi", "--attn-density", "0.5", "--mlp", "router",
                                  "--mlp-dense-above", "0.6", "--router-dtype", "int8"])
  cfg, routers = cli.build_sparsity(args)
  assert (cfg.attn_density, cfg.mlp, cfg.mlp_dense_above, cfg.router_dtype) == (0.5, "router", 0.6, "int8")
  assert routers is None
  args = cli.parser().parse_args(["some/model", "--prompt", "hi", "--attn-density", "0.5"])
  cfg, _ = cli.build_sparsity(args)
  assert (cfg.mlp_dense_above, cfg.router_dtype) == (0.6, None)


@pytest.mark.parametrize("bf16", [True, False])
def test_union_scores_rounding_keeps_methods_equal(bf16):
  from polar_jax import topk
  from polar_jax.topk import union_topk
  dtype = DecodeOptions(union_dtype="bfloat16" if bf16 else "float32").union_jnp_dtype
  rng = np.random.default_rng(11)
  logits = jnp.asarray(rng.normal(size=(6, 3000)) * 3, jnp.float32)
  active = jnp.asarray([True, True, False, True, True, False])
  s = topk.union_scores(logits, active, dtype)
  want = np.maximum(np.asarray(logits), 0)[np.asarray(active)].sum(0)
  assert s.dtype == (jnp.bfloat16 if bf16 else jnp.float32)
  np.testing.assert_allclose(np.asarray(s, np.float32), want, rtol=2.0 ** -8 if bf16 else 1e-6)
  for k in (5, 1000, 2999):
    radix = np.asarray(union_topk(logits, active, k, "radix", "xla", dtype))
    sort = np.sort(np.asarray(union_topk(logits, active, k, "sort", dtype=dtype)))
    np.testing.assert_array_equal(radix, sort)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_router_union_in_the_kernel_equals_logits_then_union(dtype):
  """decode_neuron_union (the router's up-projection with bias, ReLU and the active rows' column sums in its
  epilogue) == union_scores(decode_neuron_logits(...)): float32 sums up to order, then one rounding to the union
  dtype (so within one unit of it); the Pallas kernels (interpreted) and the XLA references."""
  from polar_jax import topk
  from polar_jax.routers.modules import decode_neuron_layers, decode_neuron_logits, decode_neuron_union
  routers = _opt_routers(OPT)
  (router,) = decode_neuron_layers(routers.neuron, [True], dtype)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(5, OPT.hidden_size)), dtype)
  active = jnp.asarray([True, False, True, True, False])
  union_dtype = DecodeOptions().union_jnp_dtype                                        # bf16 by default
  unit = 2.0 ** -7 if union_dtype == jnp.bfloat16 else 1e-5                           # relative
  with jax.default_matmul_precision("highest"):           # (float32 dots are TF32 on GPUs by default)
    want = np.asarray(topk.union_scores(decode_neuron_logits(router, x), active, union_dtype), np.float64)
    for impl in ("pallas", "xla"):
      got = decode_neuron_union(router, x, active, union_dtype, impl)
      assert got.shape == (OPT.intermediate_size,) and got.dtype == union_dtype
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=unit, atol=1e-6)
  assert (want[-128:] == 0).all() and (want > 0).sum() > 100                          # real, partly-zero scores
  with pytest.raises(ValueError, match="float router weights"):
    decode_neuron_union(decode_neuron_layers(routers.neuron, [True], jnp.int8)[0], x, active, jnp.float32)


@pytest.mark.slow
def test_union_in_router_selects_the_same_neurons_as_xla_logits(monkeypatch):
  """The step with the union scores from the router kernel (fused projections) and with XLA's logits + union
  fusion (`DecodeOptions(fused_projections=False)`) pick the same neurons on the tiny OPT model: the same sets
  each layer, the same logits (the Pallas kernels interpreted, as on a GPU, and the XLA references)."""
  from polar_jax import selection
  from polar_jax.routers import modules
  model = _opt_with_sparse_firing()
  cfg, routers = SparsityConfig(0.5, mlp="router"), _opt_routers(OPT, k=64)
  prompts = np.asarray(_prompts(5, (7, 7, 7)), np.int32)
  cache = KVCache.init(model.config, 3, 16, jnp.float32)
  _, cache = model.prefill(jnp.asarray(prompts), jnp.full((3,), 7, jnp.int32), cache)
  tok, active = jnp.asarray([3, 9, 4], jnp.int32), jnp.asarray([True, False, True])
  calls, picks = [], {}
  real_union = modules.decode_neuron_union
  monkeypatch.setattr(selection, "decode_neuron_union", lambda *a, **kw: calls.append(1) or real_union(*a, **kw))
  for impl in ("pallas", "xla"):
    for on in (True, False):
      options = DecodeOptions(kernels=impl, fused_projections=on, deferred_norm=on, router_in_qkv=on)
      calls.clear()
      decode, state = make_decoder(model, cfg, routers, batch=3, options=options)
      plans = decode.plans(model, tok, cache.lengths_b, state, active)
      x = jax.random.normal(jax.random.key(7), (3, OPT.hidden_size))
      picks[on] = [np.asarray(plans[i].neurons.indices(x, options)) for i in range(OPT.num_layers)]
      assert bool(calls) == on
      logits = decode(model, tok, cache, state, active)[0]
      picks[on].append(np.asarray(logits))
    for a, b in zip(picks[True][:-1], picks[False][:-1]):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(picks[True][-1], picks[False][-1], rtol=1e-5, atol=1e-5)
