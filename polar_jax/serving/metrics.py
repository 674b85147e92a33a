"""The engine's Prometheus metrics (one `CollectorRegistry` per engine), named after vLLM's with a `polar:` prefix.

Gauges: `polar:num_requests_running`, `polar:num_requests_waiting`, `polar:kv_slots_used` (and `..._perc`),
`polar:attention_density` (fraction of KV groups the decode steps read, over every row-step so far; with adaptive
budgets the sparse rounds count the realised density the latest selection probe measured),
`polar:mlp_dense_fallback_rate` (fraction of MLP layers the sparse step runs dense; 0 without MLP routers),
`polar:kv_group_selection_rate{layer,group}` (fraction of probed rows whose sparse step selects the group; sampled
every `EngineOptions.selection_probe_every` sparse rounds), and with a paged cache `polar:kv_pages_used` (pages
held by requests or the prefix cache), `polar:kv_pages_total`, `polar:kv_pages_cached` (pages in the prefix cache).
Counters: `polar:prompt_tokens`, `polar:generation_tokens`, `polar:request_success{finished_reason}`,
`polar:step_variant{variant}` (decode rounds per step variant), `polar:decode_steps{variant}`,
`polar:kv_group_probed_rows` (rows the selection probe counted), `polar:prefix_cache_queries` and
`polar:prefix_cache_hits` (prompt tokens looked up in the prefix cache and found there), `polar:num_preemptions`
(running requests sent back to the queue for lack of pages).
Histograms: `polar:time_to_first_token_seconds`, `polar:inter_token_latency_seconds`,
`polar:e2e_request_latency_seconds`, `polar:request_queue_time_seconds`, `polar:request_prompt_tokens`,
`polar:request_generation_tokens`, `polar:decode_round_rows` (requests decoded together in a round).
(prometheus_client appends `_total` to counter names in the exposition.)
"""

from __future__ import annotations

import threading

import numpy as np

try:
  from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError as e:   # pragma: no cover - depends on the install
  raise ImportError("polar_jax.serving needs prometheus_client: pip install 'polar_jax[serve]'") from e

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                960.0, 1920.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def _rows_buckets(max_batch: int) -> tuple[int, ...]:
  """Powers of two up to max_batch, and max_batch itself."""
  return tuple(sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}))


