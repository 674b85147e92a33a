"""Router training data: run the dense model over real text and record, per token and layer,

  * `x`: the router input, the layer's pre-attention normed hidden state `[d]` (float16 on disk);
  * `norms`: each KV group's attention-output norm before o_proj `[G]` (float32): the L2 norm over the
    group's query heads' contexts, the quantity the oracle and the head labels rank;
  * `fired` (ReLU MLPs only): which fc1 neurons fire, bit-packed along N (uint8 `[ceil(N / 8)]`).

A token at position t of a passage sees exactly what a decode step at position t sees (causal attention
over the passage's earlier tokens), so the labels follow the engine's decode semantics.

Chunks stream to `work_dir/chunk_NNNNN/{x,norms,fired}.npy` (written to a temporary name, then renamed),
and `work_dir/manifest.json` records the finished chunks; a rerun with the same settings resumes after the
last finished chunk. Memory stays bounded by one chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax.attention import group_norms
from polar_jax.routers.modules import has_neuron_mlp

MANIFEST = "manifest.json"
_SEQ_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class CollectSettings:
  """What a collection run records (a resumed run must have the same settings).

  Attributes:
    fingerprint: the model's `ModelConfig.fingerprint()`.
    data: description of the text (sources and split), for the manifest and the router metadata.
    max_tokens: stop after this many tokens.
    max_seq_len: passages are truncated to this many tokens.
    batch_tokens: padded tokens per forward pass (rows = batch_tokens // padded length).
    chunk_tokens: tokens per chunk on disk.
    seed: shuffles the passage order (mixes sources).
  """

  fingerprint: str
  data: str
  max_tokens: int
  max_seq_len: int = 512
  batch_tokens: int = 4096
  chunk_tokens: int = 8192
  seed: int = 0


@functools.partial(jax.jit, static_argnames=("graphdef", "with_fired"))
def _record_program(graphdef, state, tokens_bt, lengths_b, *, with_fired):
  return layer_records(nnx.merge(graphdef, state), tokens_bt, lengths_b, with_fired=with_fired)


def layer_records(model, tokens_bt, lengths_b, *, with_fired: bool):
  """Dense forward pass over compacted (right-padded) sequences, recording every layer.

  Returns:
    (x `[B, T, L, d]` float16, norms `[B, T, L, G]` float32, fired `[B, T, L, N]` bool or None).
  """
  b, t = tokens_bt.shape
  g = model.config.num_kv_heads
  h = model.embed_tokens(tokens_bt, jnp.broadcast_to(jnp.arange(t), (b, t)))
  xs, norms, fired = [], [], []
  for layer in model.layers:
    x = layer.attn_norm(h) if layer.pre_norm else h
    a, _, ctx = layer.attn.forward(x, lengths_b, return_context=True)
    xs.append(jnp.clip(x.astype(jnp.float32), -65000, 65000).astype(jnp.float16))
    norms.append(group_norms(ctx, g))
    h = h + a if layer.pre_norm else layer.attn_norm(h + a)
    if with_fired:
      y = layer.mlp_norm(h) if layer.pre_norm else h
      fired.append(layer.mlp.pre_activation(y) > 0)
    h = layer._mlp_block(h, layer.mlp)
  stack = lambda v: jnp.stack(v, axis=2)
  return stack(xs), stack(norms), (stack(fired) if with_fired else None)


def _bucket(n: int) -> int:
  for s in _SEQ_BUCKETS:
    if n <= s:
      return s
  return -(-n // 1024) * 1024


def _batches(seqs: Sequence[np.ndarray], batch_tokens: int) -> Iterator[list[np.ndarray]]:
  """Groups sequences of similar length (sorted), each group filling at most `batch_tokens` padded tokens."""
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
  group: list[np.ndarray] = []
  for i in order:
    s = seqs[i]
    rows = max(1, batch_tokens // _bucket(len(s)))
    if group and (len(group) >= rows or _bucket(len(s)) != _bucket(len(group[0]))):
      yield group
      group = []
    group.append(s)
  if group:
    yield group


class _Manifest:
  def __init__(self, work_dir: pathlib.Path, settings: CollectSettings):
    self.path = work_dir / MANIFEST
    self.settings = dataclasses.asdict(settings)
    self.chunks: list[dict] = []
    self.stats: dict = {}
    if self.path.is_file():
      md = json.loads(self.path.read_text())
      if md["settings"] != self.settings:
        raise ValueError(f"{work_dir} holds a collection with other settings ({md['settings']}); "
                         f"use another work directory or delete it")
      self.chunks = md["chunks"]
      self.stats = md.get("stats", {})

  @property
  def tokens(self) -> int:
    return sum(c["tokens"] for c in self.chunks)

  @property
  def sequences_done(self) -> int:
    return self.chunks[-1]["sequences_done"] if self.chunks else 0

  @property
  def complete(self) -> bool:
    return bool(self.stats.get("complete"))

  def write(self):
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": self.settings, "chunks": self.chunks, "stats": self.stats}, indent=1))
    os.replace(tmp, self.path)


def collect(model, sequences: Sequence[Sequence[int]], work_dir: str | os.PathLike, settings: CollectSettings,
            *, progress: bool = True) -> pathlib.Path:
  """Records router training data for `sequences` (token id lists) into `work_dir` (resumable).

  Sequences are shuffled with `settings.seed`, truncated to `max_seq_len`, and processed in chunks of about
  `chunk_tokens` tokens until `max_tokens` are recorded. Rerunning with the same settings skips finished
  chunks. Returns `work_dir`.
  """
  from tqdm.auto import tqdm
  work_dir = pathlib.Path(work_dir)
  work_dir.mkdir(parents=True, exist_ok=True)
  if settings.fingerprint != model.config.fingerprint():
    raise ValueError("CollectSettings.fingerprint does not match the model")
  manifest = _Manifest(work_dir, settings)
  if manifest.complete:
    return work_dir
  rng = np.random.default_rng(settings.seed)
  seqs = [np.asarray(s[:settings.max_seq_len], np.int32) for s in sequences]
  seqs = [seqs[i] for i in rng.permutation(len(seqs)) if len(seqs[i]) >= 2]
  with_fired = has_neuron_mlp(model.config)
  graphdef, state = nnx.split(model)
  bar = tqdm(total=settings.max_tokens, initial=min(manifest.tokens, settings.max_tokens), unit="tok",
             desc="collect", disable=not progress)
  pos = manifest.sequences_done
  while manifest.tokens < settings.max_tokens and pos < len(seqs):
    # One chunk: enough sequences for chunk_tokens (or what remains of max_tokens).
    want = min(settings.chunk_tokens, settings.max_tokens - manifest.tokens)
    take, n = [], 0
    while pos < len(seqs) and n < want:
      s = seqs[pos][:want - n] if len(seqs[pos]) > want - n and n else seqs[pos]
      take.append(s)
      n += len(s)
      pos += 1
    parts = {"x": [], "norms": [], "fired": []}
    for group in _batches(take, settings.batch_tokens):
      t = _bucket(max(len(s) for s in group))
      rows = max(len(group), max(1, settings.batch_tokens // t))
      tokens = np.zeros((rows, t), np.int32)
      lengths = np.ones((rows,), np.int32)
      for i, s in enumerate(group):
        tokens[i, :len(s)] = s
        lengths[i] = len(s)
      x, norms, fired = jax.device_get(_record_program(graphdef, state, jnp.asarray(tokens),
                                                       jnp.asarray(lengths), with_fired=with_fired))
      valid = np.arange(t)[None, :] < lengths[:, None]
      valid[len(group):] = False
      parts["x"].append(x[valid])
      parts["norms"].append(norms[valid])
      if with_fired:
        parts["fired"].append(np.packbits(fired[valid], axis=-1))
    name = f"chunk_{len(manifest.chunks):05d}"
    tmp = work_dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, arrs in parts.items():
      if arrs:
        np.save(tmp / f"{key}.npy", np.concatenate(arrs))
    shutil.rmtree(work_dir / name, ignore_errors=True)
    os.replace(tmp, work_dir / name)
    manifest.chunks.append({"name": name, "tokens": int(n), "sequences_done": pos})
    manifest.write()
    bar.update(min(n, settings.max_tokens - bar.n))
  bar.close()
  manifest.stats = {"complete": True, "tokens": manifest.tokens, "sequences": pos}
  manifest.write()
  return work_dir


@dataclasses.dataclass
class RouterData:
  """Read access to a collection directory: chunk by chunk, memory bounded by one chunk."""

  work_dir: pathlib.Path

  def __post_init__(self):
    self.work_dir = pathlib.Path(self.work_dir)
    path = self.work_dir / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(f"{self.work_dir} has no {MANIFEST}: not a router data directory")
    md = json.loads(path.read_text())
    self.settings = md["settings"]
    self.chunks = [c["name"] for c in md["chunks"]]
    self.tokens = sum(c["tokens"] for c in md["chunks"])

  def load(self, chunk: str, fields=("x", "norms", "fired")) -> dict[str, np.ndarray]:
    out = {}
    for f in fields:
      p = self.work_dir / chunk / f"{f}.npy"
      if p.is_file():
        out[f] = np.load(p)
    return out

  def batches(self, batch_size: int, rng: np.random.Generator | None = None, fields=("x", "norms", "fired"),
              drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Minibatches; with `rng`, chunks and rows within each chunk are shuffled."""
    order = list(self.chunks) if rng is None else [self.chunks[i] for i in rng.permutation(len(self.chunks))]
    for chunk in order:
      arrs = self.load(chunk, fields)
      n = len(next(iter(arrs.values())))
      idx = np.arange(n) if rng is None else rng.permutation(n)
      stop = n - n % batch_size if drop_last else n
      for s in range(0, stop, batch_size):
        sel = idx[s:s + batch_size]
        yield {k: v[sel] for k, v in arrs.items()}

  def all(self, fields=("x", "norms", "fired"), max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Every recorded token (or the first `max_tokens`) in one dict of arrays."""
    parts: dict[str, list] = {f: [] for f in fields}
    n = 0
    for chunk in self.chunks:
      arrs = self.load(chunk, fields)
      for k, v in arrs.items():
        parts[k].append(v)
      n += len(next(iter(arrs.values())))
      if max_tokens is not None and n >= max_tokens:
        break
    out = {k: np.concatenate(v) for k, v in parts.items() if v}
    return {k: v[:max_tokens] for k, v in out.items()} if max_tokens is not None else out
