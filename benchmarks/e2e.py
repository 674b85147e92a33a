"""End-to-end batched greedy decode throughput (a script, not a test).

Random bf16 weights (speed does not depend on values), decode tokens/s with prefill excluded:
  decode_tok_s = B * (N2 - N1) / (t(N2 new tokens) - t(N1 new tokens))
as in shared/anchors.md, where t is one compiled greedy decode loop (the step `generate` runs) timed after an
untimed prefill (`--timing generate`: two `generate` calls instead, prefill included in both), plus prefill time,
peak device memory, and the roofline fraction
  (weight bytes + KV bytes read per step) / step time / copy bandwidth (measured in the same run).
`--systems hf_static` times Hugging Face `generate` with a static cache on the same shapes (torch +
transformers + CUDA, as on the GPU image), in its own process so JAX and torch do not share memory:

  python benchmarks/e2e.py --models llama2-7b --batch 16 32 --prompts 2000 --densities 1 0.5 --out $OUT/e2e.jsonl
  XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/e2e.py --systems hf_static --models llama2-7b ...
  python benchmarks/e2e.py --smoke            # tiny model on CPU: checks the script end to end

Adaptive head budgets against uniform ones at the same average density (`--budget uniform adaptive`): the
adaptive step keeps per row the fewest groups whose router-softmax share reaches a mass, calibrated so that the
prompts' average density is each `--densities` value (records: budget, mass, realised_density):

  python benchmarks/e2e.py --models llama2-7b --batch 32 --prompts 2000 --densities 0.25 0.5 --budget uniform adaptive
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time
from typing import Any

# Weights + a B32 x 2k-token cache of a 7B model need more than JAX's default 75% of an 80 GB GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
# Hugging Face's B32 prefill failed on fragmentation (11 GiB reserved but unallocated) without this.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from polar_jax.compile_options import jit_loop  # noqa: E402
from polar_jax.cli.generate import KV_DTYPE_CHOICES  # noqa: E402
from polar_jax.config import ModelConfig, RopeScaling  # noqa: E402
from polar_jax.generation import generate  # noqa: E402
from polar_jax.kv_cache import storage_dtype  # noqa: E402
from polar_jax.model import init_model  # noqa: E402
from polar_jax.sparsity import DENSE_FALLBACK_FRACTION  # noqa: E402

MODELS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             max_position_embeddings=4096, norm_eps=1e-5),
    "llama3.1-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                               max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    "mistral-7b": ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=32768, norm_eps=1e-5, sliding_window=4096),
    "opt-6.7b": ModelConfig(model_type="opt", vocab_size=50272, hidden_size=4096, intermediate_size=16384,
                            num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                            max_position_embeddings=2048, norm="layer", norm_eps=1e-5, mlp="relu_mlp",
                            activation="relu", attn_bias=True, o_bias=True, mlp_bias=True, positions="learned",
                            tie_word_embeddings=True),
    "tiny": ModelConfig(model_type="llama", vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512),
}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_leaf(key, shape, dtype):
  return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def randomize(abstract_module, seed: int = 0):
  """`abstract_module` (an `nnx.eval_shape`d module) with every leaf filled with random values on the device,
  leaf by leaf (one small compile per distinct shape: fast even for 7B-parameter shapes, unlike compiling the
  whole initialiser as one program)."""
  from flax import nnx
  graphdef, state = nnx.split(abstract_module)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [_random_leaf(k, tuple(x.shape), jnp.dtype(x.dtype)) for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def random_model(config: ModelConfig, dtype, seed: int = 0):
  """A model with random weights (`randomize` of the abstract model)."""
  from polar_jax.model import abstract_model
  return randomize(abstract_model(config, dtype=dtype), seed)


def prepared_model(config: ModelConfig, dtype, *, tp: int = 1, dp: int = 1, fuse: bool = True):
  """The benchmarked model: random weights, sharded over a dp x tp mesh when that is more than one device, and
  with fused projections (`polar_jax.fusion`) unless `fuse` is False."""
  model = random_model(config, dtype)
  if tp * dp > 1:
    from polar_jax import sharding
    model = sharding.shard_model(model, sharding.make_mesh(tp=tp, dp=dp))
  if fuse:
    from polar_jax.fusion import fuse_projections
    fuse_projections(model)
  return model


def weight_bytes_per_step(config: ModelConfig, model) -> int:
  """Bytes of weights a decode step reads: every parameter except an untied input embedding table."""
  from flax import nnx
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    name = ".".join(map(str, path))
    if name.startswith("pos_embed") or (name.startswith("embed.") and not config.tie_word_embeddings):
      continue
    total += arr.size * arr.dtype.itemsize
  return total


def sparse_weight_bytes(config: ModelConfig, model, step, state) -> int:
  """The change to `weight_bytes_per_step` under a sparse step (`polar_jax.sparse_decode.SparseDecode` and its
  router state): minus the fc1/fc2 rows (and fc1 biases) of the neurons a layer with a budget k does not read,
  plus the routers' decode copies the step reads (the head routers' zero-padded side copy where the q|k|v kernel
  takes it, else the plain one; the neuron routers with their scales). 0 for a dense step."""
  from polar_jax.sparse_decode import SparseDecode
  if not isinstance(step, SparseDecode) or state is None:
    return 0
  delta = 0
  for layer, k in enumerate(step.neuron_k or ()):
    if k is not None:
      mlp = model.layers[layer].mlp
      row = sum(a.nbytes // a.shape[0] for a in (mlp.w_in_nd[...], mlp.w_out_nd[...]))
      row += 0 if mlp.b_in_n is None else mlp.b_in_n[...].dtype.itemsize
      delta -= row * (config.intermediate_size - k)
  routers = [state.get("head_side") or state.get("head"), state.get("neuron")]
  return delta + sum(leaf.nbytes for part in routers if part for leaf in jax.tree_util.tree_leaves(part))


def kv_bytes_per_step(config: ModelConfig, batch: int, mean_len: float, itemsize: int,
                      density_of_layer=lambda layer: 1.0) -> float:
  """K+V bytes attention reads per step, given the mean cache length and each layer's kept fraction."""
  per_layer = 2 * batch * mean_len * config.num_kv_heads * config.head_dim * itemsize
  if config.sliding_window:
    per_layer = per_layer * min(1.0, config.sliding_window / mean_len)
  return sum(per_layer * density_of_layer(i) for i in range(config.num_layers))


