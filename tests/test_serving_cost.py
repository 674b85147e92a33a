"""The step-variant cost table: interpolation and the choice at each occupancy and context (pure functions), the
forms a table can be given in, warm-up measuring one, and rounds following a given table."""

import json

import pytest

from polar_jax.serving import Engine, EngineOptions, SamplingParams, scheduler
from polar_jax.serving.cost import CostTable, context_points, measure_table, occupancy_points
from polar_jax.sparsity import SparsityConfig
from test_serving_engine import CFG, MAX_BATCH, MAX_LEN, REF_TOKENS, _prompts

# dense: 1.0 + 0.1 per row; sparse: 1.3 + 0.02 per row (router overhead, cheaper rows): they cross at 3.75 rows
OCC = (1, 2, 4, 8)
DENSE = tuple(1.0 + 0.1 * r for r in OCC)
SPARSE = tuple(1.3 + 0.02 * r for r in OCC)


def _table(long_factor=1.0):
  """Costs at contexts 100 and 1000; at 1000 the dense rows cost `long_factor` times more."""
  dense_long = tuple(1.0 + 0.1 * long_factor * r for r in OCC)
  return CostTable(OCC, (100, 1000), (("dense", (DENSE, dense_long)), ("sparse", (SPARSE, SPARSE))))


def _variants():
  return {"dense": scheduler.StepVariant("dense", None, None, 1.0, 0.0),
          "sparse": scheduler.StepVariant("sparse", None, None, 0.5, 0.0)}


def test_interpolated_costs_pick_the_cheaper_variant_at_each_occupancy():
  t = _table()
  assert t.cost("dense", 2, 100) == pytest.approx(DENSE[1])
  assert t.cost("dense", 3, 100) == pytest.approx((DENSE[1] + DENSE[2]) / 2)   # linear between measured rows
  assert t.cost("dense", 20, 100) == pytest.approx(DENSE[-1])                   # clamped past the last
  crossing = (1.3 - 1.0) / (0.1 - 0.02)
  for rows in range(1, 9):
    expected = "sparse" if t.cost("sparse", rows, 100) < t.cost("dense", rows, 100) else "dense"
    assert t.cheapest(rows, 100) == expected
    assert scheduler.choose_variant(rows, _variants(), table=t, context=100).name == expected
    assert (expected == "sparse") == (rows > crossing)
  assert scheduler.choose_variant(0, _variants(), table=t).name == "dense"


def test_context_moves_the_crossing_and_ties_go_dense():
  t = _table(long_factor=4.0)   # long contexts: dense rows cost 4x more, sparse pays from fewer rows
  assert t.cheapest(2, 100) == "dense" and t.cheapest(2, 1000) == "sparse"
  mid = t.cost("dense", 2, 550)
  assert mid == pytest.approx((t.cost("dense", 2, 100) + t.cost("dense", 2, 1000)) / 2)
  tie = CostTable(OCC, (100,), (("dense", (DENSE,)), ("sparse", (DENSE,))))
  assert all(tie.cheapest(r) == "dense" for r in OCC)
  assert scheduler.choose_variant(8, _variants(), table=tie, sparse_min_rows=2).name == "sparse"   # rule wins
  only_dense = CostTable(OCC, (100,), (("dense", (DENSE,)),))
  assert scheduler.choose_variant(8, _variants(), table=only_dense).name == "dense"


def test_table_forms_round_trip_and_bad_tables_are_refused(tmp_path):
  t = _table()
  assert CostTable.from_mapping(json.loads(json.dumps(t.to_mapping()))) == t
  path = tmp_path / "costs.json"
  t.save(path)
  assert EngineOptions(cost_table=str(path)).cost_table == t
  assert EngineOptions(cost_table=t.to_mapping()).cost_table == t
  for bad, match in [({"occupancies": [1, 2]}, "needs 'occupancies'"),
                     ({"occupancies": [2, 1], "contexts": [5], "seconds": {"dense": [[1, 1]]}}, "increasing"),
                     ({"occupancies": [1], "contexts": [5], "seconds": {"sparse": [[1]]}}, "dense"),
                     ({"occupancies": [1, 2], "contexts": [5], "seconds": {"dense": [[1]]}}, "1 x 2"),
                     ({"occupancies": [1], "contexts": [5], "seconds": {"dense": [[-1]]}}, "non-negative")]:
    with pytest.raises(ValueError, match=match):
      EngineOptions(cost_table=bad)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a JSON cost table"):
    EngineOptions(cost_table=str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="neither"):
    EngineOptions(cost_table=str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="sparse_min_rows"):
    EngineOptions(sparse_min_rows=0)


