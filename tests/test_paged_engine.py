"""The serving engine on a paged KV cache (tiny model, CPU): greedy outputs equal `generate` for each prompt alone
(dense, head-sparse with routers, under preemption, with a shared prefix served from the prefix cache), every page
comes back when the requests end, and nothing compiles while requests come and go."""

import threading
import time

import numpy as np
import pytest

from polar_jax import generation as gen
from polar_jax.config import ModelConfig
from polar_jax.fusion import fuse_projections
from polar_jax.model import init_model
from polar_jax.paged_kv_cache import PagedLayout
from polar_jax.serving import Engine, EngineOptions, SamplingParams, programs, scheduler
from polar_jax.serving.pages import SlotPages
from polar_jax.sparsity import SparsityConfig
from test_serving_engine import CFG, _prompts, random_routers, staggered, wait_idle

MAX_LEN = 64        # 4 pages of 16 per row
MAX_BATCH = 4
PAGE_SIZE = 16      # small pages for the tiny model's short rows
NUM_PAGES = 8       # half of what 4 rows of max_len need: long requests run out and get preempted
REF_TOKENS = 40
LABELS = {"model_name": "polar"}


def _opts(**kw):
  return EngineOptions(steps_per_round=3, prefill_rows=2, prefill_chunk=16, page_size=PAGE_SIZE, num_pages=NUM_PAGES,
                       **kw)


@pytest.fixture(scope="module")
def model():
  return init_model(CFG, seed=1)


@pytest.fixture(scope="module")
def engine(model):
  eng = Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=_opts())
  yield eng
  eng.shutdown()


def _reference(model, prompts, **kw):
  out = gen.generate(model, prompts, max_new_tokens=REF_TOKENS, **kw)
  return [out.tokens[i, :out.lengths[i]].tolist() for i in range(len(prompts))]


def _sample(engine, name):
  return engine.metrics.registry.get_sample_value(f"polar:{name}", LABELS) or 0.0


def _assert_pages_back(engine):
  """Every page is free or only in the prefix cache (no request holds one)."""
  wait_idle(engine)
  pages = engine.pages
  assert pages.allocator.num_free + pages.cache.num_evictable() == pages.layout.num_pages
  assert not any(pages.held) and (pages.table_bp == pages.layout.trash_page).all()


def _staggered(engine, prompts, max_tokens):
  """One request first, the rest in pairs while it decodes."""
  return staggered(engine, prompts, max_tokens, first=1, group=2, pause_s=lambda i: 0.01 * (i % 3), timeout=300)


def test_paged_requests_equal_generate_with_preemption_and_no_compilation(model, engine):
  assert engine.pages.layout == PagedLayout(PAGE_SIZE, NUM_PAGES, MAX_LEN // PAGE_SIZE)
  before = dict(programs.TRACE_COUNTS)
  preempted = engine.stats()["preemptions"]
  prompts = _prompts(40, 9, 2, 30)
  max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]   # up to 4 pages each: 8 pages run out
  outs = _staggered(engine, prompts, max_tokens)
  assert programs.TRACE_COUNTS == before
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]   # tokens made before a preemption are not streamed again
  assert engine.stats()["preemptions"] > preempted
  assert _sample(engine, "num_preemptions_total") == engine.stats()["preemptions"]
  _assert_pages_back(engine)
  assert _sample(engine, "kv_pages_total") == NUM_PAGES


def test_row_buckets_equal_generate_with_preemption_and_no_compilation(model, engine):
  """Rounds over 1, 2 or 4 rows (the running ones gathered, free slots as padding) give the tokens `generate`
  gives each prompt alone, under preemption, with one compiled round per bucket and nothing compiled later."""
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, engine_options=_opts(step_rows=(1, 2))) as eng:
    assert eng.step_rows == (1, 2, 4)
    assert engine.step_rows == (MAX_BATCH,)
    assert eng.compiled_programs == engine.compiled_programs + 2   # a round for each smaller bucket
    buckets, bucket_rows = [], eng._bucket_rows
    eng._bucket_rows = lambda rows: buckets.append((len(rows), bucket_rows(rows))) or buckets[-1][1]
    before = dict(programs.TRACE_COUNTS)
    prompts = _prompts(41, 9, 2, 30)
    max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
    outs = _staggered(eng, prompts, max_tokens)
    assert programs.TRACE_COUNTS == before
    assert eng.stats()["preemptions"] > 0
    _assert_pages_back(eng)
    rounds, variant_rounds = eng.stats()["bucket_rounds"], eng.stats()["variant_rounds"]
    steps = {b: eng.metrics.registry.get_sample_value("polar:decode_bucket_steps_total", {**LABELS, "rows": str(b)})
             for b in eng.step_rows}
  assert set(rounds) <= {1, 2, 4} and {1, 2} <= set(rounds), rounds
  assert all((steps[b] or 0) > 0 for b in rounds) and sum(rounds.values()) == sum(variant_rounds.values())
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]
  sizes = {len(r) if r is not None else MAX_BATCH for _, r in buckets}
  assert {1, 2} <= sizes, sizes   # rounds ran in the smaller buckets too
  for n, r in buckets:
    if r is not None:
      assert len(set(r.tolist())) == len(r) >= n   # distinct slots: the rows and their padding


