#!/usr/bin/env bash
# Everything the grouped-matmul issue measures on an H100, in one go (about
# 10 minutes): the gpu-marked kernel tests, the benchmark (dense batched einsum,
# jax.lax.ragged_dot, atoll-pallas; E 8/64, 16k-64k tokens, two shapes, equal
# and Zipf groups, fwd and fwd+bwd), one sweep of pallas tiles at the issue's
# headline shape, and the MoE layer benchmark with dropless dispatch through
# ragged_dot and through pallas.
# Usage: bash atoll/experiments/bench/gpu_grouped_matmul.sh OUTDIR
set -u
out=${1:-/tmp/grouped_matmul_gpu}; mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.}
echo "== gpu tests" >&2
timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_grouped_matmul.py > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"
echo "== grouped matmul benchmark" >&2
timeout 1200 python3 -m atoll.experiments.bench.grouped_matmul --out="$out/grouped_matmul.jsonl" \
  > "$out/grouped_matmul.stdout" 2> "$out/grouped_matmul.table"
tail -40 "$out/grouped_matmul.table"
echo "== pallas tiles (E=8, 16384 tokens, 2048x2048)" >&2
timeout 600 python3 -m atoll.experiments.bench.grouped_matmul --experts=8 --tokens=16384 --shapes=2048x2048 \
  --impls=einsum,xla,pallas,pallas:128x128x64s4n,pallas:128x128x64s4m,pallas:128x192x64s3n,pallas:64x128x64s4n,pallas:128x64x128s3n \
  --out="$out/grouped_matmul_tiles.jsonl" > "$out/grouped_matmul_tiles.stdout" 2> "$out/grouped_matmul_tiles.table"
tail -12 "$out/grouped_matmul_tiles.table"
for impl in xla pallas; do
  echo "== MoE layer, dropless through $impl" >&2
  timeout 600 python3 -m atoll.experiments.bench.moe --d_model=2048 --expert_mlp_dim=2048 --experts=8 --top_k=2 \
    --batch=8 --seq_len=8192 --dtype=bfloat16 --grouped_matmul_impl=$impl > "$out/moe_$impl.jsonl" 2> "$out/moe_$impl.log"
  tail -1 "$out/moe_$impl.jsonl"
done