def kv_itemsize(config: ModelConfig, model_dtype, kv_dtype: str | None) -> float:
  """Bytes per cached K or V element: the storage dtype's, plus an 8-bit cache's float32 scale per head_dim
  elements."""
  from pallas_kernels import kv_quant
  from polar_jax.kv_cache import storage_dtype
  store = storage_dtype(model_dtype, kv_dtype)
  return store.itemsize + (jnp.dtype(kv_quant.SCALE_DTYPE).itemsize / config.head_dim if kv_quant.is_8bit(store)
                           else 0)


def roofline_fraction(bytes_per_step: float, ms_per_step: float, copy_tbps: float) -> float:
  return bytes_per_step / (ms_per_step * 1e-3) / (copy_tbps * 1e12)


def decode_rate(batch: int, n1: int, n2: int, t1: float, t2: float) -> tuple[float, float]:
  """(decode tokens/s, ms per step) from two timed runs with n1 < n2 new tokens."""
  if n2 <= n1 or t2 <= t1:
    raise ValueError(f"need n2 > n1 and t2 > t1, got n1={n1} n2={n2} t1={t1} t2={t2}")
  step_s = (t2 - t1) / (n2 - n1)
  return batch / step_s, step_s * 1e3


def peak_memory_gb() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 1e9


@dataclasses.dataclass
class Setting:
  model: str
  batch: int
  prompt: int
  density: float = 1.0
  mlp: str = "dense"
  mlp_dense_above: float = DENSE_FALLBACK_FRACTION   # SparsityConfig's
  router_dtype: str | None = None          # SparsityConfig's (None: the model's dtype)
  # "adaptive": per-row group counts (SparsityConfig(budget="adaptive")) whose average is `density`: the mass
  # calibrated on the prompts' router scores (`adaptive_setting`); at most `max_density` of the groups per row
  budget: str = "uniform"
  mass: float | None = None
  max_density: float = 1.0
  realised_density: float | None = None    # the calibrated mass's density on the prompt tokens (routed layers)