def test_row_bucket_sizes():
  assert scheduler.step_row_buckets(32, None, True) == (8, 16, 32)
  assert scheduler.step_row_buckets(96, None, True) == (24, 48, 96)
  assert scheduler.step_row_buckets(16, None, True) == (8, 16)
  assert scheduler.step_row_buckets(12, None, True) == (12,)
  assert scheduler.step_row_buckets(32, (3, 50), True) == (3, 32)
  assert scheduler.step_row_buckets(32, None, False) == (32,)
  assert [scheduler.row_bucket_of(n, (8, 16, 32)) for n in (0, 1, 8, 9, 32, 40)] == [8, 8, 8, 16, 32, 32]


def test_shared_prefix_is_prefilled_once(model, engine):
  rng = np.random.default_rng(41)
  prefix = rng.integers(0, CFG.vocab_size, 37).tolist()           # 2 full pages of 16, then 5 tokens
  first, second = (prefix + rng.integers(0, CFG.vocab_size, 4).tolist() for _ in range(2))
  params = SamplingParams(max_tokens=8)
  engine.generate([first], params)
  hits, queries, prefilled = (_sample(engine, n) for n in ("prefix_cache_hits_total", "prefix_cache_queries_total",
                                                           "prompt_tokens_total"))
  out = engine.generate([second], params)[0]
  assert _sample(engine, "prefix_cache_hits_total") - hits == 32
  assert _sample(engine, "prefix_cache_queries_total") - queries == len(second)
  assert _sample(engine, "prompt_tokens_total") - prefilled == len(second) - 32   # only the rest is prefilled
  assert list(out.token_ids) == _reference(model, [second])[0][:8]
  assert engine.stats()["pages_cached"] >= 2
  _assert_pages_back(engine)


def test_requests_whose_pages_hold_their_budget_run_together(model, engine):
  """Admission keeps pages free only for running requests that may still grow: four requests whose first pages
  hold their whole budget (2 pages each: the cache's 8) all run at once, and none is preempted."""
  wait_idle(engine)
  preempted = engine.stats()["preemptions"]
  prompts = _prompts(45, MAX_BATCH, 14, 14)
  params = SamplingParams(max_tokens=18)            # 14 + 17 written tokens: 2 pages of 16
  peak, done = [0], threading.Event()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], engine.stats()["running"])
      time.sleep(0.0005)

  watcher = threading.Thread(target=watch)
  watcher.start()
  try:
    outs = engine.generate(prompts, params)
  finally:
    done.set()
    watcher.join()
  assert peak[0] == MAX_BATCH and engine.stats()["preemptions"] == preempted
  for ref, out in zip(_reference(model, prompts), outs):
    assert list(out.token_ids) == ref[:18]
  _assert_pages_back(engine)


def test_seeded_request_samples_the_same_tokens_when_preempted(engine):
  rng = np.random.default_rng(44)
  prompt = rng.integers(0, CFG.vocab_size, 9).tolist()
  seeded = SamplingParams(max_tokens=50, temperature=0.9, top_k=40, seed=5, ignore_eos=True)
  alone = engine.generate([prompt], seeded)[0].token_ids
  preempted = engine.stats()["preemptions"]
  others = [rng.integers(0, CFG.vocab_size, 9).tolist() for _ in range(MAX_BATCH - 1)]
  long = SamplingParams(max_tokens=50, ignore_eos=True)
  crowd = engine.generate(others + [prompt], [long] * len(others) + [seeded])   # admitted last: preempted first
  assert engine.stats()["preemptions"] > preempted
  assert crowd[-1].token_ids == alone and len(alone) == 50
  _assert_pages_back(engine)


@pytest.mark.slow
def test_head_sparse_routers_under_paging_equal_generate():
  model = init_model(CFG, seed=1)
  fuse_projections(model)   # the fused q|k|v projection, its router programs, RoPE and the page write
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(), selector="router", seed=3)
  routers = random_routers(CFG)
  prompts = _prompts(42, 7, 2, 30)
  max_tokens = [min(REF_TOKENS, MAX_LEN - len(p)) for p in prompts]
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, routers=routers,
              engine_options=_opts(sparse_min_rows=1, step_rows=(2,))) as eng:   # rounds of 2 or 4 rows
    outs = _staggered(eng, prompts, max_tokens)
    assert eng.stats()["variant_rounds"].get("dense", 0) == 0 and eng.stats()["preemptions"] > 0
    _assert_pages_back(eng)
  refs = _reference(model, prompts, sparsity=sparsity, routers=routers)
  for ref, m, out in zip(refs, max_tokens, outs):
    assert list(out.token_ids) == ref[:m]
  dense = _reference(model, prompts)
  assert any(list(o.token_ids) != d[:m] for o, d, m in zip(outs, dense, max_tokens))   # sparsity did something


