"""The end-to-end benchmark script runs on a tiny model (so it cannot rot); its arithmetic is checked."""

import json

import jax.numpy as jnp
import pytest

from benchmarks import e2e


def test_decode_rate_and_roofline_arithmetic():
  tok_s, ms = e2e.decode_rate(batch=32, n1=8, n2=72, t1=1.0, t2=2.28)
  assert ms == pytest.approx(20.0)                 # 1.28 s / 64 steps
  assert tok_s == pytest.approx(1600.0)            # 32 rows / 20 ms
  assert e2e.roofline_fraction(3.0e10, 20.0, 3.0) == pytest.approx(0.5)   # 30 GB in 20 ms at 3 TB/s
  with pytest.raises(ValueError):
    e2e.decode_rate(batch=1, n1=8, n2=8, t1=1.0, t2=2.0)


def test_time_fn_statistics():
  from benchmarks import common
  import time
  delays = iter([0.0, 0.0, 0.03, 0.0, 0.01])      # warm-up, then 0.0 / 0.03 / 0.0 / 0.01 s of extra time
  fn = lambda: time.sleep(next(delays))  # noqa: E731
  assert common.time_fn(fn, warmup=1, iters=4, stat="min") < 0.005
  with pytest.raises(ValueError, match="stat"):
    common.time_fn(lambda: None, warmup=0, iters=1, stat="mean")


def test_kv_bytes_follow_density_and_window():
  cfg = e2e.MODELS["llama2-7b"]
  full = e2e.kv_bytes_per_step(cfg, 16, 2036.0, 2)
  assert full == pytest.approx(2 * 16 * 2036 * 32 * 128 * 2 * 32)
  half = e2e.kv_bytes_per_step(cfg, 16, 2036.0, 2, lambda layer: 1.0 if layer == 0 else 0.5)
  assert half == pytest.approx(full * (1 + 31 * 0.5) / 32)
  mistral = e2e.MODELS["mistral-7b"]
  assert e2e.kv_bytes_per_step(mistral, 1, 8192.0, 2) == pytest.approx(
      e2e.kv_bytes_per_step(mistral, 1, 4096.0, 2))


def test_weight_bytes_exclude_the_untied_input_embedding():
  cfg = e2e.MODELS["tiny"]
  model = e2e.init_model(cfg)
  d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
  n = cfg.num_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d + d * cfg.vocab_size
  assert e2e.weight_bytes_per_step(cfg, model) == n * 4


@pytest.mark.slow
def test_smoke_run_writes_records(tmp_path):
  out = tmp_path / "e2e.jsonl"
  assert e2e.main(["--smoke", "--out", str(out), "--plot", str(tmp_path / "e2e.png")]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["density"], r["system"]) for r in recs] == [(1.0, "polar_jax"), (0.5, "polar_jax")]
  assert recs[1]["step_bytes"] < recs[0]["step_bytes"]       # half the KV groups in layers 1..3
  r = recs[0]
  for key in ("device", "jax", "date", "commit", "system", "model", "B", "prompt", "density", "mlp",
              "decode_tok_s", "ms_per_step", "prefill_ms", "peak_mem_gb", "roofline_frac", "copy_tbps"):
    assert key in r
  assert r["fused"] is True and r["timing"] == "decode_loop_min" and r["n2"] > r["n1"]
  assert r["system"] == "polar_jax" and r["decode_tok_s"] > 0 and r["copy_tbps"] > 0
  assert (tmp_path / "e2e.png").stat().st_size > 1000


