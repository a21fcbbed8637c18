#!/usr/bin/env bash
# Every GPU path on a CUDA machine, tested and timed in one go (about 6 minutes on an H200):
#   1. nvidia-smi: is there a GPU at all;
#   2. the CUDA tests: the compiled Triton head against the torch reference (tests/test_kernels.py with
#      AML_KERNELS_CUDA=1: the sweep of odd shapes plus B=64, C=2048, 24x24, D=2048), CUDA encoding against
#      the CPU (tests/test_backends.py) and the GPU search path against the exact top-k (tests/test_search.py);
#   3. bench/bench_head.py: the Triton head vs eager torch vs torch.compile;
#   4. bench/bench_encode.py with AML_BENCH_DEVICE=cuda: images/s of students and teachers, the pipeline;
#   5. bench/bench_search.py with AML_BENCH_DEVICE=cuda: the GPU search path beside the engine's CPU kernel.
# The C++ search module is built in the background meanwhile (cmake, into engine/), as the tests of step 2's
# search file and step 5 need it. Outputs under ${OUT:-bench/out}: nvidia-smi.csv, *.json, *.txt, gpu.md
# (the tables, made by bench/gpu_report.py). Run from anywhere: bash bench/gpu_check.sh. The machine's python3
# must hold torch (CUDA), triton, pytest, pytest-benchmark, timm, scikit-image and the weights packages
# (efficientnet-lite0/2); nothing is installed. Exit status: non-zero if a test or a bench failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"; then
    echo "gpu_check: nvidia-smi failed: no usable NVIDIA GPU here" >&2
    exit 2
fi
"$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"

build() {
    cmake -S . -B build/gpu-check -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
        -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null \
        && cmake --build build/gpu-check -j "$(nproc)" \
        && cp build/gpu-check/_search*.so engine/
}
build >"$OUT/build.txt" 2>&1 &
build_pid=$!

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)  # an array, not a function: `timeout` runs programs only
rc=0
step() {  # name, timeout, command...: runs one step, its output to $OUT/name.txt; a failure is remembered
    local name=$1 limit=$2
    shift 2
    echo "gpu_check: $name"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local r=$?
    tail -n 4 "$OUT/$name.txt"
    [ "$r" -eq 0 ] || { echo "gpu_check: $name failed (exit $r)"; rc=1; }
}

step test_kernels 150 env AML_KERNELS_CUDA=1 "${PYTEST[@]}" tests/test_kernels.py
step test_encode_cuda 90 "${PYTEST[@]}" tests/test_backends.py -k cuda
step bench_head 150 "${PYTEST[@]}" bench/bench_head.py --benchmark-max-time=0.5 --benchmark-json="$OUT/bench_head.json"
step bench_encode 180 env AML_BENCH_DEVICE=cuda "${PYTEST[@]}" bench/bench_encode.py --benchmark-json="$OUT/bench_encode.json"
wait "$build_pid" || { echo "gpu_check: the C++ build failed (see build.txt)"; rc=1; }
step test_search_cuda 60 "${PYTEST[@]}" tests/test_search.py -k "gpu or blocks"
step bench_search 180 env AML_BENCH_DEVICE=cuda AML_BENCH_ROUNDS=3 \
    AML_BENCH_GRID="${AML_GPU_SEARCH_GRID:-1000000x512x1,1000000x512x1024,100000x2048x1024}" \
    "${PYTEST[@]}" bench/bench_search.py --benchmark-json="$OUT/bench_search.json"

"$PY" bench/gpu_report.py "$OUT" | tee "$OUT/gpu.md"
echo "gpu_check: done, exit $rc; outputs in $OUT"
exit "$rc"
