"""Reads a Hugging Face model directory tensor by tensor.

Weights, in order of preference: `model.safetensors.index.json` (sharded), `model.safetensors`,
`pytorch_model.bin.index.json` (sharded), `pytorch_model.bin`. Safetensors are read with
`safe_open(framework="numpy")` (no torch); `.bin` files need torch, imported only then, and are
memory-mapped (`torch.load(..., weights_only=True, mmap=True)`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np

from conversions.errors import ConversionError
from conversions.naming import canonical_hf_name, hf_ignored, hf_mapping
from polar_jax.config import ModelConfig, UnsupportedConfigError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"

# dtype names in config.json ("torch_dtype" in transformers 4.x, "dtype" in 5.x) we keep as default.
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from e


class HFSource:
  """A Hugging Face model directory as a tensor source.

  Attributes:
    path: the directory.
    format: "safetensors", "safetensors-sharded", "pytorch-bin" or "pytorch-bin-sharded".
    hf_config: the parsed config.json.
    config: the ModelConfig.
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
      raise ConversionError(f"{path} is not a Hugging Face model directory: no config.json "
                            f"(expected config.json plus {SAFETENSORS}, {SAFETENSORS_INDEX} or {BIN})")
    self.hf_config = read_json(cfg_path)
    if self.hf_config.get("quantization_config"):
      method = self.hf_config["quantization_config"].get("quant_method", "?")
      raise ConversionError(f"{cfg_path}: quantized Hugging Face checkpoints ({method}) are unsupported; "
                            "convert an unquantized (float32/bfloat16/float16) checkpoint")
    try:
      self.config = ModelConfig.from_hf_config(self.hf_config)
    except UnsupportedConfigError as e:
      raise ConversionError(f"{cfg_path}: {e}") from e
    except (KeyError, TypeError) as e:
      raise ConversionError(f"{cfg_path}: missing or invalid config key {e}") from e
    self._handles: dict[pathlib.Path, Any] = {}
    self._where: dict[str, pathlib.Path] = {}   # raw tensor name -> file
    self._bin: dict[pathlib.Path, dict] = {}
    self.files = self._weight_files()
    for f in self.files:
      for name in self._open(f):
        if name in self._where:
          raise ConversionError(f"tensor {name} appears in both {self._where[name].name} and {f.name}")
        self._where[name] = f

  # ---- files -------------------------------------------------------------------------------
  def _weight_files(self) -> list[pathlib.Path]:
    p = self.path
    for index, fmt in ((SAFETENSORS_INDEX, "safetensors-sharded"), (BIN_INDEX, "pytorch-bin-sharded")):
      if (p / index).is_file():
        weight_map = read_json(p / index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
          raise ConversionError(f"{p / index}: no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
          raise ConversionError(f"{p / index} lists shard files that do not exist: {', '.join(missing)}")
        self.format = fmt
        return [p / f for f in files]
    if (p / SAFETENSORS).is_file():
      self.format = "safetensors"
      return [p / SAFETENSORS]
    if (p / BIN).is_file():
      self.format = "pytorch-bin"
      return [p / BIN]
    raise ConversionError(f"{p}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                          f"{BIN_INDEX} or {BIN})")

  def _open(self, f: pathlib.Path) -> list[str]:
    try:
      if f.suffix == ".safetensors":
        from safetensors import safe_open
        h = safe_open(str(f), framework="numpy")
        self._handles[f] = h
        return list(h.keys())
      try:
        import torch  # only for .bin checkpoints
      except ImportError as e:
        raise ConversionError(f"reading {f} needs torch (pip install torch), or save the model as "
                              "safetensors") from e
      try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError as e:
        if "mmap" not in str(e):
          raise
        sd = torch.load(str(f), map_location="cpu", weights_only=True)   # legacy (non-zip) format
      if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict of tensors")
      self._bin[f] = sd
      return list(sd)
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable file
      raise ConversionError(f"cannot read {f}: {type(e).__name__}: {e}") from e

  # ---- tensor source interface ---------------------------------------------------------------
  def default_dtype(self) -> str:
    name = self.hf_config.get("dtype") or self.hf_config.get("torch_dtype")
    return _DTYPE_NAMES.get(str(name), "float32")

  def names(self) -> list[str]:
    return list(self._where)

  def canonical(self, name: str) -> str:
    return canonical_hf_name(name)

  def ignored(self, canonical: str) -> bool:
    return hf_ignored(canonical, self.config)

  def mapping(self, targets) -> dict:
    return hf_mapping(self.config, targets)

  def shape(self, name: str) -> tuple[int, ...]:
    f = self._where[name]
    if f in self._bin:
      return tuple(self._bin[f][name].shape)
    return tuple(self._handles[f].get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    f = self._where[name]
    try:
      if f in self._bin:
        return _torch_to_numpy(self._bin[f][name])
      return self._handles[f].get_tensor(name)
    except Exception as e:  # noqa: BLE001
      raise ConversionError(f"cannot read tensor {name} from {f}: {type(e).__name__}: {e}") from e

  def close(self) -> None:
    self._handles.clear()
    self._bin.clear()


def _torch_to_numpy(t) -> np.ndarray:
  """A torch tensor as numpy in its own dtype (bf16 via an int16 view, no float32 detour)."""
  import torch
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()
