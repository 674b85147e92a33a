"""Tensor (and data) parallel decoding on a `jax.sharding.Mesh` with axes ("dp", "tp").

    mesh = polar_jax.sharding.make_mesh(tp=2)
    model = polar_jax.load_model(path, mesh=mesh)        # params restored straight into their shards
    out = polar_jax.generate(model, prompts, max_new_tokens=64, sparsity=SparsityConfig(attn_density=0.5))

Layout (Megatron style, GSPMD inserts the collectives):
  * attention q/k/v kernels `[d, H*D]` split by columns over "tp" (each shard holds whole heads, i.e. whole
    KV groups and their query heads; the fused `qkv_proj` of `polar_jax.fusion` is KV-group-major, so the same
    column split gives each shard whole groups), o_proj `[H*D, d]` by rows (its matmul ends in an all-reduce over tp);
  * gated MLP gate/up by columns, down by rows; ReLU MLP `w_in_nd`/`w_out_nd` `[N, d]` by neurons (rows);
  * norms, embeddings, lm_head and output biases replicated;
  * KV cache `[B, Hkv, S, D]`: P("dp", "tp", None, None) (batch over dp when B divides by dp);
  * decode attention: the kernel (`pallas_kernels.selective_decode_attention`, a per-device Pallas program)
    runs inside `jax.shard_map` over "tp" on each shard's local query heads, KV groups and group indices.

KV groups (`num_kv_heads`) and the MLP width must divide by tp, otherwise `ValueError` (no replication
fallback: a replicated KV cache would cost tp times the memory, which is what tensor parallelism avoids).

Sparse attention under tp uses *balanced per-shard selection* (see `balanced_topk`): each shard keeps
round(density x local groups) of its own groups. A global top-k over all groups may take more groups from one
shard than another; balanced selection gives every shard the same work (and static shapes inside shard_map).
The same selection runs on one device with `SparsityConfig(shards=tp)`, which is how it is tested.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import pallas_kernels
from polar_jax.config import ModelConfig
from polar_jax.topk import rank_topk, topk_rows, union_scores

AXES = ("dp", "tp")
TRACE_COUNTS = {"shard_map": 0}   # decode-attention shard_map calls traced (tests check the path is taken)

# (regex over the flat parameter name, spec); the first match wins, the rest is replicated.
_RULES = (
    (r"attn\.(qkv|[qkv])_proj\.kernel$", P(None, "tp")),     # qkv: fused, KV-group-major (polar_jax.fusion)
    (r"attn\.(qkv|[qkv])_proj\.bias$", P("tp")),
    (r"attn\.o_proj\.kernel$", P("tp", None)),
    (r"mlp\.(gate|up|gate_up)_proj\.kernel$", P(None, "tp")),
    (r"mlp\.down_proj\.kernel$", P("tp", None)),
    (r"mlp\.w_(in|out)_nd$", P("tp", None)),
    (r"mlp\.b_in_n$", P("tp")),
)


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A mesh of `dp * tp` devices with axes ("dp", "tp") (both `AxisType.Auto`: GSPMD propagates shardings).

  `devices` default to `jax.devices()` (all processes' devices under `jax.distributed`).
  """
  for name, n in (("tp", tp), ("dp", dp)):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
  devices = list(jax.devices() if devices is None else devices)
  if dp * tp > len(devices):
    raise ValueError(f"a mesh of dp={dp} x tp={tp} needs {dp * tp} devices; {len(devices)} available")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((dp, tp), AXES, (auto, auto), devices=devices[:dp * tp])


def check_config(config: ModelConfig, tp: int) -> None:
  """Raises ValueError when the model cannot be split over `tp` shards."""
  if tp == 1:
    return
  if config.num_kv_heads % tp:
    raise ValueError(f"tensor parallelism tp={tp} needs the KV groups to divide evenly: this model has "
                     f"{config.num_kv_heads} KV heads (query heads {config.num_heads}); pick tp dividing "
                     f"{config.num_kv_heads}")
  if config.intermediate_size % tp:
    raise ValueError(f"tp={tp} does not divide the MLP width {config.intermediate_size}")


def param_spec(name: str) -> P:
  """The PartitionSpec of one parameter by its flat name (e.g. "layers.0.attn.q_proj.kernel")."""
  for pattern, spec in _RULES:
    if re.search(pattern, name):
      return spec
  return P()


def mesh_tp(mesh) -> int:
  return 1 if mesh is None else int(dict(mesh.shape).get("tp", 1))


def mesh_dp(mesh) -> int:
  return 1 if mesh is None else int(dict(mesh.shape).get("dp", 1))


