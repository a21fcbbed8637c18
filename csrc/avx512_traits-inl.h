// AVX-512 (F, BW, VL, DQ) kernel traits: 16 floats per step, masked loads for tails.
// Included by each AVX-512 tier's translation unit, built with -mavx512f -mavx512bw -mavx512vl -mavx512dq (and
// -mavx512vnni / -mavx512bf16 for the tiers that use them), inside its namespace (no include guard).
#if !defined(AML_TIER) || !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__))
#error "avx512_traits-inl.h belongs to the AVX-512 tiers' translation units, built with their -mavx512* flags"
#endif

#define AML_INLINE __attribute__((always_inline)) inline
#define AML_FN AML_INLINE static

// Sixteen accumulators -> their sixteen sums in order, by one transposing tree: within each 128-bit lane
// (x0 + x2) + (x1 + x3), then across lanes (L0 + L2) + (L1 + L3). sum_f() follows the same tree, so a
// score does not depend on which tile shape computed it (float addition is commutative, not associative).
AML_FN __m512 lane_sums(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)), _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
}
AML_FN __m512i lane_sums(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}
AML_FN __m512 cross_lanes(__m512 r0, __m512 r1, __m512 r2, __m512 r3) {
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(r0, r1, 0x44), _mm512_shuffle_f32x4(r0, r1, 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(r2, r3, 0x44), _mm512_shuffle_f32x4(r2, r3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}
AML_FN __m512i cross_lanes(__m512i r0, __m512i r1, __m512i r2, __m512i r3) {
  const __m512i y01 = _mm512_add_epi32(_mm512_shuffle_i32x4(r0, r1, 0x44), _mm512_shuffle_i32x4(r0, r1, 0xEE));
  const __m512i y23 = _mm512_add_epi32(_mm512_shuffle_i32x4(r2, r3, 0x44), _mm512_shuffle_i32x4(r2, r3, 0xEE));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(y01, y23, 0x88), _mm512_shuffle_i32x4(y01, y23, 0xDD));
}
template <class V>
AML_FN V tile_sums(const V (&a)[4][4]) {
  return cross_lanes(lane_sums(a[0][0], a[0][1], a[0][2], a[0][3]), lane_sums(a[1][0], a[1][1], a[1][2], a[1][3]),
                     lane_sums(a[2][0], a[2][1], a[2][2], a[2][3]), lane_sums(a[3][0], a[3][1], a[3][2], a[3][3]));
}
// A 4 x 4 tile's scores as one vector and the mask of those that may enter their query's reservoir
// (score >= thr[m]); the int8 form scales exactly as the scalar emit does: ((sum - bias) * qscale) * rscale.
AML_FN __m512i query_lanes() { return _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0); }
AML_FN __m512 per_query(const float* v) {
  return _mm512_permutexvar_ps(query_lanes(), _mm512_castps128_ps512(_mm_loadu_ps(v)));
}
AML_FN __mmask16 keep(__m512 s, const float* thr, float* out) {
  _mm512_storeu_ps(out, s);
  return _mm512_cmp_ps_mask(s, per_query(thr), _CMP_GE_OQ);
}
AML_FN __mmask16 tile_scores_f(const float* sums, const float* thr, float* out) { return keep(_mm512_loadu_ps(sums), thr, out); }
AML_FN __mmask16 tile_scores_i(const int32_t* sums, const float* thr, const int32_t* bias, const float* qscale,
                               const float* rscale, float* out) {
  const __m512i b = _mm512_permutexvar_epi32(query_lanes(), _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bias))));
  __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(sums), b));
  v = _mm512_mul_ps(_mm512_mul_ps(v, per_query(qscale)), _mm512_broadcast_f32x4(_mm_loadu_ps(rscale)));
  return keep(v, thr, out);
}
AML_FN float sum_f(__m512 v) {
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

// The packed float32 kernel's lane vector (packed_f32.h): 12 queries x 32 rows = 24 accumulators of 32 zmm.
struct PF32 {
  static constexpr int L = 16, M = 12, J = 2;
  using V = __m512;
  AML_FN V zero() { return _mm512_setzero_ps(); }
  AML_FN V load(const float* p) { return _mm512_loadu_ps(p); }
  AML_FN V splat(float x) { return _mm512_set1_ps(x); }
  AML_FN V fma(V a, V q, V g) { return _mm512_fmadd_ps(q, g, a); }
  AML_FN void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  AML_FN unsigned at_least(const float* s, float thr, unsigned lanes) {
    const __mmask16 valid = static_cast<__mmask16>((1u << lanes) - 1);
    return _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(s), _mm512_set1_ps(thr), _CMP_GE_OQ);
  }
  // dst[c * stride + i] = src[i][c] for i, c < 16: a 16 x 16 transpose in registers (4 shuffle stages; the
  // element-wise copy was a store per float, a third of a 64-query scan at D = 2048).
  AML_FN void block(const float* const* src, float* dst, int64_t stride) {
    __m512 r[16], t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src[i]);
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
#pragma GCC unroll 4
    for (int i = 0; i < 16; i += 4) {
      const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
      const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c)), r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d)), r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // r[4g + k] now holds, in 128-bit lane l, columns 4l + k of rows 4g..4g+3
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
      t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
    }
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      _mm512_storeu_ps(dst + k * stride, _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88));
      _mm512_storeu_ps(dst + (k + 8) * stride, _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd));
    }
  }
};

