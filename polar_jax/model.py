"""The decoder family (OPT, LLaMA-2/3, Mistral, Qwen2) as one Flax NNX module.

Three entry points, all pure functions of the module state plus explicit inputs:
  * `model(input_ids, attention_mask)`: float32 logits `[B, T, V]` (no cache);
  * `model.prefill(tokens_bt, lengths_b, cache)`: dense prompt pass that fills the KV cache and
    returns the last valid token's logits;
  * `model.decode_step(tokens_b, cache, plans, options=...)`: one token per row; `plans` (one
    `polar_jax.selection.LayerPlan` per layer) is the Polar Sparsity hook: which KV groups (and neurons) each
    layer computes.
Prompts are handled compacted (each row's valid tokens first), so any padding works.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax import sharding
from polar_jax.attention import Attention, Normed
from polar_jax.config import ModelConfig
from polar_jax.kv_cache import KVCache
from polar_jax.paged_kv_cache import PagedKVCache
from polar_jax.layers import Embedding, Linear, RMSNorm, make_norm
from polar_jax.mlp import GatedMLP, make_mlp
from polar_jax.options import DecodeOptions
from polar_jax.selection import DENSE_PLAN, GroupIndices, LayerPlan, LinearRouter
from pallas_kernels import RmsInput
from pallas_kernels.skinny_matmul_xla import deferred_norm

OPT_POSITION_OFFSET = 2
# Prompt tokens prefilled at once; larger batches are prefilled a group of rows at a time.
PREFILL_MAX_TOKENS = 16384

def prefill_group_rows(batch: int, length: int, max_tokens: int) -> int:
  """Rows per prefill group: the largest divisor of `batch` whose tokens fit `max_tokens` (at least 1)."""
  best = 1
  for r in range(1, batch + 1):
    if batch % r == 0 and r * length <= max_tokens:
      best = r
  return best


class LayerOut(NamedTuple):
  """`DecoderLayer.decode`'s result: the layer's output `[B, d]`, its caches with the new token written, and
  (deferred norms with `next_norm`) the next layer's attention-norm input as down_proj left it, else None."""

  h: jax.Array
  k_cache_bhsd: jax.Array
  v_cache_bhsd: jax.Array
  next_normed: Normed | None


