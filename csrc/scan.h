// One shard scan: the job description shared by the per-ISA kernels, and what every tier declares.
#pragma once
#include <cstdint>
#include <vector>

#include "reservoir.h"

namespace aml {

enum class Dtype { float32 = 0, float16 = 1, bfloat16 = 2, int8 = 3 };

struct ScanJob {
  const float* queries;    // nq x d float32
  int64_t nq, d;           // nq >= 1, d >= 1
  const void* gallery;     // n x d rows of `dtype` (float16/bfloat16 as uint16 bits)
  const float* scale;      // n per-row scales (int8 only)
  Dtype dtype;
  int64_t n;               // >= 1
  int64_t cap;             // candidates kept per query by the scan (min(n, k), or min(n, k * rescore))
  const float* exact;      // n x d float32 rows to rescore against, or nullptr
  int64_t k;               // results kept after rescoring, min(n, k)
  int threads;             // >= 1
};

// Fills `out` (nq reservoirs) with each query's best rows (ids 0..n-1); with `exact` the scan's `cap`
// candidates are rescored in float32 and `k` kept. out[i].ranked(n) then gives the ranked rows.
using ScanFn = void (*)(const ScanJob&, std::vector<Reservoir>& out);

namespace scalar { void scan(const ScanJob&, std::vector<Reservoir>&); }
#ifdef AML_X86_TIERS
namespace avx2 { void scan(const ScanJob&, std::vector<Reservoir>&); }
namespace avx512 { void scan(const ScanJob&, std::vector<Reservoir>&); }
namespace avx512_vnni { void scan(const ScanJob&, std::vector<Reservoir>&); }
namespace avx512_bf16 { void scan(const ScanJob&, std::vector<Reservoir>&); }
#endif

// The kernel traits' defaults (scan-inl.h says what each means); a trait derives from it and states only
// what differs.
struct KernelDefaults {
  static constexpr int32_t kXorBias = 0;
  static constexpr int kRows = 4;
  static constexpr bool kSumTile = false;
  static constexpr bool kPacks = false;
  static constexpr bool kPackF32 = false;
};

// Software codecs shared by every tier (bit-exact with engine/quantize.py).
float half_to_float(uint16_t h);
uint16_t float_to_bf16_bits(float x);  // nearest, ties to even
inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace aml
