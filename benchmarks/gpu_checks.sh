#!/usr/bin/env bash
# What the next device calls should run after a change to the GPU paths, in parts that each fit one call:
#   tests    the CUDA-only tests of the newest code (a fresh machine compiles first)       (~3-4 min)
#   indexer  the indexer loss's cost in `dsv4 train`'s step, eager, and in the CUDA-graph rows of
#            bench_gpu.py --sections recipe (with and without the loss)                    (~4 min)
#   train    `dsv4 train` end to end on the small preset, eager and with --cuda-graph     (~3 min)
#            (TRAIN_MODES="eager graph compile compile-graph" picks; the compile modes ~4 min each)
#   mhc      the A/B of the opt-in mHC mixing kernel (benchmarks/mhc_mix_ab.py; run 2026-11-23: stays off)
#   pre      the fused mHC kernels (hc_pre_kernel, hc_expand_kernel; on by default under autograd since stop 24):
#            their CUDA tests, then mhc_mix_ab.py --switch pre,expand: fp32 model check, compiled hc_pre and
#            hc_expand off/on, tile sweeps                                                    (~5 min)
#   pretrain the same switches on the README's headline row: compiled blocks + CUDA graph with none and both,
#            b1 and b2, one process (mhc_mix_ab.py --switch pre,expand --sections train_graph --no-each; stop 23
#            got b1 86.6K -> 90.5K tok/s on an H200, stop 24 b2 100.5K -> 106.1K)             (~6 min, alone)
#            (PRETRAIN_BATCHES="2": the b2 row alone, ~3.5 min)
#   (train)  TRAIN_FUSION="pre_kernel=0,expand_kernel=0" runs `dsv4 train` with those switches (--fusion)
#   ops      which source lines issue the step's dtype copies, cats and multiplies (op_sources.py)   (~1 min)
#   compile  compiled blocks (`dsv4 train --compile`) with the Triton attention forward: gradients against
#            eager by name, tok/s, and replayed from a CUDA graph at b1 and b2 (bench_gpu.py --sections
#            compile,graph; the b2 graph row failed before 87a66b8 and is the one to look at)       (~6 min)
#   fp32     compile_check.py: fp32 compiled vs eager gradients (valid again since the attention fix of
#            8511449: the fp32 eager model had no attention gradients), bf16 compiled vs eager     (~4 min)
#   optin    A/Bs run once on the H100 (2026-11-23, results/2026-11-23_h100_stop17/call1_tests_optin): the head
#            loss's cross-entropy kernel against PyTorch ops (step_parts_ab.py --sections head_loss; won, now the
#            default), TF32 for the fp32 GEMMs (--sections tf32; within noise, not adopted), the Triton backward
#            per layer kind and training tok/s (fused_attention_ab.py --sections bwd,train; the entries' dK per
#            key block lost 9x on CSA layers and was removed; the window's dKV per key block vs atomic adds
#            remains)                                                                       (~7 min)
#   attn     the sparse-attention, head-loss and fp32-GEMM tests on CUDA, then the Triton backward per layer
#            kind and training tok/s with the CSA picks' dK by GEMMs vs atomic adds (fused_attention_ab.py
#            --sections bwd,train)                                                          (~6 min)
#   kernels  the attention kernels' token blocks and the mHC pre kernel's split / warps / stages (stop 27): the
#            sparse-attention and pre-kernel tests on CUDA, then the forward's and backward's tile sweeps per
#            layer kind (fused_attention_ab.py --sections tiles --tile-kernels fwd,bwd) and the pre kernels' sweep
#            (mhc_mix_ab.py --switch pre --sections sweep)                                     (~6 min)
#   host     the compiled b1 step without a graph (host-bound, ~0.09 s of host CPU per step in stop 27, not
#            Python's collector): host_slowdown_diag.py in a fresh process with --cprofile, which host work it is
#            (~4 min cold)
#   outstep  stop 28's rewrites (the attention's output step by grouped_output.py, pick_dcomp's Triton scatter,
#            the head loss's g·dW kernel): their CUDA tests, then output_step_ab.py: each op against the form
#            it replaced, and the headline row (compiled + graph, b2) with all three on, then off    (~8 min cold)
#   attnop   the attention's training call as a custom op (sparse_attention.AsOp, opt-in since stop 28: no graph
#            break per block): its CUDA tests, then output_step_ab.py --sections attnop (compiled + graph and
#            compiled without a graph, b2, off / on); if it wins, make AsOp.enabled the default   (~8 min cold)
#   profile  the README's headline step (compiled + CUDA graph, b2x4096, LM loss, no MTP) under torch.profiler
#            (profile_step.py --no-mtp), grouped by kind of kernel (profile_summary.py)           (~4 min cold)
#   switch   benchmarks/switch_ab.py: eager checks of each variant against the baseline, then the headline row per
#            variant with its compiled blocks held against the eager step first (default variants: stop 30's
#            old forms — HCA dk by atomic adds, 16-entry HCA steps — and 2-stage forward walks; SWITCH_VARIANTS
#            overrides them)
#            (~6 min cold)
#   table    the README speed table: dsv4 and transformers side by side (bench_side_by_side.py; needs the
#            transformers wheel: carry .whl, and first `python3 -m pip install -q --no-index --no-deps
#            --no-compile --target /tmp/site .whl/*.whl`, then PYTHONPATH=/tmp/site)             (~7 min, alone)
# Everything lands in $OUT (logs and JSON).
#
#     OUT=/some/dir bash benchmarks/gpu_checks.sh                       # parts tests indexer train (< 10 min)
#     OUT=/some/dir PARTS="compile" bash benchmarks/gpu_checks.sh       # a second call (< 7 min)
#     OUT=/some/dir PARTS="fp32" bash benchmarks/gpu_checks.sh          # a third (< 5 min)
#
# Each step has its own time limit, so one hang cannot eat the call; a failing step does not stop the next.
set -u
OUT=${OUT:?set OUT to a directory}
PARTS=${PARTS:-tests indexer train}
want() { [[ " $PARTS " == *" $1 "* ]]; }
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
want tests && step tests 300 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v --timeout 150 \
    tests/test_hc_mix_kernel.py tests/test_graphed.py tests/test_indexer_loss.py tests/test_head_loss.py \
    tests/test_fp32_linear.py tests/test_fast_paths.py::test_fused_mhc_alternating_lengths_and_grad_modes_equals_eager \
    "tests/test_sparse_attention.py::test_triton_backward_equals_reference" \
    tests/test_sparse_attention.py::test_without_the_triton_backward_gradients_still_flow \
    tests/test_train.py::test_cuda_graph_training_follows_eager_training \
    tests/test_train.py::test_balance_losses_live_only_inside_compute_loss
