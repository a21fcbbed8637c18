// int8 scans of many queries on AVX-512 VNNI, GEMM-style: a gallery tile is packed once so that each
// vector lane holds one row (16 rows x 4 bytes per register), and every query's four bytes are broadcast.
// Scores then come out sixteen rows at a time with no horizontal sums, and one compare per 16 rows
// against the query's threshold keeps heap work off the hot path. The integer sums are exact, and the
// scores are scaled exactly as emit() does, so results are identical to the other int8 kernels.
// Included by the VNNI tiers after scan_body.h (no include guard).

constexpr int kPackM = 8;  // queries per register tile
constexpr int kPackJ = 2;  // 16-row blocks per register tile: 8 x 2 accumulators, 2 rows, 1 broadcast

// Rows [0, rows) of `gal` (d bytes each) into 16-row blocks of dp / 4 chunks: chunk c of block b holds
// bytes 4c..4c+3 of its 16 rows, biased by +128 (xor 0x80) for vpdpbusd's unsigned operand. Bytes past d
// meet zero query bytes and rows past `rows` are masked at emission, so their contents do not matter.
AML_TARGET inline void pack_tile(const int8_t* gal, int64_t d, int64_t dp, int64_t rows, uint32_t* dst) {
  const int64_t nc = dp / 4, nb = (rows + 15) / 16, full = d / 4;
  for (int64_t b = 0; b < nb; ++b) {
    uint32_t* blk = dst + b * nc * 16;
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t row = b * 16 + r;
      if (row >= rows) {
        for (int64_t c = 0; c < nc; ++c) blk[c * 16 + r] = 0;
        continue;
      }
      const int8_t* s = gal + row * d;
      int64_t c = 0;
      for (; c < full; ++c) {
        uint32_t v;
        std::memcpy(&v, s + 4 * c, 4);
        blk[c * 16 + r] = v ^ 0x80808080u;
      }
      for (; c < nc; ++c) {
        uint32_t v = 0;
        if (4 * c < d) std::memcpy(&v, s + 4 * c, static_cast<size_t>(d - 4 * c));
        blk[c * 16 + r] = v ^ 0x80808080u;
      }
    }
  }
}

// kPackM queries (pointers q, of which the first mv are real) against J packed blocks starting at row r.
template <int J>
AML_TARGET AML_INLINE void packed_tile(const Prepared<int8_t>& p, const int8_t* const* q, int mv, int64_t qa,
                                       const uint32_t* blk, int64_t nc, int64_t r, int64_t rows_left,
                                       const float* rscale, TopK* heaps) {
  __m512i acc[kPackM][J];
#pragma GCC unroll 16
  for (int m = 0; m < kPackM; ++m)
#pragma GCC unroll 4
    for (int jj = 0; jj < J; ++jj) acc[m][jj] = _mm512_setzero_si512();
  for (int64_t c = 0; c < nc; ++c) {
    __m512i gv[J];
#pragma GCC unroll 4
    for (int jj = 0; jj < J; ++jj) gv[jj] = _mm512_loadu_si512(blk + (jj * nc + c) * 16);
#pragma GCC unroll 16
    for (int m = 0; m < kPackM; ++m) {
      int32_t four;
      std::memcpy(&four, q[m] + 4 * c, 4);
      const __m512i qv = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int jj = 0; jj < J; ++jj) acc[m][jj] = _mm512_dpbusd_epi32(acc[m][jj], gv[jj], qv);
    }
  }
  // Stored with constant indices: indexing the accumulators by the run-time query count below would make
  // the compiler keep them in memory through the loop above.
  alignas(64) int32_t sums[kPackM][J][16];
#pragma GCC unroll 16
  for (int m = 0; m < kPackM; ++m)
#pragma GCC unroll 4
    for (int jj = 0; jj < J; ++jj) _mm512_store_si512(sums[m][jj], acc[m][jj]);
  for (int jj = 0; jj < J; ++jj) {
    const int64_t r0 = r + jj * 16;
    const int valid = static_cast<int>(std::min<int64_t>(16, rows_left - jj * 16));
    if (valid <= 0) break;
    const __mmask16 lanes = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 rs = _mm512_maskz_loadu_ps(lanes, rscale + r0);
    for (int m = 0; m < mv; ++m) {
      TopK& h = heaps[qa + m];
      __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(sums[m][jj]), _mm512_set1_epi32(p.bias[qa + m])));
      s = _mm512_mul_ps(_mm512_mul_ps(s, _mm512_set1_ps(p.scale[qa + m])), rs);
      unsigned mask = _mm512_mask_cmp_ps_mask(lanes, s, _mm512_set1_ps(h.threshold()), _CMP_GE_OQ);
      if (!mask) continue;
      alignas(64) float out[16];
      _mm512_store_ps(out, s);
      for (; mask; mask &= mask - 1) {
        const int b = __builtin_ctz(mask);
        h.push(out[b], r0 + b);
      }
    }
  }
}

template <class K>
AML_TARGET void scan_packed_block(const ScanJob& j, const Prepared<typename K::Qt>& p, int64_t q0, int64_t q1, int64_t r0,
                       int64_t r1, int64_t tile_rows, TopK* heaps) {
  const int8_t* gal = static_cast<const int8_t*>(j.gallery);
  const int64_t nc = p.dp / 4;
  std::vector<uint32_t> packed(static_cast<size_t>((tile_rows + 15) / 16 * nc * 16));
  const std::vector<int8_t> zero(static_cast<size_t>(p.dp), 0);
  for (int64_t t0 = r0; t0 < r1; t0 += tile_rows) {
    const int64_t rows = std::min(r1, t0 + tile_rows) - t0, nb = (rows + 15) / 16;
    pack_tile(gal + t0 * j.d, j.d, p.dp, rows, packed.data());
    for (int64_t qa = q0; qa < q1; qa += kPackM) {
      const int mv = static_cast<int>(std::min<int64_t>(kPackM, q1 - qa));
      const int8_t* qs[kPackM];
      for (int m = 0; m < kPackM; ++m) qs[m] = m < mv ? p.q.data() + (qa + m) * p.dp : zero.data();
      int64_t b = 0;
      for (; b + kPackJ <= nb; b += kPackJ)
        packed_tile<kPackJ>(p, qs, mv, qa, packed.data() + b * nc * 16, nc, t0 + b * 16, rows - b * 16,
                            j.scale, heaps);
      for (; b < nb; ++b)
        packed_tile<1>(p, qs, mv, qa, packed.data() + b * nc * 16, nc, t0 + b * 16, rows - b * 16, j.scale,
                       heaps);
    }
  }
}
