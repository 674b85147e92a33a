"""Parity with Hugging Face transformers for every supported family (tiny random models, float32).

Each model is built by transformers from a config, saved, converted with our converter, loaded
with `polar_jax.load_model`, and compared: logits on a 600-token prompt (long enough for RoPE
scaling and sliding windows to matter) and on a left-padded ragged batch, and 32 greedy tokens.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import polar_jax  # noqa: E402
from conversions import convert  # noqa: E402
from polar_jax.model import forward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer files")

V, CTX = 256, 1024
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=CTX)
FAMILIES = {
    "opt_pre_ln": lambda: transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **COMMON),
    "opt_post_ln": lambda: transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=32,
                                                  do_layer_norm_before=False, **COMMON),
    "llama_mha": lambda: transformers.LlamaConfig(intermediate_size=128, num_key_value_heads=4,
                                                  tie_word_embeddings=False, **COMMON),
    "llama3_gqa": lambda: transformers.LlamaConfig(
        intermediate_size=128, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=128), **COMMON),
    "mistral": lambda: transformers.MistralConfig(intermediate_size=128, num_key_value_heads=2,
                                                  sliding_window=64, **COMMON),
    "qwen2_tied": lambda: transformers.Qwen2Config(intermediate_size=128, num_key_value_heads=2,
                                                   tie_word_embeddings=True, **COMMON),
}


def assert_logits_close(ours, ref, mask=None):
  """Within 1e-4 relative: |ours - ref| <= 1e-4 * (|ref| + max|ref|) elementwise over valid positions."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  if mask is not None:
    ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
  scale = np.abs(ref).max()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
  torch.manual_seed(0)
  hf_cfg = FAMILIES[request.param]()
  hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  hf.generation_config.eos_token_id = None
  src = tmp_path_factory.mktemp(request.param) / "hf"
  hf.save_pretrained(src)
  out = src.parent / "polar"
  convert(str(src), str(out), dtype="float32")
  return hf, polar_jax.load_model(out, dtype="float32")


def test_long_prompt_logits(pair):
  hf, model = pair
  ids = np.random.default_rng(1).integers(0, V, (1, 600))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  assert_logits_close(forward(model, ids), ref)


def _left_padded(seed=2, lengths=(37, 64, 9)):
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = np.zeros((len(lengths), t), np.int64)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, t - n:] = rng.integers(0, V, n)
    mask[i, t - n:] = 1
  return ids, mask


def test_left_padded_batch_logits(pair):
  hf, model = pair
  ids, mask = _left_padded()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert_logits_close(forward(model, ids, mask), ref, mask)


@pytest.mark.slow
def test_greedy_generation_equals_transformers(pair):
  hf, model = pair
  ids, mask = _left_padded(3)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32,
                      do_sample=False, pad_token_id=0).numpy()[:, ids.shape[1]:]
  ours = polar_jax.generate(model, ids, mask, max_new_tokens=32)
  np.testing.assert_array_equal(ours.tokens, ref)
