"""Model configuration: one frozen dataclass for every supported decoder family.

`ModelConfig.from_hf_config(d)` reads a Hugging Face `config.json` dict written by
transformers 4.x or 5.x (`rope_theta` or `rope_parameters`, `torch_dtype` or `dtype`).
Anything we do not implement raises `UnsupportedConfigError` naming what is supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("opt", "llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("relu", "gelu", "silu")


class UnsupportedConfigError(ValueError):
  """A config asks for an architecture or option polar_jax does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (`rope_type` "linear" or "llama3")."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only LM.

  Attributes:
    model_type: one of SUPPORTED_MODEL_TYPES.
    vocab_size, hidden_size (d), intermediate_size (F), num_layers (L),
    num_heads (Hq), num_kv_heads (Hkv), head_dim (D): shapes.
    max_position_embeddings: longest sequence (prompt + generated) the model takes.
    norm: "rms" (LLaMA family) or "layer" (OPT).
    norm_eps: epsilon of every norm.
    mlp: "gated" (act(gate) * up -> down) or "relu_mlp" (fc1 -> act -> fc2, OPT).
    activation: MLP activation.
    attn_bias: q/k/v projections carry biases (Qwen2, OPT).
    o_bias: output projection carries a bias (OPT).
    mlp_bias: MLP projections carry biases (OPT).
    positions: "rope" or "learned" (OPT, offset 2).
    rope_theta, rope_scaling: rotary settings ("rope" only).
    sliding_window: attend to at most this many most recent keys (Mistral), or None.
    tie_word_embeddings: lm_head shares the embedding matrix.
    pre_norm: norms before attention/MLP (False = OPT-350m post-LN).
    final_norm: a norm after the last layer.
    word_embed_proj_dim: OPT embedding width (project_in / project_out when != hidden).
    bos/eos/pad_token_id: special tokens (may be None).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm: str = "rms"
  norm_eps: float = 1e-6
  mlp: str = "gated"
  activation: str = "silu"
  attn_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  positions: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  pre_norm: bool = True
  final_norm: bool = True
  word_embed_proj_dim: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedConfigError(
          f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.activation not in SUPPORTED_ACTIVATIONS:
      raise UnsupportedConfigError(
          f"unsupported activation {self.activation!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  # ---- derived -------------------------------------------------------------------------
  @property
  def group_size(self) -> int:
    """Query heads per KV group (Hq // Hkv)."""
    return self.num_heads // self.num_kv_heads

  @property
  def embed_dim(self) -> int:
    """Width of the token embedding (OPT's word_embed_proj_dim, else hidden_size)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  # ---- serialisation ---------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
      d["eos_token_id"] = tuple(d["eos_token_id"])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def fingerprint(self) -> str:
    """Stable hash of the architecture (used to check that routers match a model)."""
    d = self.to_dict()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
      d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

  # ---- Hugging Face ----------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dict (transformers 4.x or 5.x)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedConfigError(
          f"unknown architecture: model_type {model_type!r} "
          f"(architectures={hf.get('architectures')}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    special = dict(
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    if model_type == "opt":
      return _opt_from_hf(hf, special)
    return _llama_like_from_hf(hf, special)


def _opt_from_hf(hf: dict[str, Any], special: dict[str, Any]) -> ModelConfig:
  d = hf["hidden_size"]
  heads = hf["num_attention_heads"]
  act = hf.get("activation_function", "relu")
  if act not in ("relu", "gelu"):
    raise UnsupportedConfigError(f"OPT activation_function {act!r} unsupported; supported: relu, gelu")
  if not hf.get("layer_norm_elementwise_affine", True):
    raise UnsupportedConfigError("OPT with layer_norm_elementwise_affine=False is unsupported")
  bias = hf.get("enable_bias", True)
  pre_norm = hf.get("do_layer_norm_before", True)
  wepd = hf.get("word_embed_proj_dim", d)
  return ModelConfig(
      model_type="opt",
      vocab_size=hf["vocab_size"],
      hidden_size=d,
      intermediate_size=hf["ffn_dim"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=d // heads,
      max_position_embeddings=hf["max_position_embeddings"],
      norm="layer",
      norm_eps=1e-5,
      mlp="relu_mlp",
      activation=act,
      attn_bias=bias,
      o_bias=bias,
      mlp_bias=bias,
      positions="learned",
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      pre_norm=pre_norm,
      final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
      word_embed_proj_dim=wepd if wepd != d else None,
      **special,
  )


def _rope_settings(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads RoPE theta and scaling from 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or None
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
    scaling = params
  if scaling is None:
    return float(theta), None
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedConfigError(
        f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
  if rope_type == "default":
    return float(theta), None
  return float(theta), RopeScaling(
      rope_type=rope_type,
      factor=float(scaling.get("factor", 1.0)),
      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(
          scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
  )


def _llama_like_from_hf(hf: dict[str, Any], special: dict[str, Any]) -> ModelConfig:
  model_type = hf["model_type"]
  d = hf["hidden_size"]
  heads = hf["num_attention_heads"]
  act = hf.get("hidden_act", "silu")
  if act not in SUPPORTED_ACTIVATIONS:
    raise UnsupportedConfigError(f"hidden_act {act!r} unsupported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
  if hf.get("mlp_bias", False):
    raise UnsupportedConfigError("mlp_bias=True is unsupported for LLaMA-family models")
  theta, scaling = _rope_settings(hf)
  window = None
  if model_type == "mistral":
    window = hf.get("sliding_window")
  elif model_type == "qwen2" and hf.get("use_sliding_window", False):
    raise UnsupportedConfigError("Qwen2 with use_sliding_window=True is unsupported")
  attn_bias = bool(hf.get("attention_bias", False)) or model_type == "qwen2"
  pretraining_tp = hf.get("pretraining_tp", 1)
  if pretraining_tp not in (None, 1):
    raise UnsupportedConfigError("pretraining_tp > 1 is unsupported")
  return ModelConfig(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=d,
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads,
      max_position_embeddings=hf["max_position_embeddings"],
      norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp="gated",
      activation=act,
      attn_bias=attn_bias,
      o_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
      positions="rope",
      rope_theta=theta,
      rope_scaling=scaling,
      sliding_window=window,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **special,
  )
