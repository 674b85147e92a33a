"""Chunked prefill in the serving engine: prompts longer than `EngineOptions.prefill_chunk` are prefilled chunk by
chunk into their slot while running requests keep decoding; their greedy tokens equal `generate` for the prompt
alone (dense and head-sparse), nothing compiles after warm-up, and a cancelled chunked prefill frees its slot."""


import numpy as np
import pytest

from polar_jax.serving import Engine, EngineOptions, SamplingParams, programs, scheduler
from polar_jax.sparsity import SparsityConfig
from test_serving_engine import (CFG, MAX_BATCH, MAX_LEN, REF_TOKENS, _prompts, _reference, random_routers,
                                 staggered, wait_idle)

CHUNK = 6   # prompts of 7..20 tokens take 2 to 4 chunks


def _opts(**kw):
  return EngineOptions(steps_per_round=3, prefill_rows=2, prefill_chunk=CHUNK, **kw)


@pytest.fixture(scope="module")
def chunked(model):
  eng = Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=_opts())
  yield eng
  eng.shutdown()


@pytest.fixture(scope="module")
def model():
  from polar_jax.model import init_model
  return init_model(CFG, seed=1)


def _mixed_staggered(engine, prompts, max_tokens):
  """A short request runs first; the rest (long and short) arrive in small groups while it decodes."""
  return staggered(engine, prompts, max_tokens, first=1, group=2, pause_s=lambda i: 0.02 * (i % 3), timeout=300)


def _mixed_prompts(seed, n):
  """The first prompt short, the others of mixed lengths, at least half of them longer than a chunk."""
  short = _prompts(seed, 1, 2, CHUNK)
  rest = _prompts(seed + 1, n - 1, 1, 20)
  rest[::2] = _prompts(seed + 2, len(rest[::2]), CHUNK + 1, 20)
  return short + rest


def test_chunked_prompts_equal_generate_alone_with_no_compilation(model, chunked):
  assert chunked.chunk == CHUNK and chunked.prefill_shapes == ((1, 16), (2, 16))   # bucketed prefill: short only
  before = dict(programs.TRACE_COUNTS)
  prompts = _mixed_prompts(20, 9)
  max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
  outs = _mixed_staggered(chunked, prompts, max_tokens)
  assert programs.TRACE_COUNTS == before
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]
  assert chunked.stats()["running"] == 0 and chunked.stats()["prefilling"] == 0
  # prefill + insert per shape, first per rows, a chunk per key span, step, page-table setter
  assert chunked.chunk_spans == (6, 12, 24, 32)
  assert chunked.compiled_programs == 2 * 2 + 2 + 4 + 1 + 1


def test_several_chunks_per_round_equal_generate_alone(model):
  """`prefill_chunks_per_round=3`: up to three chunks (of one long prompt, then the next) between decode rounds, the
  same tokens as `generate` for each prompt alone."""
  opts = _opts(prefill_chunks_per_round=3, prefill_chunks_backlog=1, prefill_key_spans=1)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=opts) as eng:
    chunks_at_round = []
    chunk, round_ = eng._chunk, eng._round
    eng._chunk = lambda *a, **kw: chunks_at_round.append(None) or chunk(*a, **kw)
    eng._round = lambda *a, **kw: chunks_at_round.append("round") or round_(*a, **kw)
    prompts = _mixed_prompts(21, 9)
    max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
    outs = _mixed_staggered(eng, prompts, max_tokens)
  runs = [len(run) for run in "".join("r" if c == "round" else "c" for c in chunks_at_round).split("r")]
  assert max(runs) >= 2 and max(runs) <= 3, runs   # several chunks between two rounds, never more than three
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]


def _chunk_runs(eng):
  """Counts the chunks each scheduler round prefills; returns a function listing the counts of rounds with any."""
  events = []
  chunk, chunks = eng._chunk, eng._next_chunks
  eng._chunk = lambda *a, **kw: events.append("c") or chunk(*a, **kw)
  eng._next_chunks = lambda: events.append("|") or chunks()
  return lambda: [len(run) for run in "".join(events).split("|") if run]


