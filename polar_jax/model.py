"""The decoder family (OPT, LLaMA-2/3, Mistral, Qwen2) as one Flax NNX module.

Three entry points, all pure functions of the module state plus explicit inputs:
  * `model(input_ids, attention_mask)`: float32 logits `[B, T, V]` (no cache);
  * `model.prefill(tokens_bt, lengths_b, cache)`: dense prompt pass that fills the KV cache and
    returns the last valid token's logits;
  * `model.decode_step(tokens_b, cache, selector=...)`: one token per row, the Polar Sparsity hook.
Prompts are handled compacted (each row's valid tokens first), so any padding works.
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax import layers
from polar_jax.attention import Attention
from polar_jax.config import ModelConfig
from polar_jax.kv_cache import KVCache
from polar_jax.layers import Embedding, Linear, RMSNorm, make_norm
from polar_jax.mlp import GatedMLP, make_mlp
from pallas_kernels.skinny_matmul_xla import deferred_norm

OPT_POSITION_OFFSET = 2
# Prompt tokens prefilled at once; larger batches are prefilled a group of rows at a time.
PREFILL_MAX_TOKENS = 16384

# With layers.DECODE_MATMUL on one device: a linear head router's scores as extra programs of the q|k|v kernel
# (`skinny_matmul`'s side weight) instead of an XLA dot and its split-K sum (A/B runs; set at process start).
ROUTER_IN_QKV = True
# With ROUTER_IN_QKV: the router's per-row top-k of its group scores in the side program's epilogue (off: an XLA
# fusion after the kernel; A/B runs).
ROUTER_TOPK_IN_QKV = True


def prefill_group_rows(batch: int, length: int, max_tokens: int) -> int:
  """Rows per prefill group: the largest divisor of `batch` whose tokens fit `max_tokens` (at least 1)."""
  best = 1
  for r in range(1, batch + 1):
    if batch % r == 0 and r * length <= max_tokens:
      best = r
  return best


class GroupSelector(Protocol):
  """Decides, per layer and row, which KV groups a decode step attends to.

  Called with the layer index and that layer's normed attention input `[B, d]`;
  returns int32 `[B, K]` group indices, None for dense attention in that layer, or a Python int k
  for the oracle (dense attention, then each row keeps its k groups of largest output norm).
  """

  def __call__(self, layer: int, x_bd: jax.Array) -> jax.Array | None: ...


class DecoderLayer(nnx.Module):
  """Attention + MLP with pre-norm (most models) or post-norm (OPT-350m) residuals."""

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

  def prefill(self, h_btd, lengths_b, k_cache, v_cache, row0=0):
    x = self.attn_norm(h_btd) if self.pre_norm else h_btd
    a, k_cache, v_cache = self.attn.prefill(x, lengths_b, k_cache, v_cache, row0)
    h = h_btd + a if self.pre_norm else self.attn_norm(h_btd + a)
    return self._mlp_block(h, self.mlp), k_cache, v_cache

  def defers_norms(self, mlp_fn=None) -> bool:
    """Whether `decode` runs this layer's RMSNorms inside its projection kernels (`layers.DEFERRED_NORM`: one
    device, pre-norm RMSNorm, a fused q|k|v and a fused gated MLP with its activation in the kernel)."""
    return (layers.DEFERRED_NORM and layers.DECODE_MATMUL and getattr(self.attn, "mesh", None) is None
            and self.pre_norm and isinstance(self.attn_norm, RMSNorm) and isinstance(self.mlp_norm, RMSNorm)
            and self.attn.fused_qkv_decode and mlp_fn is None and isinstance(self.mlp, GatedMLP)
            and self.mlp.glu_epilogue)

  def decode(self, h_bd, lengths_b, k_cache, v_cache, selector_fn=None, mlp_fn=None, implementation=None, *,
             selector_plan=None, normed=None, next_norm=None):
    """One token per row. `selector_fn(x_bd) -> group_idx, None or oracle k` sees the normed attention
    input (the router input); `mlp_fn(y_bd, x_bd)` replaces the MLP on its input y, given that router input.
    `selector_plan` (`SparseDecode.hooks`' `selector.plan(layer)`) says whether the selection is a linear
    router the q|k|v kernel can evaluate itself.

    On one device with `layers.DECODE_MATMUL` (`pallas_kernels.skinny_matmul`): o_proj and down_proj add the
    residual in their epilogues, and a linear router's scores come from extra programs of the q|k|v kernel.

    Deferred norms (`defers_norms`): `normed=(h * g, sq_TM)` is this layer's attention-norm input as the previous
    layer's down_proj left it (None: made here from h_bd); `next_norm` (the next layer's attention-norm weight)
    makes the result `(h, k_cache, v_cache, (h * next_norm, sq_TM))`."""
    defer = self.defers_norms(mlp_fn)
    if (normed is not None or next_norm is not None) and not defer:
      raise ValueError("DecoderLayer.decode: normed= / next_norm= need a layer that defers its norms "
                       "(defers_norms)")
    plan = selector_plan or (("dense",) if selector_fn is None else ("x",))
    one_device = layers.DECODE_MATMUL and getattr(self.attn, "mesh", None) is None
    router = None
    if (one_device and ROUTER_IN_QKV and plan[0] == "linear" and self.attn.fused_qkv_decode
        and plan[1].dtype == self.attn.qkv_proj.kernel.dtype):
      router = plan[1:4] + (plan[4] if ROUTER_TOPK_IN_QKV else None,)
    if defer:   # (a selector that reads the normed input: only where the layer selects and the kernel does not)
      select = selector_fn if plan[0] != "dense" and router is None else None
      return self._decode_deferred(h_bd, lengths_b, k_cache, v_cache, select, router, implementation, normed,
                                   next_norm)
    x = self.attn_norm(h_bd) if self.pre_norm else h_bd
    group_idx = selector_fn(x) if selector_fn is not None and router is None else None
    h, k_cache, v_cache = self.attn.decode(x, lengths_b, k_cache, v_cache, group_idx, implementation=implementation,
                                           residual_bd=h_bd, router=router)   # h_bd + attention
    h = h if self.pre_norm else self.attn_norm(h)
    if mlp_fn is None and one_device and self.mlp.decodes_in_kernels:   # the residual add in down_proj / fc2
      out = self.mlp.decode(self.mlp_norm(h) if self.pre_norm else h, residual_md=h, implementation=implementation)
      return (out if self.pre_norm else self.mlp_norm(out)), k_cache, v_cache
    mlp = self.mlp if mlp_fn is None else (lambda y: mlp_fn(y, x))
    return self._mlp_block(h, mlp), k_cache, v_cache

  def _decode_deferred(self, h_bd, lengths_b, k_cache, v_cache, selector_fn, router, implementation, normed,
                       next_norm):
    """`decode` with both RMSNorms in the kernels: q|k|v (and the router's side programs) normalise `h * g`
    rows in their epilogue, o_proj writes the MLP norm's `h * g` and squares, gate|up normalises them.
    `selector_fn` (None: the layer is dense or the kernel selects) gets the attention norm of h_bd itself."""
    x_bd, sq_tb = normed if normed is not None else deferred_norm(h_bd, self.attn_norm.scale[...])
    group_idx = selector_fn(self.attn_norm(h_bd)) if selector_fn is not None else None
    (h, y_bd, sq2_tb), k_cache, v_cache = self.attn.decode(
        x_bd, lengths_b, k_cache, v_cache, group_idx, implementation=implementation, residual_bd=h_bd,
        router=router, rms=(sq_tb, self.attn_norm.eps), norm_scale=self.mlp_norm.scale[...])
    out = self.mlp.decode(y_bd, residual_md=h, rms=(sq2_tb, self.mlp_norm.eps), norm_scale=next_norm,
                          implementation=implementation)
    if next_norm is None:
      return out, k_cache, v_cache
    return out[0], k_cache, v_cache, tuple(out[1:])


class CausalLM(nnx.Module):
  """A decoder-only language model.

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

  def prefill(self, tokens_bt, lengths_b, cache: KVCache, *, max_tokens: int = PREFILL_MAX_TOKENS):
    """Dense pass over compacted prompts; returns (last-token logits `[B, V]`, filled cache).

    Batches of more than `max_tokens` prompt tokens are processed a group of rows at a time (a
    `fori_loop`), so prefill intermediates scale with `max_tokens`, not with the batch.
    """
    b, t = tokens_bt.shape
    rows = prefill_group_rows(b, t, max_tokens)
    lengths_b = lengths_b.astype(jnp.int32)
    if rows == b:
      logits, ks, vs = self._prefill_rows(tokens_bt, lengths_b, cache.k_bhsd, cache.v_bhsd, 0)
      return logits, KVCache(ks, vs, lengths_b)

    def body(i, carry):
      logits_bv, ks, vs = carry
      r0 = i * rows
      tok = jax.lax.dynamic_slice_in_dim(tokens_bt, r0, rows, axis=0)
      lens = jax.lax.dynamic_slice_in_dim(lengths_b, r0, rows, axis=0)
      logits, ks, vs = self._prefill_rows(tok, lens, ks, vs, r0)
      return jax.lax.dynamic_update_slice_in_dim(logits_bv, logits, r0, axis=0), ks, vs

    init = (jnp.zeros((b, self.config.vocab_size), jnp.float32), cache.k_bhsd, cache.v_bhsd)
    logits, ks, vs = jax.lax.fori_loop(0, b // rows, body, init)
    return logits, KVCache(ks, vs, lengths_b)

  def _prefill_rows(self, tokens_rt, lengths_r, k_caches, v_caches, row0):
    r, t = tokens_rt.shape
    h = self.embed_tokens(tokens_rt, jnp.broadcast_to(jnp.arange(t), (r, t)))
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      h, k, v = layer.prefill(h, lengths_r, k_caches[i], v_caches[i], row0)
      ks.append(k)
      vs.append(v)
    last = jnp.take_along_axis(h, (lengths_r - 1)[:, None, None], axis=1)[:, 0]
    return self.logits(last), tuple(ks), tuple(vs)

  def decode_step(self, tokens_b, cache: KVCache, *, selector: GroupSelector | None = None,
                  mlp_override: Callable[[int], Callable | None] | None = None, implementation=None):
    """Appends one token per row; returns (logits `[B, V]`, cache with lengths + 1).

    `mlp_override(layer)` returns None (dense MLP) or `mlp_fn(y_bd, x_bd)` computing the layer's MLP
    output from its input y and the layer's router input x (see `polar_jax.sparse_decode`).
    """
    lengths = cache.lengths_b
    h = self.embed_tokens(tokens_b, lengths)
    ks, vs = [], []
    mlp_fns = [mlp_override(i) if mlp_override is not None else None for i in range(len(self.layers))]
    defers = [layer.defers_norms(fn) for layer, fn in zip(self.layers, mlp_fns)] + [False]
    normed = None   # the next layer's attention-norm input left by a deferring layer's down_proj
    for i, layer in enumerate(self.layers):
      sel = (lambda x, i=i: selector(i, x)) if selector is not None else None
      plan = selector.plan(i) if hasattr(selector, "plan") else None
      next_norm = self.layers[i + 1].attn_norm.scale[...] if defers[i] and defers[i + 1] else None
      h, k, v, *rest = layer.decode(h, lengths, cache.k_bhsd[i], cache.v_bhsd[i], sel, mlp_fns[i], implementation,
                                    selector_plan=plan, normed=normed, next_norm=next_norm)
      normed = rest[0] if rest else None
      ks.append(k)
      vs.append(v)
    return self.logits(h), KVCache(tuple(ks), tuple(vs), lengths + 1)


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
