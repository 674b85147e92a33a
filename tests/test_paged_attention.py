"""selective_paged_decode_attention, both backends (the Pallas kernel in interpret mode on CPU, compiled on GPU; the
XLA reference) vs a dense reference: the row's pages gathered into a contiguous cache and the contiguous XLA
reference (`decode_attention_xla`) run on it. Every value the kernel must not read, or must mask, is NaN."""
import importlib.util
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KV8_DTYPES, assert_attention_close, poison_slots, quantise_cache
from pallas_kernels import _platform
from pallas_kernels import paged_decode_attention_triton as paged_triton
from pallas_kernels.decode_attention_xla import decode_attention_xla
from pallas_kernels.paged_decode_attention import selective_paged_decode_attention
from pallas_kernels.paged_decode_attention_triton import PagedAttentionConfig
from pallas_kernels.paged_decode_attention_triton import PagedAttentionHeuristics

BACKENDS = ("xla", "pallas")
_contiguous_xla = jax.jit(decode_attention_xla, static_argnames=("scale",))


def _case(seed, B, Hq, Hkv, D, page_size, lengths, K, dtype):
  """A paged batch: pages of each row out of order in the pool, row 1's first page shared with row 0 (a common
  prefix), a spare pool page and a spare table slot per row (-1 or past the pool: never read).

  Returns (inputs, poisoned inputs, reference): inputs = (q, k_pages, v_pages, lengths, page_table, group_idx);
  the poisoned copy has NaN in every K/V value no row reads (unused pages, slots past a row's length, groups
  none of the page's rows selects) and in the query heads of unselected groups."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  pages_b = -(-lengths // page_size)
  P_row = int(pages_b.max()) + 1
  P = int(pages_b.sum()) + 2
  order = iter(rng.permutation(P))
  table = np.empty((B, P_row), np.int32)
  for b in range(B):
    table[b] = -1 if b % 2 else P + 7
    for slot in range(pages_b[b]):
      table[b, slot] = next(order)
  if B > 1 and pages_b[0] and pages_b[1]:
    table[1, 0] = table[0, 0]   # shared: row 1's own first page becomes an unused one
  gidx = None if K is None else np.stack([rng.permutation(Hkv)[:K] for _ in range(B)]).astype(np.int32)
  q = rng.standard_normal((B, Hq, D)).astype(np.float32)
  k_pages = rng.standard_normal((Hkv, P, page_size, D)).astype(np.float32)
  v_pages = rng.standard_normal((Hkv, P, page_size, D)).astype(np.float32)

  selected_bh = np.ones((B, Hkv), bool) if K is None else np.zeros((B, Hkv), bool)
  if K is not None:
    selected_bh[np.arange(B)[:, None], gidx] = True
  read_hps = np.zeros((Hkv, P, page_size), bool)
  for b in range(B):
    for t in range(lengths[b]):
      read_hps[selected_bh[b], table[b, t // page_size], t % page_size] = True
  q_dead = ~np.repeat(selected_bh, Hq // Hkv, axis=1)[:, :, None]
  poisoned = (np.where(q_dead, np.nan, q), np.where(read_hps[..., None], k_pages, np.nan),
              np.where(read_hps[..., None], v_pages, np.nan))

  # Host-side casts and gathers (numpy with ml_dtypes' bfloat16): no eager device op to compile per case.
  cast = lambda a: jnp.asarray(np.asarray(a).astype(jnp.dtype(dtype)))  # noqa: E731
  extra = (jnp.asarray(lengths), jnp.asarray(table), None if gidx is None else jnp.asarray(gidx))
  contiguous = lambda pages: cast(  # noqa: E731  [B, Hkv, P_row * page_size, D], clean values everywhere
      pages[:, np.clip(table, 0, P - 1)].transpose(1, 0, 2, 3, 4).reshape(B, Hkv, P_row * page_size, D))
  q, k_dense, v_dense = cast(q), contiguous(k_pages), contiguous(v_pages)
  ref = _contiguous_xla(q, k_dense, v_dense, extra[0], extra[2], None, scale=D ** -0.5)
  k_pages, v_pages = cast(k_pages), cast(v_pages)
  return (q, k_pages, v_pages) + extra, tuple(map(cast, poisoned)) + extra, ref


def _assert_matches(out, ref, inputs, dtype):
  q, k_pages, gidx = inputs[0], inputs[1], inputs[5]
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_attention_close(out, ref, dtype)
  if gidx is not None:   # query heads of unselected groups: exactly 0, as the contiguous op returns
    B, Hq, _ = q.shape
    Hkv = k_pages.shape[0]
    selected = np.zeros((B, Hkv), bool)
    selected[np.arange(B)[:, None], np.asarray(gidx)] = True
    unselected = ~np.repeat(selected, Hq // Hkv, axis=1)
    assert np.all(np.asarray(out.astype(jnp.float32))[unselected] == 0.0)


CASES = [
    # B, Hq, Hkv, D, page_size, lengths, K (None: dense), dtype, config. `table_chunk` below the row's pages: the
    # page table is read into registers in several chunks.
    (3, 4, 4, 64, 16, (1, 37, 70), 1, jnp.float32, None),                          # MHA, one group, 1-token row
    (3, 4, 4, 64, 32, (33, 64, 5), 4, jnp.bfloat16,                                # all groups, page per block
     PagedAttentionConfig(block_k=32, table_chunk=1)),
    (3, 8, 2, 64, 16, (50, 17, 16), None, jnp.bfloat16,                            # GQA G4 dense
     PagedAttentionConfig(block_k=16, table_chunk=2)),
    (2, 8, 4, 64, 32, (70, 45), 2, jnp.float32, PagedAttentionConfig(block_k=16, table_chunk=1)),  # half pages
    (2, 4, 2, 64, 16, (130, 64), 1, jnp.bfloat16, PagedAttentionConfig(block_k=64, table_chunk=4)),  # 4 pages
    (2, 8, 2, 64, 48, (100, 47), 1, jnp.float16, None),                            # page 48: blocks span pages
    (4, 8, 4, 64, 16, (75, 0, 1, 40), 2, jnp.float32,                              # split keys, an empty row
     PagedAttentionConfig(block_k=16, num_splits=3, table_chunk=2)),
    (2, 4, 4, 64, 16, (60, 33), None, jnp.bfloat16, PagedAttentionConfig(block_k=32, num_splits=2)),  # split dense
    (2, 8, 4, 80, 16, (45, 20), 3, jnp.float32, PagedAttentionConfig(block_k=16)),  # head_dim 80 (padded)
    (2, 16, 2, 64, 16, (90, 31), 2, jnp.bfloat16, PagedAttentionHeuristics(keys_per_block=32)),  # G8, other rules
]


def _params():
  for case in CASES:
    cid = "-".join(map(str, case[:5])) + f"-L{'_'.join(map(str, case[5]))}-K{case[6]}-{jnp.dtype(case[7]).name}"
    for backend in BACKENDS:
      marks = [pytest.mark.slow] if backend == "pallas" else []
      yield pytest.param(backend, case, id=f"{backend}-{cid}", marks=marks)


@pytest.mark.parametrize("backend,case", list(_params()))
def test_matches_contiguous_reference(backend, case):
  B, Hq, Hkv, D, page_size, lengths, K, dtype, config = case
  inputs, poisoned, ref = _case(sum(lengths) + Hq, B, Hq, Hkv, D, page_size, lengths, K, dtype)
  out = selective_paged_decode_attention(*poisoned, implementation=backend,
                                         config=config if backend == "pallas" else None)
  _assert_matches(out, ref, inputs, dtype)
  # The unpoisoned inputs give the same result (the poison changed nothing that is read).
  clean = selective_paged_decode_attention(*inputs, implementation=backend,
                                           config=config if backend == "pallas" else None)
  np.testing.assert_array_equal(np.asarray(clean.astype(jnp.float32)), np.asarray(out.astype(jnp.float32)))


def _kv8_params():
  """8-bit pools on a subset of the cases: a group per row, GQA dense, 4 pages per block, pages spanning blocks,
  split keys, padded head_dim. The XLA reference on every case; the kernel on two cases in the fast suite."""
  fast = {(2, "int8"), (5, "float8_e4m3fn")}
  for i in (0, 2, 4, 5, 6, 8):
    case = CASES[i]
    for kv in KV8_DTYPES:
      name = jnp.dtype(kv).name
      for backend in BACKENDS:
        slow = backend == "pallas" and (i, name) not in fast
        yield pytest.param(backend, case, kv, id=f"{backend}-case{i}-{name}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("backend,case,kv_dtype", list(_kv8_params()))
def test_kv8_pools_match_contiguous_reference(backend, case, kv_dtype):
  """Pools of int8 / float8_e4m3fn values with per-slot scales: against the contiguous 8-bit XLA reference on the
  row's gathered pages, with NaN in the scales (and float8 values) of every slot that must not be read."""
  B, Hq, Hkv, D, page_size, lengths, K, dtype, config = case
  inputs, poisoned, _ = _case(sum(lengths) + Hq, B, Hq, Hkv, D, page_size, lengths, K, dtype)
  q, k_pages, v_pages, lengths_b, table, gidx = inputs
  (kq, ks), (vq, vs) = quantise_cache(k_pages, kv_dtype), quantise_cache(v_pages, kv_dtype)
  P = k_pages.shape[1]
  rows = np.clip(np.asarray(table), 0, P - 1)
  contiguous = lambda x: jnp.asarray(np.moveaxis(np.asarray(x)[:, rows], 0, 1).reshape(  # noqa: E731
      (B, Hkv, rows.shape[1] * page_size) + x.shape[3:]))
  ref = _contiguous_xla(q, contiguous(kq), contiguous(vq), lengths_b, gidx, None, scale=D ** -0.5,
                        k_scale_BHS=contiguous(ks), v_scale_BHS=contiguous(vs))
  dead_hps = jnp.asarray(np.isnan(np.asarray(poisoned[1].astype(jnp.float32))[..., 0]))
  pk, pks = poison_slots(kq, ks, dead_hps)
  pv, pvs = poison_slots(vq, vs, dead_hps)
  out = selective_paged_decode_attention(poisoned[0], pk, pv, lengths_b, table, gidx, implementation=backend,
                                         config=config if backend == "pallas" else None, k_scale=pks, v_scale=pvs)
  _assert_matches(out, ref, inputs, dtype)


