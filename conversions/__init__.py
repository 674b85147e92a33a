"""Checkpoint converters: Hugging Face directories and llama / qwen2 GGUF files -> polar_jax checkpoints.

Example:
  from conversions import convert
  convert("path/to/hf_model_dir", "ckpt/model")          # or a .gguf file
  # command line: polar-convert SRC OUT [--dtype bfloat16] [--force]
"""

from conversions.driver import DTYPES, ConversionResult, convert, open_source
from conversions.errors import ConversionError, ConversionWarning
from conversions.gguf_reader import SUPPORTED_GGUF_ARCHITECTURES
from polar_jax.config import SUPPORTED_MODEL_TYPES

__all__ = [
    "DTYPES",
    "ConversionError",
    "ConversionResult",
    "ConversionWarning",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "convert",
    "open_source",
]
