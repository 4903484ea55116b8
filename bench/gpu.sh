#!/usr/bin/env bash
# Every GPU-only test and benchmark in one run (~8 minutes on one H100/H200), tables on stdout.
# A task lent a GPU has ~15 minutes of it in all: run this once, read the tables, put them in
# bench/RESULTS.md with the card's name. Each part has its own time limit and the script goes on
# after a failure, so one broken part costs its limit, not the rest; it ends with a summary table
# and the exit code counts failures.
#
#   bash bench/gpu.sh                 # from the repo root, on the GPU machine
#   bash bench/gpu.sh --dry-run       # any machine, CPU only (~5-8 min on 2 cores): every part on
#                                     # CPU stand-ins (tiny shapes, the same entry points, Triton
#                                     # under TRITON_INTERPRET=1, FlexAttention compiled on CPU,
#                                     # gloo instead of NCCL), so the GPU run can fail only for GPU reasons
#   bash bench/gpu.sh --only 'MoE|Qwen3.5'   # only the parts whose name matches this (grep -E) pattern
#                                            # (a rerun of what failed; combines with --dry-run)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY=${2:?--only needs a pattern}; shift ;;
        *) echo "gpu.sh: unknown argument $1 (--dry-run, --only PATTERN)"; exit 2 ;;
    esac
    shift
done
export PYTHONPATH="$PWD"
OUT="${OUT:-$(mktemp -d)}"
failures=0
SUMMARY=()

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    if [ -n "$ONLY" ] && ! grep -qE -- "$ONLY" <<<"$name"; then
        SUMMARY+=("| $name | skipped (--only) | | ${limit}s |"); return
    fi
    echo; echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"; local rc=$?
    local took=$((SECONDS - t0)) verdict=ok
    [ "$rc" -eq 0 ] || { failures=$((failures + 1)); verdict="FAILED (exit $rc)"; }
    [ "$rc" -eq 124 ] && verdict="TIMED OUT (${limit}s)"
    echo "--- $name: exit $rc in ${took}s"
    SUMMARY+=("| $name | $verdict | ${took}s | ${limit}s |")
}

if [ "$DRY" -eq 1 ]; then
    echo "gpu.sh --dry-run: CPU stand-ins for every part (no GPU used)"
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2
    DEVICE=cpu
    # The Triton, FlexAttention and fused-path tests the GPU run exists for, under the interpreter.
    # (31 tests, ~70 s of CPU time; the full files take ~4 min under the interpreter)
    TEST_ARGS=(-k "(triton and (float64_truth or softcap) and not float16) or block_mask or bucket or window_is or eager_flex or flex_mask")
    BENCH_ARGS=(--device cpu --n 256 --v 1000 --repeats 1 --impls reference,reference+inplace)
    NPROC=2                                              # two gloo ranks: FSDP2 as with 2 GPUs
    TRAIN_ARGS=(--train.device=cpu --data.max_examples=24 --data.max_test_examples=8 --sft.max_steps=2
                --train.max_steps=2 --sft.global_batch_size=4 --sft.micro_batch_size=2
                --train.global_batch_size=4 --train.micro_batch_size=2 --eval.summary=false)
    LIMITS=(300 120 240 240 150 120 150 60)
    MOE_BENCH=("--device cpu --dtype bfloat16 --experts 8 --top-k 2 --hidden 64 --intermediate 128 --tokens 256 --repeat 1")
    DELTA_ARGS=(--device cpu --lengths 64 128 --heads 1 --dim 16 --repeat 1 --recurrent-max 128)
else
    unset TRITON_INTERPRET                               # real Triton kernels, not the CPU interpreter
    export OMP_NUM_THREADS=8
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: no CUDA device (torch.cuda.is_available() is False); nothing to run" \
             "(bash bench/gpu.sh --dry-run runs every part on CPU stand-ins)"; exit 0
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    DEVICE=cuda
    TEST_ARGS=()
    BENCH_ARGS=(--device cuda --n 4096,16384 --v 32000,128256 --repeats 5)
    # World size 1 joins no process group, so NCCL is exercised only with 2+ GPUs: then FSDP2 over NCCL.
    NPROC=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
    TRAIN_ARGS=(--train.device=cuda --sft.max_steps=20 --train.max_steps=10)
    LIMITS=(150 120 150 150 60 90 120 60)      # parts 5-8 guessed at ~20, 40, 60 (FlexAttention compiles), 25 s: not yet run on a GPU
    # One sparse layer of Mixtral-8x7B and of Qwen3-30B-A3B, 8192 tokens, bf16.
    MOE_BENCH=("--device cuda --dtype bfloat16 --experts 8 --top-k 2 --hidden 4096 --intermediate 14336 --tokens 8192"
               "--device cuda --dtype bfloat16 --experts 128 --top-k 8 --hidden 2048 --intermediate 768 --tokens 8192")
    # One layer of Qwen3.5-9B's value heads (32 x 128), batch 1.
    DELTA_ARGS=(--device cuda --lengths 512 1024 2048 4096 8192 --heads 32 --dim 128 --repeat 3 --recurrent-max 2048)
