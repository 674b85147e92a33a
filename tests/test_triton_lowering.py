"""The Triton kernels lowered for a CUDA GPU on this machine (no GPU needed: lowering builds the Triton IR, which is
where unsupported casts and loads fail), on every KV storage dtype. Interpret mode, which the other kernel tests
use on CPU, accepts programs the Triton lowering rejects (a masked float8 load whose fill value is an integer, say);
this test catches them without a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import AttentionConfig
from pallas_kernels import _platform
from pallas_kernels import kv_quant
from pallas_kernels import rope_append
from pallas_kernels import selective_decode_attention
from pallas_kernels import selective_paged_decode_attention

KV_DTYPES = (None, jnp.int8, jnp.float8_e4m3fn)   # None: the query's dtype (bfloat16)
CONFIGS = {"direct": AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2),
           "persistent": AttentionConfig(block_k=16, num_splits=1, num_warps=4, num_stages=2, persistent=True),
           "split_k": AttentionConfig(block_k=16, num_splits=2, num_warps=4, num_stages=2)}
B, HQ, HKV, S, D = 2, 8, 2, 48, 64


@pytest.fixture
def as_if_on_gpu(monkeypatch):
  """The kernels' entry points choose the Triton path (not interpret mode), as on a GPU."""
  monkeypatch.setattr(_platform, "is_gpu", lambda: True)


def _lower_for_cuda(fn, *args) -> None:
  """Lowers `fn(*args)` for CUDA; it must hold at least one Triton kernel (not interpret mode's loops)."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text


def _cache(kv_dtype, shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  if kv_dtype is None:
    return x, None
  return kv_quant.quantise(x, kv_dtype)


def _name(kv_dtype) -> str:
  return "bfloat16" if kv_dtype is None else jnp.dtype(kv_dtype).name


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=_name)
@pytest.mark.parametrize("kernel", sorted(CONFIGS))
def test_contiguous_decode_attention_lowers(as_if_on_gpu, kernel, kv_dtype):
  q = jnp.ones((B, HQ, D), jnp.bfloat16)
  (k, ks), (v, vs) = _cache(kv_dtype, (B, HKV, S, D)), _cache(kv_dtype, (B, HKV, S, D))
  lengths, gidx = jnp.asarray([5, S], jnp.int32), jnp.asarray([[1], [0]], jnp.int32)
  fn = lambda *a: selective_decode_attention(*a, implementation="pallas", config=CONFIGS[kernel],  # noqa: E731
                                             k_scale=ks, v_scale=vs)
  _lower_for_cuda(fn, q, k, v, lengths, gidx)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=_name)
def test_paged_decode_attention_lowers(as_if_on_gpu, kv_dtype):
  page_size, pages = 16, 8
  q = jnp.ones((B, HQ, D), jnp.bfloat16)
  (k, ks), (v, vs) = _cache(kv_dtype, (HKV, pages, page_size, D)), _cache(kv_dtype, (HKV, pages, page_size, D))
  lengths, table = jnp.asarray([5, 40], jnp.int32), jnp.asarray([[0, 1, 2], [3, 4, 5]], jnp.int32)
  gidx = jnp.asarray([[1], [0]], jnp.int32)
  fn = lambda *a: selective_paged_decode_attention(*a, implementation="pallas", k_scale=ks,  # noqa: E731
                                                   v_scale=vs)
  _lower_for_cuda(fn, q, k, v, lengths, table, gidx)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=_name)
def test_rope_append_lowers(as_if_on_gpu, kv_dtype):
  (k, ks), (v, vs) = _cache(kv_dtype, (B, HKV, S, D)), _cache(kv_dtype, (B, HKV, S, D))
  qkv = jnp.ones((B, (HQ + 2 * HKV) * D), jnp.bfloat16)
  inv_freq = jnp.ones((D // 2,), jnp.float32)
  fn = lambda *a: rope_append(*a, num_heads=HQ, implementation="pallas", k_scale=ks, v_scale=vs)  # noqa: E731
  _lower_for_cuda(fn, qkv, jnp.asarray([3, 7], jnp.int32), inv_freq, k, v)
