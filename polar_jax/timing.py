"""Wall-clock throughput of `generate`, with prefill excluded (used by the CLI and the demo)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax import generation as gen


@dataclasses.dataclass(frozen=True)
class Throughput:
  total_s: float          # one whole generate call (prefill + decode), compiled
  prefill_s: float        # the prefill alone, same shapes
  decode_tokens: int      # tokens produced by decode steps (the first token comes from prefill)

  @property
  def decode_s(self) -> float:
    return max(self.total_s - self.prefill_s, 1e-9)

  @property
  def decode_tok_s(self) -> float:
    return self.decode_tokens / self.decode_s


def generate_timed(model, input_ids, attention_mask=None, *, repeats: int = 1, **kwargs):
  """Runs `generate` once to compile, then `repeats` timed runs; returns (output, Throughput).

  The prefill is timed separately on the same padded batch, so decode tokens/s excludes it.
  """
  out = gen.generate(model, input_ids, attention_mask, **kwargs)   # compile + warm-up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = gen.generate(model, input_ids, attention_mask, **kwargs)
    best = min(best, time.perf_counter() - t0)
  cfg = model.config
  batch = gen.prepare_batch(input_ids, attention_mask, vocab_size=cfg.vocab_size,
                            context=cfg.max_position_embeddings, max_new_tokens=kwargs["max_new_tokens"])
  graphdef, state = nnx.split(model)
  args = (graphdef, state, jnp.asarray(batch.tokens_bt), jnp.asarray(batch.lengths_b))
  jax.block_until_ready(gen._prefill_program(*args, max_len=batch.max_len))
  best_prefill = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(gen._prefill_program(*args, max_len=batch.max_len))
    best_prefill = min(best_prefill, time.perf_counter() - t0)
  decode_tokens = int((out.lengths - 1).clip(min=0).sum())
  return out, Throughput(best, best_prefill, decode_tokens)
