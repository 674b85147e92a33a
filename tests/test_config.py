"""ModelConfig parsing of Hugging Face configs (transformers 4.x and 5.x keys) and its errors."""

import pytest

from polar_jax.config import ModelConfig, RopeScaling, UnsupportedConfigError

LLAMA3_V4 = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "eos_token_id": [128001, 128008, 128009],
}


def test_llama3_v4_keys():
  c = ModelConfig.from_hf_config(LLAMA3_V4)
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (32, 8, 128, 4)
  assert c.rope_theta == 500000.0
  assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  assert c.eos_token_ids == (128001, 128008, 128009)


def test_v5_rope_parameters_equal_v4_keys():
  v5 = dict(LLAMA3_V4)
  del v5["rope_theta"], v5["rope_scaling"], v5["torch_dtype"]
  v5["rope_parameters"] = dict(LLAMA3_V4["rope_scaling"], rope_theta=500000.0)
  v5["dtype"] = "bfloat16"
  assert ModelConfig.from_hf_config(v5) == ModelConfig.from_hf_config(LLAMA3_V4)


def test_v5_default_rope_parameters():
  d = dict(LLAMA3_V4, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
  del d["rope_theta"], d["rope_scaling"]
  c = ModelConfig.from_hf_config(d)
  assert c.rope_theta == 100000.0 and c.rope_scaling is None


def test_roundtrip_dict_and_fingerprint():
  c = ModelConfig.from_hf_config(LLAMA3_V4)
  assert ModelConfig.from_dict(c.to_dict()) == c
  assert c.fingerprint() == ModelConfig.from_dict(c.to_dict()).fingerprint()
  other = ModelConfig.from_hf_config(dict(LLAMA3_V4, num_hidden_layers=31))
  assert other.fingerprint() != c.fingerprint()


def test_opt_350m_post_ln():
  c = ModelConfig.from_hf_config({
      "model_type": "opt", "vocab_size": 50272, "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 24,
      "num_attention_heads": 16, "max_position_embeddings": 2048, "do_layer_norm_before": False,
      "word_embed_proj_dim": 512, "activation_function": "relu"})
  assert not c.pre_norm and not c.final_norm and c.word_embed_proj_dim == 512 and c.embed_dim == 512
  assert c.positions == "learned" and c.mlp == "relu_mlp" and c.mlp_bias


def test_mistral_window_and_qwen2_bias():
  m = ModelConfig.from_hf_config(dict(LLAMA3_V4, model_type="mistral", sliding_window=4096, rope_scaling=None))
  assert m.sliding_window == 4096
  q = ModelConfig.from_hf_config(dict(LLAMA3_V4, model_type="qwen2", rope_scaling=None, sliding_window=4096))
  assert q.attn_bias and not q.o_bias and q.sliding_window is None


@pytest.mark.parametrize("patch, match", [
    ({"model_type": "gpt2"}, "unknown architecture.*supported: opt, llama, mistral, qwen2"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'.*llama3"),
    ({"hidden_act": "tanh"}, "hidden_act 'tanh' unsupported"),
    ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_configs_name_the_problem(patch, match):
  with pytest.raises(UnsupportedConfigError, match=match):
    ModelConfig.from_hf_config(dict(LLAMA3_V4, **patch))


def test_qwen2_sliding_window_unsupported():
  with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
    ModelConfig.from_hf_config(dict(LLAMA3_V4, model_type="qwen2", rope_scaling=None, use_sliding_window=True))
