"""Fused projections: one q|k|v matmul and one gate|up matmul per layer instead of five.

At decode batch sizes every projection is a skinny matmul that streams its weight once; each one also pays a
fixed ramp-up and tail, so fewer, wider matmuls stream the same bytes in less time (benchmarks/NOTES.md has the
measured effect). `fuse_projections(model)` rewrites a model in place, layer by layer (peak memory: one layer's
projections twice):

  * attention: `qkv_proj` `[d, G * (r + 2) * D]` with KV-group-major columns: for group g, its r query heads, then
    its key head, then its value head (G KV groups, r = query heads per group). Splitting these columns into
    tp equal blocks gives each tensor-parallel shard whole KV groups, so the layout is the same for every tp;
  * gated MLP: `gate_up_proj` `[d, 2F]` with neuron-major columns (neuron n: gate, then up), which also splits
    over tp by neurons, matching `down_proj`'s rows.

The layouts live here once: `split_qkv` / `split_gate_up` split a fused projection's output (what `Attention` and
`GatedMLP` call) or a fused kernel's columns (what `unfused_params` does for `polar_jax.save_model`, which writes
the checkpoint's separate names for a fused model too). Results equal the unfused model's up to float32 summation
order. ReLU (OPT) MLPs keep their per-neuron `[N, d]` weights (the neuron router gathers rows of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from polar_jax.layers import Linear


def fuse_qkv(q, k, v, num_kv_heads: int):
  """`[..., G*r*D]`, `[..., G*D]`, `[..., G*D]` columns -> the KV-group-major `[..., G*(r+2)*D]`."""
  lead, g = q.shape[:-1], num_kv_heads
  parts = (q.reshape(*lead, g, -1), k.reshape(*lead, g, -1), v.reshape(*lead, g, -1))
  return jnp.concatenate(parts, axis=-1).reshape(*lead, -1)


def split_qkv(y, num_heads: int, num_kv_heads: int, head_dim: int):
  """The inverse of `fuse_qkv`: `[..., G*(r+2)*D]` -> q `[..., Hq*D]`, k, v `[..., G*D]`."""
  lead, g, r = y.shape[:-1], num_kv_heads, num_heads // num_kv_heads
  y = y.reshape(*lead, g, r + 2, head_dim)
  return (y[..., :r, :].reshape(*lead, g * r * head_dim), y[..., r, :].reshape(*lead, g * head_dim),
          y[..., r + 1, :].reshape(*lead, g * head_dim))


def fuse_gate_up(gate, up):
  """`[..., F]`, `[..., F]` -> the neuron-major `[..., 2F]` (gate, up of neuron 0, then of neuron 1, ...)."""
  return jnp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def split_gate_up(y):
  """The inverse of `fuse_gate_up`: `[..., 2F]` -> gate, up `[..., F]`."""
  pairs = y.reshape(*y.shape[:-1], -1, 2)
  return pairs[..., 0], pairs[..., 1]


def is_fused(model) -> bool:
  return any(layer.attn.qkv_proj is not None or getattr(layer.mlp, "gate_up_proj", None) is not None
             for layer in model.layers)


def _placed(fn, *arrays, spec):
  """`fn(*arrays)` under jit, its output placed like a tensor-parallel parameter when the inputs are on a mesh."""
  sharding = getattr(arrays[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and mesh is not None and mesh.size > 1:
    return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, spec))(*arrays)
  return jax.jit(fn)(*arrays)


def fuse_projections(model):
  """Fuses every layer's q/k/v (and gated-MLP gate/up) projections in place; returns the model. Idempotent."""
  fuse = lambda q, k, v: fuse_qkv(q, k, v, model.config.num_kv_heads)  # noqa: E731
  for layer in model.layers:
    attn = layer.attn
    if attn.qkv_proj is None:
      projs = (attn.q_proj, attn.k_proj, attn.v_proj)
      kernel = _placed(fuse, *(p.kernel[...] for p in projs), spec=P(None, "tp"))
      bias = (None if attn.q_proj.bias is None else
              _placed(fuse, *(p.bias[...] for p in projs), spec=P("tp")))
      attn.qkv_proj = Linear(kernel.shape[0], kernel.shape[1], bias=bias is not None, dtype=kernel.dtype,
                             values=(kernel, bias))
      attn.q_proj = attn.k_proj = attn.v_proj = None
    mlp = layer.mlp
    if hasattr(mlp, "gate_up_proj") and mlp.gate_up_proj is None:
      kernel = _placed(fuse_gate_up, mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...], spec=P(None, "tp"))
      mlp.gate_up_proj = Linear(kernel.shape[0], kernel.shape[1], bias=False, dtype=kernel.dtype,
                                values=(kernel, None))
      mlp.gate_proj = mlp.up_proj = None
  return model


def unfused_params(config, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Flat `{name: array}` parameters with any fused projection split back into the checkpoint's names (a new
  dict; arrays not fused are passed through)."""
  out = {}
  for name, value in params.items():
    prefix, _, leaf = name.rpartition(".")
    if prefix.endswith("attn.qkv_proj"):
      parts = split_qkv(value, config.num_heads, config.num_kv_heads, config.head_dim)
      names = ("q_proj", "k_proj", "v_proj")
    elif prefix.endswith("mlp.gate_up_proj"):
      parts, names = split_gate_up(value), ("gate_proj", "up_proj")
    else:
      out[name] = value
      continue
    base = prefix.rpartition(".")[0]
    out.update({f"{base}.{proj}.{leaf}": part for proj, part in zip(names, parts)})
  return out
