"""Conversion of HF directories and GGUF files into polar_jax checkpoints (CPU, offline).

Tiny random models are built with transformers from configs (no download); every converted
parameter must equal the Hugging Face tensor (transposed where our layout says so) exactly.
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import conversions  # noqa: E402
from conversions import ConversionError, ConversionWarning, convert  # noqa: E402
from conversions.naming import permute_rows, unpermute_rows  # noqa: E402
from polar_jax import checkpoint  # noqa: E402
from polar_jax.cli.convert import main as cli_main  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)


def _hf_config(family: str):
  T = transformers
  if family == "llama":        # GQA, tied embeddings
    return T.LlamaConfig(**COMMON, num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
  if family == "mistral":      # GQA, sliding window, untied
    return T.MistralConfig(**COMMON, num_key_value_heads=2, intermediate_size=48, sliding_window=16,
                           tie_word_embeddings=False)
  if family == "qwen2":        # q/k/v biases, single KV head, untied
    return T.Qwen2Config(**COMMON, num_key_value_heads=1, intermediate_size=48, tie_word_embeddings=False)
  if family == "opt":          # pre-LN, tied
    return T.OPTConfig(**COMMON, ffn_dim=48, word_embed_proj_dim=32)
  if family == "opt_post":     # OPT-350m style: post-LN, project_in/out
    return T.OPTConfig(**COMMON, ffn_dim=48, do_layer_norm_before=False, word_embed_proj_dim=16)
  raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "opt", "opt_post")


def build_hf(family: str, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(family))
  with torch.no_grad():   # non-trivial norms and biases (they start at 1 / 0)
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


def save_hf(model, path: pathlib.Path, storage: str = "single") -> pathlib.Path:
  if storage == "single":
    model.save_pretrained(path)
  elif storage == "sharded":
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
  elif storage == "bin":   # transformers 5 writes safetensors only: swap in a torch pickle
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
  else:
    raise ValueError(storage)
  return path


def _np(t) -> np.ndarray:
  return t.detach().to(torch.float32).numpy()


def expected_params(model) -> dict[str, np.ndarray]:
  """Our flat parameter names -> the HF module tensors in our layout (float32)."""
  out = {}
  tied = model.config.tie_word_embeddings
  if model.config.model_type == "opt":
    dec = model.model.decoder
    out["embed.embedding"] = _np(dec.embed_tokens.weight)
    out["pos_embed.embedding"] = _np(dec.embed_positions.weight)
    if dec.project_in is not None:
      out["project_in.kernel"] = _np(dec.project_in.weight).T
      out["project_out.kernel"] = _np(dec.project_out.weight).T
    if dec.final_layer_norm is not None:
      out["final_norm.scale"] = _np(dec.final_layer_norm.weight)
      out["final_norm.bias"] = _np(dec.final_layer_norm.bias)
    for i, layer in enumerate(dec.layers):
      p = f"layers.{i}"
      for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")):
        lin = getattr(layer.self_attn, f"{theirs}_proj")
        out[f"{p}.attn.{ours}_proj.kernel"] = _np(lin.weight).T
        out[f"{p}.attn.{ours}_proj.bias"] = _np(lin.bias)
      for ours, norm in (("attn_norm", layer.self_attn_layer_norm), ("mlp_norm", layer.final_layer_norm)):
        out[f"{p}.{ours}.scale"] = _np(norm.weight)
        out[f"{p}.{ours}.bias"] = _np(norm.bias)
      out[f"{p}.mlp.w_in_nd"] = _np(layer.fc1.weight)
      out[f"{p}.mlp.b_in_n"] = _np(layer.fc1.bias)
      out[f"{p}.mlp.w_out_nd"] = _np(layer.fc2.weight).T
      out[f"{p}.mlp.b_out_d"] = _np(layer.fc2.bias)
  else:
    m = model.model
    out["embed.embedding"] = _np(m.embed_tokens.weight)
    out["final_norm.scale"] = _np(m.norm.weight)
    for i, layer in enumerate(m.layers):
      p = f"layers.{i}"
      for n in ("q", "k", "v", "o"):
        lin = getattr(layer.self_attn, f"{n}_proj")
        out[f"{p}.attn.{n}_proj.kernel"] = _np(lin.weight).T
        if lin.bias is not None:
          out[f"{p}.attn.{n}_proj.bias"] = _np(lin.bias)
      for n in ("gate", "up", "down"):
        out[f"{p}.mlp.{n}_proj.kernel"] = _np(getattr(layer.mlp, f"{n}_proj").weight).T
      out[f"{p}.attn_norm.scale"] = _np(layer.input_layernorm.weight)
      out[f"{p}.mlp_norm.scale"] = _np(layer.post_attention_layernorm.weight)
  if not tied:
    out["lm_head.kernel"] = _np(model.lm_head.weight).T
  return out


def loaded_params(path, dtype="float32") -> dict[str, np.ndarray]:
  model = checkpoint.load_model(path, dtype)
  return {k: np.asarray(v) for k, v in checkpoint.model_params(model).items()}


def assert_params_equal(got: dict, want: dict, cast=None):
  assert sorted(got) == sorted(want)
  for k in want:
    w = want[k] if cast is None else want[k].astype(cast)
    assert got[k].dtype == w.dtype, k
    assert got[k].shape == w.shape, k
    np.testing.assert_array_equal(got[k], w, err_msg=k)


def _convert_quiet(src, out, **kw):
  kw.setdefault("progress", False)
  with pytest.warns(ConversionWarning, match="no tokenizer"):
    return convert(src, out, **kw)


# ---- HF: every family x storage format ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("storage", ["single", "sharded", "bin"])
def test_hf_exact(tmp_path, family, storage):
  hf = build_hf(family)
  src = save_hf(hf, tmp_path / "hf", storage)
  res = _convert_quiet(src, tmp_path / "out")
  assert res.dtype == "float32"
  assert res.source_format == {"single": "safetensors", "sharded": "safetensors-sharded",
                               "bin": "pytorch-bin"}[storage]
  want = expected_params(hf)
  assert res.tensor_count == len(want)
  assert_params_equal(loaded_params(tmp_path / "out"), want)
  info = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert info["source_format"] == res.source_format and info["tensor_count"] == len(want)
  assert info["dtype"] == "float32" and info["polar_jax_version"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_logits_match(tmp_path, family):
  """The converted model computes the same logits as transformers (float32)."""
  hf = build_hf(family, seed=1)
  _convert_quiet(save_hf(hf, tmp_path / "hf"), tmp_path / "out")
  model = checkpoint.load_model(tmp_path / "out", "float32")
  ids = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 12))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  from flax import nnx
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))   # one compile instead of op-by-op eager
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_hf_bfloat16_output(tmp_path):
  hf = build_hf("qwen2")
  res = _convert_quiet(save_hf(hf, tmp_path / "hf"), tmp_path / "out", dtype="bfloat16")
  assert res.dtype == "bfloat16"
  want = expected_params(hf)
  # stored as bfloat16 (round-to-nearest-even, as torch/ml_dtypes cast) ...
  assert_params_equal(loaded_params(tmp_path / "out", "bfloat16"), want, cast=ml_dtypes.bfloat16)
  # ... and widened exactly when loaded as float32
  exact = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in want.items()}
  assert_params_equal(loaded_params(tmp_path / "out", "float32"), exact)
  size = sum(f.stat().st_size for f in (tmp_path / "out" / "params").rglob("*") if f.is_file())
  n = sum(v.size for v in want.values())
  assert 2 * n <= size < 3 * n   # 2 bytes a parameter (+ metadata)


@pytest.mark.parametrize("storage", ["single", "bin"])
def test_hf_default_dtype_from_config(tmp_path, storage):
  """A bfloat16 checkpoint converts to bfloat16 by default (config `dtype`), .bin without float32 detour."""
  hf = build_hf("llama").to(torch.bfloat16)
  src = save_hf(hf, tmp_path / "hf", storage)
  assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
  res = _convert_quiet(src, tmp_path / "out")
  assert res.dtype == "bfloat16"
  want = {k: v.astype(ml_dtypes.bfloat16) for k, v in expected_params(hf).items()}
  assert_params_equal(loaded_params(tmp_path / "out", "bfloat16"), want)


def test_hf_float16_and_legacy_keys(tmp_path):
  """transformers 4.x `torch_dtype` key; keys without the `model.` prefix; rotary buffers ignored."""
  from safetensors.numpy import load_file, save_file
  hf = build_hf("mistral")
  src = save_hf(hf, tmp_path / "hf")
  cfg = json.loads((src / "config.json").read_text())
  cfg["torch_dtype"] = cfg.pop("dtype")
  cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
  cfg.pop("rope_parameters")
  (src / "config.json").write_text(json.dumps(cfg))
  tensors = load_file(src / "model.safetensors")
  tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
  tensors["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  save_file(tensors, src / "model.safetensors")
  res = _convert_quiet(src, tmp_path / "out", dtype="float16")
  assert res.dtype == "float16"
  assert_params_equal(loaded_params(tmp_path / "out", "float16"), expected_params(hf), cast=np.float16)


def test_hf_tied_lm_head_present_is_ignored(tmp_path):
  from safetensors.numpy import load_file, save_file
  hf = build_hf("llama")
  src = save_hf(hf, tmp_path / "hf")
  tensors = load_file(src / "model.safetensors")
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  save_file(tensors, src / "model.safetensors")
  _convert_quiet(src, tmp_path / "out")
  assert_params_equal(loaded_params(tmp_path / "out"), expected_params(hf))


def test_hf_sharded_bin_and_unused_opt_final_norm(tmp_path):
  """`pytorch_model.bin.index.json` shards; OPT-350m's unused final_layer_norm and bare `decoder.` keys."""
  hf = build_hf("opt_post")
  src = save_hf(hf, tmp_path / "hf", "bin")
  sd = torch.load(src / "pytorch_model.bin", weights_only=True)
  (src / "pytorch_model.bin").unlink()
  sd = {k.removeprefix("model."): v for k, v in sd.items()}
  sd["decoder.final_layer_norm.weight"] = torch.ones(32)
  sd["decoder.final_layer_norm.bias"] = torch.zeros(32)
  names = sorted(sd)
  shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
  for f, keys in shards.items():
    torch.save({k: sd[k] for k in keys}, src / f)
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
  res = _convert_quiet(src, tmp_path / "out")
  assert res.source_format == "pytorch-bin-sharded"
  assert_params_equal(loaded_params(tmp_path / "out"), expected_params(hf))


