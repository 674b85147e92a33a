"""The continuous-batching engine on a tiny model: outputs equal `generate` under staggered arrivals (dense and
head-sparse), per-request seeds, stop tokens, cancellation, queue limits, no compilation after warm-up."""

import asyncio
import time

import numpy as np
import pytest

from polar_jax import generation as gen
from polar_jax.config import ModelConfig
from polar_jax.model import init_model
from polar_jax.routers import Routers
from polar_jax.serving import (Engine, EngineClosedError, EngineOptions, QueueFullError, SamplingParams,
                               programs, scheduler)
from polar_jax.sparsity import SparsityConfig

CFG = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=128)
MAX_LEN = 32     # length buckets 16 and 32
REF_TOKENS = 12  # every reference is one `generate` call with this many tokens (one compile per bucket)
MAX_BATCH = 4


@pytest.fixture(scope="module")
def model():
  return init_model(CFG, seed=1)


@pytest.fixture(scope="module")
def engine(model):
  eng = Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN,
               engine_options=EngineOptions(steps_per_round=3, prefill_rows=2))
  yield eng
  eng.shutdown()


def _prompts(seed, n, lo=1, hi=20):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, CFG.vocab_size, int(k)).tolist() for k in rng.integers(lo, hi + 1, n)]


def _reference(model, prompts, **kw):
  """Each prompt's greedy tokens from `generate` (a ragged batch decodes each row as it would alone)."""
  out = gen.generate(model, prompts, max_new_tokens=REF_TOKENS, **kw)
  return [out.tokens[i, :out.lengths[i]].tolist() for i in range(len(prompts))]


def wait_idle(engine, timeout_s=30):
  """Returns once no slot is in use (or after `timeout_s`; the caller's assertions then fail)."""
  deadline = time.time() + timeout_s
  while engine.stats()["running"] and time.time() < deadline:
    time.sleep(0.01)


def staggered(engine, prompts, max_tokens, *, first=2, group=3, pause_s=lambda i: 0.01 * (i % 2), timeout=120):
  """Submits `first` requests, waits until the first has a token, then the rest in groups of `group` (pausing
  `pause_s(i)` after the group from prompt i) while others run (more requests than slots: some wait for a slot)."""
  handles = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts[:first], max_tokens[:first])]
  next(iter(handles[0]))
  for i in range(first, len(prompts), group):
    handles += [engine.submit(p, SamplingParams(max_tokens=m))
                for p, m in zip(prompts[i:i + group], max_tokens[i:i + group])]
    time.sleep(pause_s(i))
  return [h.result(timeout=timeout) for h in handles]


@pytest.mark.slow
def test_staggered_requests_equal_generate_alone(model, engine):
  prompts = _prompts(0, 9)
  max_tokens = [int(m) for m in np.random.default_rng(1).integers(1, REF_TOKENS + 1, len(prompts))]
  outs = staggered(engine, prompts, max_tokens)
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert out.finish_reason == "length"
    assert list(out.token_ids) == ref[:m]
  assert engine.stats()["running"] == 0


def random_routers(config, seed=0, scale=3.0):
  """Head routers with random weights (selections that differ across rows, layers and steps)."""
  r = Routers.init(config, seed=seed)
  r.head.w_ldg[...] = (scale * np.random.default_rng(seed).standard_normal(r.head.w_ldg.shape)).astype(np.float32)
  return r


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["random", "oracle", "router"])
def test_head_sparse_requests_equal_generate_alone(model, selector):
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(), selector=selector, seed=3)
  routers = random_routers(CFG) if selector == "router" else None
  prompts = _prompts(2, 7)
  max_tokens = [int(m) for m in np.random.default_rng(3).integers(4, REF_TOKENS + 1, len(prompts))]
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, routers=routers,
              engine_options=EngineOptions(steps_per_round=3, prefill_rows=2, sparse_min_rows=1)) as eng:
    assert set(eng.variants) == {"dense", "sparse"}
    assert eng.variants["sparse"].attention_density == 0.5
    outs = staggered(eng, prompts, max_tokens)
    rounds = eng.stats()["variant_rounds"]
  assert rounds.get("sparse", 0) > 0 and rounds.get("dense", 0) == 0
  sparse_ref = _reference(model, prompts, sparsity=sparsity, routers=routers)
  for ref, m, out in zip(sparse_ref, max_tokens, outs):
    assert list(out.token_ids) == ref[:m]
  dense_ref = _reference(model, prompts)
  assert any(list(o.token_ids) != d[:m] for o, d, m in zip(outs, dense_ref, max_tokens))   # sparsity did something