@pytest.mark.parametrize("backend", [pytest.param("xla"), pytest.param("pallas", marks=pytest.mark.slow)])
def test_traced_inputs_are_clamped(backend):
  """Under jit nothing is validated on the host: a used table entry past the pool and group ids out of range are
  clamped (pool page P - 1, groups 0 / Hkv - 1), giving the result of the clamped inputs."""
  inputs, _, _ = _case(8, 2, 8, 4, 32, 16, (40, 20), 2, jnp.float32)
  q, k_pages, v_pages, lengths, table, _ = inputs
  P = k_pages.shape[1]
  bad_table = table.at[0, 1].set(P + 3)
  bad_gidx = jnp.asarray([[5, 1], [-1, 2]], jnp.int32)
  run = jax.jit(lambda n, t, g: selective_paged_decode_attention(q, k_pages, v_pages, n, t, g,
                                                                 implementation=backend))
  out = run(lengths, bad_table, bad_gidx)
  want = selective_paged_decode_attention(q, k_pages, v_pages, lengths, bad_table.at[0, 1].set(P - 1),
                                          jnp.clip(bad_gidx, 0, 3), implementation="xla")
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_raw_kernel_writes_every_head():
  """The unsplit kernel writes every head (zeros for unselected groups; interpret mode fills outputs with NaN, a GPU
  leaves them uninitialised), also where a row names one group twice or names groups out of range (clamped)."""
  inputs, _, _ = _case(5, 3, 8, 4, 64, 16, (30, 64, 3), 2, jnp.float32)   # clean: its own group_idx below
  q, k_pages, v_pages, lengths, table, _ = inputs
  gidx = jnp.asarray([[1, 1], [0, 3], [7, -2]], jnp.int32)   # row 2: clamped to groups 3 and 0
  out = paged_triton.paged_decode_attention_triton(
      q, k_pages, v_pages, lengths, table, gidx, scale=0.125, config=PagedAttentionConfig(block_k=16),
      interpret=_platform.interpret_mode())
  ref = selective_paged_decode_attention(q, k_pages, v_pages, lengths, table, jnp.clip(gidx, 0, 3), scale=0.125,
                                         implementation="xla")
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[0, [0, 1, 4, 5, 6, 7]] == 0) and np.any(np.asarray(out)[0, 2:4] != 0)