def _tiny_tokenizer(path: pathlib.Path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>",
                                             eos_token="</s>")
  tok.save_pretrained(path)
  return tok


def test_hf_tokenizer_copied(tmp_path):
  src = save_hf(build_hf("llama"), tmp_path / "hf")
  ref = _tiny_tokenizer(src)
  res = convert(src, tmp_path / "out", progress=False)
  assert "tokenizer.json" in res.tokenizer_files
  for name in res.tokenizer_files + ("generation_config.json",):
    assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
  tok = checkpoint.load_tokenizer(tmp_path / "out")
  assert tok("hello world foo")["input_ids"] == ref("hello world foo")["input_ids"] == [3, 4, 0]
  (tmp_path / "plain").mkdir()   # OUT gets the permissions a plain mkdir gives, not a temporary directory's 0o700
  assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_tokenizer_metadata(w, vocab_size: int, model: str = "gpt2"):
  """A tiny byte-level BPE vocabulary: <|endoftext|>, 'Ġ', printable ASCII, and the merge 'h e'."""
  tokens = ["<|endoftext|>", "\u0120"] + [chr(c) for c in range(33, 33 + vocab_size - 3)] + ["he"]
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (vocab_size - 1))
  w.add_token_merges(["h e"])
  w.add_add_bos_token(False)


