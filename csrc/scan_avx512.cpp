// AVX-512 tier (F, BW, VL, DQ): 16 floats per step; int8 widened to int16 pairs (vpmaddwd, exact).
// Built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c (CMakeLists.txt); run only when
// cpu.cpp finds all of them.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "pool.h"
#include "scan.h"

namespace aml::avx512 {
#define AML_TIER avx512
#include "avx512_traits-inl.h"
using KBF16 = KBF16Shift;
using KI8 = KI8Madd;
#include "scan-inl.h"
#include "packed_f32-inl.h"
}  // namespace aml::avx512
