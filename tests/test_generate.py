"""Generation: ragged batches, per-row stopping, samplers, streaming, compile counts, errors."""

import jax
import numpy as np
import pytest

from conftest import LLAMA_GQA as CFG
from polar_jax import generation as gen
from polar_jax.model import forward, init_model
from polar_jax.sampling import Chain, Greedy, Temperature, TopK, TopP


@pytest.fixture(scope="module")
def model():
  return init_model(CFG, seed=3)


def _prompts(seed=0, lengths=(5, 11, 2, 17)):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def test_ragged_batch_equals_each_prompt_alone(model):
  prompts = _prompts()
  batch = gen.generate(model, prompts, max_new_tokens=10)
  for i, p in enumerate(prompts):
    alone = gen.generate(model, [p], max_new_tokens=10)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])


def test_left_and_right_padding_equal_ragged(model):
  prompts = _prompts(1)
  t = max(map(len, prompts))
  left = np.zeros((4, t), np.int32); lmask = np.zeros_like(left)
  right = np.zeros((4, t), np.int32); rmask = np.zeros_like(right)
  for i, p in enumerate(prompts):
    left[i, t - len(p):] = p; lmask[i, t - len(p):] = 1
    right[i, :len(p)] = p; rmask[i, :len(p)] = 1
  ragged = gen.generate(model, prompts, max_new_tokens=6).tokens
  np.testing.assert_array_equal(gen.generate(model, left, lmask, max_new_tokens=6).tokens, ragged)
  np.testing.assert_array_equal(gen.generate(model, right, rmask, max_new_tokens=6).tokens, ragged)


def test_greedy_matches_argmax_of_full_forward(model):
  prompt = _prompts(2, (9,))[0]
  out = gen.generate(model, [prompt], max_new_tokens=8).tokens[0]
  seq = np.zeros((1, 17), np.int32)                 # one compiled shape: right padding + mask
  seq[0, :9] = prompt
  for n in range(9, 17):
    logits = np.asarray(forward(model, seq, (np.arange(17) < n)[None]))
    seq[0, n] = logits[0, n - 1].argmax()
  assert out.tolist() == seq[0, 9:].tolist()


def test_per_row_stopping_pads_after_stop(model):
  prompts = _prompts(3)
  free = gen.generate(model, prompts, max_new_tokens=12).tokens
  stop = int(free[0, 3])                       # row 0 emits this at step 3 (or earlier)
  out = gen.generate(model, prompts, max_new_tokens=12, stop_tokens=(stop,))
  for i in range(len(prompts)):
    hits = np.flatnonzero(free[i] == stop)
    n = hits[0] + 1 if hits.size else 12
    assert out.lengths[i] == n
    np.testing.assert_array_equal(out.tokens[i, :n], free[i, :n])
    assert (out.tokens[i, n:] == stop).all()   # padded with the stop token (no pad id in the config)


def test_stream_yields_the_same_tokens(model):
  prompts = _prompts(4)
  ref = gen.generate(model, prompts, max_new_tokens=7).tokens
  steps = list(gen.stream(model, prompts, max_new_tokens=7))
  assert len(steps) == 7
  np.testing.assert_array_equal(np.stack(steps, axis=1), ref)


def test_same_buckets_do_not_recompile(model):
  gen.generate(model, _prompts(5, (3, 7, 9)), max_new_tokens=5)
  before = gen.TRACE_COUNTS["generate"]
  gen.generate(model, _prompts(6, (4, 12, 2)), max_new_tokens=5)            # same length/batch buckets
  gen.generate(model, _prompts(7, (8, 8, 8)), max_new_tokens=5, sampler=Temperature(0.5))
  gen.generate(model, _prompts(7, (8, 8, 8)), max_new_tokens=5, sampler=Temperature(0.9), seed=4)
  assert gen.TRACE_COUNTS["generate"] == before + 1                          # new sampler structure only
  gen.generate(model, _prompts(8, (40,)), max_new_tokens=5)                  # new length and batch bucket
  assert gen.TRACE_COUNTS["generate"] == before + 2


def test_samplers():
  logits = jax.random.normal(jax.random.key(0), (3, 50)) * 3
  key = jax.random.key(1)
  greedy = np.asarray(Greedy()(logits, key))
  np.testing.assert_array_equal(greedy, np.asarray(logits).argmax(-1))
  np.testing.assert_array_equal(np.asarray(TopK(1)(logits, key)), greedy)
  np.testing.assert_array_equal(np.asarray(TopP(1e-6)(logits, key)), greedy)
  # Per-row: row 0 greedy-like via k=1, others sample among their top 5.
  s = TopK([1, 5, 5]).per_row(3)
  draws = np.stack([np.asarray(s(logits, jax.random.key(i))) for i in range(40)])
  assert (draws[:, 0] == greedy[0]).all()
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  assert all(set(draws[:, r]) <= set(top5[r]) for r in (1, 2))
  assert len(set(draws[:, 1])) > 1
  # Top-p keeps the smallest set reaching p.
  probs = np.asarray(jax.nn.softmax(logits, -1))
  order = np.argsort(-probs[0]); need = int(np.searchsorted(np.cumsum(probs[0][order]), 0.6) + 1)
  kept = np.isfinite(np.asarray(TopP(0.6).process(logits)))[0]
  assert kept.sum() == need and kept[order[:need]].all()
  chain = TopK(5) | TopP(0.9) | Temperature(0.7)
  assert isinstance(chain, Chain) and len(chain.parts) == 3
  assert set(np.asarray(chain(logits, key)).tolist()) <= set(top5.ravel().tolist())


