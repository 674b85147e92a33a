"""The KV-group selectors compared by the evaluation, each built as the engine's decode step (`make_decoder`).

* ``"router"``: the learned head routers (`polar_jax.load_routers`), per-row top-k of their scores.
* ``"oracle"``: dense attention, then each row keeps its k groups of largest true output norm (upper bound).
* ``"random"``: seeded uniform groups per row, layer and step (`SparsityConfig(selector="random", seed=...)`).
* ``"static"``: the same groups for every token: per layer, the k groups that are most often among a token's true
  top-k groups (by attention-output norm) over router training text. Counted by `static_group_counts` over the
  first `STATIC_TOKENS` tokens of the router training split ("train" split of the LAMBADA and BoolQ passages, the
  default data of `polar-train-routers`; passages truncated to 512 tokens) with the dense model. It runs through the
  engine's router path unchanged: `static_routers` builds head routers with zero weights whose biases are those
  counts, so every row's top-k is the layer's k most frequent groups (ties: lower group index).

Every selector shares `SparsityConfig` semantics: layers in `dense_layers` (default layer 0) stay dense,
`per_layer` overrides the density of the layers it names, and the count of groups kept is
`round_half_up(density * num_kv_heads)` (0.67 and 0.34 of 3 groups keep 2 and 1).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax import paths
from polar_jax.attention import group_norms
from polar_jax.sparsity import SparsityConfig

SELECTORS = ("router", "oracle", "random", "static")
STATIC_TOKENS = 32_768
STATIC_SOURCES = ("lambada", "boolq")
STATIC_MAX_SEQ = 512


def check_selectors(selectors: Sequence[str]) -> tuple[str, ...]:
  selectors = tuple(selectors)
  bad = [s for s in selectors if s not in SELECTORS]
  if bad or not selectors:
    raise ValueError(f"unknown selector(s) {bad or selectors!r}; expected some of {', '.join(SELECTORS)}")
  return selectors


def check_densities(densities: Sequence[float]) -> tuple[float, ...]:
  out = []
  for d in densities:
    try:
      v = float(d)
    except (TypeError, ValueError):
      raise ValueError(f"density {d!r} is not a number; densities are fractions of KV groups in (0, 1]") from None
    if not 0.0 < v <= 1.0:
      raise ValueError(f"density {d!r} is out of range; densities are fractions of KV groups in (0, 1]")
    out.append(v)
  if not out:
    raise ValueError("no densities given")
  return tuple(out)


# ---- static selection ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rank_counts(graphdef, state, tokens_bt, lengths_b):
  """int32 `[L, G, G]`: counts[l, k-1, g] = valid tokens whose group g is among their top-k groups in layer l."""
  model = nnx.merge(graphdef, state)
  b, t = tokens_bt.shape
  g = model.config.num_kv_heads
  valid = (jnp.arange(t)[None, :] < lengths_b[:, None])[..., None]                  # [B, T, 1]
  h = model.embed_tokens(tokens_bt, jnp.broadcast_to(jnp.arange(t), (b, t)))
  out = []
  for layer in model.layers:
    x = layer.attn_norm(h) if layer.pre_norm else h
    a, _, ctx = layer.attn.forward(x, lengths_b, return_context=True)
    norms = group_norms(ctx, g)                                                      # [B, T, G]
    rank = jnp.argsort(jnp.argsort(-norms, axis=-1, stable=True), axis=-1)          # 0 = largest (ties: lower g)
    out.append(jnp.stack([jnp.sum((rank < k) & valid, axis=(0, 1)) for k in range(1, g + 1)]))
    h = h + a if layer.pre_norm else layer.attn_norm(h + a)
    h = layer._mlp_block(h, layer.mlp)
  return jnp.stack(out).astype(jnp.int32)


def static_group_counts(model, sequences: Sequence[Sequence[int]], *, max_tokens: int = STATIC_TOKENS,
                        batch_tokens: int = 4096, progress: bool = False) -> tuple[np.ndarray, int]:
  """(counts `[L, G, G]` as in `_rank_counts`, tokens counted) over the first `max_tokens` tokens of `sequences`."""
  from polar_jax.generation import length_bucket
  graphdef, state = nnx.split(model)
  seqs, n = [], 0
  for s in sequences:
    s = list(s)[:max_tokens - n]
    if len(s) >= 1:
      seqs.append(s)
      n += len(s)
    if n >= max_tokens:
      break
  cfg = model.config
  total = np.zeros((cfg.num_layers, cfg.num_kv_heads, cfg.num_kv_heads), np.int64)
  seqs.sort(key=len)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, unit="tok", desc="static groups", leave=False)
  i = 0
  while i < len(seqs):
    t = length_bucket(len(seqs[min(len(seqs) - 1, i)]))
    rows = max(1, batch_tokens // t)
    group = [s for s in seqs[i:i + rows] if length_bucket(len(s)) == t] or [seqs[i]]
    t = length_bucket(max(len(s) for s in group))
    tokens = np.zeros((len(group), t), np.int32)
    lengths = np.zeros((len(group),), np.int32)
    for j, s in enumerate(group):
      tokens[j, :len(s)], lengths[j] = s, len(s)
    total += np.asarray(_rank_counts(graphdef, state, tokens, lengths))
    i += len(group)
    if bar is not None:
      bar.update(int(lengths.sum()))
  if bar is not None:
    bar.close()
  return total, n


def static_groups_file(model, tokenizer, *, max_tokens: int = STATIC_TOKENS, cache_dir=None,
                       progress: bool = False) -> dict:
  """The static-selection statistics of `model`, computed once and cached as JSON.

  Returns `{"fingerprint", "data", "tokens", "counts": [L][k-1][g], "groups": {k: [[groups of layer l]]}}`,
  where `groups[k][l]` are layer l's k most frequent top-k groups (most frequent first).
  """
  from polar_jax.data import load_passages
  fp = model.config.fingerprint()
  desc = f"{' + '.join(STATIC_SOURCES)} [train split], passages truncated to {STATIC_MAX_SEQ} tokens"
  key = hashlib.sha1(json.dumps([fp, desc, max_tokens]).encode()).hexdigest()[:10]
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else paths.home() / "eval_cache"
  path = cache_dir / f"static_groups-{fp}-{key}.json"
  if path.is_file():
    return json.loads(path.read_text())
  # Interleave the sources (LAMBADA's passages first would otherwise fill the budget).
  by_src = [load_passages(src, "train") for src in STATIC_SOURCES]
  texts = [t for group in zip(*by_src) for t in group]
  from polar_jax.evaluation.tasks import _encode
  seqs = []
  n = 0
  for t in texts:
    ids = _encode(tokenizer, t)[:STATIC_MAX_SEQ]
    seqs.append(ids)
    n += len(ids)
    if n >= max_tokens:
      break
  counts, tokens = static_group_counts(model, seqs, max_tokens=max_tokens, progress=progress)
  g = model.config.num_kv_heads
  groups = {}
  for k in range(1, g + 1):
    c = counts[:, k - 1, :]                                       # [L, G]
    order = np.argsort(-c, axis=-1, kind="stable")[:, :k]
    groups[str(k)] = order.tolist()
  out = {"fingerprint": fp, "data": desc, "tokens": int(tokens), "counts": counts.tolist(), "groups": groups}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(out) + "\n")
  tmp.replace(path)
  return out


def static_routers(model, counts_lgg, k: int):
  """Head routers that select, in every row, layer l's k most frequent groups (`counts_lgg[l, k-1]`)."""
  from polar_jax.routers import Routers
  cfg = model.config
  counts = np.asarray(counts_lgg, np.float64)[:, k - 1, :]
  routers = Routers.init(cfg)
  # Zero weights; the bias is the (normalised) frequency, minus a tiny index term so that ties go to lower groups.
  bias = counts / max(1.0, counts.max()) - 1e-6 * np.arange(cfg.num_kv_heads)[None, :]
  routers.head.b_lg[...] = bias.astype(np.float32)
  routers.metadata = {"kind": "static selection (polar_jax.evaluation.selectors)"}
  return routers


