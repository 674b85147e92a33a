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

Results equal the unfused model's up to float32 summation order. ReLU (OPT) MLPs keep their per-neuron
`[N, d]` weights (the neuron router gathers rows of them). A fused model computes exactly like the checkpoint's,
but its parameter names differ from the checkpoint contract: `split_projections` undoes the fusion (e.g.
before `polar_jax.save_model`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from polar_jax.layers import Linear


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


def _qkv_columns(config):
  """(fuse, split): q, k, v columns <-> the KV-group-major fused columns, for `config`'s heads."""
  g, r, hd = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim

  def fuse(q, k, v):   # [..., G*r*D], [..., G*D], [..., G*D] -> [..., G*(r+2)*D]
    lead = q.shape[:-1]
    parts = (q.reshape(*lead, g, r * hd), k.reshape(*lead, g, hd), v.reshape(*lead, g, hd))
    return jnp.concatenate(parts, axis=-1).reshape(*lead, g * (r + 2) * hd)

  def split(y):
    lead = y.shape[:-1]
    y = y.reshape(*lead, g, (r + 2) * hd)
    return (y[..., :r * hd].reshape(*lead, g * r * hd), y[..., r * hd:(r + 1) * hd].reshape(*lead, g * hd),
            y[..., (r + 1) * hd:].reshape(*lead, g * hd))
  return fuse, split


def _interleave(a, b):
  return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def fuse_projections(model):
  """Fuses every layer's q/k/v (and gated-MLP gate/up) projections in place; returns the model. Idempotent."""
  fuse, _ = _qkv_columns(model.config)
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
      kernel = _placed(_interleave, mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...], spec=P(None, "tp"))
      mlp.gate_up_proj = Linear(kernel.shape[0], kernel.shape[1], bias=False, dtype=kernel.dtype,
                                values=(kernel, None))
      mlp.gate_proj = mlp.up_proj = None
  return model


def unfused_params(config, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Flat `{name: array}` parameters with any fused projection split back into the checkpoint's names (a new
  dict; arrays not fused are passed through)."""
  _, split = _qkv_columns(config)
  out = {}
  for name, value in params.items():
    prefix, _, leaf = name.rpartition(".")
    if prefix.endswith("attn.qkv_proj"):
      base = prefix[:-len("qkv_proj")]
      for proj, part in zip(("q_proj", "k_proj", "v_proj"), split(value)):
        out[f"{base}{proj}.{leaf}"] = part
    elif prefix.endswith("mlp.gate_up_proj"):
      base = prefix[:-len("gate_up_proj")]
      pairs = value.reshape(*value.shape[:-1], -1, 2)
      out[f"{base}gate_proj.{leaf}"], out[f"{base}up_proj.{leaf}"] = pairs[..., 0], pairs[..., 1]
    else:
      out[name] = value
  return out


def split_projections(model):
  """Undoes `fuse_projections` in place (the checkpoint's q/k/v and gate/up parameters); returns the model."""
  _, split = _qkv_columns(model.config)
  for layer in model.layers:
    attn = layer.attn
    if attn.qkv_proj is not None:
      fused = attn.qkv_proj
      kernels = [_placed(lambda y, i=i: split(y)[i], fused.kernel[...], spec=P(None, "tp")) for i in range(3)]
      biases = ([None] * 3 if fused.bias is None else
                [_placed(lambda y, i=i: split(y)[i], fused.bias[...], spec=P("tp")) for i in range(3)])
      attn.q_proj, attn.k_proj, attn.v_proj = (
          Linear(k.shape[0], k.shape[1], bias=b is not None, dtype=k.dtype, values=(k, b))
          for k, b in zip(kernels, biases))
      attn.qkv_proj = None
    mlp = layer.mlp
    if getattr(mlp, "gate_up_proj", None) is not None:
      w = mlp.gate_up_proj.kernel[...]
      gate, up = (_placed(lambda y, i=i: y.reshape(*y.shape[:-1], -1, 2)[..., i], w, spec=P(None, "tp"))
                  for i in range(2))
      mlp.gate_proj, mlp.up_proj = (Linear(x.shape[0], x.shape[1], bias=False, dtype=x.dtype, values=(x, None))
                                    for x in (gate, up))
      mlp.gate_up_proj = None
  return model