want tests && grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -20

# 2. what the CSA indexers' KL loss costs: eager step with / without it, then the recipe rows (incl. CUDA graph)
want indexer && step indexer_cost 100 python3 benchmarks/indexer_loss_cost.py --out "$OUT"
want indexer && grep '^{' "$OUT/indexer_cost.log" | cut -c1-240
want indexer && step recipe 170 python3 benchmarks/bench_gpu.py --out "$OUT" --sections recipe --budget-s 130
want indexer && grep '^{' "$OUT/recipe.log" | cut -c1-240

# 2b. the mHC mixing kernel against the PyTorch ops: fp32 check, the compiled hc_pre, tile sweep, training
want mhc && step mhc_mix_ab 240 python3 benchmarks/mhc_mix_ab.py --out "$OUT" --sections check,op,sweep,train --budget-s 170
want mhc && grep '^{' "$OUT/mhc_mix_ab.log" | cut -c1-240

# 2c. the fused mHC pre and expand steps: CUDA tests, then the A/B against the compiled PyTorch ops
want pre && step tests_pre 200 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v --timeout 150 \
    tests/test_hc_pre_kernel.py tests/test_hc_expand_kernel.py tests/test_sinkhorn_kernel.py
want pre && grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests_pre.log" | tail -24
want pre && step pre_ab 240 python3 benchmarks/mhc_mix_ab.py --out "$OUT" --switch pre,expand \
    --sections check,op,sweep --budget-s 200