def random_routers(config: ModelConfig, seed: int = 0, mlp_topk: dict[int, tuple[int, ...]] | None = None,
                   scale: float = 1.0):
  """Routers with random weights (uniform speed does not depend on their values) and an optional budget table.
  `scale` multiplies the head routers' scores (unit variance at 1): larger spreads the adaptive counts (a peaked
  softmax for some rows, a flat one for others)."""
  from polar_jax.routers import Routers
  routers = Routers.init(config, seed=seed)
  w = routers.head.w_ldg
  w.set_value(scale * jax.random.normal(jax.random.key(seed), w.shape, jnp.float32) / config.hidden_size ** 0.5)
  if mlp_topk:
    routers.mlp_topk = dict(mlp_topk)
  return routers


def read_mlp_topk(directory: pathlib.Path) -> dict[int, tuple[int, ...]]:
  """The paper's per-layer neuron budgets: `bsize_{B}.csv` files with columns layer,batch_size,optimal_k."""
  table = {}
  for f in sorted(directory.glob("bsize_*.csv")):
    rows = [line.split(",") for line in f.read_text().splitlines()[1:] if line.strip()]
    table[int(f.stem.split("_")[1])] = tuple(int(r[2]) for r in sorted(rows, key=lambda r: int(r[0])))
  return table


def sparsity_for(setting: Setting):
  from polar_jax.sparsity import SparsityConfig
  if setting.budget == "adaptive":
    return SparsityConfig(attn_density=setting.max_density, mlp=setting.mlp, mlp_dense_above=setting.mlp_dense_above,
                          router_dtype=setting.router_dtype, budget="adaptive", mass=setting.mass)
  if setting.density >= 1.0 and setting.mlp == "dense":
    return None
  return SparsityConfig(attn_density=setting.density, mlp=setting.mlp, mlp_dense_above=setting.mlp_dense_above,
                        router_dtype=setting.router_dtype)


def kept_fraction(config: ModelConfig, sparsity, realised_density: float | None = None) -> Any:
  """Per layer, the fraction of KV groups a step reads (adaptive budgets: `realised_density` in routed layers)."""
  if sparsity is None:
    return lambda layer: 1.0
  groups = sparsity.layer_groups(config)
  if sparsity.budget == "adaptive":
    return lambda layer: 1.0 if groups[layer] is None else realised_density
  return lambda layer: 1.0 if groups[layer] is None else groups[layer] / config.num_kv_heads


def adaptive_setting(setting: Setting, model, config: ModelConfig, routers, ids: np.ndarray,
                     calibration_tokens: int = 4096) -> Setting:
  """`setting` with the mass whose average density on the prompts' router scores (the dense model over `ids`,
  the routers on each layer's normed input) is `setting.density` (`polar_jax.routers.adaptive.calibrate_mass`)."""
  from polar_jax.routers import adaptive
  base = dataclasses.replace(setting, mass=1.0)
  cfg = sparsity_for(base)
  scores = adaptive.heldout_router_scores(model, routers, [row for row in ids], max_tokens=calibration_tokens)
  budget = adaptive.calibrate_mass(scores, setting.density, cfg.layer_groups(config), min_groups=cfg.min_groups)
  mass = max(m for m, k in zip(budget.mass, budget.max_groups) if k is not None)
  return dataclasses.replace(setting, mass=mass, realised_density=budget.realised_density)


@functools.partial(jit_loop, static_argnames=("graphdef", "decode"), donate_argnames=("cache",))
def _decode_greedy(graphdef, state, tok_b, cache, decode_state, steps, *, decode):
  """`steps` greedy decode steps from a prefilled cache, with the step `generate` runs (`decode`). `steps` is
  traced, so every step count runs the same compiled program (the same autotuned kernels)."""
  from flax import nnx
  model = nnx.merge(graphdef, state)
  active_b = jnp.ones(tok_b.shape, bool)

  def body(_, carry):
    tok, cache = carry
    logits, cache = decode(model, tok, cache, decode_state, active_b)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

  return jax.lax.fori_loop(0, steps, body, (tok_b, cache))


