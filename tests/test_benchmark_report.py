"""benchmarks/report.py's tables (end to end, the README's, accuracy, docs/performance.md) and
benchmarks/e2e_grid.sh's argument check (no GPU, no timing)."""

import pathlib
import subprocess

import pytest

from benchmarks import report

H100 = "NVIDIA H100 80GB HBM3"


def _rec(model, b, density, tok_s, *, mlp="dense", system="polar_jax", date="2026-11-22T10:00:00Z", device=H100,
         tp=1, frac=0.9, commit="abcdef123"):
  return dict(model=model, B=b, prompt=2000, density=density, mlp=mlp, system=system, date=date, device=device,
              tp=tp, devices=tp, decode_tok_s=tok_s, ms_per_step=1e3 * b / tok_s, fused=True,
              roofline_frac=None if system == "hf_static" else frac, commit=commit)


def test_grid_table_pivots_latest_records_per_density():
  recs = [_rec("m", 32, 1.0, 1000.0, frac=1.01), _rec("m", 32, 0.5, 1400.0, frac=0.95),
          _rec("m", 32, 0.5, 1500.0, frac=0.97, date="2026-11-22T11:00:00Z", commit="1234567ff"),   # newer wins
          _rec("m", 32, 0.5, 1600.0, mlp="router", frac=0.88),
          _rec("m", 32, 1.0, 700.0, system="hf_static"),
          _rec("m", 32, 0.5, 9999.0, device="NVIDIA H200"),                  # another device: not in the grid
          _rec("m", 64, 0.5, 9999.0, tp=2)]                                  # tensor parallel: not in the grid
  lines = report.e2e_grid_table(recs, H100).splitlines()
  assert len(lines) == 4                                                    # header, rule, dense row, union row
  dense_row, union_row = lines[2], lines[3]
  assert dense_row == "| m | 32 | 2000 | dense | 700.0 | 1000.0 |  | 1500.0 (1.50x) |  | 0.97-1.01 | 1234567, abcdef1 |"
  assert "| union |" in union_row and "1600.0 (1.60x)" in union_row and "9999" not in "".join(lines)
  others = report.e2e_table(recs, keep=lambda r: r["device"] != H100 or r["tp"] > 1)
  assert "H200" in others and "| 2 | 64 |" in others and "| 1 | 32 | 2000 | 1 | dense | fused | 1000.0" not in others


def test_grid_script_names_an_unknown_model():
  script = pathlib.Path(report.__file__).parent / "e2e_grid.sh"
  out = subprocess.run(["bash", str(script), "gpt-5"], capture_output=True, text=True)
  assert out.returncode == 2 and "unknown model 'gpt-5'" in out.stderr


def test_serve_grid_script_names_an_unknown_part():
  script = pathlib.Path(report.__file__).parent / "serve_grid.sh"
  out = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True)
  assert out.returncode == 2 and "unknown part 'everything'" in out.stderr
  out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
  assert out.returncode != 0 and "usage" in out.stderr


def test_paged_and_serving_tables():
  base = dict(op="paged_attention", date="2026-12-07T00:00:00Z", family="mha", Hq=4, Hkv=4, B=2, S=64, density=0.5)
  recs = [dict(base, impl="contiguous", page_size=None, ms=1.0, tbps=2.0, config=None, heuristic=True),
          dict(base, impl="paged", page_size=16, ms=1.25, tbps=1.6, config={"block_k": 64}, heuristic=True),
          dict(base, impl="paged", page_size=16, ms=1.1, tbps=1.8, config={"block_k": 16}, heuristic=False)]
  table = report.paged_table(recs).splitlines()
  assert "page 16: ms (ratio)" in table[0] and "| 1.2500 (0.80) |" in table[2] and "1.1000 (0.91)" in table[2]
  serve = [dict(date="2026-12-07T00:00:00Z", device="NVIDIA H100", system="polar_engine", density=0.5, requests=8,
                max_batch=4, kv_layout="paged", num_pages=10, page_size=32, output_tok_s=123.4,
                request_throughput=1.5, ttft_s={"p50": 0.1, "p99": 0.2}, itl_s={"p50": 0.01, "p99": 0.03},
                programs_compiled_during_run=0)]
  serve.append(dict(serve[0], kv_dtype="int8", prefill_chunks_per_round=4, decode_rows_mean=3.25, decode_rows_peak=4))
  table = report.serve_table(serve).splitlines()
  assert "| polar_engine | 0.5 | 8 | at once | 4 | paged (10 x 32) |  | 123 | 1.50 |  | 100 / 200 | 10 / 30 | 0 |" \
      in table[2]
  assert "| paged (10 x 32), int8 | 4 | 123 | 1.50 | 3.2 / 4 | 100 / 200 |" in table[3]
  prefix = dict(serve[0], rate=8.0, shared_prefix=1024, prefix_cache_hits=25.0, prefix_cache_queries=100.0,
                prefill_chunks_per_round=1, prefill_key_spans=4)
  table = report.serve_table([prefix, dict(prefix, prefix_cache_hits=0.0, prefix_cache_queries=0.0)]).splitlines()
  assert "| 8 req/s; 1024-token shared prefix (cached, 25% of prompt tokens hit) | 4 | paged (10 x 32) | 1 (4) |" \
      in table[2]
  assert "| 8 req/s; 1024-token shared prefix (caching off) |" in table[3]


