"""polar-serve on localhost (uvicorn in a thread) over a tiny random model with the SmolLM2 tokenizer, driven by the
official `openai` client and raw HTTP: completions, chat, streaming, stop strings, concurrency, errors, disconnects,
/metrics."""

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import polar_jax  # noqa: E402
from polar_jax import checkpoint  # noqa: E402
from polar_jax.cli import serve as serve_cli  # noqa: E402
from polar_jax.config import ModelConfig  # noqa: E402
from polar_jax.model import init_model  # noqa: E402
from polar_jax.serving import EngineOptions, programs  # noqa: E402
from polar_jax.serving.server import build_app  # noqa: E402

pytestmark = pytest.mark.slow   # a uvicorn server and its model per module: `make test` runs these

MAX_BATCH, MAX_LEN, MAX_WAITING = 4, 64, 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A random 2-layer model with SmolLM2's vocabulary, saved with its tokenizer (built from the GGUF's metadata)."""
  from conversions.gguf_reader import GGUFSource
  from conversions.tokenizer import write_gguf_tokenizer
  from polar_jax import data
  path = tmp_path_factory.mktemp("serve") / "tiny-smollm2"
  source = GGUFSource(data.smollm2_gguf_path())
  config = ModelConfig(model_type="llama", vocab_size=source.config.vocab_size, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                       tie_word_embeddings=True, eos_token_id=source.config.eos_token_id)
  checkpoint.save_model(path, init_model(config, seed=0))
  assert write_gguf_tokenizer(source.path, source.metadata, path)
  source.close()
  return path


@pytest.fixture(scope="module")
def server(ckpt):
  args = serve_cli.parser().parse_args([str(ckpt), "--max-batch", str(MAX_BATCH), "--max-len", str(MAX_LEN),
                                        "--max-waiting", str(MAX_WAITING), "--steps-per-round", "2"])
  engine, tokenizer, name = serve_cli.build_engine(args)
  traces = dict(programs.TRACE_COUNTS)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  srv = uvicorn.Server(uvicorn.Config(build_app(engine, tokenizer, model_name=name), host="127.0.0.1", port=port,
                                      log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  deadline = time.time() + 60
  while not srv.started and time.time() < deadline:
    time.sleep(0.05)
  assert srv.started
  yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "tokenizer": tokenizer, "name": name, "traces": traces}
  srv.should_exit = True
  thread.join(60)
  assert not thread.is_alive() and not engine.alive   # shutdown stopped the server and the engine


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


REF_TOKENS = 20   # one `generate` program for every reference of a length bucket


def _greedy_text(server, ids, n):
  """Reference: the first n tokens `polar_jax.generate` makes on the server's model, decoded as the server does."""
  assert n <= REF_TOKENS
  engine = server["engine"]
  out = polar_jax.generate(engine.model, [ids], max_new_tokens=REF_TOKENS, stop_tokens=engine.eos_ids)
  toks = out.tokens[0, :min(n, out.lengths[0])].tolist()
  return server["tokenizer"].decode(toks, skip_special_tokens=True), toks