class DecoderLayer(nnx.Module):
  """One transformer block: `attn` (`Attention`) and `mlp` (`GatedMLP`, or `NeuronMLP` for ReLU/OPT models), each
  with its norm, as pre-norm (most models) or post-norm (OPT-350m) residuals.

  Args:
    config: the model's `ModelConfig`.
    dtype: parameter dtype.
    rngs: `nnx.Rngs` for the random initial weights (`polar_jax.load_model` replaces them).

  `CausalLM` calls `forward` (full sequences), `prefill` (compacted prompts, filling the KV cache) and `decode`
  (one token per row; a `LayerPlan` carries the Polar Sparsity selections, `DecodeOptions` the kernel choices).
  """

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(eps=config.norm_eps, dtype=dtype, rngs=rngs)
    self.attn_norm = make_norm(config.norm, config.hidden_size, **kw)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = make_norm(config.norm, config.hidden_size, **kw)
    self.mlp = make_mlp(config, dtype=dtype, rngs=rngs)
    self.pre_norm = config.pre_norm

  def _mlp_block(self, h, mlp_fn):
    if self.pre_norm:
      return h + mlp_fn(self.mlp_norm(h))
    return self.mlp_norm(h + mlp_fn(h))

  def forward(self, h_btd, lengths_b):
    x = self.attn_norm(h_btd) if self.pre_norm else h_btd
    a, _ = self.attn.forward(x, lengths_b)
    h = h_btd + a if self.pre_norm else self.attn_norm(h_btd + a)
    return self._mlp_block(h, self.mlp)

  def prefill(self, h_btd, lengths_b, k_cache, v_cache, row0=0, *, mesh=None):
    x = self.attn_norm(h_btd) if self.pre_norm else h_btd
    a, k_cache, v_cache = self.attn.prefill(x, lengths_b, k_cache, v_cache, row0, mesh=mesh)
    h = h_btd + a if self.pre_norm else self.attn_norm(h_btd + a)
    return self._mlp_block(h, self.mlp), k_cache, v_cache

  def defers_norms(self, plan: LayerPlan, options: DecodeOptions, mesh=None) -> bool:
    """Whether `decode` runs this layer's RMSNorms inside its projection kernels (`options.deferred_norm`: one
    device, pre-norm RMSNorm, a fused q|k|v and a dense fused gated MLP with its activation in the kernel)."""
    return (options.deferred_norm and mesh is None and self.pre_norm and isinstance(self.attn_norm, RMSNorm)
            and isinstance(self.mlp_norm, RMSNorm) and self.attn.fuses_qkv(mesh) and plan.neurons is None
            and isinstance(self.mlp, GatedMLP) and self.mlp.glu_epilogue)

  def decode(self, h_bd, lengths_b, k_cache, v_cache, plan: LayerPlan = DENSE_PLAN, *,
             options: DecodeOptions = DecodeOptions(), mesh=None, normed: Normed | None = None,
             next_norm=None, page_table_bp=None) -> LayerOut:
    """One token per row through the layer, computing what `plan` selects (`polar_jax.selection`).

    With `options.fused_projections` on one device (`pallas_kernels.skinny_matmul`), o_proj and down_proj add the
    residual in their epilogues, and a linear head router's scores come from extra programs of the q|k|v kernel
    (`options.router_in_qkv`). Deferred norms (`defers_norms`): `normed` is this layer's attention-norm input as
    the previous layer's down_proj left it (None: made here from h_bd); `next_norm` (the next layer's
    attention-norm weight) makes down_proj prepare the next layer's (`LayerOut.next_normed`). `page_table_bp`: k_cache
    and v_cache are page pools of a `PagedKVCache` with this page table (`Attention.decode`)."""
    defer = self.defers_norms(plan, options, mesh)
    if (normed is not None or next_norm is not None) and not defer:
      raise ValueError("DecoderLayer.decode: normed= / next_norm= need a layer that defers its norms "
                       "(defers_norms)")
    if defer:
      return self._decode_deferred(h_bd, lengths_b, k_cache, v_cache, plan, options, normed, next_norm,
                                   page_table_bp)
    x = self.attn_norm(h_bd) if self.pre_norm else h_bd
    heads = self._resolve_router(plan, x, options, mesh)
    a = self.attn.decode(x, lengths_b, k_cache, v_cache, heads, options=options, mesh=mesh, residual_bd=h_bd,
                         page_table_bp=page_table_bp)
    h = a.h if self.pre_norm else self.attn_norm(a.h)                          # h_bd + attention
    y = self.mlp_norm(h) if self.pre_norm else h
    if plan.neurons is not None:                                                # the batch-union neuron set
      idx_k = plan.neurons.indices(x, options)
      if mesh is not None and plan.neurons.shards > 1:
        out = h + sharding.sharded_sparse_mlp(self.mlp, y, idx_k, mesh=mesh, implementation=options.implementation)
      else:
        out = h + self.mlp.sparse(y, idx_k, implementation=options.implementation)
    elif options.fused_projections and mesh is None and self.mlp.decodes_in_kernels:   # residual in down_proj / fc2
      out = self.mlp.decode(y, residual_md=h, implementation=options.implementation).y
    else:
      out = h + self.mlp(y)
    return LayerOut(out if self.pre_norm else self.mlp_norm(out), a.k_cache_bhsd, a.v_cache_bhsd, None)

  def _resolve_router(self, plan: LayerPlan, x_bd, options: DecodeOptions, mesh):
    """`plan.heads`, with a linear router the attention kernel cannot evaluate itself turned into its groups
    (the router's own dot on the normed input x_bd)."""
    heads = plan.heads
    if isinstance(heads, LinearRouter) and not self.attn.fuses_router(heads, options, mesh):
      return heads.groups(x_bd)
    return heads

  def _decode_deferred(self, h_bd, lengths_b, k_cache, v_cache, plan, options, normed, next_norm,
                       page_table_bp) -> LayerOut:
    """`decode` with both RMSNorms in the kernels: q|k|v (and the router's side programs) normalise `h * g`
    rows in their epilogue, o_proj writes the MLP norm's `h * g` and squares, gate|up normalises them.
    A selection the kernel does not make gets the attention norm of h_bd itself."""
    x_bd, sq_tb = normed if normed is not None else deferred_norm(h_bd, self.attn_norm.scale[...])
    heads = plan.heads
    if isinstance(heads, LinearRouter) and not self.attn.fuses_router(heads, options):
      heads = heads.groups(self.attn_norm(h_bd))
    a = self.attn.decode(x_bd, lengths_b, k_cache, v_cache, heads, options=options, residual_bd=h_bd,
                         rms=RmsInput(sq_tb, self.attn_norm.eps), norm_scale=self.mlp_norm.scale[...],
                         page_table_bp=page_table_bp)
    out = self.mlp.decode(a.next_normed.x_bd, residual_md=a.h, rms=RmsInput(a.next_normed.sq_TB, self.mlp_norm.eps),
                          norm_scale=next_norm, implementation=options.implementation)
    next_normed = None if next_norm is None else Normed(out.normed, out.sq_TM)
    return LayerOut(out.y, a.k_cache_bhsd, a.v_cache_bhsd, next_normed)


