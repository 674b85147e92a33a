"""The paged KV cache in the decode step: `CausalLM.decode_step` over a `PagedKVCache` (pages shuffled over the pool)
gives the logits of the contiguous cache, dense and with selected groups, fused q|k|v or not; the page writes land
where the table says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LLAMA_GQA, OPT
from polar_jax.fusion import fuse_projections
from polar_jax.kv_cache import KVCache
from polar_jax.model import init_model
from polar_jax.options import DecodeOptions
from polar_jax.paged_kv_cache import PagedKVCache, PagedLayout, gather_row, write_token, write_tokens
from polar_jax.selection import GroupIndices, LayerPlan

PAGE = 16
MAX_LEN = 48   # 3 pages per row


def _paged_from(config, cache: KVCache, layout: PagedLayout, rng) -> PagedKVCache:
  """The contiguous cache's rows copied into pages taken in a shuffled order."""
  b = cache.batch
  pages = rng.permutation(layout.num_pages)[:b * layout.max_pages].reshape(b, layout.max_pages)
  paged = PagedKVCache.init(config, b, layout, cache.k_bhsd[0].dtype)
  ks, vs = [], []
  for kc, vc, kp, vp in zip(cache.k_bhsd, cache.v_bhsd, paged.k_hpsd, paged.v_hpsd):
    for row in range(b):
      n = int(cache.lengths_b[row])
      kp = write_tokens(kp, kc[row, :, :n], jnp.asarray(pages[row]), 0, n)
      vp = write_tokens(vp, vc[row, :, :n], jnp.asarray(pages[row]), 0, n)
    ks.append(kp)
    vs.append(vp)
  return PagedKVCache(tuple(ks), tuple(vs), jnp.asarray(pages, jnp.int32), cache.lengths_b)


@pytest.mark.parametrize("config,fused,select", [(LLAMA_GQA, False, False), (LLAMA_GQA, True, True),
                                                 (OPT, False, True)])
def test_paged_decode_step_equals_contiguous(config, fused, select):
  model = init_model(config, seed=2)
  if fused:
    fuse_projections(model)
  rng = np.random.default_rng(0)
  b, t = 3, 20
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
  lengths = jnp.asarray([20, 7, 16], jnp.int32)
  cache = KVCache.init(config, b, MAX_LEN, model.dtype)
  _, cache = jax.jit(lambda m, x, n, c: m.prefill(x, n, c))(model, tokens, lengths, cache)
  layout = PagedLayout(PAGE, num_pages=12, max_pages=MAX_LEN // PAGE)
  paged = _paged_from(config, cache, layout, rng)
  g = config.num_kv_heads
  plans = None
  if select:
    idx = jnp.asarray(rng.integers(0, g, (b, 1)), jnp.int32)
    plans = (LayerPlan(GroupIndices(idx)),) * config.num_layers
  step = jax.jit(lambda m, x, c: m.decode_step(x, c, plans, options=DecodeOptions(kernels="xla")))
  tok = tokens[:, 0]
  eps = float(jnp.finfo(model.dtype).eps)
  for _ in range(5):   # rows 1 and 2 cross page boundaries
    ref, cache = step(model, tok, cache)
    out, paged = step(model, tok, paged)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=256 * eps, atol=256 * eps)
    tok = jnp.argmax(ref, axis=-1).astype(jnp.int32)
  assert np.array_equal(np.asarray(paged.lengths_b), np.asarray(cache.lengths_b))
  for row in range(b):   # the pages hold the contiguous cache's keys, in order
    n = int(cache.lengths_b[row])
    keys = gather_row(paged.k_hpsd[1], paged.page_table_bp[row])[:, :n]
    np.testing.assert_allclose(np.asarray(keys), np.asarray(cache.k_bhsd[1][row, :, :n]), rtol=256 * eps,
                               atol=256 * eps)


def test_write_token_goes_to_its_page_and_slot():
  pages = jnp.zeros((2, 5, 16, 4), jnp.float32)
  table = jnp.asarray([[3, 1], [0, 4]], jnp.int32)
  new = jnp.arange(2 * 2 * 4, dtype=jnp.float32).reshape(2, 2, 4) + 1
  out = np.asarray(write_token(pages, new, table, jnp.asarray([17, 5], jnp.int32)))
  np.testing.assert_array_equal(out[:, 1, 1], np.asarray(new[0]))    # row 0, position 17: page table[0, 1], slot 1
  np.testing.assert_array_equal(out[:, 0, 5], np.asarray(new[1]))    # row 1, position 5: page table[1, 0], slot 5
  assert np.count_nonzero(out) == np.count_nonzero(np.asarray(new))  # nothing else written


def test_layout_names_bad_values():
  with pytest.raises(ValueError, match="multiple of 16"):
    PagedLayout(8, 4, 2)
  with pytest.raises(ValueError, match="num_pages"):
    PagedLayout(16, 0, 2)
  assert PagedLayout(16, 4, 2).trash_page == 4 and PagedLayout(16, 4, 2).max_len == 32