def write_llama_gguf(path: pathlib.Path, hf, *, arch: str = "llama", with_output: bool | None = None,
                     tokenizer: str | None = None):
  """A GGUF of an HF llama model as llama.cpp writes it: F32 tensors, Q/K rows permuted."""
  import gguf
  cfg = hf.config
  sd = {k: _np(v) for k, v in hf.state_dict().items()}
  hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(hq)
  w.add_head_count_kv(hkv)
  w.add_rope_freq_base(12345.0)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_dimension_count(cfg.hidden_size // hq)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if tokenizer:
    _gguf_tokenizer_metadata(w, cfg.vocab_size, tokenizer)
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", sd["model.norm.weight"])
  if with_output if with_output is not None else not cfg.tie_word_embeddings:
    w.add_tensor("output.weight", sd["lm_head.weight"])
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}"
    w.add_tensor(f"blk.{i}.attn_q.weight", permute_rows(sd[f"{p}.self_attn.q_proj.weight"], hq))
    w.add_tensor(f"blk.{i}.attn_k.weight", permute_rows(sd[f"{p}.self_attn.k_proj.weight"], hkv))
    w.add_tensor(f"blk.{i}.attn_v.weight", sd[f"{p}.self_attn.v_proj.weight"])
    w.add_tensor(f"blk.{i}.attn_output.weight", sd[f"{p}.self_attn.o_proj.weight"])
    for g in ("gate", "up", "down"):
      w.add_tensor(f"blk.{i}.ffn_{g}.weight", sd[f"{p}.mlp.{g}_proj.weight"])
    w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"])
    w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_unpermute_inverts_permute():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
  assert not np.array_equal(permute_rows(w, 6), w)
  np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 6), 6), w)
  b = np.arange(48, dtype=np.float32)
  np.testing.assert_array_equal(unpermute_rows(permute_rows(b, 3), 3), b)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_exact(tmp_path, tied):
  hf = build_hf("llama")
  if not tied:
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))
  src = write_llama_gguf(tmp_path / "tiny.gguf", hf)
  with pytest.warns(ConversionWarning, match="no tokenizer metadata"):
    res = convert(src, tmp_path / "out", progress=False)
  assert res.source_format == "gguf" and res.dtype == "float32"
  c = checkpoint.load_config(tmp_path / "out")
  assert (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 2, 4, 2, 8)
  assert c.tie_word_embeddings == tied and c.rope_theta == 12345.0
  assert (c.vocab_size, c.max_position_embeddings, c.bos_token_id, c.eos_token_id) == (96, 64, 1, 2)
  assert c.norm_eps == pytest.approx(1e-5)
  assert_params_equal(loaded_params(tmp_path / "out"), expected_params(hf))


