"""implementation="mosaic" off GPU, the Mosaic GPU kernels' CUDA lowering on CPU,
and benchmarks/mlp_variants.py's bound arithmetic and failure handling."""
import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gather_matmul_cols
from pallas_kernels import gather_matmul_rows
from pallas_kernels import gather_matmul_mosaic

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                     "mlp_variants.py")


def _load():
  spec = importlib.util.spec_from_file_location("bench_mlp_variants", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _inputs(m=3, d=128, n=256, k=70):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
  idx = jnp.asarray(rng.permutation(n)[:k], jnp.int32)
  return x, w, idx


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="off-GPU behaviour")
def test_mosaic_raises_off_gpu():
  x, w, idx = _inputs()
  with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
    gather_matmul_cols(x, w, idx, None, "relu", implementation="mosaic")
  h = jnp.ones((3, idx.shape[0]), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
    gather_matmul_rows(h, w, idx, implementation="mosaic")


def test_unknown_implementation_still_raises():
  x, w, idx = _inputs()
  with pytest.raises(ValueError, match="unknown implementation"):
    gather_matmul_cols(x, w, idx, implementation="cuda")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_mosaic_lowers_for_cuda(mode):
  """Pallas -> Mosaic GPU lowering runs on CPU (no compile, no execution)."""
  x, w, idx = _inputs()
  m, d = x.shape
  k = idx.shape[0]
  count = jax.ShapeDtypeStruct((1,), jnp.int32)
  if mode == "rows":
    cfg = gather_matmul_mosaic.choose_rows_config(m, d, k, num_sms=132)
    fn = lambda h, w, i, c: gather_matmul_mosaic.gather_matmul_rows_mosaic(
        h, w, i, None, c, config=cfg)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w, idx, count)
  else:
    cfg = gather_matmul_mosaic.choose_cols_config(m, d, k, num_sms=132)
    fn = lambda x, w, i, c: gather_matmul_mosaic.gather_matmul_cols_mosaic(
        x, w, i, None, c, activation="relu", config=cfg)
    args = (x, w, idx, count)
  text = jax.jit(fn).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_bound_arithmetic():
  mv = _load()
  # NOTES.md v4 table: d0.1 (k 1638) at 2.93 TB/s -> 21.4 us.
  nbytes = mv.mlp_bytes(1638, 4096)
  assert nbytes == 2 * 1638 * 4096 * 2
  assert mv.bound_ms(nbytes, 2.93) == pytest.approx(0.02145, abs=5e-5)
  assert mv.bound_ms(0, 3.0) == pytest.approx(0.010)
  assert mv.bound_ms(3e9, 3.0) == pytest.approx(1.25 + 0.010)
  ref = jnp.asarray([1.0, -2.0])
  assert mv.max_rel_err(jnp.asarray([1.0, -2.1]), ref) == pytest.approx(0.05)
  assert mv.max_rel_err(jnp.asarray([np.nan, 0.0]), ref) == math.inf


def test_failing_variant_is_recorded_not_timed():
  mv = _load()
  base = {"device": "cpu", "jax": jax.__version__, "date": "", "commit": "",
          "copy_tbps": 2.0}
  records = []

  def boom(idx):
    raise RuntimeError("does not compile\nsecond line")

  def wrong(idx):
    return lambda x, *_: x * 2

  def timer(*_):
    raise AssertionError("a failing variant must not be timed")

  x = jnp.ones((2, 4), jnp.float32)
  sets = [(x, None, None, None, None)]
  for name, make in (("boom", boom), ("wrong", wrong)):
    rec = mv.run_case(timer, base, name, make, sets, None, x, 2, 4, 8, 0.5,
                      64, records.append)
    assert rec["ms"] is None and rec["meets"] is None
    assert rec["op"] == "gather_mlp_variant" and rec["impl"] == name
    assert rec["bound_ms"] == pytest.approx(mv.bound_ms(64, 2.0))
  assert records[0]["error"].startswith("RuntimeError: does not compile")
  assert "max_rel_err" in records[1]["error"]
  assert records[1]["max_rel_err"] == pytest.approx(1.0)
  json.dumps(records)
