"""Tensor-parallel checks run in a subprocess (JAX must see several CPU devices before it is imported).

    python tests/sharding_check.py single            # 8 host devices: tp 2/4 vs one device
    python tests/sharding_check.py multi RANK PORT   # one of 2 processes x 2 CPU devices (jax.distributed)

Both check `generate` and `stream` (same tokens as generate, in every process) on the sharded model.

Prints "OK <name>" lines and exits non-zero on the first mismatch (tests/test_sharding.py drives it).
"""

from __future__ import annotations

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "single"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={8 if MODE == 'single' else 2}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

if MODE == "multi":
  from polar_jax import distributed
  distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2]))

from conftest import LLAMA_GQA_8H as GQA, LLAMA_MHA_8H as MHA, OPT  # noqa: E402  (this file's folder)
from polar_jax import sharding  # noqa: E402
from polar_jax.generation import generate  # noqa: E402
from polar_jax.kv_cache import KVCache  # noqa: E402
from polar_jax.model import init_model  # noqa: E402
from polar_jax.routers import Routers  # noqa: E402
from polar_jax.sparse_decode import SparseDecode, make_decoder  # noqa: E402
from polar_jax.sparsity import SparsityConfig  # noqa: E402

GQA8 = dataclasses.replace(MHA, num_heads=16)   # 8 KV groups of 2 query heads
# (a layer stays dense when density x local groups rounds to all of them: e.g. 4 KV groups at tp 4)
PROMPTS = [[5, 9, 13, 2, 7], [3, 1], [8, 8, 4, 60, 2, 11, 7], [40]]
NEW = 4


def random_routers(config, seed=1):
  routers = Routers.init(config)
  w = routers.head.w_ldg
  w.set_value(jax.random.normal(jax.random.key(seed), w.shape, jnp.float32))
  return routers


def greedy_logits(model, sparsity, routers, steps=NEW - 1):
  """Greedy decoding by hand: (tokens `[B, steps + 1]`, float32 logits `[steps + 1, B, V]`)."""
  b = len(PROMPTS)
  t = max(map(len, PROMPTS))
  toks = np.zeros((b, t), np.int32)
  for i, p in enumerate(PROMPTS):
    toks[i, :len(p)] = p
  lengths = np.array([len(p) for p in PROMPTS], np.int32)
  decode, state = make_decoder(model, sparsity, routers, batch=b)   # dense without sparsity
  mesh = sharding.model_mesh(model)
  assert decode.mesh == mesh, (decode.mesh, mesh)
  if sparsity is not None:
    assert isinstance(decode, SparseDecode) and decode.shards == (sparsity.shards or sharding.model_tp(model)), decode
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, toks, lengths, state):
    m = nnx.merge(graphdef, params)
    cache = KVCache.init(m.config, b, t + steps + 1, m.dtype)
    logits, cache = m.prefill(toks, lengths, cache, mesh=mesh)
    out, tok_out = [logits], [jnp.argmax(logits, -1)]
    for _ in range(steps):
      tok = tok_out[-1].astype(jnp.int32)
      logits, cache = decode(m, tok, cache, state, jnp.ones((b,), bool))
      out.append(logits)
      tok_out.append(jnp.argmax(logits, -1))
    return jnp.stack(tok_out, 1), jnp.stack(out)

  return sharding.to_host(run(params, jnp.asarray(toks), jnp.asarray(lengths), state))


def check(name, config, tp, dp=1, sparsity_kw=None, routers=None, via_generate=False, fuse=False):
  """Greedy tokens and every step's logits of the tp model equal the one-device run (same balanced selection).
  `fuse`: the tp model's projections are fused after sharding (polar_jax.fusion), the reference's are not."""
  ref_model = init_model(config, seed=3)
  mesh = sharding.make_mesh(tp=tp, dp=dp)
  tp_model = sharding.shard_model(init_model(config, seed=3), mesh)
  if fuse:
    from jax.sharding import PartitionSpec as P
    from polar_jax.fusion import fuse_projections
    fuse_projections(tp_model)
    for w in (tp_model.layers[0].attn.qkv_proj.kernel[...], tp_model.layers[1].mlp.gate_up_proj.kernel[...]):
      assert w.sharding.spec == P(None, "tp"), w.sharding
  tp_sparsity = ref_sparsity = None
  if sparsity_kw is not None:
    tp_sparsity = SparsityConfig(**sparsity_kw)                 # shards=None: the model's tp
    ref_sparsity = SparsityConfig(**sparsity_kw, shards=tp)     # the same balanced selection on one device
  traced = sharding.TRACE_COUNTS["shard_map"]
  tok_ref, lg_ref = greedy_logits(ref_model, ref_sparsity, routers)
  assert sharding.TRACE_COUNTS["shard_map"] == traced, "shard_map used without a mesh"
  tok_tp, lg_tp = greedy_logits(tp_model, tp_sparsity, routers)
  assert sharding.TRACE_COUNTS["shard_map"] > traced, "the tp decode did not go through shard_map"
  if not np.array_equal(tok_ref, tok_tp):
    raise AssertionError(f"{name}: greedy tokens differ\n{tok_ref}\n{tok_tp}")
  err = float(np.max(np.abs(lg_ref - lg_tp)))
  if not np.allclose(lg_ref, lg_tp, atol=2e-5, rtol=1e-5):
    raise AssertionError(f"{name}: logits differ by {err}")
  if via_generate:   # the full generate program (prefill + while_loop) too
    g_ref = generate(ref_model, PROMPTS, max_new_tokens=NEW, sparsity=ref_sparsity, routers=routers).tokens
    g_tp = generate(tp_model, PROMPTS, max_new_tokens=NEW, sparsity=tp_sparsity, routers=routers).tokens
    if not (np.array_equal(g_ref, g_tp) and np.array_equal(g_ref, tok_ref)):
      raise AssertionError(f"{name}: generate tokens differ\n{g_ref}\n{g_tp}\n{tok_ref}")
  print(f"OK {name} max|dlogits|={err:.2e}", flush=True)


