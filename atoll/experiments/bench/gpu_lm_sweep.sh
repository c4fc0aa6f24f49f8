#!/usr/bin/env bash
# The GPU measurements behind docs/BENCHMARKS.md (LM train step): atoll's
# step next to the plain-Flax baseline, for gpu_350m and for the H100
# baseline's own 470M shape, plus variants. Usage: bash gpu_lm_sweep.sh OUTDIR
set -u
out=${1:-/tmp/lm_sweep}; mkdir -p "$out"
bench() {  # label, per-variant timeout, then lm_step arguments
  local label=$1 limit=$2; shift 2
  echo "== $label" >&2
  timeout "$limit" python3 -m atoll.experiments.bench.lm_step --label="$label" "$@" \
    > "$out/$label.log" 2>&1
  grep '^{' "$out/$label.log" | tee -a "$out/lm_step.jsonl" || tail -5 "$out/$label.log"
}
C=atoll/configs/lm.py
BASE470="--config.model.num_heads=16 --config.model.num_kv_heads=16 --config.model.head_dim=64 \
 --config.model.mlp_dim=4096 --config.model.vocab_size=32768 --config.model.tie_embeddings=False"
bench gpu_350m 300 --config=$C:gpu_350m --steps=15
bench gpu_350m_noclip 150 --config=$C:gpu_350m --steps=15 --impl=atoll --config.train.grad_clip=0
bench gpu_350m_b24 150 --config=$C:gpu_350m --steps=15 --impl=atoll --config.train.batch_size=24
bench h100_baseline_470m 300 --config=$C:gpu_350m --steps=15 $BASE470
