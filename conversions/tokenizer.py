"""Tokenizer files for a converted checkpoint.

From an HF directory the known tokenizer files are copied as they are. From a GGUF the
tokenizer is rebuilt from the `tokenizer.*` metadata with transformers' own GGUF tokenizer
builder (`convert_gguf_tokenizer`, no torch needed) and written with `save_pretrained`; if
that internal API is unavailable, `AutoTokenizer.from_pretrained(folder, gguf_file=name)` is
used instead (that path imports torch in transformers 5).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import warnings

from conversions.errors import ConversionWarning
from polar_jax import checkpoint

# Files a tokenizer may consist of (any subset), plus generation_config.json (stop tokens).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)


def copy_hf_tokenizer(src: pathlib.Path, out: pathlib.Path) -> list[str]:
  """Copies the tokenizer files present in `src` into `out`; warns and returns [] if none."""
  found = [n for n in TOKENIZER_FILES if (src / n).is_file()]
  if not found:
    warnings.warn(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                  "the converted checkpoint has no tokenizer", ConversionWarning, stacklevel=3)
  for n in found + [n for n in EXTRA_FILES if (src / n).is_file()]:
    shutil.copyfile(src / n, out / n)
  return found


# Metadata -> tokenizer-builder keys, as transformers' `get_gguf_tokenizer` groups them.
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _build_from_metadata(metadata: dict):
  """A transformers tokenizer from GGUF metadata, without torch (mirrors `get_gguf_tokenizer`)."""
  from transformers import TokenizersBackend
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                     convert_gguf_tokenizer)
  grouped = {
      group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
              if f"tokenizer.{key}" in metadata}
      for group, renames in GGUF_TOKENIZER_MAPPING.items()
  }
  tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tok_dict.get("tokenizer_type") == "llama":
    tok_config.setdefault("add_bos_token", True)   # llama.cpp's default for sentencepiece vocabularies
  for name, key in _SPECIAL_TOKENS.items():
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    tok_config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
  backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tok_dict)
  return TokenizersBackend(tokenizer_object=backend, **tok_config, **extra)


def _build_with_auto_tokenizer(gguf_path: pathlib.Path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)


def write_gguf_tokenizer(gguf_path: pathlib.Path, metadata: dict, out: pathlib.Path) -> list[str]:
  """Writes tokenizer files built from the GGUF metadata into `out`; warns and returns [] if impossible."""
  if "tokenizer.ggml.tokens" not in metadata or "tokenizer.ggml.model" not in metadata:
    warnings.warn(f"{gguf_path} has no tokenizer metadata (tokenizer.ggml.*); "
                  "the converted checkpoint has no tokenizer", ConversionWarning, stacklevel=3)
    return []
  checkpoint.import_transformers()   # without its "PyTorch was not found" notice (no torch needed here)
  try:
    try:
      tok = _build_from_metadata(metadata)
    except ImportError:   # transformers moved its GGUF internals: use the public (torch) path
      tok = _build_with_auto_tokenizer(gguf_path)
  except Exception as e:  # noqa: BLE001
    warnings.warn(f"could not build a tokenizer from {gguf_path} ({type(e).__name__}: {e}); "
                  "the converted checkpoint has no tokenizer", ConversionWarning, stacklevel=3)
    return []
  before = set(os.listdir(out))
  tok.save_pretrained(str(out))
  return sorted(set(os.listdir(out)) - before)