@pytest.mark.slow
def test_contiguous_layout_still_serves(model):
  prompts = _prompts(43, 5, 2, 30)
  max_tokens = [min(12, MAX_LEN - len(p)) for p in prompts]
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN,
              engine_options=_opts(kv_layout="contiguous")) as eng:
    assert eng.pages is None and "pages_used" not in eng.stats()
    outs = _staggered(eng, prompts, max_tokens)
  for ref, m, out in zip(_reference(model, prompts), max_tokens, outs):
    assert list(out.token_ids) == ref[:m]


def test_paged_options_and_requests_name_the_problem(model, engine):
  for kw, match in [(dict(kv_layout="rows"), "kv_layout"), (dict(page_size=24), "multiple of 16"),
                    (dict(num_pages=0), "num_pages"), (dict(kv_memory_fraction=1.5), "kv_memory_fraction"),
                    (dict(num_pages=4, kv_memory_fraction=0.5), "not both"), (dict(step_rows=()), "step_rows"),
                    (dict(step_rows=(2, 0)), "step_rows"), (dict(step_rows="8"), "step_rows")]:
    with pytest.raises(ValueError, match=match):
      EngineOptions(**kw)
  with pytest.raises(ValueError, match="needs 3 KV pages, more than the engine's 2"):
    Engine(model, max_batch=1, max_len=MAX_LEN, engine_options=EngineOptions(page_size=16, num_pages=2, warmup=False)
           ).submit([1] * 20, SamplingParams(max_tokens=20))
  with pytest.raises(ValueError, match="step_rows needs the paged layout"):
    Engine(model, max_batch=2, max_len=MAX_LEN, engine_options=EngineOptions(kv_layout="contiguous", step_rows=(1,),
                                                                              warmup=False))
  windowed = init_model(ModelConfig(**{**CFG.__dict__, "sliding_window": 16}), seed=1)
  with pytest.raises(ValueError, match="sliding window"):
    Engine(windowed, max_batch=1, max_len=MAX_LEN, engine_options=EngineOptions(warmup=False))


def test_slot_pages_share_grow_and_release():
  pages = SlotPages(PagedLayout(16, num_pages=6, max_pages=4), max_batch=2, prefix_caching=True)
  prompt = list(range(40))
  keys = pages.prefix_keys(prompt)
  assert len(keys) == 2 and pages.cached_tokens(keys) == 0
  assert pages.claim(0, keys, 40) == 0 and len(pages.held[0]) == 3
  pages.publish(0, prompt)
  assert pages.cached_tokens(keys) == 32
  assert pages.claim(1, keys, 40, reserve=3) is None and not pages.held[1]   # 1 new page of 3 free, 3 kept
  assert pages.claim(1, keys, 40) == 32 and pages.held[1][:2] == pages.held[0][:2]
  assert pages.allocator.refcount(pages.held[0][0]) == 3                     # two slots and the cache
  assert pages.grow(1, 64) and pages.grow(0, 64) and pages.available() == 0
  assert list(pages.table_bp[1]) == pages.held[1]
  with pytest.raises(ValueError, match="max_pages"):
    pages.grow(1, 65)
  pages.release(1)
  assert pages.claim(1, [], 48) is None                                      # 2 free, the cached pages held by 0
  pages.release(0)
  assert pages.used == 2 and pages.available() == 6 and (pages.table_bp == 6).all()
  assert pages.grow(0, 64) and pages.claim(1, [], 32) == 0 and len(pages.cache) == 0   # cached pages evicted


def test_page_counts_from_options():
  from polar_jax.serving import pages as pages_mod
  assert pages_mod.resolve_num_pages(5, None, 1024, 4, 8) == 5
  if pages_mod._free_bytes() is None:   # CPU: no memory statistics
    assert pages_mod.resolve_num_pages(None, None, 1024, 4, 8) == 32        # the contiguous cache's pages
    with pytest.raises(ValueError, match="give EngineOptions.num_pages"):
      pages_mod.resolve_num_pages(None, 0.5, 1024, 4, 8)
  else:
    free = pages_mod._free_bytes()
    assert pages_mod.resolve_num_pages(None, 0.5, 1 << 20, 4, 8) == int(0.5 * free) // (1 << 20) - 1
