#!/usr/bin/env bash
# The end-to-end grid (batch x prompt x density per model) on one 80 GB GPU, run from the repository root on a device machine:
#
#   benchmarks/e2e_grid.sh MODEL [PART]      # MODEL: llama2-7b | llama3.1-8b | mistral-7b | opt-6.7b
#
# Batch 1, 8, 16, 32, 64 x prompts 1000, 2000 (OPT: 1900, its 2048 positions less the decode) and 4000 where the
# bf16 weights plus the cache fit in ~78 GB (the MHA models' KV is 0.5 MB a token: B x prompt <= ~64k tokens), x
# attention densities 1, 0.625, 0.5, 0.25 (OPT: each with the dense MLP and the MLP union). PART picks one prompt
# length (1000, 2000, 4000; default all), so that a model's grid can be split over calls of 10 minutes. Records
# go to $OUT/e2e.jsonl as measured (a cut-off call keeps its rows); OPT's neuron budgets are read from
# $MLP_TOPK_DIR (default .carry/mlp_topk: shared/reference-data/mlp_topk/opt-6.7b's bsize_*.csv copied there).
# One timed prefill per setting (PREFILL_ITERS, default 1: a B64 x 4000 prefill takes seconds).
set -o pipefail
export PYTHONUNBUFFERED=1
model=${1:?usage: benchmarks/e2e_grid.sh MODEL [PROMPT]}
part=${2:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

case "$model" in
  llama2-7b) grid="1000:1,8,16,32,64 2000:1,8,16,32 4000:1,8,16" ;;
  opt-6.7b) grid="1000:1,8,16,32,64 1900:1,8,16,32" ;;
  llama3.1-8b | mistral-7b) grid="1000:1,8,16,32,64 2000:1,8,16,32,64 4000:1,8,16,32,64" ;;
  *) echo "e2e_grid.sh: unknown model '$model' (llama2-7b, llama3.1-8b, mistral-7b, opt-6.7b)" >&2; exit 2 ;;
esac
mlp=(--mlp dense)
[ "$model" = opt-6.7b ] && mlp=(--mlp dense router --mlp-topk-dir "${MLP_TOPK_DIR:-.carry/mlp_topk}")

status=0
for entry in $grid; do
  prompt=${entry%%:*}
  [ "$part" = all ] || [ "$part" = "$prompt" ] || { [ "$part" = 2000 ] && [ "$prompt" = 1900 ]; } || continue
  batches=${entry#*:}
  python benchmarks/e2e.py --models "$model" --prompts "$prompt" --batch ${batches//,/ } \
    --densities 1 0.625 0.5 0.25 "${mlp[@]}" --prefill-iters "${PREFILL_ITERS:-1}" \
    --out "$OUT/e2e.jsonl" 2>&1 | grep --line-buffered -v Warning \
    | while IFS= read -r line; do echo "$(date +%T) $line"; done | tee -a "$OUT/grid_$model.log" || status=1
done
exit $status