def as_decode_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """`mesh` as the decode step uses it: axes named from ("dp", "tp") (a "tp"-only mesh, e.g. a plain
  `jax.make_mesh((2,), ("tp",))`, is fine), all of type `Auto` so that GSPMD propagates the parameters' shardings.
  A mesh whose axes are `Explicit` (`jax.make_mesh`'s default) is converted: same devices, same names.
  Raises ValueError for other axis names."""
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (polar_jax.make_mesh(tp=...) or jax.make_mesh), "
                    f"got {type(mesh).__name__}")
  unknown = [name for name in mesh.axis_names if name not in AXES]
  if unknown:
    raise ValueError(f"mesh axes {mesh.axis_names} include {unknown}: polar_jax shards over axes named 'tp' "
                     "(tensor parallel) and optionally 'dp' (data parallel); make one with "
                     "polar_jax.make_mesh(tp=N) or jax.make_mesh((N,), ('tp',))")
  auto = jax.sharding.AxisType.Auto
  if all(t == auto for t in mesh.axis_types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def model_mesh(model) -> jax.sharding.Mesh | None:
  """The mesh a model's parameters are sharded on (`shard_model` / `load_model(mesh=)`), read from the sharding
  of its first parameter; None on one device (or a one-device mesh). Call it outside jit (the decode-step objects
  carry the result as a static field)."""
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  mesh = getattr(sharding, "mesh", None)
  if not isinstance(sharding, NamedSharding) or mesh is None or mesh.size <= 1:
    return None
  return mesh


def model_tp(model) -> int:
  return mesh_tp(model_mesh(model))


def shard_model(model, mesh: jax.sharding.Mesh):
  """Places a model's parameters on `mesh` (in place; also returns the model). Works under `jax.distributed`:
  every process must hold the same parameter values (e.g. the same `init_model` seed)."""
  mesh = as_decode_mesh(mesh)
  check_config(model.config, mesh_tp(mesh))
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    name = ".".join(str(p) for p in path)
    value = var.get_value()
    sh = NamedSharding(mesh, param_spec(name))
    if jax.process_count() == 1:
      var.set_value(jax.device_put(value, sh))          # device to device, leaf by leaf
    else:                                               # each process fills its own shards from its copy
      host = np.asarray(jax.device_get(value))
      var.set_value(jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx]))
  nnx.update(model, state)
  return model


def cache_spec(batch: int, dp: int) -> P:
  return P("dp" if dp > 1 and batch % dp == 0 else None, "tp", None, None)


def constrain_cache(cache_bhsd, mesh):
  """KV cache layer `[B, Hkv, S, D]` constrained to P("dp", "tp", None, None)."""
  spec = cache_spec(cache_bhsd.shape[0], mesh_dp(mesh))
  return jax.lax.with_sharding_constraint(cache_bhsd, NamedSharding(mesh, spec))


# ---- balanced per-shard selection -------------------------------------------------------------
def balanced_topk(scores_bg: jax.Array, k_total: int, shards: int) -> jax.Array:
  """int32 `[B, k_total]` global group indices: each of `shards` equal blocks of groups keeps its
  `k_total // shards` best groups; block s's picks come s-th (so shard s reads columns [s*kl, (s+1)*kl)).

  With shards == 1 this is the plain per-row top-k. Unlike a global top-k (which may take, say, 3 groups from
  shard 0 and 1 from shard 1), every shard keeps exactly the same number, so work is even across devices;
  the kept set can differ from the global top-k when important groups cluster on one shard.
  """
  b, g = scores_bg.shape
  gl, kl = g // shards, k_total // shards
  idx = rank_topk(scores_bg.reshape(b * shards, gl), kl).reshape(b, shards, kl)
  return (idx + (jnp.arange(shards, dtype=jnp.int32) * gl)[None, :, None]).reshape(b, shards * kl)


