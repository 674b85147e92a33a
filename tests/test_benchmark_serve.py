"""The serving load test runs end to end on a tiny model (so it cannot rot); its arithmetic is checked."""

import json
import math

import numpy as np
import pytest

from benchmarks import serve, serve_overhead


def test_workload_lengths_and_arrivals():
  prompts, outputs, arrivals = serve.workload(200, (5, 9), (2, 4), vocab=50, rate=math.inf, seed=0)
  assert {len(p) for p in prompts} == set(range(5, 10)) and set(outputs) == {2, 3, 4}
  assert (arrivals == 0).all() and max(max(p) for p in prompts) < 50
  _, _, poisson = serve.workload(2000, (5, 9), (2, 4), vocab=50, rate=10.0, seed=0)
  assert (np.diff(poisson) >= 0).all() and poisson[-1] / 2000 == pytest.approx(0.1, rel=0.1)   # mean gap 1 / rate
  shared, _, _ = serve.workload(20, (5, 9), (2, 4), vocab=50, rate=math.inf, seed=0, shared_prefix=7)
  assert {len(p) for p in shared} <= set(range(12, 17)) and len({tuple(p[:7]) for p in shared}) == 1
  assert len({tuple(p[7:]) for p in shared}) > 1


def test_inter_token_gaps_share_a_round_between_its_tokens():
  assert serve.inter_token_gaps([1.0, 1.0, 1.4, 1.4, 1.4, 1.4, 2.0]) == pytest.approx([0.0, 0.1, 0.1, 0.1, 0.1, 0.6])
  assert serve.inter_token_gaps([3.0]) == [] and serve.inter_token_gaps([]) == []


@pytest.mark.slow
def test_smoke_run_writes_records(tmp_path):
  out = tmp_path / "serve.jsonl"
  assert serve.main(["--model", "tiny", "--requests", "8", "--max-batch", "4", "--out", str(out)]) == 0
  engine, static = [json.loads(line) for line in out.read_text().splitlines()]
  assert (engine["system"], static["system"]) == ("polar_engine", "polar_static")
  assert engine["programs_compiled_during_run"] == 0 and static["programs_compiled_during_run"] == 0
  assert engine["output_tokens"] == static["output_tokens"] > 0
  for r in (engine, static):
    assert r["output_tok_s"] > 0 and r["copy_tbps"] > 0 and r["device"] and r["commit"]
  assert 0 < engine["ttft_s"]["p50"] <= engine["ttft_s"]["p99"] <= engine["e2e_s"]["p99"]


@pytest.mark.slow
def test_static_only_run_and_nothing_to_run(tmp_path):
  out = tmp_path / "serve.jsonl"
  assert serve.main(["--model", "tiny", "--requests", "3", "--max-batch", "4", "--no-engine", "--out", str(out)]) == 0
  assert [json.loads(line)["system"] for line in out.read_text().splitlines()] == ["polar_static"]
  with pytest.raises(SystemExit):
    serve.main(["--model", "tiny", "--no-engine", "--no-static", "--out", str(out)])


@pytest.mark.slow
def test_overhead_run_compares_the_engine_with_the_decode_loop(tmp_path):
  out = tmp_path / "overhead.jsonl"
  assert serve_overhead.main(["--model", "tiny", "--batch", "2", "--prompt", "9", "--new", "12", "--iters", "1",
                              "--kv-layout", "paged", "--out", str(out)]) == 0
  (r,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert (r["kv_layout"], r["batch"], r["prompt"], r["new"]) == ("paged", 2, 9, 12)
  assert r["engine_step_ms"] > 0 and r["loop_step_ms"] > 0 and r["copy_tbps"] > 0 and r["commit"]
  assert r["overhead"] == pytest.approx(r["engine_step_ms"] / r["loop_step_ms"] - 1)


@pytest.mark.slow
def test_paged_shared_prefix_run_reports_prefix_hits(tmp_path):
  out = tmp_path / "serve.jsonl"
  assert serve.main(["--model", "tiny", "--requests", "6", "--max-batch", "4", "--shared-prefix", "40",
                     "--prefill-chunk", "16", "--num-pages", "24", "--no-static", "--out", str(out)]) == 0
  (engine,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert engine["kv_layout"] == "paged" and engine["num_pages"] == 24 and engine["shared_prefix"] == 40
  assert engine["prefix_cache_hits"] >= 32 and engine["programs_compiled_during_run"] == 0


@pytest.mark.slow
def test_kv8_run_records_its_storage(tmp_path):
  """`--kv-dtype int8` on the paged engine (shared prefix pages, chunked prefill, the sparse variant): every record
  says its storage, and its pages take D + 4 bytes per token and group against 4 D in float32."""
  out = tmp_path / "serve.jsonl"
  args = ["--model", "tiny", "--requests", "6", "--max-batch", "4", "--shared-prefix", "40", "--prefill-chunk", "16",
          "--num-pages", "24", "--density", "1", "0.5", "--no-static", "--out", str(out)]
  assert serve.main(args + ["--kv-dtype", "int8"]) == 0
  assert serve.main(args) == 0
  *int8, f32 = [json.loads(line) for line in out.read_text().splitlines()][:3]
  assert [r["kv_dtype"] for r in int8] == ["int8", "int8"] and f32["kv_dtype"] == "float32"
  head_dim = serve.e2e.MODELS["tiny"].head_dim
  assert int8[0]["kv_cache_gb"] == pytest.approx(f32["kv_cache_gb"] * (head_dim + 4) / (4 * head_dim))
  assert all(r["output_tokens"] > 0 and r["programs_compiled_during_run"] == 0 for r in int8)


@pytest.mark.slow
def test_parity_check_passes_on_this_device(capsys):
  from benchmarks import serve_parity
  assert serve_parity.main(["--requests", "6", "--max-len", "128"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in lines] == ["paged", "preempt", "contiguous"]
  assert "'preemptions': 0" not in lines[1]   # the small pool preempted