class DecodeLoop:
  """`generate`'s own prefill program and decode step, split so that a greedy decode loop of n steps can run
  (and be timed or profiled) apart from the prefill: `tok, cache = loop.prefill()`, then `loop.decode(tok, cache,
  n)` runs n steps in one compiled program whatever n is (n is traced; the cache is donated)."""

  def __init__(self, model, ids, sparsity, routers, *, max_new_tokens: int, options=None):
    from flax import nnx
    from polar_jax import generation      # generate's own prefill program and step (no copies of them here)
    cfg = model.config
    self.batch = generation.prepare_batch(ids, None, vocab_size=cfg.vocab_size,
                                          context=cfg.max_position_embeddings, max_new_tokens=max_new_tokens)
    self.step, self.state = generation.make_decoder(model, sparsity, routers if sparsity is not None else None,
                                                    batch=self.batch.batch, options=options)
    self.graphdef, self.params = nnx.split(model)
    self.tokens, self.lengths = jnp.asarray(self.batch.tokens_bt), jnp.asarray(self.batch.lengths_b)
    self._prefill = generation._prefill_program

  def prefill(self):
    """(first greedy token `[B]`, prefilled cache), computed and waited for."""
    logits, cache = self._prefill(self.graphdef, self.params, self.tokens, self.lengths, max_len=self.batch.max_len,
                                  mesh=self.step.mesh, kv_dtype=self.step.options.kv_dtype)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)                  # greedy, as Greedy()
    return jax.block_until_ready((tok, cache))

  def decode(self, tok, cache, n: int):
    return _decode_greedy(self.graphdef, self.params, tok, cache, self.state, jnp.int32(n), decode=self.step,
                          loop_graph=self.step.options.loop_graph)

  @staticmethod
  def rewind(cache, lengths_b):
    """`cache` as the prefill left it, for another timed run: its lengths set back to `lengths_b` (host values).
    The slots past them hold an earlier run's K/V, which a run overwrites before it reads them (each step writes
    slot `lengths_b[b]`, then attends to `[0, lengths_b[b]]`): the same tokens as from a fresh prefill."""
    return dataclasses.replace(cache, lengths_b=jnp.asarray(lengths_b))

  def compiled_text(self, tok, cache) -> str:
    """The optimised HLO of the decode loop (as compiled for these shapes)."""
    return _decode_greedy.lower(self.graphdef, self.params, tok, cache, self.state, jnp.int32(1),
                                decode=self.step, loop_graph=self.step.options.loop_graph).compile().as_text()


_PREFILLED: set = set()     # (model, ids shape, max new tokens) whose prefill program this process has compiled


def time_decode_loop(model, ids, sparsity, routers, *, n1: int, n2: int, iters: int, prefill_iters: int = 2,
                     options=None):
  """(t(n1), t(n2), prefill seconds, the `DecodeLoop`): the fastest of `iters` timed calls of one compiled decode
  loop running n steps from the prefilled cache, and the fastest of `prefill_iters` timed prefills (after one
  that compiles, for the first setting of a shape).

  `generate` compiles one program per `max_new_tokens`, prefill included, so `t(N2) - t(N1)` of two generate
  calls also carries the difference of two prefills and of two autotuning outcomes (B32 readings of one
  commit fell into ~2685 or ~2760 tok/s by process); here both counts run the same program, prefill-free.
  The decode runs reuse the last prefill's cache, rewound to the prompt lengths (`DecodeLoop.rewind`: the same
  tokens, the same program and bytes), so a setting costs 1 + prefill_iters prefills, not 2 (iters + 1)."""
  loop = DecodeLoop(model, ids, sparsity, routers, max_new_tokens=n2, options=options)
  best = {"prefill": float("inf"), n1: float("inf"), n2: float("inf")}
  # the prefill program does not depend on the sparsity (but on the cache's storage)
  shape = (model.config, model.dtype, ids.shape, n2, None if options is None else options.kv_dtype)
  compiled = shape in _PREFILLED
  for i in range(prefill_iters + (0 if compiled else 1)):
    cache = None                                  # (one cache alive at a time)
    t0 = time.perf_counter()
    tok, cache = loop.prefill()
    if i or compiled:
      best["prefill"] = min(best["prefill"], time.perf_counter() - t0)
  _PREFILLED.add(shape)
  lengths_b = np.asarray(cache.lengths_b)
  for i in range(iters + 1):                      # the first round compiles and warms up
    for n in (n1, n2):
      t0 = time.perf_counter()
      _, cache = jax.block_until_ready(loop.decode(tok, cache, n))
      t_decode = time.perf_counter() - t0
      cache = loop.rewind(cache, lengths_b)
      if i:
        best[n] = min(best[n], t_decode)
  return best[n1], best[n2], best["prefill"], loop


