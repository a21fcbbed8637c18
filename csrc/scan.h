// One shard scan: the job description shared by the per-ISA kernels.
#pragma once
#include <cstdint>
#include <vector>

#include "topk.h"

namespace aml {

enum class Dtype { float32 = 0, float16 = 1, bfloat16 = 2, int8 = 3 };

struct ScanJob {
  const float* queries;    // nq x d float32
  int64_t nq, d;
  const void* gallery;     // n x d rows of `dtype` (float16/bfloat16 as uint16 bits)
  const float* scale;      // n per-row scales (int8 only)
  Dtype dtype;
  int64_t n;
  int64_t cap;             // candidates kept per query by the scan (k, or k * rescore)
  const float* exact;      // n x d float32 rows to rescore against, or nullptr
  int64_t k;               // results kept after rescoring
  int threads;             // >= 1
};

// Fills `out` (nq heaps) with each query's best rows (ids 0..n-1); with `exact`
// the scan's `cap` candidates are rescored in float32 and `k` kept.
using ScanFn = void (*)(const ScanJob&, std::vector<TopK>& out);

namespace scalar { void scan(const ScanJob&, std::vector<TopK>&); }
namespace avx2 { void scan(const ScanJob&, std::vector<TopK>&); }
namespace avx512 { void scan(const ScanJob&, std::vector<TopK>&); }
namespace avx512_vnni { void scan(const ScanJob&, std::vector<TopK>&); }
namespace avx512_bf16 { void scan(const ScanJob&, std::vector<TopK>&); }

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