def test_a_backlog_gets_more_chunks_per_round(model):
  """`prefill_chunks_backlog=3`: one chunk a round for a long prompt while nothing else waits, up to three while
  long prompts wait for free slots; the same tokens as `generate` for each prompt alone."""
  opts = _opts(prefill_chunks_per_round=1, prefill_chunks_backlog=3, prefill_key_spans=1)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=opts) as eng:
    runs = _chunk_runs(eng)
    runner = eng.submit([5, 6, 7], SamplingParams(max_tokens=MAX_LEN - 4, ignore_eos=True))
    next(iter(runner))
    alone = eng.submit(list(range(1, 21)), SamplingParams(max_tokens=2))   # 4 chunks, nothing else waiting
    alone.result(timeout=120)
    lone_runs = runs()
    assert lone_runs and max(lone_runs) == 1, lone_runs
    runner.result(timeout=120)
    wait_idle(eng)
    prompts = _prompts(40, 3, 3 * CHUNK + 1, 20)   # three long prompts at once: two wait behind the first
    max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
    handles = [eng.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts, max_tokens)]
    outs = [h.result(timeout=120) for h in handles]
    backlog_runs = runs()[len(lone_runs):]
  assert max(backlog_runs) == 3, backlog_runs
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]


def test_running_requests_decode_between_chunks(chunked):
  runner = chunked.submit([5, 6, 7], SamplingParams(max_tokens=MAX_LEN - 4, ignore_eos=True))
  next(iter(runner))
  long = chunked.submit(list(range(1, 21)), SamplingParams(max_tokens=2))   # 4 chunks
  long.result(timeout=120)
  runner.result(timeout=120)
  between = [t for t in runner.token_times_s if long.admitted_s < t < long.first_token_s]
  assert len(between) >= 2   # tokens arrived while the long prompt was still being prefilled


def test_cancelled_chunked_prefill_frees_its_slot(model, chunked):
  long = chunked.submit(list(range(1, 21)), SamplingParams(max_tokens=4))
  long.cancel()
  assert long.result(timeout=60).finish_reason == "cancelled"
  prompt = _prompts(21, 1, CHUNK + 1, 20)[0]
  outs = chunked.generate([prompt] * MAX_BATCH, SamplingParams(max_tokens=REF_TOKENS))   # every slot in use
  assert all(list(o.token_ids) == _reference(model, [prompt])[0] for o in outs)
  wait_idle(chunked)
  assert chunked.stats()["running"] == 0 and chunked.stats()["prefilling"] == 0


@pytest.mark.slow
def test_chunked_prompts_with_head_sparsity_equal_generate_alone(model):
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(), selector="router", seed=3)
  routers = random_routers(CFG)
  prompts = _mixed_prompts(30, 7)
  max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, routers=routers,
              engine_options=_opts(sparse_min_rows=1, prefill_key_spans=1)) as eng:
    outs = _mixed_staggered(eng, prompts, max_tokens)
    assert eng.stats()["variant_rounds"].get("dense", 0) == 0
  for ref, m, out in zip(_reference(model, prompts, sparsity=sparsity, routers=routers), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]


