"""Saving and loading converted checkpoints.

A checkpoint directory (written by `polar-convert` / `conversions.convert`) holds:
  * `polar_config.json`: `ModelConfig.to_dict()` plus `"format_version"`;
  * `params/`: an Orbax checkpoint (StandardCheckpointer) of the nested parameter dict, keyed
    by the flat names of `polar_jax.model.param_shapes` split on "." (e.g.
    `{"layers": {"0": {"attn": {"q_proj": {"kernel": ...}}}}}`);
  * tokenizer files (`tokenizer.json`, `tokenizer_config.json`, ...), when the source had a tokenizer;
  * `conversion.json`: provenance (source, format, dtype, tensor count, polar_jax version).

Example:
  model = load_model("ckpt/smollm2")                 # float32 on CPU, bfloat16 on GPU
  tokenizer = load_tokenizer("ckpt/smollm2")
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax.config import ModelConfig
from polar_jax.model import CausalLM, abstract_model

FORMAT_VERSION = 1
CONFIG_FILE = "polar_config.json"
PARAMS_DIR = "params"
CONVERSION_FILE = "conversion.json"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_DTYPE_ALIASES = {
    "float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16, "half": jnp.float16,
}


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete or does not match its config."""


def resolve_dtype(dtype: Any = None) -> jnp.dtype:
  """A floating dtype from a name ("bfloat16", "bf16", ...) or dtype; None -> float32 on CPU, else bfloat16."""
  if dtype is None:
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  if isinstance(dtype, str):
    if dtype.lower() not in _DTYPE_ALIASES:
      raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return jnp.dtype(_DTYPE_ALIASES[dtype.lower()])
  d = jnp.dtype(dtype)
  if not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f"dtype must be floating, got {d}")
  return d


