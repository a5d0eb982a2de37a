#!/usr/bin/env bash
# GPU check of the Triton kernels and the model on them (one CUDA GPU; about 4 minutes on an H200):
#   1. natively on the GPU (no interpreter): the full op grid of tests/test_triton_ops.py, the
#      MambaLM triton-vs-torch check, and tests/test_gpu.py (decode step kernel, recurrent decoding,
#      greedy vs transformers, gradient checkpointing, bf16 autocast training)
#   2. benchmarks/bench_kernels.py at Mamba-7B shapes (16K tokens, d_inner 8192, d_state 16, bf16)
#   3. benchmarks/sweep_scan.py: the scan's default launch shapes and their neighbours, and the
#      plain-recurrence kernels ("seq:" shapes; opt-in until they are timed here)
#   4. benchmarks/bench_train_gpu.py: a mamba_130m training step (default and seq scan kernels) vs mambapy
#   5. benchmarks/bench_generate.py on the GPU vs transformers' generate (decoding through a CUDA graph)
# Results go to $OUT (if set, else a new temp dir): device.txt, gpu_tests.log, sweep_scan.{txt,json},
# bench_kernels.{txt,json}, bench_train.txt, bench_generate.txt (8 files).
# Needs torch with CUDA and triton; mambapy/transformers only for their benchmark columns.
set -uo pipefail
usage="usage: bash benchmarks/gpu_check.sh [-h|--help]   (no other arguments; results go to \$OUT or a new temp dir)"
case "${1:-}" in
    -h|--help)
        echo "$usage"
        sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"  # the comment above: what it runs and writes
        exit 0 ;;
    "") ;;
    *)
        echo "gpu_check: unknown argument '$1'" >&2
        echo "$usage" >&2
        exit 2 ;;
esac
cd "$(dirname "$0")/.."
RESULTS="${OUT:-$(mktemp -d -t gpu_check.XXXX)}"
mkdir -p "$RESULTS"
echo "gpu_check: results in $RESULTS"
unset TRITON_INTERPRET OPENLM_MAMBA_BACKEND OPENLM_MAMBA_SCAN_LAUNCH
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OPENLM_MAMBA_DISABLE_CPP=1  # the C++ kernels are the CPU path; no need to build them here
start=$(date +%s)

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch" | tee "$RESULTS/device.txt"
    exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null
  python3 -c "import importlib.metadata as m; print('mambapy', m.version('mambapy'))" 2>/dev/null
} | tee "$RESULTS/device.txt"

# Stage limits add up to 395 s (150 + 50 + 80 + 45 + 70; the first stage compiles every kernel variant
# cold); the stages took 83 + 28 + 34 + 23 + 38 s on an H200. Give the device call a timeout of at least 450 s. The first two stages are the check proper.
echo "== correctness (native)"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 150 python3 -m pytest -v -p no:cacheprovider $xdist -rfE --durations=10 --full \
    tests/test_triton_ops.py tests/test_triton_model.py tests/test_gpu.py 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
stamp() { echo "   ($1: $(( $(date +%s) - start )) s so far)" | tee -a "$RESULTS/device.txt"; }
stamp tests

echo "== kernel benchmark"
timeout 50 python3 benchmarks/bench_kernels.py --json "$RESULTS/bench_kernels.json" 2>&1 | tee "$RESULTS/bench_kernels.txt"
bench_rc=${PIPESTATUS[0]}
stamp kernels

echo "== scan launch sweep (the defaults and their neighbours)"
timeout 80 python3 benchmarks/sweep_scan.py --fwd 8x16x4,seq:1x128x4,seq:2x128x4,seq:4x128x4,seq:1x256x4,seq:2x64x2 \
    --bwd 4x32x4,2x64x4,seq:1x128x4,seq:1x64x2,seq:2x64x2 \
    --json "$RESULTS/sweep_scan.json" 2>&1 | tee "$RESULTS/sweep_scan.txt"
sweep_rc=${PIPESTATUS[0]}
stamp sweep

echo "== training step benchmark (transformers' PyTorch fallback takes minutes a step: left out)"
timeout 45 python3 benchmarks/bench_train_gpu.py --contenders openlm_mamba,openlm_mamba+ckpt,openlm_mamba+seq,mambapy 2>&1 \
    | tee "$RESULTS/bench_train.txt"
train_rc=${PIPESTATUS[0]}
stamp train

echo "== generation benchmark (transformers' fallback prefill of 4096 tokens alone takes about 10 s)"
timeout 70 python3 benchmarks/bench_generate.py --device cuda --d-model 768 --n-layer 24 \
    --contexts 16,1024,4096 --new-tokens 64 --repeats 2 2>&1 | tee "$RESULTS/bench_generate.txt"
gen_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc sweep rc=$sweep_rc kernels rc=$bench_rc train rc=$train_rc generate rc=$gen_rc," \
     "$(( $(date +%s) - start )) s" | tee -a "$RESULTS/device.txt"
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$train_rc" -eq 0 ] && [ "$gen_rc" -eq 0 ]
