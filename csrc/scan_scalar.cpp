// Portable tier: plain C++, one element per step; the reference the SIMD tiers must agree with.
#include <algorithm>
#include <atomic>
#include <cmath>

#include "pool.h"
#include "scan.h"

namespace aml::scalar {

#define AML_TARGET
#define AML_INLINE inline

template <Dtype D, class G_, class Qt_, class V_>
struct KScalar {
  static constexpr Dtype kKind = D;
  static constexpr int W = 1;
  static constexpr int32_t kXorBias = 0;
  static constexpr int kRows = 4;
  static constexpr bool kSumTile = false;
  static constexpr bool kWidens = false;
  static constexpr bool kPacks = false;
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
  static V madd(V a, QV q, GV g) { return a + q * g; }
  static Acc sum(V a) { return a; }
  static Qt qconv(float v) { return static_cast<Qt>(v); }
};
using KF32 = KScalar<Dtype::float32, float, float, float>;
using KF16 = KScalar<Dtype::float16, uint16_t, float, float>;
using KBF16 = KScalar<Dtype::bfloat16, uint16_t, float, float>;
using KI8 = KScalar<Dtype::int8, int8_t, int8_t, int32_t>;

#include "scan_body.h"

}  // namespace aml::scalar
