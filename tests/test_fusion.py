"""Fused q|k|v and gate|up projections (polar_jax.fusion): same results as the separate projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LLAMA_MHA as MHA, OPT
from polar_jax import fusion
from polar_jax.checkpoint import load_model, model_params, save_model
from polar_jax.config import ModelConfig
from polar_jax.generation import generate
from polar_jax.model import forward, init_model
from polar_jax.routers import Routers
from polar_jax.sparsity import SparsityConfig

GQA_BIAS = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=128, attn_bias=True)
PROMPTS = [[5, 9, 13, 2, 7], [3, 1], [8, 8, 4, 60, 2, 11, 7], [40, 41, 42]]
F32_TOL = dict(atol=2e-5, rtol=1e-5)   # float32: the fused matmul may sum in another order


def _random_biases(model, seed=7):
  """Non-zero biases, so a misplaced bias column shows."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for layer in model.layers:
    for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
      if proj.bias is not None:
        proj.bias.set_value(jax.random.normal(next(keys), proj.bias.shape, proj.bias.dtype))
  return model


def _params_np(model):
  return {k: np.asarray(v) for k, v in model_params(model).items()}


@pytest.mark.parametrize("config", [pytest.param(GQA_BIAS, marks=pytest.mark.slow), MHA,
                                    pytest.param(OPT, marks=pytest.mark.slow)], ids=["gqa-bias", "mha", "opt"])
def test_fused_model_computes_like_the_unfused(config):
  ref = _random_biases(init_model(config, seed=3))
  fused = fusion.fuse_projections(_random_biases(init_model(config, seed=3)))
  assert fusion.is_fused(fused) and not fusion.is_fused(ref)
  attn = fused.layers[0].attn
  assert attn.q_proj is None and attn.qkv_proj.kernel.shape == (32, (config.num_heads + 2 * config.num_kv_heads) * 8)
  if config.mlp == "gated":
    assert fused.layers[0].mlp.gate_proj is None
    assert fused.layers[0].mlp.gate_up_proj.kernel.shape == (32, 2 * config.intermediate_size)
  ids = np.array([[1, 5, 9, 2, 60, 7, 3]], np.int32)
  np.testing.assert_allclose(np.asarray(forward(fused, ids)), np.asarray(forward(ref, ids)), **F32_TOL)
  out_ref = generate(ref, PROMPTS, max_new_tokens=6)
  out_fused = generate(fused, PROMPTS, max_new_tokens=6)
  np.testing.assert_array_equal(out_fused.tokens, out_ref.tokens)


@pytest.mark.slow
def test_fused_sparse_decode_equals_unfused():
  routers = Routers.init(GQA_BIAS)
  w = routers.head.w_ldg
  w.set_value(jax.random.normal(jax.random.key(1), w.shape, jnp.float32))
  sp = SparsityConfig(attn_density=0.5)
  ref = _random_biases(init_model(GQA_BIAS, seed=3))
  fused = fusion.fuse_projections(_random_biases(init_model(GQA_BIAS, seed=3)))
  a = generate(ref, PROMPTS, max_new_tokens=6, sparsity=sp, routers=routers)
  b = generate(fused, PROMPTS, max_new_tokens=6, sparsity=sp, routers=routers)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_save_and_reload_restore_the_checkpoint_parameters_exactly(tmp_path):
  ref = _random_biases(init_model(GQA_BIAS, seed=3))
  want = _params_np(ref)
  fused = fusion.fuse_projections(_random_biases(init_model(GQA_BIAS, seed=3)))
  fusion.fuse_projections(fused)                                 # idempotent
  got = _params_np(fused)                                        # model_params splits fused projections back
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  save_model(tmp_path / "ckpt", fused)
  loaded = load_model(tmp_path / "ckpt", dtype="float32", fuse=True)
  assert fusion.is_fused(loaded)
  np.testing.assert_array_equal(np.asarray(loaded.layers[1].attn.qkv_proj.kernel[...]),
                                np.asarray(fused.layers[1].attn.qkv_proj.kernel[...]))
  for k, v in _params_np(loaded).items():                         # and splits back exactly
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_linear_values_shape_checked():
  from polar_jax.layers import Linear
  with pytest.raises(ValueError, match="given kernel"):
    Linear(4, 6, bias=False, dtype=jnp.float32, values=(jnp.zeros((4, 5)), None))
  with pytest.raises(ValueError, match="bias"):
    Linear(4, 6, bias=True, dtype=jnp.float32, values=(jnp.zeros((4, 6)), None))