class CausalLM(nnx.Module):
  """A decoder-only language model (Llama, Mistral, Qwen2 and OPT families) as a Flax NNX module.

  Usually made by `polar_jax.load_model(CKPT)` (converted weights) or `polar_jax.init_model(config)` (random
  weights) rather than by the constructor. Entry points: `model(input_ids, attention_mask)` for float32 logits of
  every position; `prefill(tokens_bt, lengths_b, cache)` then `decode_step(tokens_b, cache)` for incremental
  decoding with a `KVCache`, which `polar_jax.generate` runs jitted.

  Args:
    config: the architecture (`ModelConfig`; a checkpoint's: `polar_jax.checkpoint.load_config(CKPT)`).
    dtype: parameter and activation dtype (logits are float32).
    rngs: `nnx.Rngs` for the random initial weights.

  Attributes:
    config, dtype: as given.
    layers: one `DecoderLayer` per layer.
    embed, pos_embed (learned positions, OPT; else None), project_in / project_out (OPT-350m; else None),
    final_norm, lm_head (None with tied embeddings): the remaining parameters.

  Example:
    model = CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    logits_btv = model(input_ids_bt, attention_mask_bt)
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed = Embedding(config.vocab_size, config.embed_dim, dtype=dtype, rngs=rngs)
    if config.positions == "learned":
      self.pos_embed = Embedding(config.max_position_embeddings + OPT_POSITION_OFFSET, config.hidden_size,
                                 dtype=dtype, rngs=rngs)
    else:
      self.pos_embed = None
    if config.word_embed_proj_dim is not None:
      self.project_in = Linear(config.embed_dim, config.hidden_size, bias=False, dtype=dtype, rngs=rngs)
      self.project_out = Linear(config.hidden_size, config.embed_dim, bias=False, dtype=dtype, rngs=rngs)
    else:
      self.project_in = self.project_out = None
    self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = (make_norm(config.norm, config.hidden_size, eps=config.norm_eps, dtype=dtype, rngs=rngs)
                       if config.final_norm else None)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.embed_dim, config.vocab_size, bias=False, dtype=dtype, rngs=rngs))

  # ---- pieces -----------------------------------------------------------------------------
  def embed_tokens(self, ids, positions):
    h = self.embed(ids)
    if self.project_in is not None:
      h = self.project_in(h)
    if self.pos_embed is not None:
      h = h + self.pos_embed(positions + OPT_POSITION_OFFSET)
    return h.astype(self.dtype)

  def logits(self, h):
    """float32 logits from final hidden states."""
    if self.final_norm is not None:
      h = self.final_norm(h)
    if self.project_out is not None:
      h = self.project_out(h)
    if self.lm_head is None:
      return self.embed.attend(h)
    return self.lm_head(h, jnp.float32)

  # ---- entry points -----------------------------------------------------------------------
  def __call__(self, input_ids, attention_mask=None):
    """Float32 logits `[B, T, V]` for every position; padded positions hold unspecified values."""
    ids = jnp.asarray(input_ids, jnp.int32)
    b, t = ids.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    order = jnp.argsort(1 - mask, axis=1, stable=True)     # valid tokens first, in order
    ids_c = jnp.take_along_axis(ids, order, axis=1)
    lengths = mask.sum(axis=1).astype(jnp.int32)
    h = self.embed_tokens(ids_c, jnp.broadcast_to(jnp.arange(t), (b, t)))
    for layer in self.layers:
      h = layer.forward(h, lengths)
    logits_c = self.logits(h)
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(logits_c, inverse[:, :, None], axis=1)

  def prefill(self, tokens_bt, lengths_b, cache: KVCache, *, max_tokens: int = PREFILL_MAX_TOKENS, mesh=None):
    """Dense pass over compacted prompts; returns (last-token logits `[B, V]`, filled cache).

    Batches of more than `max_tokens` prompt tokens are processed a group of rows at a time (a
    `fori_loop`), so prefill intermediates scale with `max_tokens`, not with the batch. `mesh`: the
    tensor-parallel mesh (`polar_jax.sharding.model_mesh`) the cache is sharded on, or None.
    """
    b, t = tokens_bt.shape
    rows = prefill_group_rows(b, t, max_tokens)
    lengths_b = lengths_b.astype(jnp.int32)
    if rows == b:
      logits, ks, vs = self._prefill_rows(tokens_bt, lengths_b, cache.k_bhsd, cache.v_bhsd, 0, mesh)
      return logits, KVCache(ks, vs, lengths_b)

    def body(i, carry):
      logits_bv, ks, vs = carry
      r0 = i * rows
      tok = jax.lax.dynamic_slice_in_dim(tokens_bt, r0, rows, axis=0)
      lens = jax.lax.dynamic_slice_in_dim(lengths_b, r0, rows, axis=0)
      logits, ks, vs = self._prefill_rows(tok, lens, ks, vs, r0, mesh)
      return jax.lax.dynamic_update_slice_in_dim(logits_bv, logits, r0, axis=0), ks, vs

    init = (jnp.zeros((b, self.config.vocab_size), jnp.float32), cache.k_bhsd, cache.v_bhsd)
    logits, ks, vs = jax.lax.fori_loop(0, b // rows, body, init)
    return logits, KVCache(ks, vs, lengths_b)

  def _prefill_rows(self, tokens_rt, lengths_r, k_caches, v_caches, row0, mesh):
    r, t = tokens_rt.shape
    h = self.embed_tokens(tokens_rt, jnp.broadcast_to(jnp.arange(t), (r, t)))
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      h, k, v = layer.prefill(h, lengths_r, k_caches[i], v_caches[i], row0, mesh=mesh)
      ks.append(k)
      vs.append(v)
    last = jnp.take_along_axis(h, (lengths_r - 1)[:, None, None], axis=1)[:, 0]
    return self.logits(last), tuple(ks), tuple(vs)

  def decode_step(self, tokens_b, cache: KVCache | PagedKVCache, plans: Sequence[LayerPlan] | None = None, *,
                  options: DecodeOptions = DecodeOptions(), mesh=None):
    """Appends one token per row; returns (logits `[B, V]`, cache with lengths + 1).

    `cache`: a contiguous `KVCache`, or a `PagedKVCache` (one device): each layer then writes the new token's K/V
    into its page and attends with `selective_paged_decode_attention`.

    `plans`: one `polar_jax.selection.LayerPlan` per layer (None: dense everywhere), built by the decode-step
    objects (`polar_jax.sparse_decode.SparseDecode`). `mesh`: the tensor-parallel mesh, or None.
    """
    plans = tuple(plans) if plans is not None else (DENSE_PLAN,) * len(self.layers)
    if len(plans) != len(self.layers):
      raise ValueError(f"decode_step: {len(plans)} layer plans for {len(self.layers)} layers")
    lengths = cache.lengths_b
    h = self.embed_tokens(tokens_b, lengths)
    ks, vs = [], []
    defers = [layer.defers_norms(plan, options, mesh) for layer, plan in zip(self.layers, plans)] + [False]
    normed = None   # the next layer's attention-norm input left by a deferring layer's down_proj
    table = cache.page_table_bp if isinstance(cache, PagedKVCache) else None
    for i, layer in enumerate(self.layers):
      next_norm = self.layers[i + 1].attn_norm.scale[...] if defers[i] and defers[i + 1] else None
      out = layer.decode(h, lengths, *cache.layer_kv(i), plans[i], options=options, mesh=mesh, normed=normed,
                         next_norm=next_norm, page_table_bp=table)
      h, normed = out.h, out.next_normed
      ks.append(out.k_cache_bhsd)
      vs.append(out.v_cache_bhsd)
    return self.logits(h), cache.with_layers(ks, vs, lengths + 1)


def init_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0) -> CausalLM:
  """A randomly initialised model (for tests and speed benchmarks), built in one compiled program."""
  return nnx.jit(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed)))()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, input_ids, attention_mask):
  return nnx.merge(graphdef, state)(input_ids, attention_mask)


def forward(model: CausalLM, input_ids, attention_mask=None) -> jax.Array:
  """Jitted `model(input_ids, attention_mask)`: float32 logits `[B, T, V]`."""
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  graphdef, state = nnx.split(model)
  return _forward(graphdef, state, ids, mask)


def abstract_model(config: ModelConfig, *, dtype=jnp.float32) -> CausalLM:
  """The model with `jax.ShapeDtypeStruct` leaves (no memory), the target for checkpoint restore."""
  return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{"layers.0.attn.q_proj.kernel": shape}` of every parameter: the checkpoint contract."""
  state = nnx.state(abstract_model(config), nnx.Param)
  out = {}
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    out[".".join(str(p) for p in path)] = tuple(value.shape)
  return out