@pytest.mark.parametrize("bad, match", [
    (Temperature(0.0), "temperature must be > 0"), (TopK(0), "k >= 1"), (TopP(1.5), "0 < p <= 1")])
def test_bad_sampler_values(model, bad, match):
  with pytest.raises(ValueError, match=match):
    gen.generate(model, [[1, 2]], max_new_tokens=2, sampler=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=[], max_new_tokens=4), "empty batch"),
    (dict(input_ids=[[1, 2], []], max_new_tokens=4), "prompt 1 is empty"),
    (dict(input_ids=[[1, 2]], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(input_ids=[[1, 97]], max_new_tokens=2), r"out of the vocabulary \[0, 97\)"),
    (dict(input_ids=[[1] * 129], max_new_tokens=2), "longer than the model's context"),
    (dict(input_ids=[[1] * 100], max_new_tokens=40), r"exceeds the model's context \(128\)"),
    (dict(input_ids=np.ones((2, 3), int), attention_mask=np.ones((2, 4)), max_new_tokens=2), "shape"),
])
def test_errors_name_the_problem(model, kwargs, match):
  with pytest.raises(ValueError, match=match):
    gen.generate(model, **kwargs)


def test_buckets():
  assert [gen.length_bucket(n) for n in (1, 16, 17, 600, 1024, 1025, 2000)] == [16, 16, 32, 1024, 1024, 1536, 2048]
  assert [gen.batch_bucket(n) for n in (1, 3, 5, 17, 33, 65, 100)] == [1, 4, 8, 24, 48, 96, 128]


def test_prefill_in_row_groups_equals_whole_batch(model):
  from polar_jax.kv_cache import KVCache
  from polar_jax.model import prefill_group_rows
  assert prefill_group_rows(32, 2048, 16384) == 8 and prefill_group_rows(6, 100, 250) == 2
  assert prefill_group_rows(3, 6000, 16384) == 1 and prefill_group_rows(3, 5000, 16384) == 3
  batch = gen.prepare_batch(_prompts(9, (5, 11, 2, 17)), None, vocab_size=CFG.vocab_size, context=128,
                            max_new_tokens=4)
  tokens, lengths = jax.numpy.asarray(batch.tokens_bt), jax.numpy.asarray(batch.lengths_b)
  whole = model.prefill(tokens, lengths, KVCache.init(CFG, 4, batch.max_len, model.dtype))
  grouped = model.prefill(tokens, lengths, KVCache.init(CFG, 4, batch.max_len, model.dtype),
                          max_tokens=2 * tokens.shape[1])                   # 2 rows at a time
  # float32 rounding only (matmuls of another shape block differently)
  np.testing.assert_allclose(np.asarray(grouped[0]), np.asarray(whole[0]), rtol=1e-5, atol=1e-6)
  for a, b in zip(grouped[1].k_bhsd + grouped[1].v_bhsd, whole[1].k_bhsd + whole[1].v_bhsd):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_device_memory_does_not_grow_with_the_number_of_steps(model):
  """One compiled program: its temporary memory is the same for 8 and 512 decode steps at the same cache size, up
  to the [B, max_new_tokens] token buffer (the cache is preallocated, the loop carries fixed shapes)."""
  import jax.numpy as jnp
  from flax import nnx
  graphdef, state = nnx.split(model)
  b, max_len = 4, 1024
  decode, decode_state = gen.make_decoder(model, None, None, batch=b)

  def temp_bytes(n):
    lowered = gen._generate_program.lower(
        graphdef, state, jnp.zeros((b, 16), jnp.int32), jnp.full((b,), 16, jnp.int32), jnp.ones((b,), bool),
        gen.Greedy().per_row(b), jax.random.key(0), decode_state, max_new_tokens=n, max_len=max_len,
        stop_tokens=(), pad_id=0, decode=decode)
    mem = lowered.compile().memory_analysis()
    return mem.temp_size_in_bytes + mem.output_size_in_bytes

  small, large = temp_bytes(8), temp_bytes(512)
  assert 0 <= large - small <= 2 * b * (512 - 8) * 4 + 4096, (small, large)
