"""polar_jax.checkpoint: save/load round trips, dtype casting, and clear errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from polar_jax import checkpoint
from polar_jax.checkpoint import CheckpointError
from polar_jax.config import ModelConfig
from polar_jax.model import CausalLM, param_shapes

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=32, attn_bias=True)


def _params(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in checkpoint.model_params(model).items()}


def random_params(config: ModelConfig, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(shape).astype(dtype) for k, shape in param_shapes(config).items()}


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
  path = tmp_path_factory.mktemp("ck") / "ck"
  path.mkdir()
  want = random_params(CFG)
  checkpoint.save_params(path / "params", want)
  checkpoint.save_config(path, CFG)
  return path, want


@pytest.fixture
def saved(saved_once, tmp_path):
  """A private copy of a small float32 checkpoint (tests may break it)."""
  path, want = saved_once
  shutil.copytree(path, tmp_path / "ck")
  return tmp_path / "ck", want


def test_round_trip_exact(saved):
  path, want = saved
  assert sorted(want) == sorted(param_shapes(CFG))
  model = checkpoint.load_model(path, "float32")
  assert isinstance(model, CausalLM) and model.config == CFG
  got = _params(model)
  assert sorted(got) == sorted(want)
  for k in want:
    assert isinstance(checkpoint.model_params(model)[k], jax.Array)
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert checkpoint.load_config(path) == CFG
  assert json.loads((path / "polar_config.json").read_text())["format_version"] == checkpoint.FORMAT_VERSION


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, "float16", jnp.dtype("float16")])
def test_cast_on_restore(saved, dtype):
  path, want = saved
  model = checkpoint.load_model(path, dtype)
  target = np.dtype(jnp.dtype(dtype))
  assert model.dtype == target
  for k, v in _params(model).items():
    assert v.dtype == target, k
    np.testing.assert_array_equal(v, want[k].astype(target), err_msg=k)   # round to nearest even


def test_default_dtype_is_float32_on_cpu(saved):
  path, _ = saved
  assert jax.default_backend() == "cpu"
  model = checkpoint.load_model(path)
  assert all(v.dtype == np.float32 for v in _params(model).values())


def test_resolve_dtype():
  assert checkpoint.resolve_dtype("bf16") == jnp.bfloat16
  assert checkpoint.resolve_dtype("float32") == jnp.float32
  assert checkpoint.resolve_dtype(jnp.float16) == jnp.float16
  with pytest.raises(ValueError, match="unknown dtype 'float8'"):
    checkpoint.resolve_dtype("float8")
  with pytest.raises(ValueError, match="floating"):
    checkpoint.resolve_dtype(jnp.int32)


def test_bf16_checkpoint_loads_as_float32_exactly(tmp_path):
  want = random_params(CFG, ml_dtypes.bfloat16, seed=1)
  checkpoint.save_params(tmp_path / "params", want)
  checkpoint.save_config(tmp_path, CFG)
  got = _params(checkpoint.load_model(tmp_path, "float32"))
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)
  assert _params(checkpoint.load_model(tmp_path, "bfloat16"))["embed.embedding"].dtype == ml_dtypes.bfloat16


def test_save_model_round_trip(saved, tmp_path):
  path, want = saved
  model = checkpoint.load_model(path, "float32")
  checkpoint.save_model(tmp_path / "again", model)
  assert checkpoint.load_config(tmp_path / "again") == CFG
  got = _params(checkpoint.load_model(tmp_path / "again", "float32"))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(CheckpointError, match="already exists"):
    checkpoint.save_model(tmp_path / "again", model)


# ---- errors ------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist.*polar-convert"):
    checkpoint.load_model(tmp_path / "nope")


def test_missing_config(saved):
  path, _ = saved
  (path / "polar_config.json").unlink()
  with pytest.raises(CheckpointError, match="polar_config.json is missing"):
    checkpoint.load_model(path)


def test_future_format_version(saved):
  path, _ = saved
  d = json.loads((path / "polar_config.json").read_text())
  d["format_version"] = 99
  (path / "polar_config.json").write_text(json.dumps(d))
  with pytest.raises(CheckpointError, match="unsupported format_version 99"):
    checkpoint.load_model(path)


def test_missing_params(saved):
  path, _ = saved
  shutil.rmtree(path / "params")
  with pytest.raises(CheckpointError, match="incomplete: params/ is missing"):
    checkpoint.load_model(path)


def test_incomplete_params(saved):
  path, _ = saved
  (path / "params" / "_METADATA").unlink()
  with pytest.raises(CheckpointError, match="not a complete Orbax checkpoint"):
    checkpoint.load_model(path)


def test_params_do_not_match_config(saved):
  path, want = saved
  shutil.rmtree(path / "params")
  want = dict(want)
  want.pop("layers.1.mlp.up_proj.kernel")
  want["extra.kernel"] = np.zeros(3, np.float32)
  checkpoint.save_params(path / "params", want)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_model(path)
  msg = str(e.value)
  assert "missing parameters: layers.1.mlp.up_proj.kernel" in msg
  assert "unexpected parameters: extra.kernel" in msg
  assert "shape mismatch" not in msg


def test_shape_mismatch(saved):
  path, want = saved
  shutil.rmtree(path / "params")
  want = dict(want)
  want["layers.0.attn.k_proj.kernel"] = want["layers.0.attn.k_proj.kernel"].T.copy()
  checkpoint.save_params(path / "params", want)
  with pytest.raises(CheckpointError, match=r"shape mismatch: layers\.0\.attn\.k_proj\.kernel: "
                     r"expected \(16, 8\), found \(8, 16\)"):
    checkpoint.load_model(path)


def test_save_params_refuses_existing(saved):
  path, want = saved
  with pytest.raises(CheckpointError, match="already exists"):
    checkpoint.save_params(path / "params", want)


def test_no_tokenizer(saved):
  path, _ = saved
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    checkpoint.load_tokenizer(path)


# ---- the real converted model ----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_loads(smollm2_dir):
  model = checkpoint.load_model(smollm2_dir, "bfloat16")
  assert model.config.num_layers == 30 and model.config.tie_word_embeddings
  emb = checkpoint.model_params(model)["embed.embedding"]
  assert emb.shape == (49152, 576) and emb.dtype == jnp.bfloat16
  tok = checkpoint.load_tokenizer(smollm2_dir)
  assert tok.decode(tok("The capital of France is")["input_ids"]) == "The capital of France is"
