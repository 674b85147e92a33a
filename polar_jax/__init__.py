"""polar_jax: batched LLM decoding with Polar Sparsity in JAX / Flax NNX / Pallas.

Where things are:
  * model and the decode step: `polar_jax/model.py` (`CausalLM.decode_step`), attention in `attention.py`;
  * the generation loop: `polar_jax/generation.py`; samplers: `sampling.py`; KV cache: `kv_cache.py`;
  * kernels: the `pallas_kernels` package; converters: the `conversions` package.

Public names are imported lazily, so `import polar_jax.config` stays light.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "polar_jax.checkpoint",
    "fuse_projections": "polar_jax.fusion",
    "load_tokenizer": "polar_jax.checkpoint",
    "ModelConfig": "polar_jax.config",
    "UnsupportedConfigError": "polar_jax.config",
    "GenerationOutput": "polar_jax.generation",
    "generate": "polar_jax.generation",
    "stream": "polar_jax.generation",
    "KVCache": "polar_jax.kv_cache",
    "CausalLM": "polar_jax.model",
    "DecoderLayer": "polar_jax.model",
    "Attention": "polar_jax.attention",
    "GatedMLP": "polar_jax.mlp",
    "NeuronMLP": "polar_jax.mlp",
    "DecodeOptions": "polar_jax.options",
    "load_routers": "polar_jax.routers",
    "Routers": "polar_jax.routers",
    "HeadRouters": "polar_jax.routers",
    "NeuronRouters": "polar_jax.routers",
    "make_mesh": "polar_jax.sharding",
    "SparsityConfig": "polar_jax.sparsity",
    "init_model": "polar_jax.model",
    "Engine": "polar_jax.serving",
    "SamplingParams": "polar_jax.serving",
    "Chain": "polar_jax.sampling",
    "Greedy": "polar_jax.sampling",
    "Sampler": "polar_jax.sampling",
    "Temperature": "polar_jax.sampling",
    "TopK": "polar_jax.sampling",
    "TopP": "polar_jax.sampling",
}

__all__ = sorted(_EXPORTS)


_SUBMODULES = ("distributed", "sharding")


def __getattr__(name):
  if name in _SUBMODULES:   # polar_jax.distributed.initialize(...), polar_jax.sharding.make_mesh(...)
    value = importlib.import_module(f"polar_jax.{name}")
    globals()[name] = value
    return value
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'polar_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