def test_gguf_tokenizer_both_builders(tmp_path, monkeypatch):
  """The torch-free builder and the AutoTokenizer(gguf_file=...) fallback write the same tokenizer."""
  import conversions.tokenizer as tk
  src = write_llama_gguf(tmp_path / "tok.gguf", build_hf("llama"), tokenizer="gpt2")
  res = convert(src, tmp_path / "a", progress=False)
  assert "tokenizer.json" in res.tokenizer_files
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
  tok = checkpoint.load_tokenizer(tmp_path / "a")
  text = "hello there!"
  assert tok(text)["input_ids"] == ref(text)["input_ids"]
  assert tok.decode(tok(text)["input_ids"]) == text

  def no_internals(metadata):
    raise ImportError("moved")
  monkeypatch.setattr(tk, "_build_from_metadata", no_internals)
  convert(src, tmp_path / "b", progress=False)
  a, b = (json.loads((tmp_path / d / "tokenizer.json").read_text()) for d in "ab")
  assert a == b

  bad = write_llama_gguf(tmp_path / "bad.gguf", build_hf("llama"), tokenizer="no-such-model")
  monkeypatch.undo()
  with pytest.warns(ConversionWarning, match="could not build a tokenizer"):
    res = convert(bad, tmp_path / "c", progress=False)
  assert res.tokenizer_files == () and checkpoint.load_config(tmp_path / "c").num_layers == 2


