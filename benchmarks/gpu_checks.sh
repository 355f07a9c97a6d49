#!/usr/bin/env bash
# What one device call should run after a change to the GPU paths, in one go (about 8 minutes on an H100):
# the CUDA-only tests of the newest code, the A/B of the newest opt-in kernel, and `dsv4 train` end to end,
# eager and with --cuda-graph. Everything lands in $OUT (logs and JSON), nothing is printed twice.
#
#     OUT=/some/dir bash benchmarks/gpu_checks.sh            # from the repository root, src/ on PYTHONPATH
#
# Each step has its own time limit, so one hang cannot eat the call; a failing step does not stop the next.
set -u
OUT=${OUT:?set OUT to a directory}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"

step() {    # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, output to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt" 2>&1

# 1. CUDA-only tests of the newest code (per-test limit: a hang fails that test, not the call)
step tests 200 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v --timeout 90 \
    tests/test_hc_mix_kernel.py tests/test_graphed.py \
    tests/test_train.py::test_cuda_graph_training_follows_eager_training \
    tests/test_train.py::test_balance_losses_live_only_inside_compute_loss
grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -20

# 2. the mHC mixing kernel against the PyTorch ops: fp32 check, the compiled hc_pre, tile sweep, training
step mhc_mix_ab 260 python3 benchmarks/mhc_mix_ab.py --out "$OUT" --sections check,op,sweep,train --budget-s 200
grep '^{' "$OUT/mhc_mix_ab.log" | cut -c1-240

# 3. dsv4 train end to end on the small preset (bytes tokenizer: no download), eager then --cuda-graph
for mode in eager graph; do
    flag=""; [ "$mode" = graph ] && flag="--cuda-graph"
    step "train_$mode" 100 python3 -m dsv4 train --preset small --tokenizer bytes --steps 40 --batch 8 --seq 1024 \
        --no-progress --eval-every 0 --save-every 0 --out "/tmp/dsv4_train_$mode" $flag
    cp "/tmp/dsv4_train_$mode/log.jsonl" "$OUT/train_$mode.jsonl" 2>/dev/null
    tail -n 1 "$OUT/train_$mode.jsonl" 2>/dev/null | cut -c1-240
done
