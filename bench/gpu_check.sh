#!/usr/bin/env bash
# The descriptor head on a CUDA machine, in one go (under 5 minutes on an H100/H200):
#   1. nvidia-smi: is there a GPU at all;
#   2. tests/test_kernels.py with AML_KERNELS_CUDA=1: the compiled Triton kernels on CUDA tensors
#      against the torch reference (the sweep of odd shapes, plus B=64, C=2048, 24x24, D=2048);
#   3. bench/bench_head.py: Triton vs eager vs torch.compile, then a short table.
# Outputs under ${OUT:-bench/out}: nvidia-smi.csv, test_kernels.{txt,xml}, bench_head.{json,md}.
# Run from anywhere: bash bench/gpu_check.sh. Exit status: non-zero if the tests or the bench failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"; then
    echo "gpu_check: nvidia-smi failed: no usable NVIDIA GPU here" >&2
    exit 2
fi

# The head needs only torch + triton (+ pytest, pytest-benchmark): run from the source tree when
# they are there, which skips building the C++ search module; install the package otherwise.
if "$PY" -c "import torch, triton, pytest, pytest_benchmark; assert torch.cuda.is_available()" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check: installing the package (pip install -e .[test])"
    timeout 240 "$PY" -m pip install -q -e ".[test]" || { echo "gpu_check: install failed" >&2; exit 3; }
fi
"$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"

AML_KERNELS_CUDA=1 timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    --junitxml="$OUT/test_kernels.xml" 2>&1 | tee "$OUT/test_kernels.txt"
tests_rc=$?

timeout 150 "$PY" -m pytest -q -p no:cacheprovider bench/bench_head.py \
    --benchmark-max-time=0.5 --benchmark-json="$OUT/bench_head.json" 2>&1 | tail -n 20
bench_rc=$?

if [ -f "$OUT/bench_head.json" ]; then
    "$PY" - "$OUT/bench_head.json" "$OUT/bench_head.md" <<'EOF'
import json
import sys

runs = json.load(open(sys.argv[1]))
lines = ["| case | backend | median us | min us | GB/s |", "|---|---|---|---|---|"]
for b in runs["benchmarks"]:
    case, backend = b["param"].rsplit("-", 1)
    s, e = b["stats"], b["extra_info"]
    lines.append(f"| {case} | {backend} | {s['median'] * 1e6:.1f} | {s['min'] * 1e6:.1f} | {e['gb_per_s']} |")
device = runs["benchmarks"][0]["extra_info"]["device"] if runs["benchmarks"] else "?"
text = f"Descriptor head on {device} ({runs['datetime']}), per call including a synchronize:\n\n" + "\n".join(lines)
open(sys.argv[2], "w").write(text + "\n")
print(text)
EOF
fi
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc; outputs in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