def local_group_idx(group_idx_bk: jax.Array, num_groups: int, tp: int) -> jax.Array:
  """`[B, K]` balanced global indices -> `[B, tp, K/tp]` indices local to each shard."""
  b, k = group_idx_bk.shape
  return group_idx_bk.reshape(b, tp, k // tp) - (jnp.arange(tp) * (num_groups // tp))[None, :, None]


def sharded_decode_attention(q_bhd, k_cache, v_cache, new_len, group_idx_bk, kv_start, *, mesh, num_groups: int,
                             scale: float, implementation=None, group_count_bs=None):
  """`selective_decode_attention` inside `jax.shard_map` over "tp": each shard its local heads and groups.

  `group_idx_bk` must come from `balanced_topk(..., shards=tp)` (or be None for dense); `group_count_bs` (int32
  `[B, tp]`, adaptive budgets): shard s uses only the first `group_count_bs[b, s]` of its slots of row b."""

  TRACE_COUNTS["shard_map"] += 1
  tp, dp = mesh_tp(mesh), mesh_dp(mesh)
  b = q_bhd.shape[0]
  bax = "dp" if dp > 1 and b % dp == 0 else None
  args = [q_bhd, k_cache, v_cache, new_len]
  specs = [P(bax, "tp", None), P(bax, "tp", None, None), P(bax, "tp", None, None), P(bax)]
  has_idx, has_start, has_count = group_idx_bk is not None, kv_start is not None, group_count_bs is not None
  if has_count and (not has_idx or group_count_bs.shape != (b, tp)):
    raise ValueError(f"group_count_bs must have shape ({b}, tp={tp}) and come with group_idx_bk, got "
                     f"{None if group_count_bs is None else group_count_bs.shape}")
  if has_idx:
    if group_idx_bk.shape[1] % tp:
      raise ValueError(f"under tp={tp} the selected groups per row ({group_idx_bk.shape[1]}) must divide by tp "
                       "(balanced per-shard selection)")
    args.append(local_group_idx(group_idx_bk, num_groups, tp))
    specs.append(P(bax, "tp", None))
  if has_start:
    args.append(kv_start)
    specs.append(P(bax))
  if has_count:
    args.append(group_count_bs.astype(jnp.int32))
    specs.append(P(bax, "tp"))

  def local(q, k, v, lengths, *rest):
    rest = list(rest)
    idx = rest.pop(0).reshape(q.shape[0], -1) if has_idx else None
    start = rest.pop(0) if has_start else None
    count = rest.pop(0).reshape(q.shape[0]) if has_count else None
    return pallas_kernels.selective_decode_attention(q, k, v, lengths, idx, scale=scale, kv_start=start,
                                                     implementation=implementation, group_count=count)

  fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(bax, "tp", None), check_vma=False)
  return fn(*args)


def to_host(tree: Any) -> Any:
  """`jax.device_get` that also works for arrays spread over several processes (gathers them)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(get, tree)


# ---- neuron sparsity (ReLU MLPs) under tp: a per-shard union ------------------------------------
def balanced_union_topk(logits_bn: jax.Array, active_b: jax.Array | None, k_total: int, shards: int,
                        method: str = "radix", implementation: str | None = None, dtype=jnp.bfloat16) -> jax.Array:
  """int32 `[k_total]` global neuron indices: the batch-union score `sum_b relu(logits)` split into `shards`
  equal blocks of neurons, each keeping its `k_total // shards` best (block s's picks come s-th; within a
  block ascending for method "radix", by descending score for "sort": the same sets, see
  `polar_jax.topk.union_topk`)."""
  score_n = union_scores(logits_bn, active_b, dtype)
  n = score_n.shape[0]
  nl, kl = n // shards, k_total // shards
  idx = topk_rows(score_n.reshape(shards, nl), kl, method, implementation) + (jnp.arange(shards) * nl)[:, None]
  return idx.reshape(shards * kl).astype(jnp.int32)


def sharded_sparse_mlp(mlp, x_md, idx_k, *, mesh, implementation=None):
  """`NeuronMLP.sparse` under tp: each shard gathers its local neurons (`idx_k` from `balanced_union_topk`)
  from its rows of fc1/fc2, then the partial fc2 outputs are summed over "tp" (psum) and the fc2 bias added."""

  tp = mesh_tp(mesh)
  w_in, w_out = mlp.w_in_nd[...], mlp.w_out_nd[...]
  n = w_in.shape[0]
  local_idx = idx_k.reshape(tp, -1) - (jnp.arange(tp) * (n // tp))[:, None]
  has_b = mlp.b_in_n is not None
  args = [x_md.astype(w_in.dtype), w_in, w_out, local_idx] + ([mlp.b_in_n[...]] if has_b else [])
  specs = [P(), P("tp", None), P("tp", None), P("tp", None)] + ([P("tp")] if has_b else [])

  def local(x, wi, wo, idx, *b):
    idx = idx.reshape(-1)
    h = pallas_kernels.gather_matmul_cols(x, wi, idx, b[0] if b else None, mlp.activation,
                                          implementation=implementation)
    y = pallas_kernels.gather_matmul_rows(h, wo, idx, None, implementation=implementation)
    return jax.lax.psum(y.astype(jnp.float32), "tp")

  y = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(), check_vma=False)(*args)
  if mlp.b_out_d is not None:
    y = y + mlp.b_out_d[...].astype(jnp.float32)
  return y.astype(w_in.dtype)
