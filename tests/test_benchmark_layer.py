"""The layer benchmark script runs end to end on tiny shapes (so it cannot rot); its byte arithmetic is checked."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import layer


def _abstract_layer(config):
  return nnx.eval_shape(lambda: layer.OneLayer(config, dtype=jnp.float32, rngs=nnx.Rngs(0))).layers[0]


def test_selected_kv_bytes_scale_with_kept_groups():
  cfg = layer.SHAPES["llama2-7b"]
  dense = layer.selected_kv_bytes(cfg, 128, 4088.5, 32, 2)
  assert dense == 2 * 128 * 4088.5 * 32 * 128 * 2                    # K and V, B x len x Hkv x D x bf16
  assert layer.selected_kv_bytes(cfg, 128, 4088.5, 16, 2) == dense / 2   # density 0.5 of 32 groups
  gqa = layer.SHAPES["llama3.1-8b"]
  assert layer.selected_kv_bytes(gqa, 64, 100.0, 5, 2) == 2 * 64 * 100 * 5 * 128 * 2   # 0.625 of 8 groups


def test_layer_weight_bytes_by_hand():
  tiny = layer.SHAPES["tiny"]                        # d 128, 4 q heads / 2 KV groups of 32, F 256, RMS norms
  n = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256 + 2 * 128
  assert layer.layer_weight_bytes(_abstract_layer(tiny)) == 4 * n
  opt = layer.SHAPES["tiny-opt"]                     # d 128, MHA, N 512, biases, LayerNorms
  attn = 4 * (128 * 128 + 128) + 2 * 2 * 128
  assert layer.layer_weight_bytes(_abstract_layer(opt)) == 4 * (attn + 2 * 512 * 128 + 512 + 128)
  assert layer.layer_weight_bytes(_abstract_layer(opt), neuron_k=128) == 4 * (attn + 2 * 128 * 128 + 128 + 128)


def test_router_bytes_and_lengths():
  opt = layer.SHAPES["opt-6.7b"]                     # rank 1024
  assert layer.router_bytes(opt, True, False) == 4 * (4096 * 32 + 32)
  assert layer.router_bytes(opt, False, True) == 4 * (4096 * 1024 + 1024 * 16384 + 16384)
  lengths = layer.initial_lengths(4, 4096, 16, ragged=False)
  assert lengths.tolist() == [4080] * 4
  assert layer.mean_read_length(lengths, 16) == 4080 + 8.5   # steps read 4081 .. 4096 tokens
  ragged = layer.initial_lengths(64, 4096, 16, ragged=True)
  assert ragged.min() >= 2048 and ragged.max() <= 4080 and len(set(ragged.tolist())) > 1


def test_budget_choice_and_insitu_estimate():
  table = {16: (900, 100, 300, 200, 1000), 32: (1000,) * 5}   # N = 1000: k > 800 runs dense
  assert layer.median_budget_layer(table, 16, 1000) == 3         # sparse budgets 100, 200, 300 -> 200
  assert layer.median_budget_layer(table, 32, 1000) == 0         # every layer dense
  assert layer.layer_topk(table, 2) == {16: (300,), 32: (1000,)}
  est = layer.insitu_estimate({"dense": 0.01, "router": 0.05}, heads=31, neurons=28)
  assert est["dense"] == pytest.approx(0.31)
  assert est["router"] == pytest.approx(0.31 + 0.04 * 28)


@pytest.mark.slow
def test_smoke_run_writes_records(tmp_path):
  out = tmp_path / "layer.jsonl"
  assert layer.main(["--smoke", "--out", str(out), "--step-ms", "2.0"]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  layers = [r for r in recs if r["kind"] == "layer"]
  costs = [r for r in recs if r["kind"] == "router_cost"]
  for key in ("device", "jax", "date", "commit", "model", "B", "S", "density", "mlp", "ms", "bytes", "tbps",
              "copy_tbps", "roofline_frac", "speedup_vs_dense", "kv_bytes", "weight_bytes", "groups"):
    assert all(key in r for r in layers), key
  assert all(r["ms"] > 0 and r["tbps"] > 0 and r["copy_tbps"] > 0 for r in layers)
  assert all(r["fused"] is True for r in recs)                # projections fused by default (polar_jax.fusion)
  for model in ("tiny", "tiny-opt"):
    rows = [r for r in layers if r["model"] == model]
    assert {r["density"] for r in rows} == {1.0, 0.5}
    dense = rows[0]
    assert (dense["density"], dense["mlp"], dense["speedup_vs_dense"]) == (1.0, "dense", 1.0)
    half = next(r for r in rows if r["density"] == 0.5 and r["mlp"] == "dense")
    assert half["kv_bytes"] == pytest.approx(dense["kv_bytes"] / 2)           # 1 of 2 (tiny), 2 of 4 (tiny-opt)
    assert half["bytes"] - half["kv_bytes"] == dense["bytes"] - dense["kv_bytes"]
  routed = [r for r in layers if r["mlp"] == "router"]
  assert {r["density"] for r in routed} == {1.0, 0.5} and all(r["mlp_k"] == 128 for r in routed)
  attn = 4 * (128 * 128 + 128) + 2 * 2 * 128
  assert all(r["weight_bytes"] == 4 * (attn + 2 * 128 * 128 + 128 + 128) for r in routed)   # 128 of 512 neurons
  assert {(r["model"], r["method"], r["mlp"]) for r in costs} == {
      ("tiny", "isolated", "dense"), ("tiny", "insitu", "dense"), ("tiny-opt", "isolated", "dense"),
      ("tiny-opt", "insitu", "dense"), ("tiny-opt", "isolated", "router"), ("tiny-opt", "insitu", "router")}
  iso = [r for r in costs if r["method"] == "isolated"]
  assert all(r["router_ms"] > 0 and r["step_ms"] == 2.0 for r in iso)
  assert all(r["router_frac_of_step"] == pytest.approx(r["router_ms"] / 2.0) for r in iso)
  opt_router = next(r for r in iso if r["model"] == "tiny-opt" and r["mlp"] == "router")
  assert (opt_router["head_layers"], opt_router["neuron_layers"]) == (3, 4)   # layer 0: dense attention
  assert all(r["ms_routed"] > 0 and r["ms_fixed"] > 0 for r in costs if r["method"] == "insitu")
  assert np.isfinite([r["router_ms"] for r in costs]).all()
