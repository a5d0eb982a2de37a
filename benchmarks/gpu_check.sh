#!/usr/bin/env bash
# GPU check of the Triton kernels (run on a machine with one CUDA GPU; < 5 min on an H100):
#   1. the full correctness grid of tests/test_triton_ops.py and the MambaLM triton-vs-torch check,
#      natively on the GPU (no interpreter)
#   2. benchmarks/bench_kernels.py at Mamba-7B shapes (16K tokens, d_inner 8192, d_state 16, bf16)
# Results go to $OUT (if set, else a new temp dir): device.txt, gpu_tests.log, bench_kernels.{txt,json}.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-$(mktemp -d -t gpu_check.XXXX)}"
mkdir -p "$RESULTS"
echo "gpu_check: results in $RESULTS"
unset TRITON_INTERPRET OPENLM_MAMBA_BACKEND
start=$(date +%s)

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch" | tee "$RESULTS/device.txt"
    exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$RESULTS/device.txt"

echo "== correctness grid (native)"
timeout 180 python -m pytest -q -p no:cacheprovider --full tests/test_triton_ops.py tests/test_triton_model.py 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== kernel benchmark"
timeout 100 python benchmarks/bench_kernels.py --json "$RESULTS/bench_kernels.json" 2>&1 | tee "$RESULTS/bench_kernels.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc, $(( $(date +%s) - start )) s" | tee -a "$RESULTS/device.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
