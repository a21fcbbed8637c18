// AVX-512 + VNNI tier: int8 via vpdpbusd, many queries through packed int8 tiles (packed_vnni-inl.h).
// Built with the AVX-512 tier's flags and -mavx512vnni (CMakeLists.txt).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "pool.h"
#include "scan.h"

namespace aml::avx512_vnni {
#define AML_TIER avx512_vnni
#include "avx512_traits-inl.h"
using KBF16 = KBF16Shift;
using KI8 = KI8Vnni;
#include "scan-inl.h"
#include "packed_f32-inl.h"
#include "packed_vnni-inl.h"
}  // namespace aml::avx512_vnni
