"""The serving plot picks the latest day's records of a model and writes a PNG."""

import json

from benchmarks import serve_plot


def _record(system, date, tok_s, density=1.0, latency=True, model="llama2-7b"):
  lat = {"p50": 0.2, "p90": 0.5, "p99": 0.9} if latency else None
  return {"system": system, "date": date, "model": model, "device": "H100", "requests": 8, "prompt_len": [200, 2000],
          "output_len": [32, 512], "output_tok_s": tok_s, "density": density, "rate": None, "ttft_s": lat,
          "e2e_s": lat}


def test_select_takes_the_latest_day_of_the_model():
  recs = [_record("polar_engine", "2026-12-01T00:00:00Z", 1.0), _record("polar_engine", "2026-12-07T01:00:00Z", 2.0),
          _record("polar_engine", "2026-12-08T01:00:00Z", 3.0, model="tiny")]
  assert [r["output_tok_s"] for r in serve_plot.select(recs, "llama2-7b", None)] == [2.0]
  assert [r["output_tok_s"] for r in serve_plot.select(recs, "llama2-7b", "2026-12-01")] == [1.0]
  assert serve_plot.label(_record("polar_engine", "d", 1.0, density=0.5)).startswith("polar_engine_sparse")


def test_main_writes_a_png(tmp_path):
  res = tmp_path / "serve.jsonl"
  day = "2026-12-07T01:00:00Z"
  recs = [_record("polar_engine", day, 2000.0), _record("polar_engine", day, 2600.0, density=0.5),
          _record("polar_static", day, 1400.0, latency=False), _record("hf_continuous_default", day, 300.0)]
  res.write_text("".join(json.dumps(r) + "\n" for r in recs))
  out = tmp_path / "serve.png"
  assert serve_plot.main(["--results", str(res), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