class EngineMetrics:
  """Metrics of one engine; `model_name` labels every series. `text()` is the Prometheus exposition."""

  def __init__(self, model_name: str, max_batch: int):
    self.registry = CollectorRegistry()
    self.max_batch = max_batch
    labels = ["model_name"]
    r = self.registry

    def gauge(name, doc):
      return Gauge(f"polar:{name}", doc, labels, registry=r).labels(model_name)

    def counter(name, doc):
      return Counter(f"polar:{name}", doc, labels, registry=r).labels(model_name)

    def hist(name, doc, buckets):
      return Histogram(f"polar:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

    self.running = gauge("num_requests_running", "Requests holding a KV slot.")
    self.waiting = gauge("num_requests_waiting", "Requests waiting for a KV slot.")
    self.slots_used = gauge("kv_slots_used", "KV cache slots in use.")
    self.slots_perc = gauge("kv_slots_used_perc", "Fraction of the KV cache slots in use (1 = all).")
    self.density = gauge("attention_density", "Fraction of KV groups read by the decode steps (row-step average).")
    self.mlp_fallback = gauge("mlp_dense_fallback_rate",
                              "Fraction of MLP layers the sparse step runs dense (0 without MLP routers).")
    self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
    self.generation_tokens = counter("generation_tokens", "Tokens generated.")
    self._success = Counter("polar:request_success", "Finished requests by finish reason.",
                            labels + ["finished_reason"], registry=r)
    self._variant = Counter("polar:step_variant", "Decode rounds run, by step variant.", labels + ["variant"],
                            registry=r)
    self._steps = Counter("polar:decode_steps", "Decode steps run, by step variant.", labels + ["variant"],
                          registry=r)
    self._bucket_steps = Counter("polar:decode_bucket_steps", "Decode steps run, by row bucket (rows stepped).",
                                 labels + ["rows"], registry=r)
    self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
    self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a request.", _ITL_BUCKETS)
    self.e2e = hist("e2e_request_latency_seconds", "Request latency, arrival to last token.", _E2E_BUCKETS)
    self.queue = hist("request_queue_time_seconds", "Time from arrival to a KV slot.", _TTFT_BUCKETS)
    self.req_prompt = hist("request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
    self.req_gen = hist("request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS)
    self._group_rate = Gauge("polar:kv_group_selection_rate",
                             "Fraction of probed rows whose sparse decode step selects this KV group of this layer.",
                             labels + ["layer", "group"], registry=r)
    self.probed_rows = counter("kv_group_probed_rows", "Active rows counted by the KV-group selection probe.")
    self.pages_used = gauge("kv_pages_used", "KV cache pages held by requests or the prefix cache.")
    self.pages_total = gauge("kv_pages_total", "KV cache pages (0: contiguous cache).")
    self.pages_cached = gauge("kv_pages_cached", "KV cache pages listed in the prefix cache.")
    self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
    self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled).")
    self.preemptions = counter("num_preemptions", "Running requests preempted (requeued) for lack of KV pages.")
    self.round_rows = hist("decode_round_rows", "Requests decoded together in a decode round.",
                           _rows_buckets(max_batch))
    self._group_hits = None   # int64 [L, G], summed over probes
    self._probed = 0
    self._model = model_name
    self._lock = threading.Lock()
    self._row_steps = 0.0
    self._groups_read = 0.0
    self._decode_steps = 0
    self._peak_rows = 0
    self.density.set(1.0)

  def finished(self, reason: str) -> None:
    self._success.labels(self._model, reason).inc()

  def round(self, variant: str, steps: int, active_rows: int, density: float, bucket: int) -> None:
    """A decode round of `steps` steps over `active_rows` rows (in the row bucket `bucket`) with the variant's
    attention density."""
    self._variant.labels(self._model, variant).inc()
    if steps:
      self._steps.labels(self._model, variant).inc(steps)
      self._bucket_steps.labels(self._model, str(bucket)).inc(steps)
      self.round_rows.observe(active_rows)
    with self._lock:
      self._decode_steps += steps
      self._peak_rows = max(self._peak_rows, active_rows if steps else 0)
      self._row_steps += steps * active_rows
      self._groups_read += steps * active_rows * density
      if self._row_steps:
        self.density.set(self._groups_read / self._row_steps)

  def decode_rows(self) -> tuple[float, int]:
    """Requests per decode step: the mean over the steps run so far and the most in one round (0, 0 before any)."""
    with self._lock:
      return (self._row_steps / self._decode_steps if self._decode_steps else 0.0), self._peak_rows

  def selections(self, counts_lg: np.ndarray, rows: int) -> None:
    """One selection probe: `counts_lg[l, g]` of its `rows` active rows selected group g of layer l."""
    if rows < 1:
      return
    with self._lock:
      counts = np.asarray(counts_lg, np.int64)
      self._group_hits = counts if self._group_hits is None else self._group_hits + counts
      self._probed += rows
      rates = self._group_hits / self._probed
    self.probed_rows.inc(rows)
    for (layer, group), rate in np.ndenumerate(rates):
      self._group_rate.labels(self._model, str(layer), str(group)).set(float(rate))

  def slots(self, used: int, waiting: int) -> None:
    self.running.set(used)
    self.slots_used.set(used)
    self.slots_perc.set(used / self.max_batch)
    self.waiting.set(waiting)

  def pages(self, used: int, total: int, cached: int) -> None:
    self.pages_used.set(used)
    self.pages_total.set(total)
    self.pages_cached.set(cached)

  def text(self) -> bytes:
    return generate_latest(self.registry)
