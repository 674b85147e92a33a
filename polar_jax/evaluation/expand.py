"""`expand_kv_groups`: a grouped-query model as an exactly equivalent multi-head model (one KV group per head).

GQA shares each KV head among `r = Hq / Hkv` query heads. Repeating each KV head's k_proj / v_proj columns (and
biases) once per query head of its group gives an MHA model (`num_kv_heads = num_heads`) that computes the same
function: every query head attends to the same keys and values as before, now held in its own copy. Dense logits are
equal up to float rounding (the projections are wider matmuls), which `tests/test_evaluation.py` checks on SmolLM2.

What changes is the *unit of Polar Sparsity selection*: a "KV group" of the expanded model is one query head, so
SmolLM2-135M (9 query heads, 3 KV groups) becomes a model of 9 selectable groups (and its KV cache is r times
larger). The use here: with 3 KV groups, tensor parallelism over 3 shards keeps 1 of 1 group per shard (dense), so
balanced per-shard selection vs a global top-k cannot be measured on SmolLM2 itself; the expanded model can
(`polar-eval --expand-kv --shards 1,3`).

Head order (`layout`) decides which heads share a shard (`polar_jax.sharding` gives shard s of tp the contiguous
heads s*Hq/tp ...), and so what balanced selection constrains:

* ``"grouped"`` (default): the original order, head g*r + w = query head w of KV group g. Over tp = Hkv shards,
  shard s holds exactly the heads of original KV group s (which share their keys and values).
* ``"interleaved"``: head w*Hkv + g = query head w of KV group g (q_proj columns and o_proj rows permuted to
  match; still the same function). Over tp = r shards, shard s holds query head s of every original group.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax.model import CausalLM, abstract_model
from polar_jax.sharding import model_mesh

LAYOUTS = ("grouped", "interleaved")


def head_order(num_heads: int, num_kv_heads: int, layout: str = "grouped") -> np.ndarray:
  """int `[Hq]`: the original query head at each head position of the expanded model."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  r = num_heads // num_kv_heads
  if layout == "grouped":
    return np.arange(num_heads)
  w, g = np.divmod(np.arange(num_heads), num_kv_heads)    # position p = w * Hkv + g
  return g * r + w


def expand_kv_groups(model: CausalLM, layout: str = "grouped") -> CausalLM:
  """A new `CausalLM` with `num_kv_heads = num_heads` computing the same function as `model` (GQA -> MHA).

  k_proj / v_proj kernels `[d, Hkv * D]` become `[d, Hq * D]`: head position p gets the D columns of the KV head
  of its query head (`head_order`); biases likewise. With `layout="interleaved"` the q_proj columns (and bias) and
  o_proj rows are permuted to the new head order too. Every other parameter is shared (the same arrays). A model
  that already is MHA is returned unchanged (with the grouped layout). Unsharded models only.

  Raises:
    ValueError: `model` is sharded over a mesh (expand first, then shard), or an unknown layout.
  """
  cfg = model.config
  order = head_order(cfg.num_heads, cfg.num_kv_heads, layout)
  if cfg.num_kv_heads == cfg.num_heads and layout == "grouped":
    return model
  if model_mesh(model) is not None:
    raise ValueError("expand_kv_groups needs an unsharded model: expand it, then shard it (shard_model)")
  r, d_head = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  new_cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)

  def take_heads(x, heads, axis):   # the D-wide head blocks `heads` of `axis` (size H * D), in that order
    x = jnp.moveaxis(x, axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(*lead, -1, d_head)[..., heads, :].reshape(*lead, len(heads) * d_head)
    return jnp.moveaxis(x, -1, axis)

  kv_of = jnp.asarray(order // r)   # per head position: the original KV head
  q_of = jnp.asarray(order)
  graphdef, state = nnx.split(abstract_model(new_cfg, dtype=model.dtype))
  old = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  pure: dict = {}
  for path, _ in nnx.to_flat_state(state):
    value = old[path]
    if len(path) >= 3 and path[-3] == "attn":
      proj, leaf = path[-2], path[-1]
      if proj in ("k_proj", "v_proj"):
        value = take_heads(value, kv_of, -1)
      elif layout != "grouped" and (proj == "q_proj" or (proj == "o_proj" and leaf == "kernel")):
        value = take_heads(value, q_of, -1 if proj == "q_proj" else 0)
    node = pure
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