def test_chunk_scheduling():
  assert scheduler.chunk_size(32, 8) == 8 and scheduler.chunk_size(32, 31) is None
  assert scheduler.chunk_size(32, None) is None
  assert scheduler.prefill_shapes(64, 1, 8192, 16) == ((1, 16),)
  # long prompts are left to the chunk lane; the bucketed prefill takes the oldest short prompt's bucket
  assert scheduler.take_prefill_group([20, 3, 25, 5], 4, max_len=32, prefill_rows=4, prefill_max_tokens=8192,
                                      chunk=8) == ([1, 3], 16)
  assert scheduler.take_chunked([3, 20, 25], 2, 8, lane_busy=False) == 1
  assert scheduler.take_chunked([3, 20, 25], 2, 8, lane_busy=True) is None
  assert scheduler.take_chunked([3, 20, 25], 0, 8, lane_busy=False) is None
  assert scheduler.take_chunked([3, 5], 2, 8, lane_busy=False) is None
  # key spans of the chunk programs: the chunk doubled up to max_len, the largest `count` kept
  assert scheduler.chunk_spans(4096, 512, 4) == (512, 1024, 2048, 4096)
  assert scheduler.chunk_spans(4096, 512, 2) == (2048, 4096) and scheduler.chunk_spans(4096, 512, 1) == (4096,)
  assert scheduler.chunk_spans(2500, 512, 8) == (512, 1024, 2048, 2500) and scheduler.chunk_spans(64, None, 4) == ()
  assert [scheduler.span_for(e, (512, 1024, 2048, 4096)) for e in (1, 512, 513, 2049)] == [512, 512, 1024, 4096]


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_a_chunk_over_its_key_span_equals_one_over_the_whole_row(model, layout):
  """The second chunk of a prompt attending over keys [0, 16) of a 32-token row: the same logits and cache as over
  the whole row (the keys past the chunk are masked either way), and a span outside the row is refused."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from polar_jax.kv_cache import KVCache
  from polar_jax.paged_kv_cache import PagedKVCache, PagedLayout
  from polar_jax.serving.chunked_prefill import prefill_chunk
  if layout == "contiguous":
    cache = KVCache.init(CFG, 2, MAX_LEN, model.dtype)
  else:
    cache = PagedKVCache.init(CFG, 2, PagedLayout(16, 4, 2), model.dtype)
    cache = dataclasses.replace(cache, page_table_bp=jnp.array([[3, 0], [2, 1]], jnp.int32))
  tokens = jax.random.randint(jax.random.key(0), (2, CHUNK), 0, CFG.vocab_size)
  _, cache = prefill_chunk(model, tokens[0], 0, CHUNK, cache, 1)
  whole = prefill_chunk(model, tokens[1], CHUNK, CHUNK - 1, cache, 1)
  span = prefill_chunk(model, tokens[1], CHUNK, CHUNK - 1, cache, 1, key_span=16)
  eps = float(jnp.finfo(model.dtype).eps)
  for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(span)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=16 * eps, atol=16 * eps)
  with pytest.raises(ValueError, match="key_span"):
    prefill_chunk(model, tokens[1], CHUNK, CHUNK, cache, 1, key_span=MAX_LEN + 1)


@pytest.mark.parametrize("block", [None, 3])
def test_chunk_attention_matches_whole_prompt_attention(block):
  import jax
  import jax.numpy as jnp
  from polar_jax.attention import prefill_attention
  from polar_jax.serving.chunked_prefill import SCORE_BUDGET, chunk_attention, write_chunk
  t, hq, hkv, d, s, c = 11, 4, 2, 8, 16, 4
  # a score budget of `block` query rows: each chunk's queries go in blocks
  budget = SCORE_BUDGET if block is None else block * hq * s
  q, k, v = (jax.random.normal(jax.random.key(i), (t, h, d), jnp.float32) for i, h in enumerate((hq, hkv, hkv)))
  whole = prefill_attention(q[None], k[None], v[None], jnp.array([t]), scale=0.3)[0]
  cache_k = cache_v = jnp.zeros((3, hkv, s, d), jnp.float32)
  parts = []
  for start in range(0, t, c):
    pad = lambda x: jnp.zeros((c,) + x.shape[1:], x.dtype).at[:min(c, t - start)].set(x[start:start + c])  # noqa
    cache_k = write_chunk(cache_k, pad(k), 1, start)
    cache_v = write_chunk(cache_v, pad(v), 1, start)
    parts.append(chunk_attention(pad(q), cache_k[1], cache_v[1], start, scale=0.3,
                                 score_budget=budget)[:min(c, t - start)])
  assert not np.asarray(cache_k[0]).any() and not np.asarray(cache_k[2]).any()   # other rows untouched
  np.testing.assert_allclose(np.asarray(cache_k[1, :, :t]), np.asarray(k).transpose(1, 0, 2))
  eps = float(jnp.finfo(jnp.float32).eps)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(parts)), np.asarray(whole), rtol=64 * eps, atol=64 * eps)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "sliding_window"])
def test_chunked_prompts_of_other_families_equal_generate_alone(family):
  """OPT (learned positions with their offset, biases, LayerNorm) and a sliding window shorter than the prompts."""
  import dataclasses

  from conftest import LLAMA_GQA, OPT
  from polar_jax.model import init_model
  config = OPT if family == "opt" else dataclasses.replace(LLAMA_GQA, model_type="mistral", sliding_window=5)
  model = init_model(config, seed=2)
  prompts = _mixed_prompts(60, 5)
  max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
  spans = {"prefill_key_spans": 2}   # chunks over 24 keys, then the whole row's 32
  opts = _opts(kv_layout="contiguous", **spans) if family == "sliding_window" else _opts(**spans)   # paged: no window
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=opts) as eng:
    outs = _mixed_staggered(eng, prompts, max_tokens)
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]