def test_kernel_name_and_config_choice():
  """`config=`: default rules, other rules or a fixed config all run the one paged kernel; the rules pick whole
  pages as blocks when a page is at least `keys_per_block` keys, and split keys only when B x K is small."""
  inputs, _, _ = _case(6, 2, 4, 2, 32, 16, (20, 9), 1, jnp.float32)
  for config in (None, PagedAttentionHeuristics(keys_per_block=16), PagedAttentionConfig(block_k=16, num_splits=2)):
    jaxpr = str(jax.make_jaxpr(lambda *a, c=config: selective_paged_decode_attention(
        *a, implementation="pallas", config=c))(*inputs))
    assert set(re.findall(r"name=(selective\w*)", jaxpr)) == {"selective_paged_decode_attention"}
  choose = paged_triton.choose_config
  assert choose(32, 16, 16, 4096, num_sms=132) == PagedAttentionConfig(block_k=64, num_splits=1)
  assert choose(32, 16, 64, 4096, num_sms=132).block_k == 64
  assert choose(32, 16, 128, 4096, num_sms=132).block_k == 128
  assert choose(32, 16, 48, 4096, num_sms=132).block_k == 64      # not a power of two: gathered blocks
  assert choose(32, 16, 16, 4096, num_sms=132, heuristics=PagedAttentionHeuristics(keys_per_block=16)).block_k == 16
  assert choose(4, 2, 16, 4096, num_sms=132).num_splits == 16      # capped: >= 4 blocks of 64 keys per split
  assert choose(8, 8, 16, 4096, num_sms=132).num_splits == 5       # ~2 programs per SM in all
  assert choose(4, 2, 16, 128, num_sms=132).num_splits == 1        # too few blocks to split


