"""The conversion driver: HF directory or llama / qwen2 GGUF -> polar_jax checkpoint directory.

Example:
  from conversions import convert
  result = convert("path/to/hf_model", "ckpt/model", dtype="bfloat16")
  model = polar_jax.checkpoint.load_model(result.out)

Tensors are validated (names and shapes) before any is read, then read one at a time,
transformed and cast to the output dtype at once, so host memory peaks near the output size.
Everything is written into a temporary directory next to OUT, which is renamed to OUT only when
complete: a failure or an interrupt (Ctrl-C) leaves neither OUT nor the temporary directory behind.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np

from conversions.errors import ConversionError, name_list
from conversions.gguf_reader import GGUFSource
from conversions.hf import HFSource
from conversions.naming import Entry
from conversions.tokenizer import copy_hf_tokenizer, write_gguf_tokenizer
from polar_jax import checkpoint
from polar_jax.config import ModelConfig
from polar_jax.model import param_shapes

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  """What `convert` wrote."""

  out: pathlib.Path
  config: ModelConfig
  source_format: str
  dtype: str
  tensor_count: int
  parameter_count: int
  tokenizer_files: tuple[str, ...]
  seconds: float


def open_source(src: str | os.PathLike):
  """An `HFSource` for a directory, a `GGUFSource` for a `.gguf` file (or a file with GGUF magic)."""
  src = pathlib.Path(src)
  if src.is_dir():
    return HFSource(src)
  if not src.exists():
    raise ConversionError(f"source {src} does not exist")
  try:
    with open(src, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise ConversionError(f"cannot read {src}: {type(e).__name__}: {e}") from e
  if src.suffix.lower() == ".gguf" or magic == b"GGUF":
    return GGUFSource(src)
  raise ConversionError(f"unsupported source {src}: expected a Hugging Face model directory "
                        "(config.json + safetensors or pytorch_model.bin) or a .gguf file")


def _np_dtype(name: str) -> np.dtype:
  import ml_dtypes
  return np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name])


def plan(source) -> tuple[list[tuple[str, Entry, tuple[int, ...]]], dict[str, tuple[int, ...]]]:
  """Matches source tensors to parameters and checks shapes, before reading any data.

  Returns `([(source name, Entry, target shape)], param_shapes)` in source order.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped tensor.
  """
  expected = param_shapes(source.config)
  mapping = source.mapping(expected)
  seen: dict[str, str] = {}
  unexpected, wrong, items = [], [], []
  for name in source.names():
    canon = source.canonical(name)
    if canon in mapping:
      if canon in seen:
        raise ConversionError(f"tensors {seen[canon]} and {name} both map to {mapping[canon].target}")
      seen[canon] = name
      entry = mapping[canon]
      want = entry.source_shape(expected[entry.target])
      found = source.shape(name)
      if found != want:
        wrong.append(f"{name} (-> {entry.target}): expected {want}, found {found}")
      items.append((name, entry, expected[entry.target]))
    elif not source.ignored(canon):
      unexpected.append(name)
  missing = [k for k in mapping if k not in seen]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {name_list(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {name_list(unexpected)}")
  if wrong:
    problems.append(f"shape mismatch ({len(wrong)}): {'; '.join(wrong[:20])}"
                    + (f"; ... ({len(wrong) - 20} more)" if len(wrong) > 20 else ""))
  if problems:
    raise ConversionError(f"{source.path} does not match its {source.config.model_type} config: "
                          + " | ".join(problems))
  return items, expected


def read_params(source, items, dtype: str, progress: bool = True, workers: int | None = None) -> dict[str, np.ndarray]:
  """Reads, transforms and casts every planned tensor into `{flat name: array}`.

  Up to `workers` tensors (default: min(4, CPU count)) are in flight at once, so host memory
  stays near the output size plus a few source tensors.
  """
  from concurrent.futures import ThreadPoolExecutor

  from tqdm.auto import tqdm
  np_dtype = _np_dtype(dtype)

  def load(item):
    name, entry, shape = item
    arr = np.array(entry.apply(source.read(name)), dtype=np_dtype, order="C", copy=True)
    if arr.shape != shape:  # pragma: no cover - plan() checked the source shape
      raise AssertionError(f"{name}: produced {arr.shape}, expected {shape}")
    return arr

  workers = workers or min(4, os.cpu_count() or 1)
  params: dict[str, np.ndarray] = {}
  todo = iter(items)
  pending: collections.deque = collections.deque()
  with ThreadPoolExecutor(max_workers=workers) as pool, \
       tqdm(total=len(items), desc="converting", unit="tensor", disable=not progress) as bar:

    def submit_next():
      item = next(todo, None)
      if item is not None:
        pending.append((item[1].target, pool.submit(load, item)))

    for _ in range(2 * workers):   # a bounded window: memory stays near the output size
      submit_next()
    try:
      while pending:
        target, future = pending.popleft()
        params[target] = future.result()
        bar.update()
        submit_next()
    except BaseException:
      for _, future in pending:
        future.cancel()
      raise
  return params


def _version() -> str:
  try:
    from importlib.metadata import version
    return version("polar_jax")
  except Exception:  # noqa: BLE001 - not installed (running from a checkout)
    import polar_jax
    return getattr(polar_jax, "__version__", "unknown")


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
            force: bool = False, progress: bool = True,
            cancelled: Callable[[], bool] | None = None) -> ConversionResult:
  """Converts a Hugging Face model directory or a llama / qwen2 GGUF file into a polar_jax checkpoint.

  Args:
    src: HF directory (config.json + model.safetensors / sharded index / pytorch_model.bin)
      or a `.gguf` file (`llama` or `qwen2` architecture, any tensor type `gguf.quants.dequantize` reads).
    out: checkpoint directory to create.
    dtype: "float32", "bfloat16" or "float16"; None -> the source's dtype for HF
      (config `dtype`/`torch_dtype`, else float32), float32 for GGUF.
    force: replace an existing `out` (only after the new checkpoint is complete).
    progress: show a tqdm progress bar.
    cancelled: asked just before the finished checkpoint is renamed to `out`; True ends the conversion as a
      Ctrl-C would (KeyboardInterrupt, nothing left behind). The CLI passes whether SIGINT arrived: Python drops a
      KeyboardInterrupt raised while it runs a finalizer or a gc callback ("Exception ignored in ..."), so the
      signal alone can be lost.

  Raises:
    ConversionError: unknown architecture, missing/unexpected/mis-shaped tensors, unreadable
      files, or an existing `out` without `force`.
  """
  t0 = time.perf_counter()
  out = checkpoint.absolute_path(out)   # relative paths and ~ work; Orbax writes only absolute paths
  src = pathlib.Path(src).expanduser()
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
  if out.exists() and not force:
    raise ConversionError(f"output {out} already exists (pass force=True / --force to replace it)")
  source = open_source(src)
  try:
    dtype = dtype or source.default_dtype()
    items, expected = plan(source)
    # The name is chosen before the directory exists, so a Ctrl-C at any point after it removes what was made.
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    try:
      try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()   # the permissions a plain mkdir gives (umask applied), as OUT will have
      except OSError as e:
        raise ConversionError(f"cannot create {out}: {type(e).__name__}: {e}") from e
      params = read_params(source, items, dtype, progress)
      n_params = int(sum(a.size for a in params.values()))
      checkpoint.save_params(tmp / checkpoint.PARAMS_DIR, params)
      del params
      checkpoint.save_config(tmp, source.config)
      if isinstance(source, GGUFSource):
        tok_files = write_gguf_tokenizer(source.path, source.metadata, tmp)
      else:
        tok_files = copy_hf_tokenizer(source.path, tmp)
      info = {
          "source": str(src.absolute()),
          "source_format": source.format,
          "dtype": dtype,
          "tensor_count": len(items),
          "parameter_count": n_params,
          "tokenizer_files": tok_files,
          "polar_jax_version": _version(),
          "format_version": checkpoint.FORMAT_VERSION,
      }
      (tmp / checkpoint.CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
      if cancelled is not None and cancelled():
        raise KeyboardInterrupt
      _replace(tmp, out, force)
    except BaseException as e:   # Ctrl-C included: save_params has waited for Orbax's writes, nothing writes now
      shutil.rmtree(tmp, ignore_errors=True)
      if isinstance(e, OSError):   # disk full, permissions, ...
        raise ConversionError(f"cannot write {out}: {type(e).__name__}: {e}") from e
      raise
  finally:
    source.close()
  return ConversionResult(out=out, config=source.config, source_format=source.format, dtype=dtype,
                          tensor_count=len(items), parameter_count=n_params,
                          tokenizer_files=tuple(tok_files), seconds=time.perf_counter() - t0)


def _replace(tmp: pathlib.Path, out: pathlib.Path, force: bool) -> None:
  """Renames the finished `tmp` to `out`, moving an existing `out` aside first when forced."""
  old = None
  if out.exists() or out.is_symlink():
    if not force:
      raise ConversionError(f"output {out} already exists (pass force=True / --force to replace it)")
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    if old is not None:
      os.rename(old, out)
    raise
  if old is not None:
    if old.is_dir() and not old.is_symlink():
      shutil.rmtree(old, ignore_errors=True)
    else:
      old.unlink()
