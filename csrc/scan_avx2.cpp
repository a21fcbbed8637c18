// AVX2 + FMA + F16C tier: 8 floats per step; int8 widened to int16 pairs (vpmaddwd, exact).
// Built with -mavx2 -mfma -mf16c (CMakeLists.txt); run only when cpu.cpp finds all three.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "pool.h"
#include "scan.h"

#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "scan_avx2.cpp must be built with -mavx2 -mfma -mf16c"
#endif

namespace aml::avx2 {

#define AML_TIER avx2
#define AML_INLINE __attribute__((always_inline)) inline
#define AML_FN AML_INLINE static

// Tails go through a zeroed stack buffer: AVX2 has no byte- or word-masked loads.
template <class G, int W>
AML_FN void tail_copy(G* buf, const G* p, int n) {
  for (int i = 0; i < W; ++i) buf[i] = i < n ? p[i] : G(0);
}

AML_FN float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The packed float32 kernel's lane vector (packed_f32.h): 6 queries x 16 rows = 12 accumulators of 16 ymm.
struct PF32 {
  static constexpr int L = 8, M = 6, J = 2;
  using V = __m256;
  AML_FN V zero() { return _mm256_setzero_ps(); }
  AML_FN V load(const float* p) { return _mm256_loadu_ps(p); }
  AML_FN V splat(float x) { return _mm256_set1_ps(x); }
  AML_FN V fma(V a, V q, V g) { return _mm256_fmadd_ps(q, g, a); }
  AML_FN void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  AML_FN unsigned at_least(const float* s, float thr, unsigned lanes) {
    const unsigned ge = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s), _mm256_set1_ps(thr), _CMP_GE_OQ)));
    return ge & ((1u << lanes) - 1);
  }
  AML_FN void block(const float* const* src, float* dst, int64_t stride) {  // an L x L transpose
    for (int c = 0; c < L; ++c)
      for (int i = 0; i < L; ++i) dst[c * stride + i] = src[i][c];
  }
};

struct KF32 : KernelDefaults {
  static constexpr Dtype kKind = Dtype::float32;
  static constexpr int W = 8;
  static constexpr int kRows = 2;  // 16 ymm registers: 4 x 2 accumulators leave room for loads
  static constexpr bool kPackF32 = true;
  using G = float; using Qt = float; using V = __m256; using QV = __m256; using GV = __m256; using Acc = float;
  AML_FN V zero() { return _mm256_setzero_ps(); }
  AML_FN QV lq(const Qt* p) { return _mm256_loadu_ps(p); }
  AML_FN GV lg(const G* p) { return _mm256_loadu_ps(p); }
  AML_FN GV lg_tail(const G* p, int n) { alignas(32) G b[W]; tail_copy<G, W>(b, p, n); return lg(b); }
  AML_FN void st(float* p, GV v) { _mm256_storeu_ps(p, v); }
  AML_FN V madd(V a, QV q, GV g) { return _mm256_fmadd_ps(q, g, a); }
  AML_FN Acc sum(V a) { return hsum(a); }
  static Qt qconv(float v) { return v; }
};

struct KF16 : KF32 {
  static constexpr Dtype kKind = Dtype::float16;
  using G = uint16_t;
  AML_FN GV lg(const G* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  AML_FN GV lg_tail(const G* p, int n) { alignas(32) G b[W]; tail_copy<G, W>(b, p, n); return lg(b); }
};

struct KBF16 : KF32 {
  static constexpr Dtype kKind = Dtype::bfloat16;
  using G = uint16_t;
  AML_FN GV lg(const G* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  AML_FN GV lg_tail(const G* p, int n) { alignas(32) G b[W]; tail_copy<G, W>(b, p, n); return lg(b); }
};

struct KI8 : KernelDefaults {
  static constexpr Dtype kKind = Dtype::int8;
  static constexpr int W = 16;
  static constexpr int kRows = 2;  // 16 ymm registers: 4 x 2 accumulators leave room for loads
  using G = int8_t; using Qt = int16_t; using V = __m256i; using QV = __m256i; using GV = __m256i; using Acc = int32_t;
  AML_FN V zero() { return _mm256_setzero_si256(); }
  AML_FN QV lq(const Qt* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  AML_FN GV lg(const G* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  AML_FN GV lg_tail(const G* p, int n) { alignas(16) G b[W]; tail_copy<G, W>(b, p, n); return lg(b); }
  AML_FN V madd(V a, QV q, GV g) { return _mm256_add_epi32(a, _mm256_madd_epi16(g, q)); }
  AML_FN Acc sum(V a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }
  static Qt qconv(float v) { return static_cast<Qt>(v); }
};

#include "scan-inl.h"
#include "packed_f32-inl.h"

}  // namespace aml::avx2
