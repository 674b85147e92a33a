"""`DecodeOptions`: validation, and every option is part of the compiled program's key (no module switches)."""

import dataclasses

import numpy as np
import pytest

from conftest import LLAMA_GQA, OPT
from polar_jax import fusion
from polar_jax import generation as gen
from polar_jax.model import init_model
from polar_jax.options import DecodeOptions, check_options
from polar_jax.sparse_decode import DenseDecode, SparseDecode, make_decoder
from polar_jax.sparsity import SparsityConfig

PROMPTS = [[5, 9, 13, 2], [3, 1]]

# One changed value per field: every field of DecodeOptions must be listed (checked below).
CHANGES = {
    "kernels": "xla",
    "fused_projections": dict(fused_projections=False, deferred_norm=False, router_in_qkv=False),
    "deferred_norm": False,
    "router_in_qkv": False,
    "union_dtype": "float32",
    "union_method": "sort",
    "loop_graph": False,
    "kv_dtype": "int8",
}


def _changed(name):
  change = CHANGES[name]
  return DecodeOptions(**(change if isinstance(change, dict) else {name: change}))


def test_every_field_has_a_recompile_case():
  assert set(CHANGES) == {f.name for f in dataclasses.fields(DecodeOptions)}


@pytest.fixture(scope="module")
def fused_model():
  return fusion.fuse_projections(init_model(LLAMA_GQA, seed=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_an_option_compiles_a_new_program(name, fused_model):
  """`generate` with an option changed traces its program again; the same options again do not (the options are
  a field of the static decode step, not module globals read at trace time)."""
  model = fused_model
  base = gen.generate(model, PROMPTS, max_new_tokens=3).tokens
  before = gen.TRACE_COUNTS["generate"]
  gen.generate(model, PROMPTS, max_new_tokens=3)
  assert gen.TRACE_COUNTS["generate"] == before                      # same options: the cached program
  out = gen.generate(model, PROMPTS, max_new_tokens=3, options=_changed(name)).tokens
  assert gen.TRACE_COUNTS["generate"] == before + 1                  # another option: another program
  gen.generate(model, PROMPTS, max_new_tokens=3, options=_changed(name))
  assert gen.TRACE_COUNTS["generate"] == before + 1
  np.testing.assert_array_equal(out, base)                           # the same greedy tokens either way


def test_options_reach_the_decode_step_objects():
  model = init_model(OPT, seed=0)
  options = DecodeOptions(kernels="xla", union_method="sort")
  dense, _ = make_decoder(model, None, None, batch=2, options=options)
  assert dense == DenseDecode(options) and dense != DenseDecode()
  sparse, _ = make_decoder(model, SparsityConfig(0.5, selector="random"), None, batch=2, options=options)
  assert isinstance(sparse, SparseDecode) and sparse.options is options
  assert hash(sparse) != hash(dataclasses.replace(sparse, options=DecodeOptions()))
  steps = list(gen.stream(model, PROMPTS, max_new_tokens=3, options=options))
  np.testing.assert_array_equal(np.stack(steps, 1), gen.generate(model, PROMPTS, max_new_tokens=3).tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernels="triton"), "kernels must be one of"),
    (dict(union_dtype="float16"), "union_dtype must be one of"),
    (dict(union_method="approx"), "union_method must be one of"),
    (dict(fused_projections=False), "needs fused_projections=True"),
    (dict(fused_projections=False, deferred_norm=False), "router_in_qkv=True\\) needs fused_projections=True"),
])
def test_invalid_options_name_the_problem(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DecodeOptions(**kwargs)


def test_option_types_are_checked():
  with pytest.raises(TypeError, match="deferred_norm must be True or False"):
    DecodeOptions(deferred_norm=1)
  with pytest.raises(TypeError, match="options must be a polar_jax.DecodeOptions"):
    check_options({"kernels": "xla"})
  with pytest.raises(TypeError, match="options must be a polar_jax.DecodeOptions"):
    gen.generate(init_model(LLAMA_GQA), PROMPTS, max_new_tokens=2, options="xla")
  assert check_options(None) == DecodeOptions()
  assert DecodeOptions(kernels="auto").implementation is None and DecodeOptions(kernels="xla").implementation == "xla"


def test_polar_generate_takes_the_kernels_option():
  from polar_jax.cli import generate as cli
  assert cli.parser().parse_args(["m", "--prompt", "hi", "--kernels", "xla"]).kernels == "xla"
  assert cli.parser().parse_args(["m", "--prompt", "hi"]).kernels == "auto"
  with pytest.raises(SystemExit):
    cli.parser().parse_args(["m", "--prompt", "hi", "--kernels", "cuda"])


def test_kv_dtype_flags_of_the_command_lines():
  """`--kv-dtype` of polar-generate, polar-serve and polar-eval: "model" (the default) is None, the others pass
  through to `DecodeOptions.kv_dtype` / `EngineOptions.kv_dtype`; unknown names are refused."""
  from polar_jax.cli import eval as eval_cli
  from polar_jax.cli import generate as cli
  from polar_jax.cli import serve as serve_cli
  gen_args = lambda *a: cli.parser().parse_args(["m", "--prompt", "hi", *a])   # noqa: E731
  assert cli.kv_dtype_of(gen_args()) is None and cli.kv_dtype_of(gen_args("--kv-dtype", "int8")) == "int8"
  opts = serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt", "--kv-dtype", "float8_e4m3fn"]))
  assert opts.kv_dtype == "float8_e4m3fn" and opts.kv_layout == "paged"
  assert serve_cli.engine_options(serve_cli.parser().parse_args(["ckpt"])).kv_dtype is None
  assert cli.kv_dtype_of(eval_cli.parser().parse_args(["ckpt", "--out", "o", "--kv-dtype", "int8"])) == "int8"
  with pytest.raises(SystemExit):
    gen_args("--kv-dtype", "int4")