def test_measure_table_times_every_point():
  calls = []

  def run_round(variant, rows, context):
    calls.append((variant, rows, context))
    return (2.0 if variant == "dense" else 1.0) * rows + context / 1000

  t = measure_table(run_round, ("dense", "sparse"), (1, 2), (10, 20), repeats=2)
  assert len(calls) == 2 * 2 * 2 * 3   # variants x occupancies x contexts x (1 untimed + 2)
  assert t.cost("dense", 2, 20) == pytest.approx(4.02) and t.cost("sparse", 1, 10) == pytest.approx(1.01)
  assert occupancy_points(6) == (1, 2, 4, 6) and occupancy_points(1) == (1,)
  assert context_points(32, 3) == (4, 28) and context_points(4, 3) == (1,)


@pytest.fixture(scope="module")
def model():
  from polar_jax.model import init_model
  return init_model(CFG, seed=1)


SPARSITY = SparsityConfig(attn_density=0.5, dense_layers=(), selector="random", seed=3)


@pytest.mark.slow
def test_warmup_measures_the_table(model):
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=SPARSITY,
              engine_options=EngineOptions(steps_per_round=3, prefill_rows=2)) as eng:
    table = eng.stats()["cost_table"]
  assert table["occupancies"] == [1, 2, 4] and table["contexts"] == list(context_points(MAX_LEN, 3))
  assert set(table["seconds"]) == {"dense", "sparse"}
  assert all(s > 0 for grid in table["seconds"].values() for row in grid for s in row)
  assert CostTable.from_mapping(table) == eng.cost_table


def test_rounds_follow_a_given_table(model):
  sparse_from_3 = CostTable((1, 2, 3, 4), (1,), (("dense", ((1.0, 1.0, 1.0, 1.0),)),
                                                 ("sparse", ((2.0, 2.0, 0.5, 0.5),))))
  opts = EngineOptions(steps_per_round=3, prefill_rows=2, cost_table=sparse_from_3,
                       page_size=16)   # small pages: the 4 rows run at once
  with Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=SPARSITY, engine_options=opts) as eng:
    eng.generate(_prompts(40, 1), SamplingParams(max_tokens=REF_TOKENS))
    assert eng.stats()["variant_rounds"].get("sparse", 0) == 0
    eng.generate(_prompts(41, MAX_BATCH, 3, 10), SamplingParams(max_tokens=REF_TOKENS, ignore_eos=True))
    rounds = eng.stats()["variant_rounds"]
    counted = eng.metrics.registry.get_sample_value("polar:step_variant_total",
                                                    {"model_name": "polar", "variant": "sparse"})
  assert rounds["sparse"] > 0 and counted == rounds["sparse"]


def test_cli_options(tmp_path):
  from polar_jax.cli import serve as serve_cli
  defaults = serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt"]))
  assert (defaults.cost_table, defaults.sparse_min_rows, defaults.prefill_chunk) == ("measure", None, 512)
  path = tmp_path / "costs.json"
  _table().save(path)
  args = serve_cli.parser().parse_args(["ckpt", "--cost-table", str(path), "--prefill-chunk", "0", "--tp", "2"])
  opts = serve_cli.engine_options(args)
  assert (opts.cost_table, opts.prefill_chunk, args.tp) == (_table(), None, 2)
  rule = serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt", "--sparse-min-rows", "4"]))
  assert rule.sparse_min_rows == 4
  spans = serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt", "--prefill-key-spans", "1"]))
  assert (defaults.prefill_key_spans, spans.prefill_key_spans) == (4, 1)
  rounds = serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt", "--step-rows", "16", "4",
                                                                   "--prefill-chunks-backlog", "2"]))
  assert (defaults.step_rows, defaults.prefill_chunks_backlog) == (None, 4)
  assert (rounds.step_rows, rounds.prefill_chunks_backlog) == ((4, 16), 2)
  with pytest.raises(ValueError, match="prefill_key_spans"):
    serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt", "--prefill-key-spans", "0"]))
  with pytest.raises(ValueError, match="neither"):
    serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt", "--cost-table", str(tmp_path / "none.json")]))