def check_stream(name, config, tp, dp=1, sparsity_kw=None, routers=None):
  """`stream` on the tp model yields, step by step, the tokens of `generate` on the one-device model (and on the
  tp model); every process sees the same tokens."""
  from polar_jax.generation import stream
  ref_model = init_model(config, seed=3)
  tp_model = sharding.shard_model(init_model(config, seed=3), sharding.make_mesh(tp=tp, dp=dp))
  tp_sparsity = None if sparsity_kw is None else SparsityConfig(**sparsity_kw)
  ref_sparsity = None if sparsity_kw is None else SparsityConfig(**sparsity_kw, shards=tp)
  g_ref = generate(ref_model, PROMPTS, max_new_tokens=NEW, sparsity=ref_sparsity, routers=routers).tokens
  g_tp = generate(tp_model, PROMPTS, max_new_tokens=NEW, sparsity=tp_sparsity, routers=routers).tokens
  steps = list(stream(tp_model, PROMPTS, max_new_tokens=NEW, sparsity=tp_sparsity, routers=routers))
  assert all(isinstance(t, np.ndarray) and t.shape == (len(PROMPTS),) for t in steps), steps
  s_tp = np.stack(steps, axis=1)
  if not (np.array_equal(s_tp, g_tp) and np.array_equal(s_tp, g_ref)):
    raise AssertionError(f"{name}: stream tokens differ from generate\n{s_tp}\n{g_tp}\n{g_ref}")
  print(f"OK {name}", flush=True)


def check_checkpoint():
  """load_model(path, mesh=...) restores every parameter straight into its shards."""
  import tempfile
  from jax.sharding import PartitionSpec as P
  from polar_jax.checkpoint import load_model, save_model
  ref = init_model(GQA, seed=3)
  with tempfile.TemporaryDirectory() as d:
    save_model(f"{d}/ckpt", ref)
    model = load_model(f"{d}/ckpt", mesh=sharding.make_mesh(tp=2))
    fused = load_model(f"{d}/ckpt", mesh=sharding.make_mesh(tp=2), fuse=True)
  qkv = fused.layers[0].attn.qkv_proj.kernel[...]     # 4 groups x (2 query + k + v heads) x 8: whole groups per shard
  assert qkv.sharding.spec == P(None, "tp") and qkv.addressable_shards[0].data.shape == (32, 64), qkv.sharding
  tok_f, lg_f = greedy_logits(fused, None, None)
  q = model.layers[0].attn.q_proj.kernel[...]
  assert q.sharding.spec == P(None, "tp") and q.addressable_shards[0].data.shape == (32, 32), q.sharding
  w = model.layers[0].attn.o_proj.kernel[...]
  assert w.sharding.spec == P("tp", None) and w.addressable_shards[0].data.shape == (32, 32), w.sharding
  assert model.embed.embedding[...].sharding.spec == P()
  tok_ref, lg_ref = greedy_logits(ref, None, None)
  tok_tp, lg_tp = greedy_logits(model, None, None)
  assert np.array_equal(tok_ref, tok_tp) and np.allclose(lg_ref, lg_tp, atol=2e-5, rtol=1e-5)
  assert np.array_equal(tok_ref, tok_f) and np.allclose(lg_ref, lg_f, atol=2e-5, rtol=1e-5)
  print("OK checkpoint load_model(mesh=tp2) and fuse=True", flush=True)
  # A user's own mesh: jax.make_mesh's default Explicit axes, only a "tp" axis (loaded and sharded in place).
  plain = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
  assert plain.axis_types[0] == jax.sharding.AxisType.Explicit, plain.axis_types
  with tempfile.TemporaryDirectory() as d:
    save_model(f"{d}/ckpt", ref)
    loaded = load_model(f"{d}/ckpt", mesh=plain, fuse=True)
  placed = sharding.shard_model(init_model(GQA, seed=3), plain)
  for m in (loaded, placed):
    assert sharding.mesh_tp(sharding.model_mesh(m)) == 2
    tok_p, lg_p = greedy_logits(m, None, None)
    assert np.array_equal(tok_ref, tok_p) and np.allclose(lg_ref, lg_p, atol=2e-5, rtol=1e-5)
    out = generate(m, PROMPTS, max_new_tokens=NEW, sparsity=SparsityConfig(attn_density=0.5),
                   routers=random_routers(GQA)).tokens
    assert out.shape == (len(PROMPTS), NEW)
  try:
    sharding.shard_model(init_model(GQA), jax.make_mesh((2,), ("model",), devices=jax.devices()[:2]))
  except ValueError as e:
    assert "'tp'" in str(e), e
  else:
    raise AssertionError("a mesh without a 'tp' axis did not raise")
  print("OK plain jax.make_mesh (Explicit axes, tp only)", flush=True)