def run_polar(setting: Setting, model, config: ModelConfig, *, n1: int, n2: int, iters: int,
              copy_tbps: float, routers=None, timing: str = "decode_loop", prefill_iters: int = 2,
              options=None) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, (setting.batch, setting.prompt)).astype(np.int32)
  if setting.budget == "adaptive" and setting.mass is None:
    setting = adaptive_setting(setting, model, config, routers, ids)
  sparsity = sparsity_for(setting)
  if timing == "decode_loop":
    t1, t2, prefill_s, loop = time_decode_loop(model, ids, sparsity, routers, n1=n1, n2=n2, iters=iters,
                                                  prefill_iters=prefill_iters, options=options)
    tok_s, ms = decode_rate(setting.batch, n1, n2, t1, t2)
    prefill_ms = prefill_s * 1e3
    step, state = loop.step, loop.state
  else:
    # `generate` end to end, the fastest of `iters` runs each: the prefill (seconds at B32) varies by ~0.1 s run
    # to run, which the median of 3 let through into (t2 - t1) / (n2 - n1) (one B32 record read 15% fast on
    # 2026-11-21).
    kwargs: dict[str, Any] = dict(options=options)
    if sparsity is not None:
      kwargs.update(sparsity=sparsity, routers=routers)
    run = lambda n: generate(model, ids, max_new_tokens=n, **kwargs).tokens  # noqa: E731
    t1 = common.time_fn(lambda: run(n1), warmup=1, iters=iters, stat="min")
    t2 = common.time_fn(lambda: run(n2), warmup=1, iters=iters, stat="min")
    tok_s, ms = decode_rate(setting.batch, n1, n2, t1, t2)
    prefill_ms = max(t1 - n1 * ms * 1e-3, 0.0) * 1e3
    from polar_jax import generation
    step, state = generation.make_decoder(model, sparsity, routers if sparsity is not None else None,
                                          batch=setting.batch, options=options)
  itemsize = kv_itemsize(config, model.dtype, None if options is None else options.kv_dtype)
  mean_len = setting.prompt + (n1 + n2) / 2
  step_bytes = weight_bytes_per_step(config, model) + sparse_weight_bytes(config, model, step, state)
  step_bytes += kv_bytes_per_step(config, setting.batch, mean_len, itemsize,
                                  kept_fraction(config, sparsity, setting.realised_density))
  extra = {}
  if setting.budget == "adaptive":
    extra = dict(mass=setting.mass, realised_density=setting.realised_density, max_density=setting.max_density)
  return dict(system="polar_jax", decode_tok_s=tok_s, ms_per_step=ms, prefill_ms=prefill_ms,
              peak_mem_gb=peak_memory_gb(), roofline_frac=roofline_fraction(step_bytes, ms, copy_tbps),
              step_bytes=step_bytes, **extra)


def run_hf_static(setting: Setting, config: ModelConfig, *, n1: int, n2: int, iters: int) -> dict[str, Any] | None:
  """Hugging Face generate with a static cache on the same shapes (random bf16 weights), if available."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  hf_cfg = _hf_config(config, transformers)
  with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
  ids = torch.randint(0, config.vocab_size, (setting.batch, setting.prompt), device="cuda")

  def timed(n):
    times = []
    for i in range(iters + 1):
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, cache_implementation="static", pad_token_id=0)
      torch.cuda.synchronize()
      if i:
        times.append(time.perf_counter() - t0)
    return float(np.min(times))   # as run_polar: the fastest run

  with torch.no_grad():
    t1, t2 = timed(n1), timed(n2)
  tok_s, ms = decode_rate(setting.batch, n1, n2, t1, t2)
  peak = torch.cuda.max_memory_allocated() / 1e9
  del model
  torch.cuda.empty_cache()
  return dict(system="hf_static", decode_tok_s=tok_s, ms_per_step=ms, prefill_ms=None, peak_mem_gb=peak,
              roofline_frac=None)


def _guarded(fn, system: str) -> dict[str, Any] | None:
  """`fn()`, or an error record when it runs out of device memory (the sweep goes on to the next setting)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError / torch.OutOfMemoryError, matched by message
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
      raise
    print(f"{system}: out of device memory: {msg.splitlines()[0][:300]}", flush=True)
    try:
      import torch
      torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
      pass
    return dict(system=system, decode_tok_s=None, ms_per_step=None, prefill_ms=None, peak_mem_gb=None,
                roofline_frac=None, error="out of device memory")


