"""benchmarks/report.py's end-to-end tables and benchmarks/e2e_grid.sh's argument check (no GPU, no timing)."""

import pathlib
import subprocess

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
