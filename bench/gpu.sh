#!/usr/bin/env bash
# Every GPU-only test and benchmark in one run (~8 minutes on one H100/H200), tables on stdout.
# A task lent a GPU has ~15 minutes of it in all: run this once, read the tables, put them in
# bench/RESULTS.md with the card's name. Each part has its own time limit and the script goes on
# after a failure, so one broken part costs its limit, not the rest; the exit code counts failures.
#
#   bash bench/gpu.sh                 # from the repo root, on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" OMP_NUM_THREADS=8
unset TRITON_INTERPRET                # real Triton kernels, not the CPU interpreter
OUT="${OUT:-$(mktemp -d)}"
failures=0

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"; local rc=$?
    echo "--- $name: exit $rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device (torch.cuda.is_available() is False); nothing to run"; exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 1. Kernel and model tests on the GPU, without the interpreter (CUDA tensors where the tests have them).
part "kernel tests (compiled Triton)" 150 python -m pytest -q -x tests/test_kernels.py tests/test_fused_linear.py \
    tests/test_attention.py tests/test_logprobs.py -p no:cacheprovider
# 2. Per-token log-softmax gather: speed against the HBM floor, memory (bench/logprobs.py prints both).
part "token_logprobs vs the bandwidth floor" 120 python bench/logprobs.py --device cuda --n 4096,16384 \
    --v 32000,128256 --repeats 5
# 3. FlexAttention packed rows vs padded SDPA, and the fused lm_head + log-prob on CUDA.
part "FlexAttention masks and fused log-probs" 150 python bench/gpu_checks.py --rows 8192
# 4. A training run on one GPU under torchrun (bf16 autocast, fused path, packing on): the tiny demo's
#    SFT and both sDPO steps, capped, with the summary. World size 1 joins no process group, so NCCL is
#    exercised only with 2+ GPUs: then the same command with --nproc_per_node 2 runs FSDP2 over NCCL.
nproc=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
part "training under torchrun on $nproc GPU(s)" 150 python -m torch.distributed.run --standalone \
    --nproc_per_node "$nproc" train.py --train.device=cuda --sft.max_steps=20 --train.max_steps=10 \
    --train.output_dir="$OUT/gpu_run"
[ -f "$OUT/gpu_run/metrics.jsonl" ] && tail -n 3 "$OUT/gpu_run/metrics.jsonl"

echo; echo "gpu.sh: $failures part(s) failed; outputs under $OUT"
exit "$failures"
