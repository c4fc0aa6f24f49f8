#!/usr/bin/env bash
# Everything the flash-attention issue measures on an H100, in one go (about
# 10 minutes): the gpu-marked kernel tests, the attention benchmark (xla, cudnn,
# atoll-pallas; one tuning sweep of pallas block sizes at D=128), and the LM
# train step of gpu_350m with each attention backend (MFU in the JSON rows).
# Usage: bash atoll/experiments/bench/gpu_attention.sh OUTDIR
set -u
out=${1:-/tmp/attention_gpu}; mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.}
echo "== gpu tests" >&2
timeout 300 python3 -m pytest -q -m gpu tests/kernels > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"
echo "== attention benchmark" >&2
timeout 900 python3 -m atoll.experiments.bench.attention --out="$out/attention.jsonl" \
  > "$out/attention.stdout" 2> "$out/attention.table"
tail -40 "$out/attention.table"
echo "== pallas block sizes (D=128, S=8192)" >&2
timeout 600 python3 -m atoll.experiments.bench.attention --impls=cudnn,pallas --head_dims=128 --seq_lens=8192 \
  --pallas_block_sizes='[{"block_q":64,"block_kv":128},{"block_q":64,"block_kv":64},{"block_q":64,"block_kv":128,"stages":3},{"block_q":64,"block_kv":128,"schedule_barrier":false},{"block_q_bwd":64,"block_kv_bwd":128},{"block_q_bwd":128,"block_kv_bwd":64,"compute_wgs":1}]' \
  --out="$out/attention_tuning.jsonl" > "$out/attention_tuning.stdout" 2> "$out/attention_tuning.table"
tail -20 "$out/attention_tuning.table"
for impl in cudnn pallas; do
  echo "== gpu_350m train step, attention_impl=$impl" >&2
  timeout 300 python3 -m atoll.experiments.bench.lm_step --config=atoll/configs/lm.py:gpu_350m --steps=15 \
    --impl=atoll --label="gpu_350m_$impl" --config.model.attention_impl=$impl > "$out/lm_$impl.log" 2>&1
  grep '^{' "$out/lm_$impl.log" | tee -a "$out/lm_step.jsonl" || tail -5 "$out/lm_$impl.log"
done
