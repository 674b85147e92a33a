"""Reads a `llama` or `qwen2` `.gguf` file tensor by tensor with `gguf.GGUFReader` (no torch).

Tensors are dequantized with `gguf.quants.dequantize` to float32 in torch `(out, in)` layout
(F32, F16, BF16 and the quantized types the `gguf` package reads: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
the K-quants Q2_K ... Q6_K, ...); a tensor of any other type is named in a ConversionError before
anything is read. The model config comes from the `<architecture>.*` metadata keys, the
vocabulary size from the token list, tied embeddings from the absence of `output.weight`.

Architectures differ in how llama.cpp's converter stored them:
  * `llama`: Q/K rows permuted for llama.cpp's interleaved RoPE (undone here); biases optional.
  * `qwen2`: Q/K rows as in the Hugging Face checkpoint (llama.cpp runs it with NeoX-style
    rotate-half RoPE, which is ours); q/k/v carry biases, the output projection does not.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from conversions.errors import ConversionError, name_list
from conversions.naming import gguf_mapping
from polar_jax.config import ModelConfig, RopeScaling, UnsupportedConfigError


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
  """How one `general.architecture` maps onto a ModelConfig and its tensors.

  Attributes:
    model_type: the ModelConfig model_type.
    permuted_qk: Q/K weight (and bias) rows are in llama.cpp's interleaved-RoPE order.
    qkv_bias: True: q/k/v biases are part of the architecture (missing ones are an error);
      None: present when the file has `blk.0.attn_q.bias`.
  """

  model_type: str
  permuted_qk: bool
  qkv_bias: bool | None


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(model_type="llama", permuted_qk=True, qkv_bias=None),
    "qwen2": GGUFArchitecture(model_type="qwen2", permuted_qk=False, qkv_bias=True),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)


class GGUFSource:
  """A `llama` or `qwen2` GGUF file as a tensor source.

  Attributes:
    path: the file.
    format: "gguf".
    metadata: `{key: value}` of every metadata field (strings, numbers, lists).
    architecture: the `GGUFArchitecture` of `general.architecture`.
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
    self._check_tensor_types()

  # ---- config --------------------------------------------------------------------------------
  def _config(self) -> ModelConfig:
    md = self.metadata
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
      raise ConversionError(f"{self.path}: unknown GGUF architecture {arch!r}; "
                            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    self.architecture = GGUF_ARCHITECTURES[arch]

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
    qkv_bias = self.architecture.qkv_bias
    if qkv_bias is None:
      qkv_bias = f"{layer0}.attn_q.bias" in self._tensors
    try:
      return ModelConfig(
          model_type=self.architecture.model_type,
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
          attn_bias=qkv_bias,
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

  def _check_tensor_types(self) -> None:
    """Names every tensor whose type `gguf.quants.dequantize` cannot read, before any data is read."""
    readable = _readable_types()
    if readable is None:   # the gguf package no longer lists its types: `read` reports such a tensor instead
      return
    bad: dict[str, list[str]] = {}
    for name, t in self._tensors.items():
      if t.tensor_type not in readable:
        bad.setdefault(t.tensor_type.name, []).append(name)
    if bad:
      detail = "; ".join(f"{q} ({len(names)}): {name_list(names, 5)}" for q, names in bad.items())
      raise ConversionError(f"{self.path}: unsupported tensor types, which {_gguf_version()} cannot dequantize: "
                            f"{detail}; supported: {', '.join(sorted(q.name for q in readable))}")

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
    return gguf_mapping(self.config, targets, permuted_qk=self.architecture.permuted_qk)

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


def _readable_types() -> frozenset | None:
  """The GGML tensor types `gguf.quants.dequantize` reads: F32, F16 and every quantization the package registers
  (its `_type_traits` table, the one `dequantize` looks types up in); None if that table is gone."""
  from gguf import GGMLQuantizationType
  try:
    from gguf.quants import _type_traits
  except ImportError:
    return None
  return frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits})


def _gguf_version() -> str:
  try:
    from importlib.metadata import version
    return f"gguf {version('gguf')}"
  except Exception:  # noqa: BLE001 - metadata unavailable
    return "gguf"


def _opt_int(v) -> int | None:
  return None if v is None else int(v)


def _field_value(field) -> Any:
  """A metadata field as a Python value (str, int, float, bool or list)."""
  v = field.contents()
  if isinstance(v, np.generic):
    v = v.item()
  return v