@pytest.mark.slow
def test_sparse_variant_runs_only_from_the_row_threshold(model):
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(), selector="random", seed=3)   # compiled above
  prompts = _prompts(11, 4, 3, 10)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity,
              engine_options=EngineOptions(steps_per_round=3, prefill_rows=2, sparse_min_rows=3,
                                           page_size=16)) as eng:   # small pages: the 4 rows run at once
    alone = eng.generate(prompts[:1], SamplingParams(max_tokens=REF_TOKENS))[0]
    assert eng.stats()["variant_rounds"].get("sparse", 0) == 0
    assert list(alone.token_ids) == _reference(model, prompts[:1])[0]    # dense below the threshold
    eng.generate(prompts, SamplingParams(max_tokens=REF_TOKENS))
    rounds = eng.stats()["variant_rounds"]
    density = eng.metrics.registry.get_sample_value("polar:attention_density", {"model_name": "polar"})
  assert rounds["sparse"] > 0 and rounds["dense"] > 0
  assert 0.5 < density < 1.0   # row-steps at density 0.5 (sparse rounds) and 1 (dense ones)


def test_step_variant_table():
  variants = {"dense": scheduler.StepVariant("dense", None, None, 1.0, 0.0),
              "sparse": scheduler.StepVariant("sparse", None, None, 0.5, 0.0)}
  by_rows = [scheduler.choose_variant(n, variants, sparse_min_rows=8).name for n in (0, 1, 7, 8, 32)]
  assert by_rows == ["dense"] * 3 + ["sparse"] * 2
  assert scheduler.choose_variant(1, {"dense": variants["dense"]}, sparse_min_rows=1).name == "dense"
  assert scheduler.choose_variant(8, variants).name == "dense"   # no table, no threshold: nothing says sparse pays
  assert EngineOptions().sparse_min_rows is None and EngineOptions().cost_table == "measure"


def test_buckets_and_prefill_groups():
  assert scheduler.length_buckets(32) == (16, 32)
  assert scheduler.length_buckets(40) == (16, 32, 40)
  assert scheduler.prefill_shapes(32, 2, 8192) == ((1, 16), (2, 16), (1, 32), (2, 32))
  assert scheduler.prefill_shapes(64, 4, 64) == ((1, 16), (2, 16), (4, 16), (1, 32), (2, 32), (1, 64))
  # the oldest prompt's bucket, then younger prompts of that bucket, up to rows / free slots / token budget
  assert scheduler.take_prefill_group([20, 3, 25, 30, 17], 8, max_len=32, prefill_rows=2,
                                      prefill_max_tokens=8192) == ([0, 2], 32)
  assert scheduler.take_prefill_group([3, 20, 5], 1, max_len=32, prefill_rows=4, prefill_max_tokens=8192) == ([0], 16)
  assert scheduler.take_prefill_group([3, 5], 4, max_len=32, prefill_rows=4, prefill_max_tokens=16) == ([0], 16)
  assert scheduler.take_prefill_group([], 4, max_len=32, prefill_rows=4, prefill_max_tokens=16) == ([], 0)