# ---- decoders ------------------------------------------------------------------------------------------------
def sparsity_config(selector: str, density: float, *, dense_layers=(0,), per_layer: Mapping[int, float] | None = None,
                    seed: int = 0, shards: int = 1) -> SparsityConfig:
  """The SparsityConfig of one evaluated setting ("static" runs as the router path, see `static_routers`).

  `shards > 1`: balanced per-shard selection over that many blocks of groups, as tensor parallelism over `shards`
  devices selects (`SparsityConfig.shards`); 1: the global per-row top-k."""
  check_selectors([selector])
  return SparsityConfig(attn_density=float(density), dense_layers=tuple(dense_layers),
                        per_layer=dict(per_layer) if per_layer else None,
                        selector="router" if selector == "static" else selector, seed=seed,
                        shards=None if shards == 1 else int(shards))


def build_decoder(model, selector: str, density: float, *, routers=None, static_counts=None, dense_layers=(0,),
                  per_layer: Mapping[int, float] | None = None, seed: int = 0, batch: int = 32, shards: int = 1,
                  options=None):
  """(decode, decode_state) of `make_decoder` for one selector and density (`shards`: see `sparsity_config`), with
  `options` (a `polar_jax.DecodeOptions`, e.g. its `kv_dtype`; None: the defaults).

  A setting that keeps every group in every layer returns the dense step itself (as `generate` does), so
  density 1.0 reproduces dense decoding exactly for every selector.

  Raises:
    ValueError: unknown selector, bad density, "router" without routers or "static" without counts.
  """
  from polar_jax.sparse_decode import make_decoder
  cfg = sparsity_config(selector, density, dense_layers=dense_layers, per_layer=per_layer, seed=seed, shards=shards)
  groups = cfg.layer_groups(model.config)
  if all(k is None for k in groups):
    return make_decoder(model, cfg, None, batch=batch, options=options)
  if selector == "router":
    if routers is None:
      raise ValueError("selector 'router' needs routers: pass --routers DIR (or train them with "
                       "polar-train-routers); the shipped SmolLM2 routers are used by default when present")
    return make_decoder(model, cfg, routers, batch=batch, options=options)
  if selector == "static":
    if static_counts is None:
      raise ValueError("selector 'static' needs static group counts (static_groups_file)")
    # One bias table per k: layers with different budgets need their own k; build per distinct k.
    ks = {k for k in groups if k is not None}
    if len(ks) > 1:
      return _mixed_static(model, cfg, groups, static_counts, batch, options)
    return make_decoder(model, cfg, static_routers(model, static_counts, ks.pop()), batch=batch, options=options)
  return make_decoder(model, cfg, None, batch=batch, options=options)


def _mixed_static(model, cfg, groups, counts, batch, options=None):
  """Static selection when layers keep different numbers of groups: each layer's bias ranks by its own k."""
  from polar_jax.sparse_decode import make_decoder
  counts = np.asarray(counts, np.float64)
  routers = static_routers(model, counts, 1)
  bias = np.zeros_like(np.asarray(routers.head.b_lg[...]), np.float64)
  g = model.config.num_kv_heads
  for layer, k in enumerate(groups):
    if k is not None:
      c = counts[layer, k - 1]
      bias[layer] = c / max(1.0, c.max()) - 1e-6 * np.arange(g)
  routers.head.b_lg[...] = bias.astype(np.float32)
  return make_decoder(model, cfg, routers, batch=batch, options=options)
