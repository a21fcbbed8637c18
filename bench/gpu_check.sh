#!/usr/bin/env bash
# Every GPU path on a CUDA machine, tested and timed in one go (about 6 minutes on an H200). Steps in order of
# value, so that a run cut short still brings back the most important figures:
#   1. nvidia-smi: is there a GPU at all;
#   2. test_cuda: the CUDA tests that need no C++ module: the full-size Triton head against the torch reference
#      (launched and replayed as a CUDA graph), the graphed encoder forward against the eager one, CUDA encoding
#      against the CPU, nvJPEG decoding against the host's Pillow;
#   3. test_search_cuda: the GPU-resident index (engine.Index(device="cuda"), streaming included) and the torch
#      GPU search path against the CPU engine's exact top-k;
#   4. bench/bench_search.py: the resident index against the HBM read bound and the engine's CPU kernel on the
#      machine's cores;
#   5. bench/bench_head.py: the head's GPU time against its memory bound, launched and as graphs; the encoder
#      forward eager vs graphed;
#   6. bench/bench_encode.py -k pipeline: `engine encode --device cuda` (nvJPEG) vs --decode host vs the bare forward;
#   7. test_kernels: the rest of the kernel test file compiled for the GPU (the sweep of odd shapes).
# The C++ search module is built in the background meanwhile (cmake, into engine/), as steps 3 and 4 need it.
# Outputs under ${OUT:-bench/out}: nvidia-smi.csv, one NAME.txt per step, bench_*.json, gpu.md (the tables, made
# by bench/gpu_report.py). Run from anywhere: bash bench/gpu_check.sh. The machine's python3 must hold torch (CUDA),
# triton, torchvision, pytest, pytest-benchmark, timm, scikit-image, pyarrow, typer, rich, httpx and the weights
# packages (efficientnet-lite0/2); nothing is installed here. Exit status: non-zero if a test or a bench failed.
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
"$PY" -c "import torch, torchvision, triton; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')" \
    | tee "$OUT/versions.txt"

build() {
    cmake -S . -B build/gpu-check -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
        -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null \
        && cmake --build build/gpu-check -j "$(nproc)" \
        && cp build/gpu-check/_search*.so engine/
}
build >"$OUT/build.txt" 2>&1 &
build_pid=$!

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p no:randomly)  # an array, not a function: `timeout` runs programs only
rc=0
step() {  # name, timeout, command...: runs one step, its output to $OUT/name.txt; a failure is remembered
    local name=$1 limit=$2
    shift 2
    echo "gpu_check: $name ($(date -u +%T))"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local r=$?
    tail -n 4 "$OUT/$name.txt"
    [ "$r" -eq 0 ] || { echo "gpu_check: $name failed (exit $r)"; rc=1; }
}

step test_cuda 110 env AML_KERNELS_CUDA=1 "${PYTEST[@]}" tests/test_kernels.py tests/test_backends.py \
    tests/test_device_decode.py -k "full_size or cuda"
wait "$build_pid" || { echo "gpu_check: the C++ build failed (see build.txt)"; rc=1; }
step test_search_cuda 80 env AML_KERNELS_CUDA=1 "${PYTEST[@]}" tests/test_resident.py tests/test_search.py -k "cuda or gpu"
step bench_search 130 env AML_BENCH_DEVICE=cuda AML_BENCH_ROUNDS=3 \
    AML_BENCH_GRID="${AML_GPU_SEARCH_GRID:-1000000x512x1,1000000x512x1024,100000x2048x1024}" \
    AML_BENCH_METHODS=engine-float32,engine-int8,resident-cuda \
    "${PYTEST[@]}" bench/bench_search.py --benchmark-json="$OUT/bench_search.json"
step bench_head 120 "$PY" bench/bench_head.py
step bench_encode 130 env AML_BENCH_DEVICE=cuda "${PYTEST[@]}" bench/bench_encode.py -k pipeline \
    --benchmark-json="$OUT/bench_encode.json"
step test_kernels 90 env AML_KERNELS_CUDA=1 "${PYTEST[@]}" tests/test_kernels.py -k "not (full_size or cuda)"  # test_cuda ran those

"$PY" bench/gpu_report.py "$OUT" | tee "$OUT/gpu.md"
echo "gpu_check: done, exit $rc; outputs in $OUT"
exit "$rc"
