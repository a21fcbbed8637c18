// AVX-512 tiers: plain (F/BW/VL/DQ), + VNNI (int8 via vpdpbusd), + BF16 (bfloat16 via vdpbf16ps).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "pool.h"
#include "scan.h"

namespace aml::avx512 {
#define AML_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#include "avx512_traits.h"
using KBF16 = KBF16Shift;
using KI8 = KI8Madd;
#include "scan_body.h"
#include "packed_f32.h"
#undef AML_TARGET
#undef AML_INLINE
#undef AML_FN
#undef AML_VNNI
}  // namespace aml::avx512

namespace aml::avx512_vnni {
#define AML_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define AML_VNNI
#include "avx512_traits.h"

using KBF16 = KBF16Shift;
using KI8 = KI8Vnni;
#include "scan_body.h"
#include "packed_f32.h"
#include "packed_vnni.h"
#undef AML_TARGET
#undef AML_INLINE
#undef AML_FN
#undef AML_VNNI
}  // namespace aml::avx512_vnni

namespace aml::avx512_bf16 {
#define AML_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))
#define AML_VNNI
#include "avx512_traits.h"

// Pairs of bfloat16 per 32-bit lane; the query is kept as bf16 bits (already rounded by prepare()).
struct KBF16Dot {
  static constexpr Dtype kKind = Dtype::bfloat16;
  static constexpr int W = 32;
  static constexpr int32_t kXorBias = 0;
  static constexpr int kRows = 4;
  static constexpr bool kSumTile = true;
  static constexpr bool kPacks = false;
  static constexpr bool kPackF32 = false;  // its queries are bf16 bits; vdpbf16ps already doubles the rate
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
#include "scan_body.h"
#include "packed_f32.h"
#include "packed_vnni.h"
#undef AML_TARGET
#undef AML_INLINE
#undef AML_FN
#undef AML_VNNI
}  // namespace aml::avx512_bf16
