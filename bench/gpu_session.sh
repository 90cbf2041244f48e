#!/usr/bin/env bash
# The GPU measurements in one call, sized for a 15-minute device budget (about 7 minutes of runs):
# the fast paths against the float64 CPU reference with stage 1 (fp32 / bf16) next to the plain
# forward+backward, the precision policy on a spiked spectrum (every route, bf16/tf32 matmuls on and off;
# stages 2 and 3 run through the real drivers on the device), then stage 2 and the query at f=16 c=1 r=2048 and f=4 c=1 r=4096 on GPT-2-small
# shapes at the paper's N = 232,585 (or the largest N that fits, scaled), for the curvature-term
# routes that fit. Needs torch, transformers, numpy, pyarrow, safetensors only.
#
#   device run:  bash bench/gpu_session.sh          (tables and JSON land in $OUT)
#   CPU smoke:   EXTRA="--small --device cpu" OUT=/tmp/gpu_session PATH=.venv/bin:$PATH bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 GPU_SPEED_TMP=${GPU_SPEED_TMP:-/tmp}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)") \
    > "$OUT/device.txt" 2>&1
run() {  # name, time limit (s), gpu_speed.py arguments
    local name=$1 limit=$2; shift 2
    echo "== $name: bench/gpu_speed.py $*" | tee -a "$OUT/session.log"
    timeout "$limit" python bench/gpu_speed.py "$@" ${EXTRA:-} --json "$OUT/$name.json" > "$OUT/$name.md" 2>&1
    echo "exit $? after ${SECONDS}s" | tee -a "$OUT/session.log"
    grep -v "^\[transformers\]" "$OUT/$name.md"
}
run check 150 --check --n 20000 --skip stage2,query
run precision 90 --precision --small --skip stage1,stage2,query
run f16_query 90 --f 16 --r 2048 --stage2-bf16 --skip stage1 --route query --chunk 8192
run f16_stored 60 --f 16 --r 2048 --skip stage1,stage2 --route stored
run f4_query 150 --f 4 --r 4096 --stage2-bf16 --skip stage1 --route query --chunk 2048
run f4_stored 90 --f 4 --r 4096 --skip stage1,stage2 --route stored
