"""router_topk: the head router's scores + per-row top-k as one kernel (Pallas in interpret mode on CPU) vs
lax.top_k of the XLA scores; ties to the lower index; the decode step's selection with the kernel on and off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import router_topk
from pallas_kernels import router_topk_xla


CASES = [  # B, D, G, k, dtype, rows per program
    (5, 64, 8, 3, jnp.float32, 1),
    (5, 64, 8, 3, jnp.float32, 16),       # one program, padded tile rows
    (33, 256, 32, 16, jnp.bfloat16, 1),   # LLaMA-2 shape of groups / k, bf16
    (33, 256, 32, 16, jnp.bfloat16, 16),  # a partial last row block
    (3, 48, 9, 9, jnp.float32, 2),        # G not a power of two, k = G
    (4, 96, 6, 1, jnp.float32, 1),        # k = 1, hidden 96 (chunks of 32)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_pallas_equals_lax_top_k_of_the_reference_scores(case):
  B, D, G, k, dtype, rows = case
  rng = np.random.default_rng(B * G + k)
  x = jnp.asarray(rng.standard_normal((B, D)), dtype)
  w = jnp.asarray(rng.standard_normal((D, G)), dtype)
  b = jnp.asarray(rng.standard_normal(G), jnp.float32)
  want = jax.lax.top_k(router_topk_xla.router_scores_xla(x, w, b), k)[1]
  got = router_topk(x, w, b, k, implementation="pallas", rows_per_program=rows)
  assert got.dtype == jnp.int32 and got.shape == (B, k)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(router_topk(x, w, b, k, implementation="xla")), np.asarray(want))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_ties_go_to_the_lower_index(impl):
  """A zero weight makes every score its bias: equal biases tie and go to the lower index first."""
  x = jnp.ones((2, 32), jnp.float32)
  w = jnp.zeros((32, 8), jnp.float32)
  b = jnp.asarray([1.0, 3.0, 3.0, -1.0, 0.0, 3.0, -2.0, 1.0], jnp.float32)
  got = np.asarray(router_topk(x, w, b, 6, implementation=impl))
  np.testing.assert_array_equal(got, [[1, 2, 5, 0, 7, 4]] * 2)


@pytest.mark.parametrize("what,match", [("x", "router_topk needs"), ("bias", "router_topk needs"),
                                        ("k", "must lie in")])
def test_bad_inputs_raise(what, match):
  x, w, b, k = jnp.ones((2, 32)), jnp.ones((32, 8)), jnp.ones((8,)), 3
  if what == "x":
    x = jnp.ones((2, 16))
  elif what == "bias":
    b = jnp.ones((7,))
  else:
    k = 9
  with pytest.raises(ValueError, match=match):
    router_topk(x, w, b, k)



def test_decode_step_selects_the_same_groups_with_the_kernel(monkeypatch):
  """The sparse decode step with the router kernel (forced to "pallas": interpret mode on CPU) generates the same
  tokens as the XLA router path: both select lax.top_k's groups of the same scores."""
  from polar_jax import sparse_decode
  from polar_jax.config import ModelConfig
  from polar_jax.generation import generate
  from polar_jax.model import init_model
  from polar_jax.routers import Routers
  from polar_jax.sparsity import SparsityConfig
  config = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
                       num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=128)
  model = init_model(config, seed=3)
  routers = Routers.init(config)
  w = routers.head.w_ldg
  w.set_value(jax.random.normal(jax.random.key(1), w.shape, jnp.float32))
  prompts = [[5, 9, 13, 2, 7], [3, 1], [8, 8, 4, 60, 2, 11, 7]]
  sp = SparsityConfig(attn_density=0.5)
  calls = []
  real = sparse_decode.router_topk
  monkeypatch.setattr(sparse_decode, "router_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  monkeypatch.setattr(sparse_decode, "resolve_implementation", lambda impl: "pallas")
  monkeypatch.setattr(sparse_decode, "ROUTER_TOPK_KERNEL", False)
  ref = generate(model, prompts, max_new_tokens=5, sparsity=sp, routers=routers)
  assert not calls
  monkeypatch.setattr(sparse_decode, "ROUTER_TOPK_KERNEL", True)
  out = generate(model, prompts, max_new_tokens=6, sparsity=sp, routers=routers)   # another program: retraced
  assert calls                                   # the kernel ran (traced once per routed layer)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :5], np.asarray(ref.tokens))