def main_single(part: str):
  """Part "a": dense, oracle (uniform and adaptive) and random selection, checkpoints, errors; part "b": routers
  (uniform and adaptive) and `stream` (two processes, so the two halves run side by side)."""
  assert len(jax.devices()) == 8, jax.devices()
  if part == "a":
    check("mha tp2 dense", MHA, 2)
    check("gqa tp4 dense", GQA, 4)
    check("opt tp2 dense", OPT, 2)
    check("mha tp4 oracle", MHA, 4, sparsity_kw=dict(attn_density=0.5, selector="oracle"))
    check("gqa8 tp4 random", GQA8, 4, sparsity_kw=dict(attn_density=0.5, selector="random", seed=4))
    check("mha tp2 oracle adaptive", MHA, 2, sparsity_kw=dict(attn_density=0.75, selector="oracle",
                                                           budget="adaptive", mass=0.5))
    check_checkpoint()
    check_errors()
    return
  mha_r, gqa_r = random_routers(MHA), random_routers(GQA)
  check("mha tp4 router", MHA, 4, sparsity_kw=dict(attn_density=0.5), routers=mha_r)
  check("gqa tp2 router", GQA, 2, sparsity_kw=dict(attn_density=0.5), routers=gqa_r, via_generate=True)
  check("gqa dp2 tp2 router", GQA, 2, dp=2, sparsity_kw=dict(attn_density=0.5), routers=gqa_r)
  check("mha tp2 router adaptive", MHA, 2, sparsity_kw=dict(attn_density=0.75, budget="adaptive", mass=0.5),
        routers=mha_r)
  check("gqa8 tp4 router fused", GQA8, 4, sparsity_kw=dict(attn_density=0.5), routers=random_routers(GQA8),
        via_generate=True, fuse=True)
  opt_r = random_routers(OPT)
  opt_r.mlp_topk = {8: (40, 24)}                                  # neuron budgets per layer (N = 128)
  check("opt tp2 router+neurons", OPT, 2, sparsity_kw=dict(attn_density=0.5, mlp="router"), routers=opt_r)
  check_stream("stream gqa tp2 dense", GQA, 2)
  check_stream("stream gqa dp2 tp2 router", GQA, 2, dp=2, sparsity_kw=dict(attn_density=0.5), routers=gqa_r)


def check_errors():
  # Balanced per-shard selection differs from a global top-k in general.
  scores = jnp.array([[0.9, 0.8, 0.1, 0.2]])
  assert sharding.balanced_topk(scores, 2, 2).tolist() == [[0, 3]]
  assert sorted(sharding.balanced_topk(scores, 2, 1)[0].tolist()) == [0, 1]
  # Non-divisible KV groups: a clear error.
  try:
    sharding.shard_model(init_model(GQA), sharding.make_mesh(tp=8))
  except ValueError as e:
    assert "KV" in str(e), e
  else:
    raise AssertionError("tp=8 over 4 KV groups did not raise")
  print("OK errors", flush=True)


def main_multi():
  assert jax.process_count() == 2 and len(jax.devices()) == 4, (jax.process_count(), jax.devices())
  routers = random_routers(GQA8)
  check("multi gqa8 tp4 dense", GQA8, 4, via_generate=True)
  check("multi gqa8 tp4 router", GQA8, 4, sparsity_kw=dict(attn_density=0.5), routers=routers, via_generate=True)
  check_stream("multi stream gqa8 tp4 router", GQA8, 4, sparsity_kw=dict(attn_density=0.5), routers=routers)
  # dp over the two processes: the sampled tokens are not process-local (stream gathers them, as generate does)
  check_stream("multi stream gqa dp2 tp2 router", GQA, 2, dp=2, sparsity_kw=dict(attn_density=0.5),
               routers=random_routers(GQA))


if __name__ == "__main__":
  main_single(sys.argv[2] if len(sys.argv) > 2 else "a") if MODE == "single" else main_multi()
  print("DONE", flush=True)
