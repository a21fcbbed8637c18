// AVX-512 + VNNI + BF16 tier: bfloat16 rows against bfloat16 queries by vdpbf16ps, int8 as the VNNI tier.
// Built with the VNNI tier's flags and -mavx512bf16 (CMakeLists.txt).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "pool.h"
#include "scan.h"

#ifndef __AVX512BF16__
#error "scan_avx512_bf16.cpp must be built with -mavx512bf16"
#endif

namespace aml::avx512_bf16 {
#define AML_TIER avx512_bf16
#include "avx512_traits-inl.h"

// Pairs of bfloat16 per 32-bit lane; the query is kept as bf16 bits (already rounded by prepare()).
// Its queries are bf16 bits, so no packed float32 kernel (kPackF32): vdpbf16ps already doubles the rate.
struct KBF16Dot : KernelDefaults {
  static constexpr Dtype kKind = Dtype::bfloat16;
  static constexpr int W = 32;
  static constexpr bool kSumTile = true;
  using G = uint16_t; using Qt = uint16_t; using V = __m512; using QV = __m512i; using GV = __m512i; using Acc = float;
  AML_FN V zero() { return _mm512_setzero_ps(); }
  AML_FN QV lq(const Qt* p) { return _mm512_loadu_si512(p); }
  AML_FN GV lg(const G* p) { return _mm512_loadu_si512(p); }
  AML_FN GV lg_tail(const G* p, int n) { return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p); }
  AML_FN V madd(V a, QV q, GV g) { return _mm512_dpbf16_ps(a, (__m512bh)q, (__m512bh)g); }
  AML_FN Acc sum(V a) { return sum_f(a); }
  AML_FN void sum_tile(const V (&a)[4][4], Acc* out) { _mm512_storeu_ps(out, tile_sums(a)); }
  AML_FN __mmask16 tile_scores(const Acc* s, const float* thr, const int32_t*, const float*, const float*, float* out) {
    return tile_scores_f(s, thr, out);
  }
  static Qt qconv(float v) { return float_to_bf16_bits(v); }
};
using KBF16 = KBF16Dot;
using KI8 = KI8Vnni;
#include "scan-inl.h"
#include "packed_f32-inl.h"
#include "packed_vnni-inl.h"
}  // namespace aml::avx512_bf16