# ---- GGUF qwen2 with K-quants ------------------------------------------------------------------
# K-quant blocks hold 256 values of a row, so every row length (the input width of each linear) is a multiple of 256.
QWEN2_GGUF = dict(hidden=256, heads=4, kv_heads=2, intermediate=512, layers=2)
QWEN2_QUANTS = ("Q4_K", "Q6_K", "Q8_0", "Q5_0")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _qwen2_tokenizer_metadata(w) -> int:
  """A tiny byte-level BPE vocabulary with Qwen2's special tokens and pre-tokenizer and a ChatML template, as
  llama.cpp writes Qwen2's; returns the vocabulary size."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tokens = specials + ["\u0120", "\u010a"] + [chr(c) for c in range(33, 127)] + ["he", "\u0120t"]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("qwen2")
  w.add_token_list(tokens)
  w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
  w.add_token_merges(["h e", "\u0120 t"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(False)
  w.add_chat_template(CHATML)
  return len(tokens)


def _quantized_tensor(rng: np.random.Generator, shape: tuple[int, int], qtype: str) -> np.ndarray:
  """A random `(out, in)` weight stored as `qtype`: the packed uint8 blocks GGUFWriter takes with `raw_dtype`.

  Q8_0 / Q5_0 quantize random floats with `gguf.quants.quantize`. The gguf package dequantizes K-quants but does not
  quantize them, so Q4_K / Q6_K blocks are random bytes with small fp16 scales (every bit pattern of the packed
  quants and sub-block scales is a valid block): weights of about 0.03, as trained ones.
  """
  import gguf
  q = gguf.GGMLQuantizationType[qtype]
  if qtype in ("Q8_0", "Q5_0"):
    return gguf.quants.quantize((rng.standard_normal(shape) * 0.03).astype(np.float32), q)
  block, size = gguf.GGML_QUANT_SIZES[q]
  rows, cols = shape
  blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)

  def f16(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), np.uint8)
  if qtype == "Q4_K":        # d, dmin (fp16), 12 bytes of 6-bit scales / mins, 128 bytes of 4-bit quants
    blocks[..., 0:2], blocks[..., 2:4] = f16(1e-4), f16(7.5e-4)   # dmin ~ d x mean quant: weights centred on 0
  elif qtype == "Q6_K":      # 128 + 64 bytes of 6-bit quants, 16 int8 scales, d (fp16)
    blocks[..., -2:] = f16(2e-5)
  else:  # pragma: no cover - the test's own list
    raise ValueError(qtype)
  return blocks.reshape(rows, -1)


def write_qwen2_gguf(path: pathlib.Path, *, tied: bool = False, seed: int = 0, biases: bool = True,
                     extra: dict[str, tuple[np.ndarray, str]] | None = None) -> pathlib.Path:
  """A random `qwen2` GGUF as llama.cpp lays one out (Q/K rows not permuted, q/k/v biases, `output.weight` unless
  `tied`), its linears and embeddings quantized to a rotation of QWEN2_QUANTS, norms and biases F32. `biases=False`
  leaves the q/k/v biases out (an invalid file); `extra`: further tensors `{name: (packed data, GGML type name)}`."""
  import gguf
  rng = np.random.default_rng(seed)
  d, hq, hkv, f, n_layers = (QWEN2_GGUF[k] for k in ("hidden", "heads", "kv_heads", "intermediate", "layers"))
  head_dim = d // hq
  w = gguf.GGUFWriter(str(path), "qwen2")
  w.add_block_count(n_layers)
  w.add_context_length(128)
  w.add_embedding_length(d)
  w.add_feed_forward_length(f)
  w.add_head_count(hq)
  w.add_head_count_kv(hkv)
  w.add_rope_freq_base(1e6)
  w.add_layer_norm_rms_eps(1e-6)
  vocab = _qwen2_tokenizer_metadata(w)
  quants = iter(QWEN2_QUANTS * 16)

  def linear(name: str, shape: tuple[int, int]):
    qtype = next(quants)
    w.add_tensor(name, _quantized_tensor(rng, shape, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])

  def vector(name: str, n: int, mean: float):
    w.add_tensor(name, (mean + 0.1 * rng.standard_normal(n)).astype(np.float32))

  linear("token_embd.weight", (vocab, d))
  vector("output_norm.weight", d, 1.0)
  if not tied:
    linear("output.weight", (vocab, d))
  for i in range(n_layers):
    b = f"blk.{i}"
    for p, rows in (("q", hq * head_dim), ("k", hkv * head_dim), ("v", hkv * head_dim)):
      linear(f"{b}.attn_{p}.weight", (rows, d))
      if biases:
        vector(f"{b}.attn_{p}.bias", rows, 0.0)
    linear(f"{b}.attn_output.weight", (d, hq * head_dim))
    linear(f"{b}.ffn_gate.weight", (f, d))
    linear(f"{b}.ffn_up.weight", (f, d))
    linear(f"{b}.ffn_down.weight", (d, f))
    vector(f"{b}.attn_norm.weight", d, 1.0)
    vector(f"{b}.ffn_norm.weight", d, 1.0)
  for name, (data, qtype) in (extra or {}).items():
    w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_qwen2_kquants_match_transformers(tmp_path, tied):
  """A qwen2 GGUF with Q4_K / Q6_K / Q8_0 / Q5_0 tensors converts to the weights and logits transformers reads from
  the same file, with its config (biases, tied or untied head, rope theta, rms eps) and its tokenizer."""
  import gguf
  src = write_qwen2_gguf(tmp_path / "qwen2.gguf", tied=tied)
  types = {t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors}
  assert types == {"F32", *QWEN2_QUANTS}
  res = convert(src, tmp_path / "out", progress=False)
  assert res.source_format == "gguf" and "tokenizer.json" in res.tokenizer_files
  c = checkpoint.load_config(tmp_path / "out")
  assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
          c.intermediate_size) == ("qwen2", 2, 256, 4, 2, 64, 512)
  assert c.attn_bias and not c.o_bias and c.tie_word_embeddings == tied
  assert (c.rope_theta, c.vocab_size, c.max_position_embeddings) == (1e6, 101, 128)
  assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, 2, 0)
  assert c.norm_eps == pytest.approx(1e-6)

  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name, dtype=torch.float32)
  assert hf.config.model_type == "qwen2" and hf.config.tie_word_embeddings == tied
  # the same dequantized values in our layout: mapping, row order and transposes are exact
  assert_params_equal(loaded_params(tmp_path / "out"), expected_params(hf.eval()))

  model = checkpoint.load_model(tmp_path / "out", "float32")
  ids = np.random.default_rng(1).integers(0, c.vocab_size, (2, 16))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  from flax import nnx
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
  assert np.abs(want).max() > 0.1                       # logits carry signal, not a degenerate all-zero model
  # float32 sums of 256-512 terms in another order: a few float32 ulps of the logits' scale
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=src.name)
  tok = checkpoint.load_tokenizer(tmp_path / "out")
  for text in ("hello the theater!", "<|im_start|>user\nhe said: t t<|im_end|>"):
    assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.decode(tok(text)["input_ids"]) == text
  assert tok.convert_tokens_to_ids("<|im_end|>") == 2
  msgs = [{"role": "user", "content": "hello"}]
  chat = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert chat == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_qwen2_errors(tmp_path):
  """A tensor type the gguf package cannot dequantize is named before anything is read; a qwen2 file without its
  q/k/v biases is missing tensors."""
  import gguf
  block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
  q8k = np.zeros((4, 256 // block * size), np.uint8)
  src = write_qwen2_gguf(tmp_path / "q8k.gguf", extra={"blk.0.extra.weight": (q8k, "Q8_K")})
  with pytest.raises(ConversionError, match=r"unsupported tensor types.*Q8_K \(1\): blk\.0\.extra\.weight; "
                     r"supported: .*Q4_K.*Q6_K"):
    convert(src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)

  src = write_qwen2_gguf(tmp_path / "nobias.gguf", biases=False)
  with pytest.raises(ConversionError, match=r"missing tensors \(6\): blk\.0\.attn_q\.bias"):
    convert(src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


# ---- real SmolLM2 GGUF -------------------------------------------------------------------------
def _smollm2_gguf():
  from polar_jax import data
  try:
    return data.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.fail(f"the embedded model is missing: {e}")


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir, hf_smollm2):
  """Every converted tensor is bit-identical to transformers' GGUF load (after un-permutation)."""
  hf = hf_smollm2
  info = json.loads((smollm2_dir / "conversion.json").read_text())
  assert info["source_format"] == "gguf" and info["dtype"] == "float32" and info["tensor_count"] == 272
  c = checkpoint.load_config(smollm2_dir)
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (30, 576, 9, 3, 1536)
  assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings, c.bos_token_id, c.eos_token_id) == (
      49152, 100000.0, True, 1, 2)
  got = loaded_params(smollm2_dir)
  want = expected_params(hf)
  # spot checks first, for a readable failure
  for k in ("layers.0.attn.q_proj.kernel", "layers.0.attn.k_proj.kernel", "embed.embedding"):
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert_params_equal(got, want)


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip(smollm2_dir):
  path = _smollm2_gguf()
  ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  tok = checkpoint.load_tokenizer(smollm2_dir)
  assert len(tok) == len(ref) == 49152
  # the generic fast tokenizer is loaded by its own class: the one AutoTokenizer picks for the checkpoint
  assert type(tok) is type(transformers.AutoTokenizer.from_pretrained(str(smollm2_dir)))
  texts = ["The capital of France is", "  Ünïcødé — 東京 🙂\n\ttabs and  spaces",
           "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2  # 12345"]
  for text in texts:
    ids = tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    assert tok.decode(ids) == ref.decode(ids) == text
  msgs = [{"role": "user", "content": "What is the capital of France?"}]
  assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
          == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
  assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)