want pre && grep '^{' "$OUT/pre_ab.log" | cut -c1-240
want pretrain && step pre_train 560 python3 benchmarks/mhc_mix_ab.py --out "$OUT/pretrain" --switch pre,expand \
    --sections train_graph --no-each --budget-s 540 --batches "${PRETRAIN_BATCHES:-1,2}"
want pretrain && grep '^{' "$OUT/pre_train.log" | cut -c1-240

# 3. dsv4 train end to end on the small preset (bytes tokenizer: no download), eager then --cuda-graph
want train && for mode in ${TRAIN_MODES:-eager graph}; do      # eager graph compile compile-graph
    case $mode in eager) flag="";; graph) flag="--cuda-graph";; compile) flag="--compile";;
                  compile-graph) flag="--compile --cuda-graph";; esac
    limit=90; [[ $mode == compile* ]] && limit=220                  # the blocks compile first (~1-2 min)
    step "train_$mode" $limit python3 -m dsv4 train --preset small --tokenizer bytes --steps 40 --batch 8 --seq 1024 \
        --no-progress --eval-every 0 --save-every 0 --out "/tmp/dsv4_train_$mode" $flag --fusion "${TRAIN_FUSION:-}"
    cp "/tmp/dsv4_train_$mode/log.jsonl" "$OUT/train_$mode.jsonl" 2>/dev/null
    tail -n 1 "$OUT/train_$mode.jsonl" 2>/dev/null | cut -c1-240
done

# 4. where the small ops of a step come from (the profile's 1,057 copies at b2x4096 had no source lines)
want ops && step op_sources 120 python3 benchmarks/op_sources.py --out "$OUT" --batch 1 --seq 4096 --ops copy,cat,mul
want ops && head -45 "$OUT/op_sources.txt"

# 5. compiled blocks with the Triton forward (not yet run on a GPU since it became the default)
want compile && step compile 400 python3 benchmarks/bench_gpu.py --out "$OUT" --sections compile,graph --budget-s 360
want compile && grep '^{' "$OUT/compile.log" | cut -c1-240

# 5a. the A/Bs: the cross-entropy kernel, TF32, the attention backward's dKV forms
want optin && step head_loss 90 python3 benchmarks/step_parts_ab.py --out "$OUT" --sections head_loss
want optin && grep '^{' "$OUT/head_loss.log" | cut -c1-240
want optin && step tf32 100 python3 benchmarks/step_parts_ab.py --out "$OUT/tf32" --sections tf32
want optin && grep '^{' "$OUT/tf32.log" | cut -c1-240
want optin && step attn_bwd 260 python3 benchmarks/fused_attention_ab.py --out "$OUT" --sections bwd,train \
    --bwd-heads 16 64 --budget-s 220
want optin && grep '^{' "$OUT/attn_bwd.log" | cut -c1-240

# 5c. the CSA picks' dK by GEMMs (sparse_attention_bwd.pick_dcomp) and the head loss's dW by one GEMM in place
want attn && step tests_attn 240 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v --timeout 150 \
    tests/test_sparse_attention.py tests/test_head_loss.py tests/test_fp32_linear.py
want attn && grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests_attn.log" | tail -40
want attn && step attn_bwd 230 python3 benchmarks/fused_attention_ab.py --out "$OUT" --sections bwd,train \
    --bwd-heads 16 64 --budget-s 200
