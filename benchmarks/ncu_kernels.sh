#!/usr/bin/env bash
# Nsight Compute profile of the Triton training kernels at Mamba-7B shapes (one CUDA GPU, about 2 minutes):
#   1. the selective scan's forward and backward kernels (first forward and first backward launch)
#   2. the causal conv1d and add + RMSNorm backward kernels
# Each profiled launch is replayed for the full section set (occupancy, registers, memory and compute
# throughput, warp stall reasons, source-level hot spots); clocks are left alone (--clock-control none).
# Results go to $OUT (if set, else a new temp dir): ncu_scan.txt, ncu_conv_norm.txt.
# Needs ncu (Nsight Compute) on PATH or under /opt/nvidia/nsight-compute, torch with CUDA and triton.
# Exits 1 if a profile fails (ncu's exit code non-zero, or no kernel report in its file).
set -uo pipefail
usage="usage: bash benchmarks/ncu_kernels.sh [-h|--help]   (no other arguments; results go to \$OUT or a new temp dir)"
case "${1:-}" in
    -h|--help)
        echo "$usage"
        sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
        exit 0 ;;
    "") ;;
    *)
        echo "ncu_kernels: unknown argument '$1'" >&2
        echo "$usage" >&2
        exit 2 ;;
esac
cd "$(dirname "$0")/.."
RESULTS="${OUT:-$(mktemp -d -t ncu_kernels.XXXX)}"
mkdir -p "$RESULTS"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
if [ -z "$NCU" ]; then
    echo "ncu_kernels: ncu (Nsight Compute) not found" >&2
    exit 2
fi
unset TRITON_INTERPRET OPENLM_MAMBA_BACKEND OPENLM_MAMBA_SCAN_LAUNCH
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OPENLM_MAMBA_DISABLE_CPP=1
echo "ncu_kernels: $NCU; results in $RESULTS"
# bench_kernels with one repeat times a forward (warm-up, timed), then a forward + backward (warm-up, timed):
# of the scan kernels, launches 3 and 4 are a forward and a backward; of the backward kernels matched
# below, launches 1 and 3 are the conv's and the norm's first.
failed=0
profile() {  # profile OUTFILE KERNEL_REGEX SKIP COUNT OPS: launches SKIP+1 .. SKIP+COUNT of the kernels matched
    timeout 100 "$NCU" --clock-control none --set full --kernel-name "regex:$2" --launch-skip "$3" --launch-count "$4" \
        --print-summary none python3 benchmarks/bench_kernels.py --backends triton --ops "$5" --repeats 1 \
        > "$RESULTS/$1" 2>&1
    local rc=$? reports
    reports=$(grep -c '^  _' "$RESULTS/$1")
    echo "ncu_kernels: $1 rc=$rc ($reports kernel reports)"
    if [ "$rc" -ne 0 ] || [ "$reports" -eq 0 ]; then
        failed=$((failed + 1))
    fi
}
profile ncu_scan.txt "_scan_(fwd|bwd)_kernel" 2 2 selective_scan
profile ncu_conv_norm.txt "_(conv|add_norm)_bwd_kernel" 0 3 causal_conv1d,add_norm
if [ "$failed" -ne 0 ]; then
    echo "ncu_kernels: $failed of 2 profiles failed (non-zero exit code or no kernel report; see $RESULTS)" >&2
    exit 1
fi