# ---- writing ------------------------------------------------------------------------------------
def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def save_params(directory: str | os.PathLike, params_flat: Mapping[str, np.ndarray]) -> None:
  """Writes `{flat name: array}` as an Orbax checkpoint of the nested dict into `directory`.

  `directory` is the `params/` folder itself and must not exist yet. Arrays are stored in
  their own dtype (numpy or jax arrays).
  """
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers
  directory = absolute_path(directory)
  if directory.exists():
    raise CheckpointError(f"{directory} already exists")
  tree = _nest({k: np.asarray(v) for k, v in params_flat.items()})
  # Orbax deep-copies host arrays before writing by default (a second copy of the whole model
  # in memory); ours are not modified while saving. Uncompressed: 3x faster, no extra buffers.
  try:
    numpy_handler = type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  except TypeError:   # orbax versions without the option (e.g. the GPU image's) copy; correct, more memory
    numpy_handler = type_handlers.NumpyHandler()
  registry = type_handlers.create_type_handler_registry(
      (np.ndarray, numpy_handler),
      (jax.Array, type_handlers.ArrayHandler()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)

  def write() -> None:
    with ocp.Checkpointer(handler) as ckpt:
      ckpt.save(directory, args=ocp.args.PyTreeSave(tree))

  run_to_completion(write)


def run_to_completion(fn: Callable[[], None]) -> None:
  """Runs `fn` in a worker thread and returns only once it has ended, even if Ctrl-C arrives meanwhile.

  Orbax writes from background threads; an interrupt that stopped the main thread mid-save used to leave them
  writing into a directory the caller was already removing (a half-written folder reappeared after the cleanup).
  Here the interrupt (and any further one) waits for `fn` to finish, then is raised, so a caller's cleanup runs
  after the last write. An exception of `fn` is raised in the caller.
  """
  error: list[BaseException] = []
  done = threading.Event()   # not Thread.join: an interrupted join marks a running thread as ended (Python < 3.13)

  def target() -> None:
    try:
      fn()
    except BaseException as e:  # noqa: BLE001 - handed to the caller
      error.append(e)
    finally:
      done.set()

  threading.Thread(target=target, name="polar_jax-save").start()
  interrupt = None
  while not done.is_set():
    try:
      done.wait()
    except KeyboardInterrupt as e:   # keep waiting: nothing may be written after the caller cleans up
      interrupt = interrupt or e
  if interrupt is not None:
    raise interrupt
  if error:
    raise error[0]


def save_config(path: str | os.PathLike, config: ModelConfig) -> None:
  """Writes `polar_config.json` (config + format version) into the checkpoint directory `path`."""
  d = {"format_version": FORMAT_VERSION, **config.to_dict()}
  absolute_path(path).joinpath(CONFIG_FILE).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_params(model: CausalLM) -> dict[str, jax.Array]:
  """`{flat name: array}` of a model's parameters (the names of `param_shapes`; fused projections of
  `polar_jax.fusion` are split back)."""
  from polar_jax.fusion import unfused_params
  state = nnx.state(model, nnx.Param)
  flat = {".".join(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(state)}
  return unfused_params(model.config, flat)


def save_model(path: str | os.PathLike, model: CausalLM) -> None:
  """Writes `polar_config.json` and `params/` of a live model into a new directory `path` (no tokenizer)."""
  path = absolute_path(path)
  path.mkdir(parents=True, exist_ok=True)
  if (path / PARAMS_DIR).exists():
    raise CheckpointError(f"{path / PARAMS_DIR} already exists")
  save_params(path / PARAMS_DIR, {k: np.asarray(v) for k, v in model_params(model).items()})
  save_config(path, model.config)


# ---- reading ------------------------------------------------------------------------------------
def absolute_path(path: str | os.PathLike) -> pathlib.Path:
  """`path` with `~` expanded, made absolute against the current directory. Orbax reads and writes only absolute
  paths (a relative one fails deep inside it with an unrelated error), so every path given to it goes through here."""
  return pathlib.Path(path).expanduser().absolute()


def _checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  path = absolute_path(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint directory {path} does not exist "
                          "(create one with: polar-convert SRC OUT)")
  return path


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig stored in a checkpoint directory's `polar_config.json`."""
  path = _checkpoint_dir(path)
  cfg_path = path / CONFIG_FILE
  if not cfg_path.is_file():
    raise CheckpointError(f"{path} is not a polar_jax checkpoint: {CONFIG_FILE} is missing "
                          "(create one with: polar-convert SRC OUT)")
  try:
    d = json.loads(cfg_path.read_text(encoding="utf-8"))
    version = d.pop("format_version", None)
    if version is None or version > FORMAT_VERSION:
      raise CheckpointError(f"{cfg_path}: unsupported format_version {version!r} "
                            f"(this polar_jax reads up to {FORMAT_VERSION})")
    return ModelConfig.from_dict(d)
  except CheckpointError:
    raise
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{cfg_path} is invalid: {type(e).__name__}: {e}") from e


def _saved_shapes(params_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
  import orbax.checkpoint as ocp
  if not params_dir.is_dir():
    raise CheckpointError(f"{params_dir.parent} is incomplete: {PARAMS_DIR}/ is missing")
  if not (params_dir / "_METADATA").is_file():
    raise CheckpointError(f"{params_dir} is not a complete Orbax checkpoint (_METADATA missing)")
  try:
    with ocp.StandardCheckpointer() as ckpt:
      md = ckpt.metadata(params_dir)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read {params_dir}: {type(e).__name__}: {e}") from e
  tree = getattr(md, "item_metadata", md)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"cannot read the parameter metadata in {params_dir} (Orbax returned {type(tree).__name__})")
  return {k: tuple(v.shape) for k, v in _flatten(tree).items()}


def load_model(path: str | os.PathLike, dtype: Any = None, *,
               sharding: jax.sharding.Sharding | None = None, mesh: jax.sharding.Mesh | None = None,
               fuse: bool = False) -> CausalLM:
  """Restores a converted checkpoint into a `CausalLM` with real arrays.

  Args:
    path: checkpoint directory (see module docstring).
    dtype: parameter dtype ("float32", "bfloat16", "float16" or a jnp dtype); None -> float32
      on CPU, bfloat16 on GPU/TPU. Stored arrays are cast while restoring.
    sharding: where to place every parameter; default the first device.
    mesh: a ("dp", "tp") mesh (`polar_jax.sharding.make_mesh`): each parameter is restored straight into its
      tensor-parallel shards (`polar_jax.sharding.param_spec`; no full copy on one device) and decoding runs
      tensor parallel. ValueError when the KV groups or MLP width do not divide by tp. Excludes `sharding`.
    fuse: fuse each layer's q/k/v and gate/up projections into one matmul each (`polar_jax.fusion`; faster
      decoding, same results up to float32 summation order). `polar-generate` and the demo do this.

  Raises:
    CheckpointError: the directory is missing, incomplete, or its arrays do not match the config.
  """
  path = _checkpoint_dir(path)
  config = load_config(path)
  dtype = resolve_dtype(dtype)
  saved = _saved_shapes(path / PARAMS_DIR)

  graphdef, state = nnx.split(abstract_model(config, dtype=dtype))
  leaves = {".".join(str(p) for p in p_): (p_, v.get_value()) for p_, v in nnx.to_flat_state(state)}
  missing = sorted(set(leaves) - set(saved))
  unexpected = sorted(set(saved) - set(leaves))
  wrong = [f"{k}: expected {tuple(leaves[k][1].shape)}, found {saved[k]}"
           for k in sorted(set(leaves) & set(saved)) if tuple(leaves[k][1].shape) != saved[k]]
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f"missing parameters: {', '.join(missing)}")
    if unexpected:
      parts.append(f"unexpected parameters: {', '.join(unexpected)}")
    if wrong:
      parts.append(f"shape mismatch: {'; '.join(wrong)}")
    raise CheckpointError(f"{path / PARAMS_DIR} does not match {CONFIG_FILE}: " + " | ".join(parts))

  import orbax.checkpoint as ocp
  if mesh is not None:
    from polar_jax import sharding as tp_sharding
    if sharding is not None:
      raise ValueError("pass either sharding= or mesh=, not both")
    mesh = tp_sharding.as_decode_mesh(mesh)   # a plain jax.make_mesh (Explicit axes, "tp" only) works too
    tp_sharding.check_config(config, tp_sharding.mesh_tp(mesh))
    place = {k: jax.sharding.NamedSharding(mesh, tp_sharding.param_spec(k)) for k in leaves}
  else:
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = {k: sharding for k in leaves}
  target = _nest({k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place[k]) for k, (_, s) in leaves.items()})
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = _flatten(ckpt.restore(path / PARAMS_DIR, target))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot restore {path / PARAMS_DIR}: {type(e).__name__}: {e}") from e

  pure: dict[Any, Any] = {}
  for name, (p, _) in leaves.items():
    node = pure
    for part in p[:-1]:
      node = node.setdefault(part, {})
    node[p[-1]] = restored[name]
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  if fuse:
    from polar_jax.fusion import fuse_projections
    fuse_projections(model)
  return model