def _metrics(server):
  text = httpx.get(server["url"] + "/metrics").text
  return {s.name + json.dumps(s.labels, sort_keys=True): s.value
          for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sample(metrics, name, **labels):
  return sum(v for k, v in metrics.items() if k.startswith(name + "{") and
             all(json.loads(k[len(name):]).get(a) == b for a, b in labels.items()))


def _wait_idle(server, timeout=30):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if _sample(_metrics(server), "polar:num_requests_running") == 0:
      return True
    time.sleep(0.05)
  return False


PROMPT = "The capital of France is"


@pytest.mark.slow
def test_models_and_health(server, client):
  assert [m.id for m in client.models.list().data] == [server["name"]]
  r = httpx.get(server["url"] + "/health")
  assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_text_and_token_prompts_equal_generate(server, client):
  ids = server["tokenizer"].encode(PROMPT)
  text, toks = _greedy_text(server, ids, 8)
  r = client.completions.create(model=server["name"], prompt=PROMPT, max_tokens=8, temperature=0)
  assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
  r2 = client.completions.create(model=server["name"], prompt=ids, max_tokens=8, temperature=0)
  assert r2.choices[0].text == text
  batch = client.completions.create(model=server["name"], prompt=[PROMPT, "Hello"], max_tokens=8, temperature=0)
  assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == text


def test_streaming_completion_equals_plain(server, client):
  plain = client.completions.create(model=server["name"], prompt=PROMPT, max_tokens=12, temperature=0)
  chunks = list(client.completions.create(model=server["name"], prompt=PROMPT, max_tokens=12, temperature=0,
                                          stream=True, stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].usage.completion_tokens == 12


def test_raw_stream_ends_with_done(server):
  with httpx.stream("POST", server["url"] + "/v1/completions", timeout=60,
                    json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.iter_lines() if line]
  assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_plain_and_streaming(server, client):
  messages = [{"role": "user", "content": "Say hi"}]
  ids = server["tokenizer"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
  text, _ = _greedy_text(server, list(ids), 10)
  r = client.chat.completions.create(model=server["name"], messages=messages, max_tokens=10, temperature=0)
  assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
  assert r.usage.prompt_tokens == len(ids)
  chunks = list(client.chat.completions.create(model=server["name"], messages=messages, max_tokens=10,
                                               temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server, client, stream):
  ids = server["tokenizer"].encode(PROMPT)
  text, _ = _greedy_text(server, ids, 20)
  stop = text[len(text) // 2:len(text) // 2 + 3]
  expected = text[:text.find(stop)]
  kw = dict(model=server["name"], prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "\x00never"])
  if stream:
    chunks = list(client.completions.create(stream=True, **kw))
    got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
  else:
    r = client.completions.create(**kw)
    got, reason = r.choices[0].text, r.choices[0].finish_reason
  assert (got, reason) == (expected, "stop")
  assert _wait_idle(server)


def test_concurrent_requests_each_equal_alone(server, client):
  prompts = ["Once upon a time", "def main():", "1, 2, 3,", "The weather today", "Paris is"]
  alone = [client.completions.create(model=server["name"], prompt=p, max_tokens=10, temperature=0).choices[0].text
           for p in prompts]
  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:   # slots + queue: none is refused
    together = list(pool.map(lambda p: client.completions.create(model=server["name"], prompt=p, max_tokens=10,
                                                                 temperature=0).choices[0].text, prompts))
  assert together == alone


def test_seeded_sampling_is_reproducible(server, client):
  kw = dict(model=server["name"], prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=11,
            extra_body={"top_k": 50})
  a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
  assert a == b


@pytest.mark.parametrize("body, status, match", [
    ({"prompt": PROMPT, "max_tokens": MAX_LEN}, 400, "exceeds the server's max_len"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": PROMPT, "n": 2}, 400, "n=2"),
    ({"prompt": [], "max_tokens": 4}, 400, "empty"),
    ({"prompt": [10**9], "max_tokens": 4}, 400, "vocabulary"),
    ({"prompt": PROMPT, "model": "gpt-5"}, 404, "does not exist"),
])
def test_bad_requests(server, body, status, match):
  r = httpx.post(server["url"] + "/v1/completions", json=body, timeout=30)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert match in err["message"] and err["type"]


def test_bad_json_and_openai_client_errors(server, client):
  r = httpx.post(server["url"] + "/v1/completions", content=b"{not json", timeout=30,
                 headers={"content-type": "application/json"})
  assert r.status_code == 400 and "error" in r.json()
  with pytest.raises(openai.BadRequestError, match="max_len"):
    client.completions.create(model=server["name"], prompt=PROMPT, max_tokens=MAX_LEN)
  with pytest.raises(openai.BadRequestError, match="messages"):
    client.chat.completions.create(model=server["name"], messages=[], max_tokens=4)


def test_full_queue_answers_503(server):
  body = {"prompt": PROMPT, "max_tokens": MAX_LEN - 8, "temperature": 0, "ignore_eos": True}

  def post(_):
    r = httpx.post(server["url"] + "/v1/completions", json=body, timeout=120)
    return r.status_code, r.json()

  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    results = list(pool.map(post, range(12)))
  codes = [c for c, _ in results]
  assert set(codes) <= {200, 503} and 503 in codes and codes.count(200) >= MAX_BATCH + MAX_WAITING
  refused = next(b for c, b in results if c == 503)
  assert refused["error"]["code"] == "queue_full" and "queue is full" in refused["error"]["message"]
  assert _wait_idle(server)


def test_client_disconnect_mid_stream_frees_the_slot(server):
  before = _sample(_metrics(server), "polar:request_success_total", finished_reason="cancelled")
  body = {"prompt": PROMPT, "max_tokens": MAX_LEN - 8, "temperature": 0, "ignore_eos": True, "stream": True}
  with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60) as r:
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
  assert _wait_idle(server)
  deadline = time.time() + 10
  while time.time() < deadline:
    after = _sample(_metrics(server), "polar:request_success_total", finished_reason="cancelled")
    if after > before:
      break
    time.sleep(0.05)
  assert after == before + 1


def test_client_gone_before_a_plain_response_frees_the_slot(server):
  before = _sample(_metrics(server), "polar:request_success_total", finished_reason="cancelled")
  body = {"prompt": PROMPT, "max_tokens": MAX_LEN - 8, "temperature": 0, "ignore_eos": True}
  with contextlib.ExitStack() as busy:   # every slot taken: the plain request waits, then runs, well past the poll
    streams = []
    for _ in range(MAX_BATCH):
      streams.append(busy.enter_context(httpx.stream("POST", server["url"] + "/v1/completions", timeout=60,
                                                     json=dict(body, stream=True))).iter_lines())
      assert next(streams[-1]).startswith("data: ")
    try:
      httpx.post(server["url"] + "/v1/completions", json=body, timeout=0.05)   # gives up before the answer
    except httpx.TimeoutException:
      pass
    for lines in streams:   # read to the end: these finish by length, not cancelled
      assert [line for line in lines if line][-1] == "data: [DONE]"
  deadline = time.time() + 20
  while time.time() < deadline:
    after = _sample(_metrics(server), "polar:request_success_total", finished_reason="cancelled")
    if after > before:
      break
    time.sleep(0.05)
  assert after == before + 1 and _wait_idle(server)


def test_cli_sparsity_settings(ckpt):
  from polar_jax.cli.generate import build_sparsity
  args = serve_cli.parser().parse_args([str(ckpt), "--attn-density", "0.5", "--selector", "random",
                                        "--sparse-min-rows", "2"])
  sparsity, routers = build_sparsity(args)
  assert (sparsity.attn_density, sparsity.selector, routers, args.sparse_min_rows) == (0.5, "random", None, 2)
  assert build_sparsity(serve_cli.parser().parse_args([str(ckpt)])) == (None, None)


def test_metrics(server, client):
  client.completions.create(model=server["name"], prompt=PROMPT, max_tokens=5, temperature=0)
  m = _metrics(server)
  assert _sample(m, "polar:num_requests_running") == 0 and _sample(m, "polar:num_requests_waiting") == 0
  assert _sample(m, "polar:prompt_tokens_total") > 0 and _sample(m, "polar:generation_tokens_total") >= 5
  assert _sample(m, "polar:request_success_total", finished_reason="length") >= 1
  assert _sample(m, "polar:time_to_first_token_seconds_count") >= 1
  assert _sample(m, "polar:inter_token_latency_seconds_count") >= 1
  assert _sample(m, "polar:e2e_request_latency_seconds_count") >= 1
  assert _sample(m, "polar:request_queue_time_seconds_count") >= 1
  assert _sample(m, "polar:step_variant_total", variant="dense") >= 1
  assert _sample(m, "polar:attention_density") == 1.0 and _sample(m, "polar:mlp_dense_fallback_rate") == 0.0
  assert np.isclose(_sample(m, "polar:kv_slots_used_perc"), 0.0)
  assert _sample(m, "polar:kv_pages_total") == MAX_BATCH * MAX_LEN // EngineOptions().page_size   # paged by default
  assert _sample(m, "polar:kv_pages_used") == _sample(m, "polar:kv_pages_cached")   # no request holds a page
  for name in ("polar:num_preemptions_total", "polar:prefix_cache_hits_total", "polar:prefix_cache_queries_total"):
    assert any(k.startswith(name + "{") for k in m), name
  assert programs.TRACE_COUNTS == server["traces"]   # serving compiled nothing after the warm-up


class _CharTokenizer:
  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_what_may_begin_a_stop_string():
  from polar_jax.serving.text import TextStream
  ts = TextStream(_CharTokenizer(), stop=["END", "x"], hidden_ids=[0])
  assert [ts.add([ord(c)]) for c in "abEN"] == ["a", "b", "", ""]
  assert ts.add([0]) == "" and ts.add([ord("D")]) == "" and ts.stopped and ts.text == "ab"
  assert ts.add([ord("z")]) == "" and ts.finish() == ""
  ts = TextStream(_CharTokenizer(), stop=["END"])
  assert [ts.add([ord(c)]) for c in "aEb"] == ["a", "", "Eb"]
  assert ts.add([ord("E")]) == "" and ts.finish() == "E" and not ts.stopped
  ts = TextStream(_CharTokenizer())
  assert ts.add([ord("a"), 0xFFFD]) == "a" and ts.finish() == "\ufffd"
