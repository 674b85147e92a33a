"""benchmarks/kernels.py --smoke runs in-process (CPU, interpret mode) and writes
well-formed records. No timing assertions."""
import importlib.util
import json
import math
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                     "kernels.py")


def _load():
  spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses need the module registered
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_smoke_records(tmp_path):
  bench = _load()
  out = tmp_path / "kernels.jsonl"
  returned = bench.main(["--smoke", "--check", "--out", str(out)])
  assert bench.main(["--smoke", "--only", "probe", "--out", str(out)])   # the attention probes (not in "all")
  assert bench.main(["--smoke", "--only", "matmul", "--out", str(out)])  # the decode projections (not in "all")
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines[:len(returned)] == json.loads(json.dumps(returned))
  probes = [r for r in lines if r["op"] == "attention_probe"]
  assert {r["family"] for r in probes} == {"selection", "config", "splits", "persistent"} and len(probes) == 7
  assert [r["config"]["num_splits"] for r in probes if r["family"] == "splits"] == [2]
  assert [r["Hkv"] for r in probes if r["family"] == "persistent"] == [4, 2]
  assert all(r["config"]["persistent"] for r in probes if r["family"] == "persistent")
  ops = {(r["op"], r["impl"]) for r in lines}
  assert ops >= {("attention", "pallas"), ("attention", "xla_einsum"), ("attention", "xla_gather"),
                 ("gather_mlp", "pallas"), ("gather_mlp", "xla_gather"), ("gather_mlp", "xla_dense"),
                 ("topk_select", "pallas"), ("topk_select", "xla"), ("skinny_matmul", "pallas"),
                 ("skinny_matmul", "xla")}
  for r in lines:
    assert set(bench.KEYS) <= set(r)
    assert r["ms"] > 0 and r["bytes"] > 0 and r["copy_tbps"] > 0
    assert math.isclose(r["tbps"], r["bytes"] / (r["ms"] * 1e-3) / 1e12)
    assert math.isclose(r["roofline_frac"], r["tbps"] / r["copy_tbps"])
    if r["impl"] == "pallas":
      assert r["max_rel_err"] < 1e-2
    if r["op"] == "attention":
      k = max(1, round(r["density"] * r["Hkv"]))
      assert r["bytes"] == 2 * r["B"] * k * r["S"] * r["D"] * 2
    elif r["op"] == "attention_probe":
      assert r["bytes"] == 2 * r["B"] * r["K"] * (r["S"] - 7) * r["D"] * 2 and r["max_rel_err"] < 1e-2
    elif r["op"] == "skinny_matmul":               # weight + x + output (+ residual), vs XLA
      out_size = {"float32": 4, "bfloat16": 2}[r["out_dtype"]]
      assert r["bytes"] == (r["d"] * r["N"] + r["M"] * r["d"]) * 2 + r["M"] * r["N"] * out_size * (1 + r["residual"])
      assert r["max_rel_err"] < 1e-2
    elif r["op"] == "topk_select":                 # the script raises unless each result is lax.top_k's set
      assert r["exact_set"] and r["bytes"] == r["M"] * r["N"] * 4
    else:
      k = max(1, round(r["density"] * r["N"]))
      assert r["bytes"] == 2 * k * r["d"] * 2