# `tokenizer_class` values naming the generic fast tokenizer (a `tokenizer.json` and nothing model-specific): the
# class `AutoTokenizer` would pick, loaded directly.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(path: pathlib.Path) -> str | None:
  try:
    return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer saved in a checkpoint directory, as `transformers.AutoTokenizer` loads it. A generic fast
  tokenizer (what `polar-convert` writes for GGUF files) is loaded by its own class: the same object, without the
  seconds `AutoTokenizer`'s import costs (it imports PyTorch when installed)."""
  path = _checkpoint_dir(path)
  if not any((path / n).is_file() for n in TOKENIZER_MARKERS):
    raise CheckpointError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); the source "
                          "checkpoint had none - copy a tokenizer into it or pass one explicitly")
  transformers = import_transformers()
  if _tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
    cls = getattr(transformers, "TokenizersBackend", None) or transformers.PreTrainedTokenizerFast
  else:
    cls = transformers.AutoTokenizer
  try:
    return cls.from_pretrained(str(path), local_files_only=True)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e


def import_transformers():
  """The `transformers` module, imported without its advisory notice that PyTorch was not found (tokenizers need
  no PyTorch; the notice printed on every command). Only the advisory notices of the import itself are muted, by
  the switch transformers reads for them; its warnings and errors still show, and so do later notices."""
  if "transformers" not in sys.modules:
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
      import transformers  # noqa: F401
    finally:
      if before is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = before
  return sys.modules["transformers"]