def test_no_compilation_after_warmup_over_many_requests(engine):
  before = dict(programs.TRACE_COUNTS)
  rng = np.random.default_rng(4)
  prompts = _prompts(5, 30)
  params = [SamplingParams(max_tokens=int(rng.integers(1, MAX_LEN - len(p) + 1)),
                           temperature=float(rng.choice([0.0, 0.7])), top_k=int(rng.integers(1, 50)),
                           top_p=float(rng.uniform(0.5, 1.0)), seed=i) for i, p in enumerate(prompts)]
  outs = engine.generate(prompts, params)
  assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
  assert programs.TRACE_COUNTS == before
  # prefill + insert per (rows, bucket), first token per rows, step, the paged cache's page-table setter
  assert engine.compiled_programs == 2 * 4 + 2 + 1 + 1


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
  p = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=7)
  prompt = _prompts(6, 1)[0]
  alone = engine.generate([prompt], p)[0].token_ids
  crowd = engine.generate(_prompts(7, 3) + [prompt], [SamplingParams(max_tokens=8, temperature=1.0, seed=1)] * 3 + [p])
  assert crowd[-1].token_ids == alone
  other = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=8))
  assert other[0].token_ids != alone


def test_stop_tokens_and_one_token_requests(model, engine):
  prompt = _prompts(8, 1, 5, 10)[0]
  free = _reference(model, [prompt])[0]
  stop = free[4]
  n = free.index(stop) + 1
  out = engine.generate([prompt], SamplingParams(max_tokens=REF_TOKENS, stop_token_ids=(stop,)))[0]
  assert out.finish_reason == "stop" and list(out.token_ids) == free[:n]
  first = engine.generate([prompt], SamplingParams(max_tokens=5, stop_token_ids=(free[0],)))[0]
  assert first.finish_reason == "stop" and list(first.token_ids) == free[:1]
  one = engine.generate([prompt], SamplingParams(max_tokens=1))[0]
  assert one.finish_reason == "length" and list(one.token_ids) == free[:1]


def test_async_iteration_yields_every_token(model, engine):
  prompt = _prompts(9, 1)[0]

  async def collect():
    h = engine.submit(prompt, SamplingParams(max_tokens=REF_TOKENS))
    return [t async for t in h]

  assert asyncio.run(collect()) == _reference(model, [prompt])[0]


def test_cancel_frees_the_slot_for_a_waiting_request(model, engine):
  prompts = _prompts(10, MAX_BATCH + 1, 3, 10)
  long = [engine.submit(p, SamplingParams(max_tokens=MAX_LEN - 10, ignore_eos=True)) for p in prompts[:MAX_BATCH]]
  waiting = engine.submit(prompts[-1], SamplingParams(max_tokens=REF_TOKENS))
  next(iter(long[0]))
  long[0].cancel()
  out = long[0].result(timeout=60)
  assert out.finish_reason == "cancelled" and len(out.token_ids) < MAX_LEN - 10
  assert list(waiting.result(timeout=60).token_ids) == _reference(model, [prompts[-1]])[0]
  for h in long[1:]:
    h.cancel()
  wait_idle(engine)
  stats = engine.stats()
  assert (stats["running"], stats["waiting"], stats["prefilling"]) == (0, 0, 0)
  assert stats["compiled_programs"] == engine.compiled_programs and stats["cost_table"] is None   # dense engine


def test_bad_requests_name_the_problem(engine):
  with pytest.raises(ValueError, match="non-empty"):
    engine.submit([], SamplingParams())
  with pytest.raises(ValueError, match="outside the vocabulary"):
    engine.submit([1, CFG.vocab_size], SamplingParams())
  with pytest.raises(ValueError, match="exceeds the engine's max_len"):
    engine.submit([1] * 20, SamplingParams(max_tokens=13))
  for kwargs, match in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                        (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"), (dict(seed=2**40), "seed")]:
    with pytest.raises(ValueError, match=match):
      SamplingParams(**kwargs)


def test_full_queue_then_shutdown(model):
  opts = EngineOptions(max_waiting=1, steps_per_round=3)   # the module engine's shapes: nothing compiles
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=opts) as eng:
    handles = []
    with pytest.raises(QueueFullError, match="waiting queue is full"):
      for _ in range(MAX_BATCH + 1 + 1):   # slots + queue + one more
        handles.append(eng.submit([1, 2, 3], SamplingParams(max_tokens=MAX_LEN - 3, ignore_eos=True)))
    assert len(handles) <= MAX_BATCH + 1
    eng.shutdown()
    assert all(h.result(timeout=30).finish_reason in ("cancelled", "length") for h in handles)
    with pytest.raises(EngineClosedError):
      eng.submit([1, 2], SamplingParams())