@pytest.mark.slow
def test_smoke_generate_timing(tmp_path):
  """`--timing generate` (two generate calls, prefill included) still runs and says so."""
  out = tmp_path / "e2e.jsonl"
  assert e2e.main(["--smoke", "--timing", "generate", "--densities", "0.5", "--out", str(out)]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert recs and all(r["timing"] == "min" and r["decode_tok_s"] > 0 and r["prefill_ms"] >= 0 for r in recs)


@pytest.mark.slow
def test_decode_loop_matches_generate_tokens():
  """The timed decode loop (`e2e.DecodeLoop`) runs `generate`'s prefill and step: the same greedy tokens for the
  same prompts (dense and sparse), step by step, as one n-step call and from a rewound cache (the timing reuses
  one prefill); its HLO text is the loop's."""
  import numpy as np
  from polar_jax import generation
  cfg = e2e.MODELS["tiny"]
  model = e2e.prepared_model(cfg, np.float32)
  routers = e2e.random_routers(cfg)
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
  for density in (1.0, 0.5):
    sparsity = e2e.sparsity_for(e2e.Setting("tiny", 2, 24, density))
    kw = {} if sparsity is None else dict(sparsity=sparsity, routers=routers)
    want = generation.generate(model, ids, max_new_tokens=6, **kw).tokens
    loop = e2e.DecodeLoop(model, ids, sparsity, routers, max_new_tokens=6)
    tok, cache = loop.prefill()
    got = [np.asarray(tok)]
    for _ in range(5):
      tok, cache = loop.decode(tok, cache, 1)
      got.append(np.asarray(tok))
    np.testing.assert_array_equal(np.stack(got, 1)[:2], want)
    tok, cache = loop.prefill()
    assert "while" in loop.compiled_text(tok, cache)
    lengths_b = np.asarray(cache.lengths_b)
    last, cache = loop.decode(tok, cache, 5)                   # five steps in one call: the same last token
    np.testing.assert_array_equal(np.asarray(last), want[:, -1])
    assert (np.asarray(cache.lengths_b) == lengths_b + 5).all()
    for n in (5, 3):                                           # the timing's reuse: rewound, the same tokens
      cache = loop.rewind(cache, lengths_b)
      last, cache = loop.decode(tok, cache, n)
      np.testing.assert_array_equal(np.asarray(last), want[:, n])


@pytest.mark.slow
def test_profile_step_arithmetic_and_smoke(tmp_path):
  from benchmarks import profile_step
  assert profile_step.kernel_group("fusion.123") == "fusion"
  assert profile_step.kernel_group("loop_add_fusion_2.1") == "loop_add_fusion"
  steps = profile_step.per_step({"a": 2e6, "b": 5e6}, {"a": 10e6, "b": 5e6, "c": 4e6}, n1=2, n2=6)
  assert steps == {"a": 2.0, "c": 1.0}            # (10-2)/4 ms, b unchanged -> dropped, c new
  out = tmp_path / "p.jsonl"
  assert profile_step.main(["--smoke", "--densities", "1", "--out", str(out)]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert recs and all(r["kind"] == "step_profile" and r["ms_per_step"] > 0 for r in recs)
  assert all(r["timing"] == "decode_loop" and r["launches_per_step"] > 0 for r in recs)
  assert all(r["loop_graph"] is False for r in recs)    # profiled without the loop's command buffer
  # kernels kept apart by name, the loop's HLO written; and the older two-generate method still runs
  out2, hlo = tmp_path / "p2.jsonl", tmp_path / "hlo"
  assert profile_step.main(["--smoke", "--densities", "0.5", "--instances", "--hlo", str(hlo), "--out", str(out2)]) == 0
  inst = [json.loads(line) for line in out2.read_text().splitlines()]
  assert inst and all(r["instances"] for r in inst)
  assert "while" in (hlo / "tiny_B2_p16_d0.5_dense.hlo.txt").read_text()
  out3 = tmp_path / "p3.jsonl"
  assert profile_step.main(["--smoke", "--densities", "1", "--timing", "generate", "--out", str(out3)]) == 0
  assert all(json.loads(line)["timing"] == "generate" for line in out3.read_text().splitlines())


@pytest.mark.slow
def test_sparse_step_bytes_count_read_neurons_and_router_copies():
  """mlp=router: the step reads k of N fc1/fc2 rows (and fc1 biases) per routed layer, plus the routers' decode
  copies (head: the zero-padded side copy; neuron: weights in the router dtype, scales, float32 bias)."""
  import numpy as np
  from polar_jax import generation
  from polar_jax.config import ModelConfig
  from polar_jax.routers.modules import default_neuron_rank
  from polar_jax.sparsity import SparsityConfig
  cfg = ModelConfig(model_type="opt", vocab_size=64, hidden_size=32, intermediate_size=256, num_layers=3,
                    num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=64, norm="layer",
                    mlp="relu_mlp", activation="relu", attn_bias=True, o_bias=True, mlp_bias=True,
                    positions="learned", tie_word_embeddings=True)
  model = e2e.prepared_model(cfg, np.float32)
  routers = e2e.random_routers(cfg, mlp_topk={2: (64, 128, 250)})
  d, n, r = cfg.hidden_size, cfg.intermediate_size, default_neuron_rank(cfg.hidden_size)
  row = (2 * d + 1) * 4                                       # fc1 row, fc2 row, fc1 bias (float32)
  head = 2 * (d * 16 + 16) * 4                                # layers 1, 2: 4 groups padded to 16 columns
  for dtype, itemsize, scales in (("float32", 4, 0), ("int8", 1, (r + n) * 4)):
    sp = SparsityConfig(0.5, mlp="router", router_dtype=dtype)   # layer 2 (250 > 0.8 * 256) dense
    step, state = generation.make_decoder(model, sp, routers, batch=2)
    assert step.neuron_k == (64, 128, None)
    neuron = 2 * ((d * r + r * n) * itemsize + scales + n * 4)
    want = -row * ((n - 64) + (n - 128)) + head + neuron
    assert e2e.sparse_weight_bytes(cfg, model, step, state) == want
  dense_step, dense_state = generation.make_decoder(model, None, None, batch=2)
  assert e2e.sparse_weight_bytes(cfg, model, dense_step, dense_state) == 0


def test_kv_itemsize_counts_the_scales():
  cfg = e2e.MODELS["llama2-7b"]
  assert e2e.kv_itemsize(cfg, jnp.bfloat16, None) == 2 and e2e.kv_itemsize(cfg, jnp.bfloat16, "bfloat16") == 2
  assert e2e.kv_itemsize(cfg, jnp.bfloat16, "int8") == 1 + 4 / 128
  assert e2e.kv_itemsize(cfg, jnp.bfloat16, "float8_e4m3fn") == 1 + 4 / 128


@pytest.mark.slow
def test_smoke_kv_dtypes_one_record_each(tmp_path):
  """`--kv-dtype model int8`: one record per storage (and density: the smoke run adds 0.5), the 8-bit ones reading
  fewer KV bytes per step."""
  out = tmp_path / "e2e.jsonl"
  assert e2e.main(["--smoke", "--densities", "1", "--kv-dtype", "model", "int8", "--iters", "1", "--out",
                   str(out)]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["kv_dtype"], r["density"]) for r in recs] == [("float32", 1.0), ("float32", 0.5), ("int8", 1.0),
                                                            ("int8", 0.5)]
  assert recs[2]["step_bytes"] < recs[0]["step_bytes"] and recs[3]["step_bytes"] < recs[1]["step_bytes"]
  assert all(r["decode_tok_s"] > 0 for r in recs)