def _bad_calls():
  q = jnp.ones((2, 8, 64), jnp.float32)
  pages = jnp.ones((4, 6, 16, 64), jnp.float32)
  n = jnp.asarray([3, 32], jnp.int32)
  table = jnp.asarray([[0, 1, 2], [3, 4, -1]], jnp.int32)
  g = jnp.asarray([[0], [1]], jnp.int32)
  f = selective_paged_decode_attention
  return {
      "q rank": (lambda: f(q[0], pages, pages, n, table, g), "q must be"),
      "pages rank": (lambda: f(q, pages[0], pages[0], n, table, g), "must be \\[Hkv, num_pages"),
      "k/v shape": (lambda: f(q, pages, pages[:, :3], n, table, g), "v_pages shape"),
      "head_dim": (lambda: f(q[..., :32], pages, pages, n, table, g), "disagree on head_dim"),
      "Hq multiple": (lambda: f(jnp.ones((2, 6, 64)), pages, pages, n, table, g), "not a multiple"),
      "page size": (lambda: f(q, pages[:, :, :8], pages[:, :, :8], n, table, g), "multiple of 16"),
      "dtype": (lambda: f(q.astype(jnp.bfloat16), pages, pages, n, table, g), "dtypes differ"),
      "lengths shape": (lambda: f(q, pages, pages, n[:1], table, g), "lengths must have"),
      "lengths float": (lambda: f(q, pages, pages, n.astype(jnp.float32), table, g), "integer dtype"),
      "lengths range": (lambda: f(q, pages, pages, n + 20, table, g), "lengths must lie in \\[0, max_pages"),
      "table rank": (lambda: f(q, pages, pages, n, table[0], g), "page_table must be"),
      "table batch": (lambda: f(q, pages, pages, n, table[:1], g), "page_table must be"),
      "table float": (lambda: f(q, pages, pages, n, table.astype(jnp.float32), g), "integer dtype"),
      "used page range": (lambda: f(q, pages, pages, n + jnp.asarray([0, 16]), table, g),
                          "page_table\\[1, 2\\] = -1 holds keys of row 1"),
      "K too big": (lambda: f(q, pages, pages, n, table, jnp.zeros((2, 5), jnp.int32)), "1 <= K"),
      "group range": (lambda: f(q, pages, pages, n, table, g + 4), "values must lie"),
      "implementation": (lambda: f(q, pages, pages, n, table, g, implementation="cuda"), "unknown implementation"),
      "block_k": (lambda: PagedAttentionConfig(block_k=48), "power of two >= 16"),
      "table_chunk": (lambda: PagedAttentionConfig(block_k=16, table_chunk=3), "table_chunk must be a power"),
      "heuristic page size": (lambda: PagedAttentionHeuristics(page_size=24), "multiple of 16"),
  }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_bad_inputs_raise(name):
  call, match = _bad_calls()[name]
  with pytest.raises(ValueError, match=match):
    call()


def test_bad_config_type_raises():
  inputs, _, _ = _case(7, 2, 4, 2, 32, 16, (20, 9), 1, jnp.float32)
  with pytest.raises(TypeError, match="config must be a PagedAttentionConfig, a PagedAttentionHeuristics or None"):
    selective_paged_decode_attention(*inputs, implementation="pallas", config=dict(block_k=16))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_benchmark_smoke(tmp_path):
  """`benchmarks/kernels.py --smoke --only paged` writes paged and contiguous records of the same shapes."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "kernels.py")
  spec = importlib.util.spec_from_file_location("bench_kernels_paged", path)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench
  spec.loader.exec_module(bench)
  out = tmp_path / "kernels.jsonl"
  returned = bench.main(["--smoke", "--only", "paged", "--out", str(out)])
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert lines == json.loads(json.dumps(returned)) and lines
  assert {r["impl"] for r in lines} == {"paged", "contiguous"}
  assert {r["config"]["block_k"] for r in lines if r["impl"] == "paged"} == {64, 16}   # gathered, whole pages
  for r in lines:
    assert r["op"] == "paged_attention" and r["max_rel_err"] < 1e-2
    assert r["bytes"] == 2 * r["B"] * r["K"] * r["S"] * r["D"] * 2 and r["tbps"] > 0
    assert (r["page_size"] is None) == (r["impl"] == "contiguous")
