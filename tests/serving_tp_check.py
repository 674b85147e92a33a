"""The serving engine on a tensor-parallel model, run in a subprocess (JAX must see several CPU devices before it
is imported): `python tests/serving_tp_check.py` (4 host devices; tests/test_serving_tp.py drives it).

For tp 2 and 4, dense and head-sparse (balanced per-shard selection, compared with the same selection on one
device), with prompts long enough to be prefilled in chunks: the sharded engine's greedy tokens equal the unsharded
engine's, its KV cache stays sharded by KV group, and serving compiles nothing after the warm-up. Warm-up measures
the cost table on a sharded model; `polar-serve --tp 2` loads the model on a 2-device mesh. Prints "OK <name>"
lines; exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dataclasses  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import LLAMA_GQA_8H  # noqa: E402  (this file's folder)
from polar_jax import checkpoint, sharding  # noqa: E402
from polar_jax.cli import serve as serve_cli  # noqa: E402
from polar_jax.model import init_model  # noqa: E402
from polar_jax.serving import Engine, EngineOptions, SamplingParams, programs  # noqa: E402
from polar_jax.sparsity import SparsityConfig  # noqa: E402

CFG = dataclasses.replace(LLAMA_GQA_8H, num_kv_heads=4)   # 4 KV groups: 2 or 1 per shard
MAX_BATCH, MAX_LEN, NEW = 4, 32, 6
OPTS = EngineOptions(steps_per_round=3, prefill_rows=2, prefill_chunk=8, sparse_min_rows=1, kv_layout="contiguous")


def prompts() -> list[list[int]]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, CFG.vocab_size, int(n)).tolist() for n in (3, 14, 9, 1, 20, 6, 11)]


def compiled() -> list[int]:
  """Executables each jitted program of the engine holds (a new input sharding compiles without a new trace)."""
  jits = [programs.prefill_program, programs.first_token_program, programs.insert_program, programs.chunk_program,
          programs.occupy_program, *programs._STEP_PROGRAMS.values()]   # pylint: disable=protected-access
  return [f._cache_size() for f in jits]   # pylint: disable=protected-access


def serve(model, sparsity) -> tuple[list[tuple[int, ...]], Engine]:
  eng = Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity, engine_options=OPTS)
  traces, executables = dict(programs.TRACE_COUNTS), compiled()
  outs = eng.generate(prompts(), SamplingParams(max_tokens=NEW, ignore_eos=True))
  if programs.TRACE_COUNTS != traces or compiled() != executables:
    raise AssertionError(f"serving compiled programs after the warm-up: {traces} -> {programs.TRACE_COUNTS}, "
                         f"{executables} -> {compiled()}")
  eng.shutdown()
  return [o.token_ids for o in outs], eng


def check(tp: int, density: float | None) -> None:
  sparsity = None if density is None else SparsityConfig(attn_density=density, dense_layers=(), selector="random",
                                                         seed=2)
  single = None if sparsity is None else dataclasses.replace(sparsity, shards=tp)   # the same balanced selection
  want, _ = serve(init_model(CFG, seed=3), single)
  model = sharding.shard_model(init_model(CFG, seed=3), sharding.make_mesh(tp=tp))
  got, eng = serve(model, sparsity)
  if got != want:
    raise AssertionError(f"tp={tp} density={density}: {got} != {want}")
  spec = eng._slots.cache.k_bhsd[0].sharding.spec   # pylint: disable=protected-access
  if tuple(spec) not in ((None, "tp", None, None), (None, "tp")):
    raise AssertionError(f"tp={tp}: the slots' cache is {spec}, not sharded by KV group")
  print(f"OK engine tp={tp} density={density} ({eng.stats()['variant_rounds']})", flush=True)


def check_measured_costs(tp: int) -> None:
  """Warm-up measures the cost table on the sharded model; serving then compiles nothing."""
  sparsity = SparsityConfig(attn_density=0.5, dense_layers=(), selector="random", seed=2)
  model = sharding.shard_model(init_model(CFG, seed=3), sharding.make_mesh(tp=tp))
  eng = Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, sparsity=sparsity,
               engine_options=dataclasses.replace(OPTS, sparse_min_rows=None))
  table = eng.stats()["cost_table"]
  if table is None or set(table["seconds"]) != {"dense", "sparse"}:
    raise AssertionError(f"tp={tp}: no measured cost table: {table}")
  traces, executables = dict(programs.TRACE_COUNTS), compiled()
  eng.generate(prompts(), SamplingParams(max_tokens=NEW, ignore_eos=True))
  eng.shutdown()
  if programs.TRACE_COUNTS != traces or compiled() != executables:
    raise AssertionError(f"tp={tp}: serving after a measured warm-up compiled programs: {traces} -> "
                         f"{programs.TRACE_COUNTS}, {executables} -> {compiled()}")
  print(f"OK measured cost table tp={tp} ({eng.stats()['variant_rounds']})", flush=True)


def check_cli() -> None:
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save_model(d, init_model(CFG, seed=0))
    args = serve_cli.parser().parse_args([d, "--tp", "2"])
    model = serve_cli.load_model(args)
  if sharding.model_tp(model) != 2:
    raise AssertionError("polar-serve --tp 2 did not shard the model over 2 devices")
  print("OK polar-serve --tp 2", flush=True)


if __name__ == "__main__":
  assert len(jax.devices()) == 4, jax.devices()
  for tp, density in ((2, None), (2, 0.5), (4, None)):
    check(tp, density)
  check_measured_costs(2)
  check_cli()