struct KF32 : KernelDefaults {
  static constexpr Dtype kKind = Dtype::float32;
  static constexpr int W = 16;
  static constexpr bool kSumTile = true;
  static constexpr bool kPackF32 = true;
  using G = float; using Qt = float; using V = __m512; using QV = __m512; using GV = __m512; using Acc = float;
  AML_FN __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1); }
  AML_FN V zero() { return _mm512_setzero_ps(); }
  AML_FN QV lq(const Qt* p) { return _mm512_loadu_ps(p); }
  AML_FN GV lg(const G* p) { return _mm512_loadu_ps(p); }
  AML_FN GV lg_tail(const G* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  AML_FN void st(float* p, GV v) { _mm512_storeu_ps(p, v); }
  AML_FN V madd(V a, QV q, GV g) { return _mm512_fmadd_ps(q, g, a); }
  AML_FN Acc sum(V a) { return sum_f(a); }
  AML_FN void sum_tile(const V (&a)[4][4], Acc* out) { _mm512_storeu_ps(out, tile_sums(a)); }
  AML_FN __mmask16 tile_scores(const Acc* s, const float* thr, const int32_t*, const float*, const float*, float* out) {
    return tile_scores_f(s, thr, out);
  }
  static Qt qconv(float v) { return v; }
};

struct KF16 : KF32 {
  static constexpr Dtype kKind = Dtype::float16;
  using G = uint16_t;
  AML_FN GV lg(const G* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  AML_FN GV lg_tail(const G* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
};

// bfloat16 -> float32 is a 16-bit shift; the product with a bf16-rounded query is exact in float32.
struct KBF16Shift : KF32 {
  static constexpr Dtype kKind = Dtype::bfloat16;
  using G = uint16_t;
  AML_FN GV widen(__m256i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16)); }
  AML_FN GV lg(const G* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  AML_FN GV lg_tail(const G* p, int n) { return widen(_mm256_maskz_loadu_epi16(mask(n), p)); }
};

// The int8 tiers' int32 side: the accumulator, the reductions and the scoring of a tile are the same with or
// without VNNI; only the query's integer width and the multiply-add differ.
template <class QueryInt>
struct KI8Base : KernelDefaults {
  static constexpr Dtype kKind = Dtype::int8;
  static constexpr bool kSumTile = true;
  using G = int8_t; using Qt = QueryInt; using V = __m512i; using QV = __m512i; using GV = __m512i; using Acc = int32_t;
  AML_FN V zero() { return _mm512_setzero_si512(); }
  AML_FN QV lq(const Qt* p) { return _mm512_loadu_si512(p); }
  AML_FN Acc sum(V a) { return _mm512_reduce_add_epi32(a); }
  AML_FN void sum_tile(const V (&a)[4][4], Acc* out) { _mm512_storeu_si512(out, tile_sums(a)); }
  AML_FN __mmask16 tile_scores(const Acc* s, const float* thr, const int32_t* bias, const float* qs, const float* rs,
                                float* out) {
    return tile_scores_i(s, thr, bias, qs, rs, out);
  }
  static Qt qconv(float v) { return static_cast<Qt>(v); }
};

// int8 without VNNI: widen to int16 and multiply-add pairs (vpmaddwd), exact in int32.
struct KI8Madd : KI8Base<int16_t> {
  static constexpr int W = 32;
  AML_FN GV lg(const G* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  AML_FN GV lg_tail(const G* p, int n) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(static_cast<__mmask32>((1u << n) - 1), p));
  }
  AML_FN V madd(V a, QV q, GV g) { return _mm512_add_epi32(a, _mm512_madd_epi16(g, q)); }
};

#ifdef __AVX512VNNI__  // the VNNI tiers are built with -mavx512vnni
// vpdpbusd multiplies unsigned by signed bytes: the gallery byte is biased by +128 (xor 0x80),
// which adds exactly 128 * sum(query) to the int32 dot; prepare() records that bias per query.
struct KI8Vnni : KI8Base<int8_t> {
  static constexpr int W = 64;
  static constexpr int32_t kXorBias = 128;
  static constexpr bool kPacks = true;
  AML_FN GV bias(__m512i g) { return _mm512_xor_si512(g, _mm512_set1_epi8(static_cast<char>(0x80))); }
  AML_FN GV lg(const G* p) { return bias(_mm512_loadu_si512(p)); }
  AML_FN GV lg_tail(const G* p, int n) { return bias(_mm512_maskz_loadu_epi8((__mmask64(1) << n) - 1, p)); }
  AML_FN V madd(V a, QV q, GV g) { return _mm512_dpbusd_epi32(a, g, q); }
};
#endif