def test_prefill_table_compares_each_chunk_with_its_calls_dense_prefill():
  call = dict(date="2026-12-07T00:00:00Z", device="NVIDIA H100", commit="abc", model="m", chunk=512, max_len=4096)
  recs = [dict(call, system="prefill", layout=None, start=0, ms=10.0, tok_s=51200.0, mfu=0.5),
          dict(call, system="chunk", layout="paged", start=512, key_span=1024, ms=15.0, tok_s=34133.0, mfu=0.4)]
  table = report.prefill_table(recs).splitlines()
  assert "| m | dense prefill | | 512 | 10.00 | 51200 | 0.50 | 1 |" in table[2]
  assert "| m | paged | 512 | 1024 | 15.00 | 34133 | 0.40 | 1.50 |" in table[3]


def test_8bit_kv_and_adaptive_records_stay_out_of_the_grid():
  recs = [_rec("m", 32, 1.0, 1000.0), _rec("m", 32, 0.5, 1500.0),
          dict(_rec("m", 32, 1.0, 1400.0), kv_dtype="int8"), dict(_rec("m", 32, 0.5, 1300.0), budget="adaptive")]
  grid = report.e2e_grid_table(recs, H100)
  assert "| 1000.0 |" in grid and "1500.0 (1.50x)" in grid and "1400.0" not in grid and "1300.0" not in grid
  variants = report.e2e_variant_table(recs).splitlines()
  assert any("| int8 | uniform | 1 | 1400.0 | 1.40 |" in row for row in variants)
  assert any("| adaptive | 0.5 | 1300.0 | 1.30 |" in row for row in variants)


