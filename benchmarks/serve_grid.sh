#!/usr/bin/env bash
# The serving measurements on one 80 GB GPU (LLaMA-2-7B shape, random bf16 weights), run from the repository root
# on a device machine, one PART per call of 10 minutes:
#
#   benchmarks/serve_grid.sh PART      # PART: saturation | static | overhead | chunks | capacity | prefix | poisson
#                                      #       | kv8 | hf
#
#   saturation  1000 requests at once (REQUESTS), max_batch 32: the engine dense and at density 0.5
#   static      the same requests through static `generate` batches of 32
#   overhead    the engine's decode steps at full occupancy (32 rows, prompts of 2000) against e2e.py's decode loop
#   chunks      the same at 1, 2, 4 and 8 prompt chunks per round (--prefill-chunks-per-round), dense and 0.5
#   capacity    256 requests, max_len 4096: the paged engine (max_batch 96, 0.85 of the free memory as pages)
#               against the contiguous one (max_batch 24: what contiguous rows of 4096 fit), dense and 0.5, four
#               prompt chunks per round (one chunk of 512 tokens a round cannot refill 64 rows as they finish)
#   prefix      128 requests sharing a 1024-token prefix at 8 requests/s, prefix caching on and off
#   poisson     128 requests at 2 requests/s, dense and 0.5 (latencies below saturation)
#   kv8         the capacity run's paged engine with an 8-bit cache in the same memory (KV8: the dtypes, default
#               "int8 float8_e4m3fn")
#   hf          Hugging Face's continuous batching on the same 128 requests (default and tuned settings)
#
# Records are appended to $OUT/serve.jsonl as they are made (a cut-off call keeps its rows); copy them into
# benchmarks/results/serve.jsonl and plot with benchmarks/serve_plot.py. Each run stops itself before the call's
# limit (LIMIT_S, default 560 s for the whole part).
set -o pipefail
export PYTHONUNBUFFERED=1
part=${1:?usage: benchmarks/serve_grid.sh saturation|static|overhead|chunks|capacity|prefix|poisson|kv8|hf}
OUT=${OUT:-/tmp/out}
LIMIT_S=${LIMIT_S:-560}
mkdir -p "$OUT"
serve() { timeout $((LIMIT_S - SECONDS > 10 ? LIMIT_S - SECONDS : 10)) python benchmarks/serve.py --model llama2-7b \
  --out "$OUT/serve.jsonl" "$@"; }

case "$part" in
  saturation) serve --requests "${REQUESTS:-1000}" --max-batch 32 --density 1 0.5 --no-static ;;
  static) serve --requests "${REQUESTS:-1000}" --max-batch 32 --no-engine ;;
  overhead) timeout $((LIMIT_S - SECONDS)) python benchmarks/serve_overhead.py --model llama2-7b --batch 32 \
              --prompt 2000 --new 256 --density 1 0.5 --out "$OUT/serve_overhead.jsonl" ;;
  chunks) for n in 1 2 4 8; do serve --requests 128 --max-batch 32 --density 1 0.5 --no-static \
            --prefill-chunks-per-round "$n"; done ;;
  capacity) serve --requests 256 --max-batch 96 --max-len 4096 --kv-memory-fraction 0.85 --density 1 0.5 --no-static \
              --prefill-chunks-per-round 4
            serve --requests 256 --max-batch 24 --max-len 4096 --kv-layout contiguous --density 1 0.5 --no-static \
              --prefill-chunks-per-round 4 ;;
  prefix) serve --requests 128 --max-batch 64 --shared-prefix 1024 --rate 8 --no-static
          serve --requests 128 --max-batch 64 --shared-prefix 1024 --rate 8 --no-static --no-prefix-caching ;;
  poisson) serve --requests 128 --max-batch 32 --rate 2 --density 1 0.5 --no-static ;;
  kv8) for kv in ${KV8:-int8 float8_e4m3fn}; do serve --requests 256 --max-batch 192 --max-len 4096 \
         --kv-memory-fraction 0.85 --density 1 0.5 --no-static --prefill-chunks-per-round 4 --kv-dtype "$kv"; done ;;
  hf) timeout $((LIMIT_S - SECONDS)) python benchmarks/serve_hf.py --requests 128 --settings default tuned \
        --out "$OUT/serve.jsonl" ;;
  *) echo "serve_grid.sh: unknown part '$part'" >&2; exit 2 ;;
esac
