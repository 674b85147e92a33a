"""The 8-bit KV cache end to end on a tiny model: teacher-forced logits near the float cache's (bounded by the
quantisation step), greedy `generate` tokens, the fused decode path's Pallas kernels (interpret mode) equal to its
XLA references, the engine (contiguous and paged, whole and chunked prefills) equal to `generate`, page sizes, and
the settings it refuses."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LLAMA_GQA as CFG
from pallas_kernels import kv_quant
from polar_jax import DecodeOptions
from polar_jax import generation as gen
from polar_jax.fusion import fuse_projections
from polar_jax.kv_cache import KVCache, QuantizedKV, storage_dtype
from polar_jax.model import init_model
from polar_jax.paged_kv_cache import PagedKVCache, PagedLayout
from polar_jax.serving import Engine, EngineOptions, SamplingParams

KV8 = ("int8", "float8_e4m3fn")
# Largest error of one stored element as a fraction of its vector's largest magnitude: half an int8 step, or
# float8 e4m3's relative rounding (3 mantissa bits).
STEP = {"int8": 0.5 / 127, "float8_e4m3fn": 2.0 ** -4}


@pytest.fixture(scope="module")
def model():
  return init_model(CFG, seed=3)


def _teacher_forced(model, kv_dtype, options=DecodeOptions(), B=3, T=9, steps=6):
  """Logits `[steps + 1, B, V]` of a prefill and `steps` decode steps over fixed tokens."""
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T + steps)), jnp.int32)
  cache = KVCache.init(model.config, B, T + steps + 1, model.dtype, kv_dtype)
  logits, cache = model.prefill(toks[:, :T], jnp.asarray([T, 5, 2][:B], jnp.int32), cache)
  out = [logits]
  for i in range(steps):
    logits, cache = model.decode_step(toks[:, T + i], cache, options=options)
    out.append(logits)
  return np.stack(out), cache


def test_logits_within_the_quantisation_step(model):
  """Every K/V element is stored within STEP of its vector's largest magnitude; the attention outputs are convex
  combinations of the values, so the logits move by about that fraction of their own scale: at most
  STEP * max|logits|. The float8 error (coarser step) exceeds the int8 one; the greedy choices agree."""
  ref, _ = _teacher_forced(model, None)
  errors = {}
  for kv in KV8:
    out, cache = _teacher_forced(model, kv)
    assert isinstance(cache.k_bhsd[0], QuantizedKV) and cache.kv_dtype == jnp.dtype(kv)
    errors[kv] = np.abs(out - ref).max()
    assert 0 < errors[kv] <= STEP[kv] * np.abs(ref).max()
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
  assert errors["int8"] < errors["float8_e4m3fn"]


def test_cache_bytes_halve():
  """An 8-bit cache holds D + 4 bytes per (token, group) against 2 D in bfloat16: contiguous, paged, a page."""
  ratio = (CFG.head_dim + 4) / (2 * CFG.head_dim)
  contiguous8 = KVCache.init(CFG, 2, 64, jnp.bfloat16, "int8")
  assert contiguous8.nbytes() == KVCache.init(CFG, 2, 64, jnp.bfloat16).nbytes() * ratio
  layout = PagedLayout(16, 5, 2)
  paged8 = PagedKVCache.init(CFG, 2, layout, jnp.bfloat16, "float8_e4m3fn")
  assert isinstance(paged8.k_hpsd[0], QuantizedKV) and paged8.kv_dtype == jnp.float8_e4m3fn
  assert paged8.nbytes() == PagedKVCache.init(CFG, 2, layout, jnp.bfloat16).nbytes() * ratio
  assert layout.page_bytes(CFG, jnp.bfloat16, "int8") == layout.page_bytes(CFG, jnp.bfloat16) * ratio


@pytest.mark.parametrize("kv_dtype", KV8)
def test_generate_greedy_tokens(model, kv_dtype):
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 11, 2)]
  base = gen.generate(model, prompts, max_new_tokens=8)
  out = gen.generate(model, prompts, max_new_tokens=8, options=DecodeOptions(kv_dtype=kv_dtype))
  np.testing.assert_array_equal(out.tokens, base.tokens)
  streamed = np.stack(list(gen.stream(model, prompts, max_new_tokens=8, options=DecodeOptions(kv_dtype=kv_dtype))),
                      axis=1)
  np.testing.assert_array_equal(streamed, out.tokens[:, :streamed.shape[1]])


@pytest.mark.parametrize("kv_dtype", ["int8", pytest.param("float8_e4m3fn", marks=pytest.mark.slow)])
def test_fused_step_pallas_equals_xla(kv_dtype):
  """The fused decode step (rope_append quantising, the decode attention kernel dequantising; interpret mode)
  against its XLA references: the same caches up to a rounding step, logits within bf16-level attention error."""
  cfg = dataclasses.replace(CFG, num_heads=4, num_kv_heads=2, head_dim=16)
  fused = fuse_projections(init_model(cfg, seed=4))
  ref, ref_cache = _teacher_forced(fused, kv_dtype, DecodeOptions(kernels="xla"), steps=2)
  out, cache = _teacher_forced(fused, kv_dtype, DecodeOptions(kernels="pallas"), steps=2)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  back = lambda c: np.asarray(c.dequantise(jnp.float32))   # noqa: E731
  np.testing.assert_allclose(back(cache.k_bhsd[1]), back(ref_cache.k_bhsd[1]), rtol=0,
                             atol=2 * STEP[kv_dtype] * np.abs(back(ref_cache.k_bhsd[1])).max())


@pytest.mark.parametrize("layout,chunk", [("contiguous", None), ("paged", None),
                                          pytest.param("paged", 8, marks=pytest.mark.slow)])
def test_engine_equals_generate(model, layout, chunk):
  """The engine's 8-bit slots (prompts quantised as `generate`'s prefill writes them, inserted or written a chunk at
  a time) give `generate`'s greedy tokens. A chunked prefill attends over the dequantised prefix: the tokens agree
  here, where the float cache's logits margins exceed the quantisation step."""
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (4, 13, 3)]
  ref = gen.generate(model, prompts, max_new_tokens=6, options=DecodeOptions(kv_dtype="int8"))
  opts = EngineOptions(kv_layout=layout, kv_dtype="int8", steps_per_round=2, warmup=False, prefill_chunk=chunk,
                       step_rows=(1,) if layout == "paged" else None)   # paged: rounds of 1 or 2 rows
  with Engine(model, max_batch=2, max_len=32, engine_options=opts) as eng:
    cache = eng._slots.cache   # pylint: disable=protected-access
    assert isinstance((cache.k_bhsd if layout == "contiguous" else cache.k_hpsd)[0], QuantizedKV)
    outs = eng.generate(prompts, SamplingParams(max_tokens=6))
  for i, o in enumerate(outs):
    assert list(o.token_ids) == ref.tokens[i, :ref.lengths[i]].tolist()


def test_refused_settings_name_the_problem(model):
  with pytest.raises(ValueError, match="differ"):
    Engine(model, max_batch=2, max_len=32, options=DecodeOptions(kv_dtype="int8"),
           engine_options=EngineOptions(kv_layout="contiguous", kv_dtype="float8_e4m3fn", warmup=False))
  with pytest.raises(ValueError, match="kv_dtype must be one of"):
    DecodeOptions(kv_dtype="int4")
  with pytest.raises(ValueError, match="kv_dtype must be one of"):
    EngineOptions(kv_dtype="fp8")
  with pytest.raises(ValueError, match="stored in the model's dtype"):
    storage_dtype(jnp.float32, "bfloat16")
  assert storage_dtype(jnp.bfloat16, "bfloat16") == jnp.bfloat16 and storage_dtype(jnp.float32, None) == jnp.float32
  assert kv_quant.is_8bit(storage_dtype(jnp.float32, "float8_e4m3fn"))