want attn && grep '^{' "$OUT/attn_bwd.log" | cut -c1-240
want kernels && step tests_kernels 200 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v \
    --timeout 150 tests/test_sparse_attention.py tests/test_hc_pre_kernel.py
want kernels && grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests_kernels.log" | tail -40
want kernels && step fwd_tiles 240 python3 benchmarks/fused_attention_ab.py --out "$OUT/fwd_tiles" --sections tiles \
    --tile-kernels ${TILE_KERNELS:-fwd,bwd}
want kernels && grep '^{' "$OUT/fwd_tiles.log" | cut -c1-200
want kernels && step pre_sweep 150 python3 benchmarks/mhc_mix_ab.py --out "$OUT/pre_sweep" --switch pre --sections sweep
want kernels && grep '^{' "$OUT/pre_sweep.log" | cut -c1-200
want host && step host 300 python3 benchmarks/host_slowdown_diag.py --out "$OUT/host" --variants fresh --batches 1 \
    --cprofile --timeout 280
want host && cut -c1-200 "$OUT/host.log"; head -60 "$OUT/host/fresh_b1_cprofile.txt" 2>/dev/null
want outstep && step tests_outstep 170 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v \
    --timeout 120 tests/test_grouped_output.py tests/test_head_loss.py tests/test_graphed.py \
    "tests/test_sparse_attention.py::test_pick_dcomp_sums_each_picks_contribution" \
    "tests/test_sparse_attention.py::test_triton_forward_and_backward_give_reference_gradients"
want outstep && grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests_outstep.log" | tail -30
want outstep && step outstep_ab ${OUTSTEP_LIMIT:-400} python3 benchmarks/output_step_ab.py --out "$OUT/outstep" \
    --budget-s 300
want outstep && grep '^{' "$OUT/outstep_ab.log" | cut -c1-240
want attnop && step tests_attnop 200 python3 -m pytest -p no:cacheprovider -o addopts= -rfs --tb=short -v \
    --timeout 150 "tests/test_sparse_attention.py::test_attention_op_compiles_into_one_graph" \
    "tests/test_sparse_attention.py::test_triton_forward_and_backward_give_reference_gradients"
want attnop && grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests_attnop.log" | tail -10
want attnop && step attnop_ab 380 python3 benchmarks/output_step_ab.py --out "$OUT/attnop" --sections attnop \
    --budget-s 330
want attnop && grep '^{' "$OUT/attnop_ab.log" | cut -c1-240
want switch && step switch_ab 560 python3 benchmarks/switch_ab.py --out "$OUT/switch" --budget-s 430 \
    ${SWITCH_VARIANTS:+--variants "$SWITCH_VARIANTS"}
want switch && grep '^{' "$OUT/switch_ab.log" | cut -c1-240
want profile && step profile 330 python3 benchmarks/profile_step.py --out "$OUT" --what train_compiled_graph --batch 2 \
    --no-mtp
want profile && python3 benchmarks/profile_summary.py "$OUT/profile_train_compiled_graph_trace.json.gz" \
    > "$OUT/profile_kinds.md" && cat "$OUT/profile_kinds.md"

# 5b. fp32 and bf16 compiled blocks against eager, gradients per parameter
want fp32 && step compile_check 280 python3 benchmarks/compile_check.py --seq 2048 --out "$OUT"
want fp32 && head -c 2500 "$OUT/compile_check.json"

# 6. the README table from one run (dsv4 then transformers, each in its own process), and its markdown
want table && step side_by_side 540 python3 benchmarks/bench_side_by_side.py run --out "$OUT" \
    --sections check,train,graph,recipe,decode,prefill --max-context 1048576 --dsv4-timeout 440 --hf-timeout 80
want table && python3 benchmarks/bench_side_by_side.py table --dsv4 "$OUT/dsv4_gpu.json" --hf "$OUT/hf.jsonl" \
    --out "$OUT" > "$OUT/table.log" 2>&1; cat "$OUT/side_by_side.md" 2>/dev/null | head -40
