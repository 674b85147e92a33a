"""What a new user meets first: relative paths, where tools write, `polar-generate`'s output and timing, the shipped
routers by name, chat stop tokens, Ctrl-C, the transformers notice, the public names and the demo's explanations.

Command-line checks run the tools as a user does: in a subprocess, from a fresh directory, with relative paths.
The models are tiny and hand-built, so their output is known:

* `tiny_ckpt` (`ckpt/m` under the test's directory): attention and MLP outputs are zero, so each position's hidden
  state is its token's embedding, and the embeddings and the LM head are set so that after the chat prompt (which
  ends with a newline) the model writes "hi", then `<|im_end|>`, then "x" for ever. Its tokenizer is byte-level
  with a ChatML template whose end-of-turn token `<|im_end|>` is not the tokenizer's end-of-sequence token, so only
  the chat template tells that it ends a reply.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import polar_jax
from polar_jax import checkpoint
from polar_jax.config import ModelConfig
from polar_jax.model import param_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY = ModelConfig(model_type="llama", vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=6, num_kv_heads=3, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                   eos_token_id=0)


def _env() -> dict[str, str]:
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def run_tool(module: str, *args: str, cwd: pathlib.Path, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m polar_jax.cli.<module> ARGS` in `cwd`, as a user would type `polar-<module> ARGS` there."""
  return subprocess.run([sys.executable, "-m", f"polar_jax.cli.{module}", *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def write_tokenizer(path: pathlib.Path):
  """A byte-level BPE tokenizer (ids 0-2 the ChatML specials, then the 256 bytes) with a ChatML template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(list(SPECIALS) + sorted(byte_chars))}
  tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                unk_token="<|endoftext|>", additional_special_tokens=["<|im_end|>"])
  tok.chat_template = CHATML
  tok.save_pretrained(path)
  return tok


def write_tiny_checkpoint(path: pathlib.Path) -> dict[str, int]:
  """`TINY` with the chain newline -> "h" -> "i" -> <|im_end|> -> "x" -> "x" ... (see the module docstring) and
  its tokenizer, saved with `polar_jax.checkpoint`; returns the token ids of the chain."""
  path.mkdir(parents=True)
  tok = write_tokenizer(path)
  ids = {name: tok.convert_tokens_to_ids(t) for name, t in
         [("newline", "\u010a"), ("h", "h"), ("i", "i"), ("im_end", "<|im_end|>"), ("x", "x")]}
  rng = np.random.default_rng(0)
  params = {}
  for name, shape in param_shapes(TINY).items():
    if name.endswith("scale"):
      params[name] = np.ones(shape, np.float32)
    elif name.endswith(("o_proj.kernel", "down_proj.kernel")):   # attention and MLP add nothing to the residual
      params[name] = np.zeros(shape, np.float32)
    else:
      params[name] = rng.standard_normal(shape).astype(np.float32)
  embed = np.zeros((TINY.vocab_size, TINY.hidden_size), np.float32)
  embed[:, 0] = 1.0                                     # every other token: dimension 0
  head = np.zeros((TINY.hidden_size, TINY.vocab_size), np.float32)
  for dim, (token, successor) in enumerate(
      [("x", "x"), ("newline", "h"), ("h", "i"), ("i", "im_end"), ("im_end", "x")]):
    embed[ids[token]] = 0.0
    embed[ids[token], dim] = 1.0
    head[dim, ids[successor]] = 10.0
  params["embed.embedding"], params["lm_head.kernel"] = embed, head
  checkpoint.save_params(path / checkpoint.PARAMS_DIR, params)
  checkpoint.save_config(path, TINY)
  return ids


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
  """A directory holding `ckpt/m` (the tiny chat checkpoint); copy nothing into it, tests write elsewhere."""
  base = tmp_path_factory.mktemp("first_hour")
  write_tiny_checkpoint(base / "ckpt" / "m")
  return base


def random_routers(config: ModelConfig, seed: int = 0) -> "polar_jax.Routers":
  r = polar_jax.Routers.init(config, seed=seed)
  r.head.w_ldg[...] = (3.0 * np.random.default_rng(seed).standard_normal(r.head.w_ldg.shape)).astype(np.float32)
  return r


# ---- 1. relative checkpoint and router paths -----------------------------------------------------------------
def test_python_api_reads_and_writes_relative_paths(tiny_dir, tmp_path, monkeypatch):
  from polar_jax.routers import save_routers
  monkeypatch.chdir(tiny_dir)
  model = polar_jax.load_model("ckpt/m")
  assert model.config == TINY
  tok = polar_jax.load_tokenizer("ckpt/m")
  assert tok.decode(tok.encode("hi")) == "hi"
  monkeypatch.chdir(tmp_path)
  checkpoint.save_model("saved/m", model)
  again = polar_jax.load_model("saved/m")
  for name, value in checkpoint.model_params(model).items():
    np.testing.assert_array_equal(np.asarray(checkpoint.model_params(again)[name]), np.asarray(value), err_msg=name)
  routers = random_routers(TINY)
  save_routers(routers, "routers/r")
  loaded = polar_jax.load_routers("routers/r", model)
  np.testing.assert_array_equal(np.asarray(loaded.head.w_ldg[...]), np.asarray(routers.head.w_ldg[...]))


@pytest.mark.slow
def test_eval_and_train_routers_take_relative_paths(tiny_dir, tmp_path):
  """The tools that load a checkpoint, given `ckpt/m` from the directory holding it (polar-generate: below). Both
  stop with a usage error that comes only after the model and the tokenizer loaded."""
  r = run_tool("eval", "ckpt/m", "--out", str(tmp_path / "res"), "--tasks", "sciq", "--selector", "random",
               "--densities", "1,0.5", "--shards", "2", "--compile-cache", "none", "--no-progress", cwd=tiny_dir)
  assert r.returncode == 2 and "divide by 2" in r.stderr and "Traceback" not in r.stderr, r.stderr
  r = run_tool("train_routers", "ckpt/m", "--out", str(tmp_path / "routers"), "--data", "no-such-source",
               "--no-progress", cwd=tiny_dir)
  assert r.returncode == 2 and "no-such-source" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- 2. polar-eval writes where it is told; the critical density says when n is too small --------------------
def test_eval_needs_out_and_writes_nothing_by_default(tiny_dir, tmp_path):
  r = run_tool("eval", str(tiny_dir / "ckpt" / "m"), "--tasks", "sciq", "--limit", "2", cwd=tmp_path)
  assert r.returncode == 2 and "--out" in r.stderr, r.stderr
  assert list(tmp_path.iterdir()) == []


def _mc_records(out: pathlib.Path, n: int, dense_correct: np.ndarray, sparse_correct: np.ndarray):
  from polar_jax.evaluation import report
  recs, details = [], []
  for selector, density, correct in (("dense", 1.0, dense_correct), ("router", 0.67, sparse_correct)):
    acc = float(correct.mean())
    recs.append({"model": "m", "mode": "engine", "task": "sciq", "selector": selector, "density": density,
                 "value": acc, "stderr": float(np.sqrt(acc * (1 - acc) / n)), "n": n, "metric": "acc"})
    details.append({"correct": correct.astype(int).tolist()})
  report.append_records(out, recs, details)


def test_critical_density_says_when_n_is_too_small(tmp_path):
  from polar_jax.evaluation import report
  rng = np.random.default_rng(0)
  few = rng.random(10) < 0.7
  _mc_records(tmp_path / "few", 10, few, few.copy())   # 10 SciQ questions, identical answers
  crit, = report.critical_records(tmp_path / "few", "m", "engine", ["router"])
  assert crit["critical_density"] == 0.67 and crit["decided"] is False
  text = report.describe_critical(crit)
  assert text.startswith("0.67") and "NOT DECIDED" in text and "sciq n=10" in text and "--limit" in text
  assert "NOT DECIDED" in report.markdown(tmp_path / "few")

  dense = rng.random(2000) < 0.7
  sparse = dense.copy()
  sparse[np.flatnonzero(dense)[:20]] = False          # 1 point lower, paired: exactly on the line
  _mc_records(tmp_path / "close", 2000, dense, sparse)
  crit, = report.critical_records(tmp_path / "close", "m", "engine", ["router"])
  assert crit["decided"] is False and "within 2 standard errors" in crit["undecided"]

  sparse = dense.copy()
  sparse[np.flatnonzero(dense)[:2]] = False           # 0.1 point lower on 2000 questions: clearly within 1 point
  _mc_records(tmp_path / "many", 2000, dense, sparse)
  crit, = report.critical_records(tmp_path / "many", "m", "engine", ["router"])
  assert crit["critical_density"] == 0.67 and crit["decided"] is True
  assert report.describe_critical(crit) == "0.67"


# ---- 3. polar-generate: one generation, completions only, honest timing on request ----------------------------
@pytest.mark.slow
def test_generate_prints_completions_and_stops_at_the_chat_end_token(tiny_dir):
  long_prompt = "Tell me a story about " + "a long road and " * 6 + "the end."
  r = run_tool("generate", "ckpt/m", "--chat", "--prompt", long_prompt, "--prompt", "hi", "--max-new-tokens", "8",
               cwd=tiny_dir)   # a relative checkpoint path
  assert r.returncode == 0, r.stderr
  assert "Traceback" not in r.stderr and "Failed to get item metadata" not in r.stderr
  blocks = r.stdout.split("--- [")
  assert len(blocks) == 3 and blocks[0] == ""
  for block in blocks[1:]:
    header, completion = block.rstrip("\n").split("\n", 1)
    assert completion == "hi", r.stdout              # <|im_end|> ended it: not printed, no "x" after it
  assert long_prompt not in r.stdout and "Tell me a story about" in r.stdout   # a prefix, not the whole prompt
  assert "tok/s" not in r.stdout and "ms" not in r.stdout                     # no timing unless asked
  assert "PyTorch was not found" not in r.stderr
  r = run_tool("generate", "ckpt/m", "--chat", "--prompt", "hi", "--max-new-tokens", "5", "--no-stop", "--timing",
               cwd=tiny_dir)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split("--- [0] 'hi'\n")[1].startswith("hixx\n"), r.stdout      # h i <|im_end|> x x
  m = re.search(r"generated (\d+) tokens \(batch 1\) in ([\d.]+) s wall, ([\d.]+) s of it tracing and compiling",
                r.stdout)
  assert m, r.stdout
  assert int(m.group(1)) == 5 and float(m.group(3)) <= float(m.group(2))
  rate = re.search(r"; ([\d.]+) tok/s over the other ([\d.]+) s", r.stdout)
  if rate:   # only when some time was left outside compiling: then tokens / that time, nothing clamped
    assert float(rate.group(2)) > 0
    assert float(rate.group(1)) == pytest.approx(5 / float(rate.group(2)), rel=0.05, abs=0.1)


def test_generate_runs_the_generation_once(tiny_dir, monkeypatch, capsys):
  from polar_jax.cli import generate as cli
  from polar_jax import generation
  calls = []
  real = generation.generate
  monkeypatch.setattr(polar_jax, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.chdir(tiny_dir)
  assert cli.main(["ckpt/m", "--chat", "--prompt", "hi", "--max-new-tokens", "4", "--timing"]) == 0
  assert len(calls) == 1
  out = capsys.readouterr().out
  assert "generated 3 tokens (batch 1)" in out, out    # h, i, <|im_end|>: the tokens actually generated


def test_stop_tokens_include_the_chat_end_token(tiny_dir):
  from polar_jax.cli.generate import completion_text, stop_tokens
  tok = polar_jax.load_tokenizer(tiny_dir / "ckpt" / "m")
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert tok.eos_token_id != im_end
  stop = stop_tokens(tok, TINY)
  assert im_end in stop and tok.eos_token_id in stop and 0 in stop
  h, i = tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("i")
  assert completion_text(tok, [h, i, im_end], stop) == "hi"


# ---- 4. the shipped routers by name, from Python as on the command line -------------------------------------
@pytest.mark.slow
def test_load_routers_default(smollm2_dir, tmp_path, monkeypatch):
  from polar_jax.routers import RouterMismatchError, default_routers_dir, read_metadata, routers_dir
  config = checkpoint.load_config(smollm2_dir)
  by_name = polar_jax.load_routers("default", config)
  by_none = polar_jax.load_routers(None, config)
  np.testing.assert_array_equal(np.asarray(by_name.head.w_ldg[...]), np.asarray(by_none.head.w_ldg[...]))
  assert routers_dir("default") == default_routers_dir() and read_metadata("default")["train_groups"] == 2
  from polar_jax.cli import eval as eval_cli                 # polar-eval --routers default
  for arg in ("default", None):
    routers, label = eval_cli.resolve_routers(arg, config, ["router"])
    assert routers.fingerprint == by_name.fingerprint and label.startswith("smollm2-135m@"), label
  monkeypatch.chdir(tmp_path)                       # a folder called "default" is "./default" or a Path
  assert routers_dir("./default") == routers_dir(pathlib.Path("default")) == tmp_path / "default"
  with pytest.raises(RouterMismatchError, match="trained for another model"):
    polar_jax.load_routers("default", TINY)


# ---- 5. Ctrl-C: one line, exit 130, nothing left behind ------------------------------------------------------
def write_hf_llama(path: pathlib.Path, vocab_size: int = 150_000) -> None:
  """An HF llama directory (config.json + model.safetensors, ~40 MB) big enough that converting takes a moment."""
  from safetensors.numpy import save_file
  path.mkdir(parents=True)
  h, inter, heads, kv, layers = 64, 128, 4, 2, 2
  (path / "config.json").write_text(json.dumps(dict(
      model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=h,
      intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")))
  rng = np.random.default_rng(0)
  hd = h // heads
  t = {"model.embed_tokens.weight": rng.standard_normal((vocab_size, h), np.float32),
       "model.norm.weight": np.ones(h, np.float32)}
  for i in range(layers):
    p = f"model.layers.{i}"
    for name, shape in [("self_attn.q_proj", (heads * hd, h)), ("self_attn.k_proj", (kv * hd, h)),
                        ("self_attn.v_proj", (kv * hd, h)), ("self_attn.o_proj", (h, heads * hd)),
                        ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)), ("mlp.down_proj", (h, inter))]:
      t[f"{p}.{name}.weight"] = rng.standard_normal(shape, np.float32)
    t[f"{p}.input_layernorm.weight"] = t[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float32)
  save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("phase, pattern", [("reading", ".out.tmp-*"), ("saving", ".out.tmp-*/params*"),
                                            ("saving later", ".out.tmp-*/params*")])
def test_ctrl_c_during_convert_is_clean(tmp_path, phase, pattern):
  write_hf_llama(tmp_path / "hf")
  p = subprocess.Popen([sys.executable, "-m", "polar_jax.cli.convert", "hf", "out", "--no-progress"], cwd=tmp_path,
                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not glob.glob(str(tmp_path / pattern)) and p.poll() is None and time.monotonic() < deadline:
    time.sleep(0.002)
  assert p.poll() is None, f"the conversion ended before it could be interrupted: {p.communicate()}"
  if phase == "saving later":
    time.sleep(0.05)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=120)
  time.sleep(1.0)   # a write still under way would show up now
  assert p.returncode == 130, (p.returncode, err)
  assert err == "polar-convert: interrupted\n", err
  assert sorted(x.name for x in tmp_path.iterdir()) == ["hf"]   # neither OUT nor a hidden .out.tmp-* directory


@pytest.mark.parametrize("module", ["generate", "eval", "train_routers", "serve"])
def test_ctrl_c_in_every_cli(module, tiny_dir, tmp_path, monkeypatch, capsys):
  import importlib
  if module == "serve":
    pytest.importorskip("uvicorn")   # polar-serve's extra; without it the tool exits before loading anything
  cli = importlib.import_module(f"polar_jax.cli.{module}")

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(polar_jax, "load_model", interrupted)
  argv = {"generate": ["ckpt/m", "--prompt", "hi"],
          "eval": ["ckpt/m", "--out", str(tmp_path / "res"), "--tasks", "sciq", "--selector", "random"],
          "train_routers": ["ckpt/m", "--out", str(tmp_path / "routers")], "serve": ["ckpt/m"]}[module]
  monkeypatch.chdir(tiny_dir)
  try:
    status = cli.main(argv)
  except KeyboardInterrupt:
    pytest.fail(f"polar_jax.cli.{module}.main let KeyboardInterrupt through (a traceback for the user)")
  assert status == 130
  prog = {"train_routers": "polar-train-routers"}.get(module, f"polar-{module}")
  assert capsys.readouterr().err == f"{prog}: interrupted\n"


def test_every_cli_main_is_interruptible():
  """A tool added later gets the same Ctrl-C handling: each `polar_jax.cli` module's `main` is wrapped."""
  import importlib
  import pkgutil

  import polar_jax.cli
  mains = {}
  for info in pkgutil.iter_modules(polar_jax.cli.__path__):
    module = importlib.import_module(f"polar_jax.cli.{info.name}")
    if hasattr(module, "main"):
      mains[info.name] = module.main
  assert {"convert", "generate", "eval", "train_routers"} <= set(mains)
  for name, main in mains.items():
    assert getattr(main, "__wrapped__", None) is not None, f"polar_jax.cli.{name}.main is not @interruptible"


# ---- 6. the transformers notice, public names, the demo ------------------------------------------------------
def test_no_pytorch_notice_when_loading_a_tokenizer(tiny_dir):
  """Without torch (hidden from transformers' check here), loading our tokenizer prints nothing about it."""
  script = ("import importlib.util as u\n"
            "real = u.find_spec\n"
            "u.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'torch' else real(name, *a, **k)\n"
            "import polar_jax\n"
            "tok = polar_jax.load_tokenizer('ckpt/m')\n"
            "import transformers\n"
            "assert not transformers.utils.is_torch_available()\n"
            "print(tok.decode(tok.encode('ok')))\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=tiny_dir, env=_env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
  assert "PyTorch" not in r.stderr, r.stderr


def test_public_names():
  from polar_jax import attention, kv_cache, mlp, model, options, routers
  expected = {"DecoderLayer": model.DecoderLayer, "Attention": attention.Attention, "HeadRouters": routers.HeadRouters,
              "DecodeOptions": options.DecodeOptions, "KVCache": kv_cache.KVCache, "GatedMLP": mlp.GatedMLP,
              "NeuronMLP": mlp.NeuronMLP, "CausalLM": model.CausalLM}
  for name, obj in expected.items():
    assert name in polar_jax.__all__ and getattr(polar_jax, name) is obj, name
  for cls in (model.CausalLM, model.DecoderLayer, attention.Attention, mlp.GatedMLP, mlp.NeuronMLP):
    assert "config:" in cls.__doc__ and "rngs:" in cls.__doc__, cls.__name__   # what the constructor takes
  assert all(f"{arg}:" in kv_cache.KVCache.init.__doc__ for arg in ("config", "batch", "max_len", "dtype"))


def test_demo_explains_its_density_and_shows_both_texts(tiny_dir, monkeypatch, capsys):
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    import demo
  finally:
    sys.path.remove(str(ROOT / "examples"))
  from polar_jax import paths
  monkeypatch.setattr(paths, "default_model_dir", lambda: tiny_dir / "ckpt" / "m")
  monkeypatch.setattr(polar_jax, "load_routers", lambda name, model: random_routers(model.config))
  assert demo.main(["--max-new-tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert "keep 2 of 3 KV groups per row (density 0.67)" in out and "layer 0 stays dense" in out
  assert "not the point" in out and "large batches on a GPU" in out
  assert "tok/s" not in out
  for prompt in demo.PROMPTS:
    block = out.split(f">>> {prompt}\n")[1]
    assert re.match(r"\[ *dense\] hi\n\[sparse 2/3\] hi\n", block), block
  cost = demo.measured_cost(2, 3)
  assert cost is not None and "accuracy" in cost and "perplexity" in cost


def test_an_interrupt_python_dropped_still_ends_the_tool(tmp_path, capsys):
  """Python drops a KeyboardInterrupt raised inside a finalizer or gc callback ("Exception ignored in ..."): the
  tools remember SIGINT themselves, so the tool still ends with status 130, and a conversion asked to stop just
  before its rename leaves nothing behind."""
  import os
  from conversions import convert
  from polar_jax.cli import interruptible

  @interruptible("polar-test")
  def main():
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)   # (the handler runs here)
    except KeyboardInterrupt:
      pass             # what a finalizer's "Exception ignored" amounts to
    return 0

  assert main() == 130
  assert capsys.readouterr().err == "polar-test: interrupted\n"
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler put back
  write_hf_llama(tmp_path / "hf", vocab_size=1000)
  with pytest.raises(KeyboardInterrupt):
    convert(tmp_path / "hf", tmp_path / "out", progress=False, cancelled=lambda: True)
  assert sorted(x.name for x in tmp_path.iterdir()) == ["hf"]
