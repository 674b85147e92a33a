"""Source tensor names -> polar_jax parameter names, per checkpoint family.

A mapping is `{source_name: Entry(target, ops)}`. `ops` run in order on the source array
(torch `(out, in)` layout for linears):
  * `("T",)`: transpose a 2-D weight into our `[in, out]` kernel layout;
  * `("unpermute", n)`: undo llama.cpp's per-head row permutation of Q/K (n heads).
Candidate entries are generated for every optional tensor (biases, lm_head, ...) and then
filtered to the names `polar_jax.model.param_shapes(config)` declares, so the mapping always
agrees with the model.

HF source names are canonicalised by dropping one leading `model.` (checkpoints saved from
the bare `LlamaModel`/`OPTModel` lack it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from polar_jax.config import ModelConfig

TRANSPOSE = ("T",)


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one source tensor goes and how it is reshaped on the way."""

  target: str
  ops: tuple = ()

  def source_shape(self, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the source tensor must have to produce `target_shape`."""
    shape = tuple(target_shape)
    for op in reversed(self.ops):
      if op == "T":
        shape = shape[::-1]
    return shape

  def apply(self, array: np.ndarray) -> np.ndarray:
    for op in self.ops:
      if op == "T":
        array = array.T
      elif op[0] == "unpermute":
        array = unpermute_rows(array, op[1])
      else:  # pragma: no cover - programming error
        raise AssertionError(f"unknown op {op!r}")
    return array


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute(w, n_head)` (rows of Q/K weights or biases).

  llama.cpp interleaves the two rotary halves of each head; Hugging Face (and polar_jax)
  keep them as contiguous halves (rotate-half RoPE).
  """
  d = w.shape[0] // n_head // 2
  return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's `permute(w, n_head)` (used by its HF -> GGUF converter); for tests."""
  d = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, d, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _filter(candidates: dict[str, Entry], targets) -> dict[str, Entry]:
  targets = set(targets)
  out = {k: e for k, e in candidates.items() if e.target in targets}
  covered = {e.target for e in out.values()}
  if covered != targets:  # pragma: no cover - the candidate lists below must cover the model
    raise AssertionError(f"no source mapping for {sorted(targets - covered)}")
  return out


def _linear(prefix_src: str, prefix_dst: str) -> dict[str, Entry]:
  return {f"{prefix_src}.weight": Entry(f"{prefix_dst}.kernel", TRANSPOSE),
          f"{prefix_src}.bias": Entry(f"{prefix_dst}.bias")}


def _norm(prefix_src: str, prefix_dst: str) -> dict[str, Entry]:
  return {f"{prefix_src}.weight": Entry(f"{prefix_dst}.scale"),
          f"{prefix_src}.bias": Entry(f"{prefix_dst}.bias")}


# ---- Hugging Face ------------------------------------------------------------------------
def canonical_hf_name(name: str) -> str:
  """Drops one leading `model.` so `model.layers.0...` and `layers.0...` map alike."""
  return name[len("model."):] if name.startswith("model.") else name


def hf_ignored(name: str, config: ModelConfig) -> bool:
  """Known non-parameter buffers and tensors the model does not use (canonical names)."""
  if name.endswith("rotary_emb.inv_freq"):
    return True
  if name == "lm_head.weight" and config.tie_word_embeddings:
    return True  # tied: absent, or a copy of the embedding
  if config.model_type == "opt" and not config.final_norm and name.startswith("decoder.final_layer_norm."):
    return True  # present in some post-LN (OPT-350m) checkpoints, unused by transformers too
  return False


def hf_mapping(config: ModelConfig, targets) -> dict[str, Entry]:
  """`{canonical HF name: Entry}` for every parameter in `targets` (our flat names)."""
  if config.model_type == "opt":
    cand = _opt_candidates(config)
  else:
    cand = _llama_candidates(config)
  return _filter(cand, targets)


def _llama_candidates(config: ModelConfig) -> dict[str, Entry]:
  c = {"embed_tokens.weight": Entry("embed.embedding"),
       "lm_head.weight": Entry("lm_head.kernel", TRANSPOSE)}
  c.update(_norm("norm", "final_norm"))
  for i in range(config.num_layers):
    s, t = f"layers.{i}", f"layers.{i}"
    for p in ("q", "k", "v", "o"):
      c.update(_linear(f"{s}.self_attn.{p}_proj", f"{t}.attn.{p}_proj"))
    for p in ("gate", "up", "down"):
      c.update(_linear(f"{s}.mlp.{p}_proj", f"{t}.mlp.{p}_proj"))
    c.update(_norm(f"{s}.input_layernorm", f"{t}.attn_norm"))
    c.update(_norm(f"{s}.post_attention_layernorm", f"{t}.mlp_norm"))
  return c


def _opt_candidates(config: ModelConfig) -> dict[str, Entry]:
  c = {"decoder.embed_tokens.weight": Entry("embed.embedding"),
       "decoder.embed_positions.weight": Entry("pos_embed.embedding"),
       "decoder.project_in.weight": Entry("project_in.kernel", TRANSPOSE),
       "decoder.project_out.weight": Entry("project_out.kernel", TRANSPOSE),
       "lm_head.weight": Entry("lm_head.kernel", TRANSPOSE)}
  c.update(_norm("decoder.final_layer_norm", "final_norm"))
  for i in range(config.num_layers):
    s, t = f"decoder.layers.{i}", f"layers.{i}"
    for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
      c.update(_linear(f"{s}.self_attn.{p}_proj", f"{t}.attn.{q}_proj"))
    c.update(_norm(f"{s}.self_attn_layer_norm", f"{t}.attn_norm"))
    c.update(_norm(f"{s}.final_layer_norm", f"{t}.mlp_norm"))
    c[f"{s}.fc1.weight"] = Entry(f"{t}.mlp.w_in_nd")             # [N, d], not transposed
    c[f"{s}.fc1.bias"] = Entry(f"{t}.mlp.b_in_n")
    c[f"{s}.fc2.weight"] = Entry(f"{t}.mlp.w_out_nd", TRANSPOSE)  # HF [d, N] -> [N, d]
    c[f"{s}.fc2.bias"] = Entry(f"{t}.mlp.b_out_d")
  return c


# ---- GGUF (llama, qwen2) ----------------------------------------------------------------------
def gguf_mapping(config: ModelConfig, targets, *, permuted_qk: bool = True) -> dict[str, Entry]:
  """`{GGUF tensor name: Entry}`; linears are transposed, and with `permuted_qk` (llama.cpp's `llama` files) the
  Q/K rows are un-permuted first (`qwen2` files keep the Hugging Face row order)."""
  hq, hkv = config.num_heads, config.num_kv_heads
  c = {"token_embd.weight": Entry("embed.embedding"),
       "output.weight": Entry("lm_head.kernel", TRANSPOSE),
       "output_norm.weight": Entry("final_norm.scale")}
  for i in range(config.num_layers):
    s, t = f"blk.{i}", f"layers.{i}"
    for p, n in (("q", hq), ("k", hkv)):
      rows = (("unpermute", n),) if permuted_qk else ()
      c[f"{s}.attn_{p}.weight"] = Entry(f"{t}.attn.{p}_proj.kernel", rows + TRANSPOSE)
      c[f"{s}.attn_{p}.bias"] = Entry(f"{t}.attn.{p}_proj.bias", rows)
    c.update(_linear(f"{s}.attn_v", f"{t}.attn.v_proj"))
    c.update(_linear(f"{s}.attn_output", f"{t}.attn.o_proj"))
    for g, p in (("gate", "gate"), ("up", "up"), ("down", "down")):
      c.update(_linear(f"{s}.ffn_{g}", f"{t}.mlp.{p}_proj"))
    c[f"{s}.attn_norm.weight"] = Entry(f"{t}.attn_norm.scale")
    c[f"{s}.ffn_norm.weight"] = Entry(f"{t}.mlp_norm.scale")
  return _filter(c, targets)
