// Portable tier: plain C++, one element per step; the reference the SIMD tiers must agree with. Built with the
// baseline flags only, on any architecture.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "pool.h"
#include "scan.h"

namespace aml::scalar {

#define AML_TIER scalar
#define AML_INLINE inline

template <Dtype D, class G_, class Qt_, class V_>
struct KScalar : KernelDefaults {
  static constexpr Dtype kKind = D;
  static constexpr int W = 1;
  static constexpr bool kPackF32 = D != Dtype::int8;
  using G = G_;
  using Qt = Qt_;
  using V = V_;
  using QV = V_;
  using GV = V_;
  using Acc = V_;
  static V zero() { return V(0); }
  static QV lq(const Qt* p) { return static_cast<V>(*p); }
  static GV lg(const G* p) {
    if constexpr (D == Dtype::float16) return half_to_float(*p);
    else if constexpr (D == Dtype::bfloat16) return bf16_bits_to_float(*p);
    else return static_cast<V>(*p);
  }
  static GV lg_tail(const G* p, int) { return lg(p); }
  static void st(float* p, GV v) { *p = v; }
  static V madd(V a, QV q, GV g) { return a + q * g; }
  static Acc sum(V a) { return a; }
  static Qt qconv(float v) { return static_cast<Qt>(v); }
};
// The packed float32 kernel's lane vector: four floats (GCC vector extension: SSE2 on any x86-64, NEON or plain
// code elsewhere), each lane summing exactly as the scalar tile does (q * g rounded, then added: no FMA at this
// tier, which CMakeLists.txt builds with -ffp-contract=off where the baseline has FMA).
struct PF32 {
  static constexpr int L = 4, M = 4, J = 2;
  typedef float V __attribute__((vector_size(16)));
  static V zero() { return V{0.f, 0.f, 0.f, 0.f}; }
  static V load(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static V splat(float x) { return V{x, x, x, x}; }
  static V fma(V a, V q, V g) { return a + q * g; }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
  static unsigned at_least(const float* s, float thr, unsigned lanes) {
    unsigned m = 0;
    for (unsigned l = 0; l < lanes; ++l) m |= static_cast<unsigned>(s[l] >= thr) << l;
    return m;
  }
  static void block(const float* const* src, float* dst, int64_t stride) {  // an L x L transpose
    for (int c = 0; c < L; ++c)
      for (int i = 0; i < L; ++i) dst[c * stride + i] = src[i][c];
  }
};

using KF32 = KScalar<Dtype::float32, float, float, float>;
using KF16 = KScalar<Dtype::float16, uint16_t, float, float>;
using KBF16 = KScalar<Dtype::bfloat16, uint16_t, float, float>;
using KI8 = KScalar<Dtype::int8, int8_t, int8_t, int32_t>;

#include "scan-inl.h"
#include "packed_f32-inl.h"

}  // namespace aml::scalar
