"""The engine's telemetry: the KV-group selection probe (rates per layer and group, outputs unchanged by it), the
request and token metrics after a run, and the named scopes of the compiled programs."""

import numpy as np
import pytest

from polar_jax.serving import Engine, EngineOptions, SamplingParams, programs
from polar_jax.sparsity import SparsityConfig
from test_serving_engine import CFG, MAX_BATCH, MAX_LEN, REF_TOKENS, _prompts, _reference, random_routers


@pytest.fixture(scope="module")
def model():
  from polar_jax.model import init_model
  return init_model(CFG, seed=1)


def _sample(eng, name, **labels):
  return eng.metrics.registry.get_sample_value(name, {"model_name": "polar", **labels})


def _rates(eng):
  return np.array([[_sample(eng, "polar:kv_group_selection_rate", layer=str(l), group=str(g))
                    for g in range(CFG.num_kv_heads)] for l in range(CFG.num_layers)])


@pytest.mark.slow
@pytest.mark.parametrize("selector,budget", [("router", "uniform"), ("random", "uniform"), ("router", "adaptive")])
def test_selection_probe_rates_and_unchanged_outputs(model, selector, budget):
  adaptive = dict(budget="adaptive", mass=0.5) if budget == "adaptive" else {}
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(0,), selector=selector, seed=3, **adaptive)
  routers = random_routers(CFG) if selector == "router" else None
  prompts = _prompts(50, 6)
  opts = EngineOptions(steps_per_round=3, prefill_rows=2, sparse_min_rows=1, selection_probe_every=2)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, routers=routers,
              engine_options=opts) as eng:
    outs = eng.generate(prompts, SamplingParams(max_tokens=REF_TOKENS))
    rates, probed = _rates(eng), _sample(eng, "polar:kv_group_probed_rows_total")
    sparse_rounds = eng.stats()["variant_rounds"]["sparse"]
  for ref, out in zip(_reference(model, prompts, sparsity=sparsity, routers=routers), outs):
    assert list(out.token_ids) == ref   # probing left every request's tokens as they were
  assert probed >= (sparse_rounds + 1) // 2   # every second sparse round, each with at least one active row
  np.testing.assert_array_equal(rates[0], 1.0)                        # the dense layer reads every group
  k = CFG.num_kv_heads // 2
  if budget == "uniform":
    np.testing.assert_allclose(rates[1:].sum(axis=1), k, rtol=1e-12)   # k groups per row
  else:   # at least one group a row, at most k; the mass keeps fewer than k in some rows
    assert (rates[1:].sum(axis=1) >= 1 - 1e-12).all() and (rates[1:].sum(axis=1) <= k + 1e-12).all()
    assert (rates[1:].sum(axis=1) < k).any()
  assert ((rates >= 0) & (rates <= 1)).all() and (rates[1:] < 1).any()


@pytest.mark.slow
def test_attention_density_counts_the_realised_groups_of_adaptive_budgets(model):
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(0,), selector="router", seed=3, budget="adaptive",
                            mass=0.5)
  opts = EngineOptions(steps_per_round=1, prefill_rows=2, sparse_min_rows=1, selection_probe_every=1)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, routers=random_routers(CFG),
              engine_options=opts) as eng:
    eng.generate(_prompts(53, 6), SamplingParams(max_tokens=REF_TOKENS))
    density, rates = _sample(eng, "polar:attention_density"), _rates(eng)
    k_density = eng.variants["sparse"].attention_density
    assert eng.stats()["variant_rounds"].get("dense", 0) == 0
  # every round sparse and probed on its rows: the row-step average of the probes' realised densities
  np.testing.assert_allclose(density, rates.sum(axis=1).mean() / CFG.num_kv_heads, rtol=1e-9)
  assert density < k_density   # the mass keeps fewer than k groups in some rows; k would overstate the reads


def test_realised_density_of_probe_counts():
  from polar_jax.serving.selection_stats import realised_density
  counts_lg = np.array([[4, 4, 4, 4], [1, 3, 0, 0]])   # 4 rows: a dense layer, then 1 group a row
  assert realised_density(counts_lg, 4) == pytest.approx((1.0 + 0.25) / 2)
  with pytest.raises(ValueError, match="rows >= 1"):
    realised_density(counts_lg, 0)


def test_no_probe_without_sparsity_or_when_off(model):
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(), selector="random", seed=3)
  opts = EngineOptions(steps_per_round=3, prefill_rows=2, sparse_min_rows=1, selection_probe_every=0)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, engine_options=opts) as eng:
    eng.generate(_prompts(51, 2), SamplingParams(max_tokens=4))
    assert _sample(eng, "polar:kv_group_probed_rows_total") == 0
    assert _sample(eng, "polar:kv_group_selection_rate", layer="0", group="0") is None
  with pytest.raises(ValueError, match="selection_probe_every"):
    EngineOptions(selection_probe_every=-1)


def test_request_metrics_after_a_run(model):
  prompts = _prompts(52, 3, 2, 12)
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN,
              engine_options=EngineOptions(steps_per_round=3, prefill_rows=2, prefill_chunk=6)) as eng:
    outs = eng.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    assert _sample(eng, "polar:prompt_tokens_total") == sum(map(len, prompts))
    assert _sample(eng, "polar:generation_tokens_total") == sum(len(o.token_ids) for o in outs) == 15
    assert _sample(eng, "polar:request_success_total", finished_reason="length") == 3
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
      assert _sample(eng, f"polar:{name}_count") == 3
    assert _sample(eng, "polar:inter_token_latency_seconds_count") == 3 * 4
    assert _sample(eng, "polar:num_requests_running") == 0 and _sample(eng, "polar:kv_slots_used") == 0
    assert _sample(eng, "polar:step_variant_total", variant="dense") >= 1
    stats = eng.stats()   # requests per decode step: at least one, at most the three submitted
    assert 1 <= stats["decode_rows_mean"] <= stats["decode_rows_peak"] <= len(prompts)
    rounds = _sample(eng, "polar:decode_round_rows_count")
    assert 1 <= rounds <= _sample(eng, "polar:step_variant_total", variant="dense")
    assert rounds <= _sample(eng, "polar:decode_round_rows_sum") <= rounds * stats["decode_rows_peak"]


def test_programs_carry_named_scopes(model):
  from flax import nnx
  graphdef, state = nnx.split(model)
  slots = programs.init_slots(CFG, 2, 16, model.dtype, 2)
  tokens = np.zeros((1, 16), np.int32)
  hlo = programs.prefill_program.lower(graphdef, state, tokens, np.ones((1,), np.int32)).as_text(debug_info=True)
  assert "serve_prefill" in hlo
  args = (np.int32(4), np.full((2,), -1, np.int32), np.float32(1), np.int32(CFG.vocab_size), np.float32(1),
          np.bool_(True), np.int32(0), np.int32(0))   # ..., seed, tokens made before
  hlo = programs.chunk_program.lower(graphdef, state, slots, np.zeros((4,), np.int32), np.int32(0), np.int32(6),
                                     np.int32(1), *args).as_text(debug_info=True)
  assert "serve_prefill_chunk" in hlo
  _, cache = programs.prefill_program(graphdef, state, tokens, np.ones((1,), np.int32))
  hlo = programs.insert_program.lower(slots, cache, np.int32(0), np.int32(1), np.int32(3), np.bool_(True),
                                      *args).as_text(debug_info=True)
  assert "serve_insert" in hlo