def _hf_config(config: ModelConfig, transformers):
  common_kw = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                   max_position_embeddings=config.max_position_embeddings)
  if config.model_type == "opt":
    return transformers.OPTConfig(ffn_dim=config.intermediate_size, word_embed_proj_dim=config.hidden_size,
                                  **common_kw)
  cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[config.model_type]
  kw = dict(intermediate_size=config.intermediate_size, num_key_value_heads=config.num_kv_heads,
            rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta)
  if config.sliding_window:
    kw["sliding_window"] = config.sliding_window
  return cls(**kw, **common_kw)


DENSITY_COLORS = {1.0: "tab:blue", 0.625: "tab:green", 0.5: "tab:orange", 0.25: "tab:purple"}


def plot(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  """Decode tokens/s vs batch size on one device: a panel per model (columns) and prompt length (rows: ~1000,
  ~2000, ~4000), a colour per attention density, dashed with the MLP union, Hugging Face static in black. Only the
  device of the newest record and one-GPU runs (the table has the rest); the latest record wins where a setting
  was measured more than once."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = [r for r in records if r.get("decode_tok_s") is not None and r.get("model") in MODELS]
  if not records:
    raise ValueError("no measured records to plot")
  device = max(records, key=lambda r: r["date"])["device"]
  records = [r for r in records if r["device"] == device and r.get("devices", r.get("tp", 1)) == 1]
  bucket = lambda prompt: 1000 if prompt < 1500 else 2000 if prompt < 3000 else 4000  # noqa: E731
  models = sorted({r["model"] for r in records})
  rows = sorted({bucket(r["prompt"]) for r in records})
  fig, axes = plt.subplots(len(rows), len(models), figsize=(4.2 * len(models), 3.4 * len(rows)), squeeze=False)
  for i, row in enumerate(rows):
    for j, m in enumerate(models):
      ax = axes[i][j]
      series: dict[tuple, dict[int, float]] = {}
      prompts = set()
      for r in sorted((r for r in records if r["model"] == m and bucket(r["prompt"]) == row),
                      key=lambda r: r["date"]):
        prompts.add(r["prompt"])
        key = ("hf", 1.0, "dense") if r["system"] == "hf_static" else ("polar", r["density"], r["mlp"])
        series.setdefault(key, {})[r["B"]] = r["decode_tok_s"]
      for (system, density, mlp), pts in sorted(series.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        bs = sorted(pts)
        label = "HF static" if system == "hf" else f"d={density:g}" + (" + MLP union" if mlp == "router" else "")
        ax.plot(bs, [pts[b] for b in bs], marker="x" if system == "hf" else "o", markersize=4, label=label,
                color="black" if system == "hf" else DENSITY_COLORS.get(density, "tab:gray"),
                linestyle="--" if mlp == "router" else "-")
      if not series:
        ax.set_visible(False)
        continue
      ax.set_title(f"{m}, prompt {'/'.join(str(x) for x in sorted(prompts))}", fontsize=9)
      ax.set_xscale("log", base=2)
      batches = sorted({b for pts in series.values() for b in pts})
      ax.set_xticks(batches, [str(b) for b in batches])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6)
      if i == len(rows) - 1:
        ax.set_xlabel("batch size")
      if j == 0:
        ax.set_ylabel("decode tokens/s")
  fig.suptitle(f"polar_jax decode throughput, {device.replace('NVIDIA ', '')} (d = attention density)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["llama2-7b"], choices=sorted(MODELS))
  p.add_argument("--batch", nargs="+", type=int, default=[16, 32])
  p.add_argument("--prompts", nargs="+", type=int, default=[2000])
  p.add_argument("--n1", type=int, default=8)
  p.add_argument("--n2", type=int, default=72, help="new tokens of the long run (decode steps timed: n2 - n1; "
                 "8 and 72 as shared/anchors.md)")
  p.add_argument("--iters", type=int, default=5, help="timed runs per length (the fastest is used)")
  p.add_argument("--prefill-iters", type=int, default=2,
                 help="timed prefills per setting, each after one that compiles (the fastest is used)")
  p.add_argument("--densities", nargs="+", type=float, default=[1.0], help="attention densities (1 = dense)")
  p.add_argument("--mlp", nargs="+", default=["dense"], choices=["dense", "router"],
                 help="MLP modes (router: batch-union neurons, ReLU models)")
  p.add_argument("--mlp-dense-above", nargs="+", type=float, default=[DENSE_FALLBACK_FRACTION],
                 help="mlp=router: budgets above this fraction of N run the dense MLP (SparsityConfig; default "
                      "%(default)s); several values: one run each")
  p.add_argument("--router-dtype", nargs="+", default=[None], choices=[None, "float32", "bfloat16", "int8"],
                 type=lambda v: None if v == "model" else v, metavar="{model,float32,bfloat16,int8}",
                 help="routers' decode weights (SparsityConfig.router_dtype; 'model': the model's dtype); several: "
                      "one run each")
  p.add_argument("--mlp-topk-dir", type=pathlib.Path,
                 default=pathlib.Path(__file__).resolve().parents[2] / "shared/reference-data/mlp_topk/opt-6.7b",
                 help="per-layer neuron budgets (bsize_B.csv) for mlp=router with random routers")
  p.add_argument("--systems", nargs="+", default=["polar_jax"], choices=["polar_jax", "hf_static"],
                 help="hf_static: Hugging Face generate with a static cache (needs torch + CUDA; run it in its own "
                      "process with XLA_PYTHON_CLIENT_PREALLOCATE=false so JAX leaves it the memory)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR / "e2e.jsonl")
  p.add_argument("--plot", type=pathlib.Path, default=None)
  p.add_argument("--plot-only", action="store_true",
                 help="only draw --plot from the records already in --out (e.g. benchmarks/results/e2e.jsonl)")
  p.add_argument("--smoke", action="store_true", help="tiny model, CPU friendly")
  p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (polar_jax.sharding; records carry tp)")
  p.add_argument("--dp", type=int, default=1, help="data parallel degree (batch split over dp)")
  p.add_argument("--timing", default="decode_loop", choices=["decode_loop", "generate"],
                 help="decode_loop (default): one compiled greedy decode loop timed after an untimed prefill, "
                      "t(N2) - t(N1) of the same program; generate: two `generate` calls, prefill included "
                      "(records before 2026-11-22 04:30 UTC)")
  p.add_argument("--budget", nargs="+", default=["uniform"], choices=["uniform", "adaptive"],
                 help="head budgets per density: uniform (each row keeps round(density x groups)) and/or adaptive "
                      "(per-row counts from a mass threshold calibrated so that the prompts' average density is "
                      "the density; random routers scaled by --adaptive-router-scale)")
  p.add_argument("--adaptive-max-density", type=float, default=1.0,
                 help="--budget adaptive: the most groups a row keeps, as a density (Kmax)")
  p.add_argument("--adaptive-router-scale", type=float, default=3.0,
                 help="--budget adaptive: random routers' score scale (spreads the per-row counts)")
  common.add_decode_options(p)
  p.add_argument("--no-fuse", action="store_true",
                 help="keep separate q/k/v and gate/up projections (default: fused, polar_jax.fusion)")
  p.add_argument("--kv-dtype", nargs="+", default=["model"], choices=KV_DTYPE_CHOICES,
                 help="KV cache storage (DecodeOptions.kv_dtype; 'model': the model's dtype); several: one record "
                 "each (field kv_dtype), e.g. --kv-dtype bfloat16 int8 float8_e4m3fn")
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batch, args.prompts, args.n1, args.n2, args.iters = ["tiny"], [2], [24], 1, 129, 3
    args.densities = sorted(set(args.densities) | {1.0, 0.5}, reverse=True)
    args.dtype = "float32"

  options = common.decode_options(args)
  if args.plot_only:
    if not args.plot:
      p.error("--plot-only needs --plot PATH")
    import json
    plot(args.plot, [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()])
    print(f"wrote {args.plot}")
    return 0
  copy_tbps = common.copy_bandwidth_tbps(1 << 26 if args.smoke else 1 << 31)
  prov = common.provenance()
  print(f"{prov['device']} jax {prov['jax']}: copy bandwidth {copy_tbps:.2f} TB/s")
  devices = args.tp * args.dp     # roofline of a tp x dp run: the summed copy bandwidth of its devices
  records = []
  for name in args.models:
    config = MODELS[name]
    run_ours = "polar_jax" in args.systems
    model = (prepared_model(config, jnp.dtype(args.dtype), tp=args.tp, dp=args.dp, fuse=not args.no_fuse)
             if run_ours else None)
    sparse_needed = any(d < 1 for d in args.densities) or "router" in args.mlp or "adaptive" in args.budget
    topk = read_mlp_topk(args.mlp_topk_dir) if "router" in args.mlp and config.mlp == "relu_mlp" else None
    routers = random_routers(config, mlp_topk=topk) if sparse_needed and run_ours else None
    adaptive_routers = (random_routers(config, mlp_topk=topk, scale=args.adaptive_router_scale)
                        if "adaptive" in args.budget and run_ours else None)
    for prompt in args.prompts:
      prompt = min(prompt, config.max_position_embeddings - args.n2)
      for b in args.batch:
        rows = []
        for kv in args.kv_dtype if run_ours else ():
          kv_options = options.replace(kv_dtype=None if kv == "model" else kv)
          for density in args.densities:
            for mlp in args.mlp:
              if mlp == "router" and config.mlp != "relu_mlp":
                continue
              sparse = density < 1 or mlp == "router"
              for above in args.mlp_dense_above if mlp == "router" else [DENSE_FALLBACK_FRACTION]:
                for rdt in args.router_dtype if sparse else [None]:
                  for budget in args.budget:
                    if budget == "adaptive" and density > args.adaptive_max_density:
                      continue
                    s = Setting(name, b, prompt, density, mlp, above, rdt, budget=budget,
                                max_density=args.adaptive_max_density)
                    r = _guarded(lambda: run_polar(s, model, config, n1=args.n1, n2=args.n2, iters=args.iters,
                                                   copy_tbps=copy_tbps * devices,
                                                   routers=adaptive_routers if budget == "adaptive" else routers,
                                                   timing=args.timing, prefill_iters=args.prefill_iters,
                                                   options=kv_options),
                                         "polar_jax")
                    rows.append((s, r, kv_options))
        s = Setting(name, b, prompt)
        if "hf_static" in args.systems:
          hf = _guarded(lambda: run_hf_static(s, config, n1=args.n1, n2=args.n2, iters=args.iters), "hf_static")
          if hf:
            rows.append((s, hf, None))
        for s, r, row_options in rows:
          ours = r["system"] == "polar_jax"
          sparse = ours and (s.density < 1 or s.mlp == "router")
          rec = dict(prov, model=name, B=b, prompt=prompt, density=s.density, mlp=s.mlp, copy_tbps=copy_tbps,
                     budget=s.budget if ours else None,
                     mlp_dense_above=s.mlp_dense_above if ours and s.mlp == "router" else None,
                     router_dtype=(s.router_dtype or args.dtype) if sparse else None,
                     tp=args.tp if r["system"] == "polar_jax" else 1,
                     dp=args.dp if r["system"] == "polar_jax" else 1,
                     devices=devices if r["system"] == "polar_jax" else 1,
                     fused=(not args.no_fuse) if r["system"] == "polar_jax" else None, n1=args.n1, n2=args.n2,
                     **{k: v if r["system"] == "polar_jax" else None
                        for k, v in common.options_record(row_options or options).items()},
                     timing="decode_loop_min" if r["system"] == "polar_jax" and args.timing == "decode_loop"
                     else "min", **r)
          if ours:   # the storage itself ("bfloat16" for the model's dtype), not the option's None
            rec["kv_dtype"] = str(storage_dtype(jnp.dtype(args.dtype), row_options.kv_dtype))
          records.append(rec)
          common.append_jsonl(args.out, [rec])              # written as measured: a cut-off run keeps its rows
          if rec.get("error"):
            print(f"{name:12s} {rec['system']:9s} B{b:<4d} prompt {prompt:5d} density {s.density:.3f}: "
                  f"FAILED ({rec['error']})", flush=True)
            continue
          frac = "-" if rec["roofline_frac"] is None else f"{rec['roofline_frac']:.2f}"
          tag = (f" mlp router >{rec['mlp_dense_above']:g} dense" if rec.get("mlp_dense_above") else "") + (
              f" routers {rec['router_dtype']}" if rec.get("router_dtype") else "") + (
              f" adaptive (mass {rec['mass']:.4f}, realised {rec['realised_density']:.3f})"
              if rec.get("budget") == "adaptive" else "")
          tag += f" kv {rec['kv_dtype']}" if ours and len(args.kv_dtype) > 1 else ""
          print(f"{name:12s} {rec['system']:9s} B{b:<4d} prompt {prompt:5d} density {s.density:.3f}{tag}: "
                f"{rec['decode_tok_s']:9.1f} tok/s {rec['ms_per_step']:7.2f} ms/step roofline {frac}", flush=True)
    del model
  if args.plot:
    plot(args.plot, records)
  print(f"wrote {len(records)} records to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