fi
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 1. Kernel, attention and log-prob tests (CUDA tensors where the tests have them; the interpreter in --dry-run).
part "kernel and attention tests ($DEVICE)" "${LIMITS[0]}" python -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels.py tests/test_fused_linear.py tests/test_attention.py tests/test_logprobs.py \
    tests/test_gpu_readiness.py "${TEST_ARGS[@]}"
# 2. Per-token log-softmax gather: speed against the HBM floor, memory (bench/logprobs.py prints both).
part "token_logprobs vs the bandwidth floor ($DEVICE)" "${LIMITS[1]}" python bench/logprobs.py "${BENCH_ARGS[@]}"
# 3. FlexAttention packed rows vs padded SDPA, a float32 model under bf16 autocast on packed rows, and
#    the fused lm_head + log-prob (bench/gpu_checks.py).
part "FlexAttention, autocast dtypes, fused log-probs ($DEVICE)" "${LIMITS[2]}" python bench/gpu_checks.py \
    --device "$DEVICE"
# 4. A training run under torchrun (bf16 autocast on GPU, fused path, packing on): the tiny demo's SFT and
#    both sDPO steps, capped, with the summary; 2 ranks run FSDP2 (NCCL on GPUs, gloo in --dry-run).
part "training under torchrun, $NPROC rank(s) ($DEVICE)" "${LIMITS[3]}" python -m torch.distributed.run \
    --standalone --nproc_per_node "$NPROC" train.py "${TRAIN_ARGS[@]}" --train.output_dir="$OUT/gpu_run"
[ -f "$OUT/gpu_run/metrics.jsonl" ] && tail -n 3 "$OUT/gpu_run/metrics.jsonl"
# 5. Mixture of experts on the committed fixtures (bench/gpu_models.py moe): grouped (torch._grouped_mm) and
#    per-expert loop in bf16 against each other and float32 on the CPU, forward and backward; no host sync on
#    the grouped path (Tensor host reads, torch.cuda.set_sync_debug_mode).
part "MoE fixtures: grouped vs loop vs float32, host syncs ($DEVICE)" "${LIMITS[4]}" python bench/gpu_models.py moe \
    --device "$DEVICE"
# 6. bench/moe.py: grouped vs loop vs every expert on every token, ms and peak memory, one layer of each shape.
part "MoE layer: grouped vs loop vs dense ($DEVICE)" "${LIMITS[5]}" bash -c \
    'for a in "$@"; do python bench/moe.py $a || exit; done' moe_bench "${MOE_BENCH[@]}"
# 7. Qwen3.5 (bench/gpu_models.py qwen35): the chunked delta rule vs the float64 recurrence on the device, the
#    fixture's float32 and bf16 logits vs transformers', a packed shared-prompt DPO step vs separate rows.
part "Qwen3.5: delta rule, fixture logits, packed DPO step ($DEVICE)" "${LIMITS[6]}" python bench/gpu_models.py \
    qwen35 --device "$DEVICE"
# 8. bench/linear_attention.py: the chunked delta rule's time and peak memory per length (the recurrence to 2048).
part "gated delta rule: chunked vs recurrent by length ($DEVICE)" "${LIMITS[7]}" python bench/linear_attention.py \
    "${DELTA_ARGS[@]}"

echo; echo "| part | result | took | limit |"; echo "| --- | --- | --- | --- |"
printf '%s\n' "${SUMMARY[@]}"
echo; echo "gpu.sh$([ "$DRY" -eq 1 ] && echo ' --dry-run'): $failures part(s) failed; outputs under $OUT"
exit "$failures"