# ---- errors ------------------------------------------------------------------------------------
@pytest.fixture
def llama_src(tmp_path):
  return save_hf(build_hf("llama"), tmp_path / "hf")


def _edit_safetensors(src: pathlib.Path, fn):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(src / "model.safetensors")
  fn(tensors)
  save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _no_out_left(tmp_path, name="out"):
  assert not (tmp_path / name).exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")], list(tmp_path.iterdir())


def test_error_unknown_architecture(tmp_path, llama_src):
  cfg = json.loads((llama_src / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (llama_src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match=r"'gpt2'.*supported: opt, llama, mistral, qwen2"):
    convert(llama_src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_unknown_gguf_architecture(tmp_path):
  src = write_llama_gguf(tmp_path / "x.gguf", build_hf("llama"), arch="gpt2")
  with pytest.raises(ConversionError, match=r"unknown GGUF architecture 'gpt2'; supported: llama, qwen2"):
    convert(src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_missing_tensor(tmp_path, llama_src):
  _edit_safetensors(llama_src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ConversionError, match=r"missing tensors \(1\): layers\.1\.mlp\.up_proj\.weight"):
    convert(llama_src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_missing_untied_lm_head(tmp_path):
  hf = build_hf("qwen2")
  src = save_hf(hf, tmp_path / "hf")
  _edit_safetensors(src, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ConversionError, match=r"missing tensors \(1\): lm_head\.weight"):
    convert(src, tmp_path / "out", progress=False)


def test_error_unexpected_tensor(tmp_path, llama_src):
  def add(t):
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    t["model.extra.weight"] = np.ones(3, np.float32)
  _edit_safetensors(llama_src, add)
  with pytest.raises(ConversionError, match=r"unexpected tensors \(2\): .*model\.extra\.weight.*q_norm"):
    convert(llama_src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_shape_mismatch(tmp_path, llama_src):
  key = "model.layers.0.self_attn.k_proj.weight"
  _edit_safetensors(llama_src, lambda t: t.__setitem__(key, t[key].reshape(32, 16).copy()))
  with pytest.raises(ConversionError, match=rf"shape mismatch \(1\): {key} \(-> layers\.0\.attn\.k_proj\.kernel\): "
                     r"expected \(16, 32\), found \(32, 16\)"):
    convert(llama_src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_truncated_safetensors(tmp_path, llama_src):
  f = llama_src / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(ConversionError, match=rf"cannot read {f}: "):
    convert(llama_src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_truncated_gguf(tmp_path):
  src = write_llama_gguf(tmp_path / "t.gguf", build_hf("llama"))
  data = src.read_bytes()
  src.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(ConversionError, match=rf"cannot read {src}: "):
    convert(src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)


def test_error_not_a_model(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="no config.json"):
    convert(tmp_path / "empty", tmp_path / "out")
  with pytest.raises(ConversionError, match="does not exist"):
    convert(tmp_path / "nope", tmp_path / "out")
  (tmp_path / "w.txt").write_text("hello")
  with pytest.raises(ConversionError, match="unsupported source"):
    convert(tmp_path / "w.txt", tmp_path / "out")
  (tmp_path / "cfgonly").mkdir()
  (tmp_path / "cfgonly" / "config.json").write_text(_hf_config("llama").to_json_string())
  with pytest.raises(ConversionError, match="no weights found"):
    convert(tmp_path / "cfgonly", tmp_path / "out")
  with pytest.raises(ConversionError, match="unknown dtype 'int8'"):
    convert(tmp_path / "cfgonly", tmp_path / "out", dtype="int8")
  _no_out_left(tmp_path)


def test_error_existing_out_and_force(tmp_path, llama_src):
  out = tmp_path / "out"
  _convert_quiet(llama_src, out)
  with pytest.raises(ConversionError, match="already exists.*force"):
    convert(llama_src, out, progress=False)
  _convert_quiet(llama_src, out, dtype="bfloat16", force=True)
  assert json.loads((out / "conversion.json").read_text())["dtype"] == "bfloat16"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_failure_mid_conversion_leaves_nothing(tmp_path, llama_src, monkeypatch):
  """A read failure after the temp dir exists removes it; a forced replace keeps the old OUT."""
  from conversions.hf import HFSource
  calls = {"n": 0}
  real_read = HFSource.read

  def flaky_read(self, name):
    calls["n"] += 1
    if calls["n"] == 5:
      raise ConversionError("simulated read failure")
    return real_read(self, name)

  monkeypatch.setattr(HFSource, "read", flaky_read)
  with pytest.raises(ConversionError, match="simulated"):
    convert(llama_src, tmp_path / "out", progress=False)
  _no_out_left(tmp_path)

  monkeypatch.setattr(HFSource, "read", real_read)
  _convert_quiet(llama_src, tmp_path / "out")
  before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
  calls["n"] = 0
  monkeypatch.setattr(HFSource, "read", flaky_read)
  with pytest.raises(ConversionError, match="simulated"):
    convert(llama_src, tmp_path / "out", progress=False, force=True)
  assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
  checkpoint.load_model(tmp_path / "out")


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli(tmp_path, llama_src, capsys):
  out = tmp_path / "out"
  assert cli_main([str(llama_src), str(out), "--dtype", "bfloat16", "--no-progress"]) == 0
  captured = capsys.readouterr()
  assert "llama: 2 layers" in captured.out and "bfloat16" in captured.out
  assert "polar-convert: warning:" in captured.err and "no tokenizer" in captured.err
  assert cli_main([str(llama_src), str(out), "--no-progress"]) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith("polar-convert: error: output") and "Traceback" not in captured.err
  assert cli_main([str(llama_src), str(out), "--force", "--no-progress"]) == 0
  assert json.loads((out / "conversion.json").read_text())["dtype"] == "float32"
  with pytest.raises(SystemExit) as e:
    cli_main([str(llama_src), str(out), "--dtype", "int4"])
  assert e.value.code == 2


def test_public_names():
  assert conversions.SUPPORTED_GGUF_ARCHITECTURES == ("llama", "qwen2")
  assert set(conversions.DTYPES) == {"float32", "bfloat16", "float16"}
  assert issubclass(ConversionError, ValueError)
  assert os.fspath(pathlib.Path(conversions.__file__).parent.name) == "conversions"
