"""Router directories: an Orbax checkpoint of the weights plus `metadata.json`.

    DIR/
      params/          Orbax (StandardCheckpointer) tree {"head": {"w_ldg", "b_lg"},
                       "neuron": {"w_down_ldr", "w_up_lrn", "b_ln"}}  (neuron only for ReLU MLPs)
      metadata.json    format_version, fingerprint, model (its ModelConfig), shapes, train settings,
                       data and token counts, per-layer validation recall/precision, mlp_topk table
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from polar_jax.config import ModelConfig
from polar_jax.routers.modules import HeadRouters, NeuronRouters, RouterMismatchError, Routers

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
DEFAULT_MODEL_ROUTERS = "smollm2-135m"
DEFAULT_NAME = "default"   # what `load_routers("default", model)` and `--routers default` call the shipped routers


def default_routers_dir(name: str = DEFAULT_MODEL_ROUTERS) -> pathlib.Path:
  """Routers shipped inside the package (`polar_jax/assets/routers/<name>`)."""
  return pathlib.Path(__file__).resolve().parent.parent / "assets" / "routers" / name


def routers_dir(directory: str | os.PathLike | None) -> pathlib.Path:
  """The absolute router directory `directory` names: None or the string "default" -> the shipped SmolLM2-135M
  routers (`default_routers_dir()`); anything else is a path (`~` expanded; a local folder called "default" is
  "./default" or a `pathlib.Path`). Absolute because Orbax reads and writes only absolute paths."""
  if directory is None or (isinstance(directory, str) and directory == DEFAULT_NAME):
    return default_routers_dir()
  return pathlib.Path(directory).expanduser().absolute()


def _tree(routers: Routers) -> dict[str, Any]:
  tree = {"head": {"w_ldg": np.asarray(routers.head.w_ldg[...]), "b_lg": np.asarray(routers.head.b_lg[...])}}
  if routers.neuron is not None:
    n = routers.neuron
    tree["neuron"] = {"w_down_ldr": np.asarray(n.w_down_ldr[...]), "w_up_lrn": np.asarray(n.w_up_lrn[...]),
                      "b_ln": np.asarray(n.b_ln[...])}
  return tree


def save_routers(routers: Routers, directory: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 *, overwrite: bool = True) -> pathlib.Path:
  """Writes `routers` (and `metadata`, merged over `routers.metadata`) to `directory`."""
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).expanduser().absolute()
  if directory.exists():
    if not overwrite:
      raise FileExistsError(f"{directory} exists")
    shutil.rmtree(directory)
  directory.mkdir(parents=True)
  tree = _tree(routers)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / PARAMS_DIR, tree)
  md = dict(routers.metadata)
  md.update(metadata or {})
  md["format_version"] = FORMAT_VERSION
  md["fingerprint"] = routers.fingerprint
  md["shapes"] = {k: list(v.shape) for part in tree.values() for k, v in part.items()}
  md["mlp_topk"] = {str(b): list(ks) for b, ks in sorted(routers.mlp_topk.items())}
  (directory / METADATA_FILE).write_text(json.dumps(md, indent=1, sort_keys=True) + "\n")
  routers.metadata = md
  return directory


def read_metadata(directory: str | os.PathLike | None) -> dict[str, Any]:
  """`metadata.json` of a router directory, "default" / None for the shipped routers (RouterMismatchError when
  missing or unreadable)."""
  directory = routers_dir(directory)
  path = directory / METADATA_FILE
  if not path.is_file():
    raise RouterMismatchError(f"{directory} is not a router directory: {METADATA_FILE} is missing "
                              "(write one with polar-train-routers)")
  try:
    md = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RouterMismatchError(f"{path} is not valid JSON: {e}") from e
  if md.get("format_version") != FORMAT_VERSION:
    raise RouterMismatchError(f"{path}: format_version {md.get('format_version')!r}, expected {FORMAT_VERSION}")
  return md


def load_routers(directory: str | os.PathLike | None = None, model_or_config=None) -> Routers:
  """Loads routers written by `polar-train-routers` (default: the shipped SmolLM2-135M routers).

  Example:
    routers = polar_jax.load_routers("default", model)    # the shipped SmolLM2-135M routers
    routers = polar_jax.load_routers("routers/mine", model)  # written by polar-train-routers --out routers/mine

  Args:
    directory: a router directory (relative paths and `~` work), or "default" / None for the shipped SmolLM2-135M
      routers (`default_routers_dir()`).
    model_or_config: a `CausalLM` or `ModelConfig`; when given, the routers must have been trained for
      the same architecture (`ModelConfig.fingerprint()`), else RouterMismatchError says which is which.

  Returns:
    `Routers` with float32 weights, the neuron budget table and the metadata.
  """
  import orbax.checkpoint as ocp
  directory = routers_dir(directory)
  md = read_metadata(directory)
  shapes = {k: tuple(v) for k, v in md["shapes"].items()}
  target = {"head": {k: jax.ShapeDtypeStruct(shapes[k], np.float32) for k in ("w_ldg", "b_lg")}}
  if "w_up_lrn" in shapes:
    target["neuron"] = {k: jax.ShapeDtypeStruct(shapes[k], np.float32) for k in ("w_down_ldr", "w_up_lrn", "b_ln")}
  try:
    with ocp.StandardCheckpointer() as ckpt:
      tree = ckpt.restore(directory / PARAMS_DIR, target)
  except Exception as e:  # noqa: BLE001
    raise RouterMismatchError(f"cannot restore router weights from {directory / PARAMS_DIR}: "
                              f"{type(e).__name__}: {e}") from e
  num_layers, d, g = shapes["w_ldg"]
  head = HeadRouters(num_layers, d, g)
  head.w_ldg[...] = np.asarray(tree["head"]["w_ldg"])
  head.b_lg[...] = np.asarray(tree["head"]["b_lg"])
  neuron = None
  if "neuron" in tree:
    import flax.nnx as nnx
    _, r = shapes["w_down_ldr"][1:]
    neuron = NeuronRouters(num_layers, d, shapes["w_up_lrn"][2], r, rngs=nnx.Rngs(0))
    for k in ("w_down_ldr", "w_up_lrn", "b_ln"):
      getattr(neuron, k)[...] = np.asarray(tree["neuron"][k])
  table = {int(b): tuple(int(k) for k in ks) for b, ks in md.get("mlp_topk", {}).items()}
  routers = Routers(head, neuron, md["fingerprint"], table, md)
  if model_or_config is not None:
    config = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config
    routers.check_model(config, source=f"the routers in {directory}")
  return routers
