"""Reads a llama-family `.gguf` file tensor by tensor with `gguf.GGUFReader` (no torch).

Tensors are dequantized with `gguf.quants.dequantize` to float32 in torch `(out, in)` layout;
the model config comes from the `llama.*` metadata keys, the vocabulary size from the token
list, tied embeddings from the absence of `output.weight`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from conversions.errors import ConversionError
from conversions.naming import gguf_mapping
from polar_jax.config import ModelConfig, RopeScaling, UnsupportedConfigError

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


class GGUFSource:
  """A llama-family GGUF file as a tensor source.

  Attributes:
    path: the file.
    format: "gguf".
    metadata: `{key: value}` of every metadata field (strings, numbers, lists).
    config: the ModelConfig.
  """

  format = "gguf"

  def __init__(self, path: pathlib.Path):
    self.path = path
    try:
      from gguf import GGUFReader
      reader = GGUFReader(str(path))
      self.metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
      self._tensors = {t.name: t for t in reader.tensors}
    except Exception as e:  # noqa: BLE001 - truncated, not a GGUF, unsupported version, ...
      raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if len(self._tensors) != len(reader.tensors):
      raise ConversionError(f"{path}: duplicate tensor names")
    del reader   # its per-element field arrays (~100 MB for a 49k vocabulary) are no longer needed
    self.config = self._config()

  # ---- config --------------------------------------------------------------------------------
  def _config(self) -> ModelConfig:
    md = self.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
      raise ConversionError(f"{self.path}: unknown GGUF architecture {arch!r}; "
                            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def key(name, default=KeyError):
      full = f"{arch}.{name}"
      if full in md:
        return md[full]
      if default is KeyError:
        raise ConversionError(f"{self.path}: metadata key {full!r} missing")
      return default

    if key("expert_count", 0):
      raise ConversionError(f"{self.path}: mixture-of-experts GGUF models ({arch}.expert_count="
                            f"{key('expert_count')}) are unsupported")
    if "rope_freqs.weight" in self._tensors:
      raise ConversionError(f"{self.path}: per-frequency RoPE scaling (tensor rope_freqs.weight, "
                            "llama3-style) is unsupported for GGUF; convert the Hugging Face checkpoint instead")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    rot_dim = int(key("rope.dimension_count", head_dim))
    if rot_dim != head_dim:
      raise ConversionError(f"{self.path}: partial rotary embeddings (rope.dimension_count={rot_dim} != "
                            f"head_dim={head_dim}) are unsupported")
    scaling = None
    rope_type = key("rope.scaling.type", "none")
    if rope_type == "linear":
      scaling = RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif rope_type not in ("none", None):
      raise ConversionError(f"{self.path}: unsupported RoPE scaling {rope_type!r}; supported: none, linear")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
      vocab = len(tokens)
    elif f"{arch}.vocab_size" in md:
      vocab = int(md[f"{arch}.vocab_size"])
    elif "token_embd.weight" in self._tensors:
      vocab = self.shape("token_embd.weight")[0]
    else:
      raise ConversionError(f"{self.path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens, "
                            f"{arch}.vocab_size or token_embd.weight)")
    intermediate = key("feed_forward_length")
    if isinstance(intermediate, list):
      raise ConversionError(f"{self.path}: per-layer feed_forward_length is unsupported")
    layer0 = "blk.0"
    try:
      return ModelConfig(
          model_type="llama",
          vocab_size=int(vocab),
          hidden_size=hidden,
          intermediate_size=int(intermediate),
          num_layers=int(key("block_count")),
          num_heads=heads,
          num_kv_heads=kv_heads,
          head_dim=head_dim,
          max_position_embeddings=int(key("context_length")),
          norm="rms",
          norm_eps=float(key("attention.layer_norm_rms_epsilon")),
          mlp="gated",
          activation="silu",
          attn_bias=f"{layer0}.attn_q.bias" in self._tensors,
          o_bias=f"{layer0}.attn_output.bias" in self._tensors,
          positions="rope",
          rope_theta=float(key("rope.freq_base", 10000.0)),
          rope_scaling=scaling,
          tie_word_embeddings="output.weight" not in self._tensors,
          bos_token_id=_opt_int(md.get("tokenizer.ggml.bos_token_id")),
          eos_token_id=_opt_int(md.get("tokenizer.ggml.eos_token_id")),
          pad_token_id=_opt_int(md.get("tokenizer.ggml.padding_token_id")),
      )
    except UnsupportedConfigError as e:
      raise ConversionError(f"{self.path}: {e}") from e

  # ---- tensor source interface ---------------------------------------------------------------
  def default_dtype(self) -> str:
    return "float32"

  def names(self) -> list[str]:
    return list(self._tensors)

  def canonical(self, name: str) -> str:
    return name

  def ignored(self, canonical: str) -> bool:
    return False

  def mapping(self, targets) -> dict:
    return gguf_mapping(self.config, targets)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))   # GGUF lists dims fastest-first

  def read(self, name: str) -> np.ndarray:
    from gguf.quants import dequantize
    t = self._tensors[name]
    try:
      arr = dequantize(t.data, t.tensor_type)
    except Exception as e:  # noqa: BLE001 - unsupported quantization, truncated data
      raise ConversionError(f"cannot dequantize tensor {name} ({t.tensor_type.name}) from {self.path}: "
                            f"{type(e).__name__}: {e}") from e
    shape = self.shape(name)
    if tuple(arr.shape) != shape:
      arr = arr.reshape(shape)
    return arr

  def close(self) -> None:
    self._tensors.clear()


def _opt_int(v) -> int | None:
  return None if v is None else int(v)


def _field_value(field) -> Any:
  """A metadata field as a Python value (str, int, float, bool or list)."""
  v = field.contents()
  if isinstance(v, np.generic):
    v = v.item()
  return v