def test_main_prints_the_grid_or_every_record(tmp_path, monkeypatch, capsys):
  import json
  recs = [_rec("m", 32, 1.0, 1000.0), _rec("m", 32, 0.5, 1500.0), _rec("m", 32, 0.5, 2000.0, device="NVIDIA H200")]
  (tmp_path / "e2e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  assert report.main([]) == 0
  out = capsys.readouterr().out
  assert "## End to end, one H100 80GB HBM3" in out and "1500.0 (1.50x)" in out
  assert out.count("| H200 |") == 1                           # the other device, in the full-format table
  assert report.main(["--all-e2e"]) == 0
  out = capsys.readouterr().out
  assert out.count("| m | polar_jax |") == 3 and "## " not in out


def _acc(selector, density, task, value, *, stderr=0.01, groups=3, n=100, per_layer=None, budget="uniform",
         shards=1, device="cpu (2 cores)", avg=None):
  return dict(model="smollm2-135m", mode="engine", device=device, task=task, selector=selector, density=density,
              value=value, stderr=stderr, groups=groups, num_groups=3, n=n, dtype="float32", per_layer=per_layer,
              budget=budget, shards=shards, date="2026-11-21T10:00:00Z", avg_density=avg)


def test_readme_performance_keeps_batch_32_at_each_models_prompt():
  recs = [_rec("llama2-7b", 32, 1.0, 1000.0), _rec("llama2-7b", 32, 0.5, 1500.0), _rec("llama2-7b", 16, 1.0, 800.0),
          dict(_rec("opt-6.7b", 32, 1.0, 900.0), prompt=1900), dict(_rec("opt-6.7b", 32, 1.0, 950.0), prompt=2000)]
  table = report.readme_performance(recs)
  assert "one H100 80GB HBM3, measured 2026-11-22" in table
  rows = [line for line in table.splitlines() if line.startswith("| llama2") or line.startswith("| opt")]
  assert rows == ["| llama2-7b | 32 | 2000 | dense |  | 1000.0 |  | 1500.0 (1.50x) |  | 0.90-0.90 | abcdef1 |",
                  "| opt-6.7b | 32 | 1900 | dense |  | 900.0 |  |  |  | 0.90-0.90 | abcdef1 |"]


def test_accuracy_table_latest_record_average_and_perplexity_change():
  recs = [_acc("dense", 1.0, "piqa", 0.60), _acc("dense", 1.0, "piqa", 0.64),      # the later record wins
          _acc("dense", 1.0, "sciq", 0.70), _acc("dense", 1.0, "ppl", 20.0, stderr=1.0),
          _acc("router", 0.67, "piqa", 0.62, groups=2), _acc("router", 0.67, "ppl", 25.0, stderr=1.5, groups=2),
          _acc("router", 0.67, "ppl", 21.0, groups=2, per_layer=[[1, 1.0]], budget="b1", avg=0.8),
          _acc("oracle", 0.67, "ppl", 99.0, groups=2, shards=3),
          {"kind": "critical_density", "model": "smollm2-135m"}]
  groups = report.accuracy_groups(recs)
  assert list(groups) == [("smollm2-135m", "engine", "cpu (2 cores)")]
  settings = groups[("smollm2-135m", "engine", "cpu (2 cores)")]
  assert set(settings) == {("dense", 1.0, ""), ("router", 0.67, ""), ("router", 0.67, "b1"), ("oracle", 0.67, "shards=3")}
  lines = report.accuracy_table(settings, budgets=True).splitlines()
  assert lines[0] == "| selector | density | KV groups | budget | avg density | piqa | sciq | avg | ppl | Δppl |"
  assert lines[2] == "| dense | 1 | 3/3 | uniform |  | 64.0 ± 1.0 | 70.0 ± 1.0 | 67.0 | 20.00 ± 1.00 | +0.0% |"
  assert lines[3] == "| router | 0.67 | 2/3 | uniform |  | 62.0 ± 1.0 | – | – | 25.00 ± 1.50 | +25.0% |"
  assert "| router | 0.67 | 2/3 | b1 | 0.800 | – | – | – | 21.00 ± 0.01 | +5.0% |" in lines
  readme = report.readme_accuracy(recs)
  assert "n = piqa 100, ppl 100 tokens, sciq 100" in readme and "b1" not in readme and "shards" not in readme


def test_readme_tables_replace_only_the_marked_block(tmp_path, monkeypatch):
  import json
  text = f"# title\n\nbefore\n{report.README_BEGIN}\nold table\n{report.README_END}\nafter\n"
  new = report.replace_readme_tables(text, "| new |")
  assert new == f"# title\n\nbefore\n{report.README_BEGIN}\n| new |\n{report.README_END}\nafter\n"
  assert report.replace_readme_tables(new, "| new |") == new
  with pytest.raises(ValueError, match="no .* block"):
    report.replace_readme_tables("# no markers\n", "| new |")
  (tmp_path / "e2e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [_rec("m", 32, 1.0, 1000.0)]))
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  readme = tmp_path / "README.md"
  readme.write_text(text)
  perf = tmp_path / "docs" / "performance.md"
  assert report.main(["--readme", str(readme), "--performance-md", str(perf)]) == 0
  assert "old table" not in readme.read_text() and "| m | 32 | 2000 | dense |  | 1000.0 |" in readme.read_text()
  assert perf.read_text().startswith("# Measured performance") and "| m | 32 | 2000 |" in perf.read_text()
  assert sorted(p.name for p in perf.parent.iterdir()) == ["performance.md"]          # no temporary file left
  (tmp_path / "bad.md").write_text("# no markers\n")
  assert report.main(["--readme", str(tmp_path / "bad.md")]) == 2
