// int8 scans of many queries on AVX-512 VNNI, GEMM-style: each gallery tile (kVnniTileBytes, kept in L2) is packed
// once, in depth chunks of kVnniDepth bytes, into panels in which each vector lane holds one row (16 rows x 4 bytes
// per register), and every query's four bytes are broadcast. Scores then come out sixteen rows at a time with no
// horizontal sums, and one compare per 16 rows against the query's threshold keeps reservoir work off the hot path.
// The integer sums are exact whatever the chunking, and the scores are scaled exactly as emit() does, so results
// are identical to the other int8 kernels.
// Included by the VNNI tiers after scan-inl.h (no include guard).
#if !defined(AML_TIER) || !defined(__AVX512VNNI__)
#error "packed_vnni-inl.h belongs to the AVX-512 VNNI tiers' translation units, built with -mavx512vnni"
#endif

constexpr int kPackM = 8;  // queries per register tile
constexpr int kPackJ = 2;  // 16-row blocks per register tile: 8 x 2 accumulators, 2 rows, 1 broadcast
constexpr int64_t kPackRows = 16 * kPackJ;     // rows per panel
constexpr int64_t kVnniDepth = 256;            // bytes per depth chunk: a panel's chunk (8 KiB) stays in L1
constexpr int64_t kVnniTileBytes = 512 << 10;  // one packed tile (all chunks), kept in L2

// Rows [t0, t0 + rows) x bytes [k0, k0 + kc) of `gal` (d bytes a row; kc a multiple of 4) as panels of
// kPackRows rows: dword c of row i of panel b (bytes k0 + 4c..+3) at (b * kc / 4 + c) * kPackRows + i, biased
// by +128 (xor 0x80) for vpdpbusd's unsigned operand. Bytes past d meet zero query bytes and rows past `rows`
// are masked at emission, so their contents do not matter.
inline void pack_chunk_i8(const int8_t* gal, int64_t d, int64_t t0, int64_t rows, int64_t k0, int64_t kc,
                                     uint32_t* dst) {
  const int64_t nc = kc / 4, full = std::clamp<int64_t>((d - k0) / 4, 0, nc);
  for (int64_t b = 0; b * kPackRows < rows; ++b) {
    uint32_t* panel = dst + b * nc * kPackRows;
    for (int64_t i = 0; i < kPackRows; ++i) {
      const int64_t r = b * kPackRows + i;
      if (r >= rows) {
        for (int64_t c = 0; c < nc; ++c) panel[c * kPackRows + i] = 0;
        continue;
      }
      const int8_t* s = gal + (t0 + r) * d + k0;
      int64_t c = 0;
      for (; c < full; ++c) {
        uint32_t v;
        std::memcpy(&v, s + 4 * c, 4);
        panel[c * kPackRows + i] = v ^ 0x80808080u;
      }
      for (; c < nc; ++c) {
        uint32_t v = 0;
        if (k0 + 4 * c < d) std::memcpy(&v, s + 4 * c, static_cast<size_t>(d - k0 - 4 * c));
        panel[c * kPackRows + i] = v ^ 0x80808080u;
      }
    }
  }
}

// One register tile over nc dwords: kPackM queries (pointers q, already offset to the chunk) x one panel (gp),
// continuing the running integer sums in acc (kPackM * kPackRows, query-major) unless `first`.
AML_INLINE void packed_i8_tile(const int8_t* const* q, const uint32_t* gp, int64_t nc, bool first,
                                          int32_t* acc) {
  __m512i a[kPackM][kPackJ];
#pragma GCC unroll 16
  for (int m = 0; m < kPackM; ++m)
#pragma GCC unroll 4
    for (int jj = 0; jj < kPackJ; ++jj)
      a[m][jj] = first ? _mm512_setzero_si512() : _mm512_load_si512(acc + (m * kPackJ + jj) * 16);
  for (int64_t c = 0; c < nc; ++c) {
    __m512i gv[kPackJ];
#pragma GCC unroll 4
    for (int jj = 0; jj < kPackJ; ++jj) gv[jj] = _mm512_load_si512(gp + c * kPackRows + jj * 16);
#pragma GCC unroll 16
    for (int m = 0; m < kPackM; ++m) {
      int32_t four;
      std::memcpy(&four, q[m] + 4 * c, 4);
      const __m512i qv = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int jj = 0; jj < kPackJ; ++jj) a[m][jj] = _mm512_dpbusd_epi32(a[m][jj], gv[jj], qv);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < kPackM; ++m)
#pragma GCC unroll 4
    for (int jj = 0; jj < kPackJ; ++jj) _mm512_store_si512(acc + (m * kPackJ + jj) * 16, a[m][jj]);
}

// A finished register tile's sums (acc) scaled as emit() does into the reservoirs of queries qa.. (mv of them real),
// rows r.. (rows_left).
inline void packed_i8_emit(const Prepared<int8_t>& p, const int32_t* acc, int mv, int64_t qa, int64_t r,
                                      int64_t rows_left, const float* rscale, Reservoir* reservoirs) {
  for (int jj = 0; jj < kPackJ; ++jj) {
    const int64_t r0 = r + jj * 16;
    const int valid = static_cast<int>(std::min<int64_t>(16, rows_left - jj * 16));
    if (valid <= 0) break;
    const __mmask16 lanes = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 rs = _mm512_maskz_loadu_ps(lanes, rscale + r0);
    for (int m = 0; m < mv; ++m) {
      Reservoir& h = reservoirs[qa + m];
      const __m512i sum = _mm512_load_si512(acc + (m * kPackJ + jj) * 16);
      __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_set1_epi32(p.bias[qa + m])));
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

// The first 64-byte boundary at or after p (4-byte elements).
template <class T>
inline T* line_aligned(T* p) {
  return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(T);
}

// Queries [q0, q1) against rows [r0, r1): each L2-sized tile of rows is packed whole (all depth chunks), then every
// query register tile runs chunk by chunk over its panels, so the panel chunk, the query chunk and the running
// sums stay in L1 (whole 2 KiB rows, as before, made a 32-row panel 64 KiB at D = 2048: the scan took 1.4x as long).
template <class K>
void scan_packed_block(const ScanJob& j, const Prepared<typename K::Qt>& p, int64_t q0, int64_t q1, int64_t r0,
                       int64_t r1, Reservoir* reservoirs) {
  const int8_t* gal = static_cast<const int8_t*>(j.gallery);
  const int64_t dp = p.dp, depth = std::min(dp, kVnniDepth);
  const int64_t tile_rows = std::max(kPackRows, kVnniTileBytes / dp / kPackRows * kPackRows);
  // Both buffers start on a cache line (16 spare elements) so that no vector load splits one.
  std::vector<uint32_t> pbuf(static_cast<size_t>(tile_rows * dp / 4 + 16));
  std::vector<int32_t> abuf(static_cast<size_t>(tile_rows * kPackM + 16));
  uint32_t* const packed = line_aligned(pbuf.data());  // chunk k0 at k0 / 4 * tile_rows
  int32_t* const acc = line_aligned(abuf.data());
  const std::vector<int8_t> zero(static_cast<size_t>(dp), 0);
  for (int64_t t0 = r0; t0 < r1; t0 += tile_rows) {
    const int64_t rows = std::min(r1, t0 + tile_rows) - t0, np = (rows + kPackRows - 1) / kPackRows;
    for (int64_t k0 = 0; k0 < dp; k0 += depth)
      pack_chunk_i8(gal, j.d, t0, rows, k0, std::min(depth, dp - k0), packed + k0 / 4 * tile_rows);
    for (int64_t qa = q0; qa < q1; qa += kPackM) {
      const int mv = static_cast<int>(std::min<int64_t>(kPackM, q1 - qa));
      for (int64_t k0 = 0; k0 < dp; k0 += depth) {
        const int64_t nc = std::min(depth, dp - k0) / 4;
        const int8_t* qs[kPackM];
        for (int m = 0; m < kPackM; ++m) qs[m] = (m < mv ? p.q.data() + (qa + m) * dp : zero.data()) + k0;
        for (int64_t pn = 0; pn < np; ++pn)
          packed_i8_tile(qs, packed + k0 / 4 * tile_rows + pn * nc * kPackRows, nc, k0 == 0,
                         acc + pn * kPackM * kPackRows);
      }
      for (int64_t pn = 0; pn < np; ++pn)
        packed_i8_emit(p, acc + pn * kPackM * kPackRows, mv, qa, t0 + pn * kPackRows, rows - pn * kPackRows,
                       j.scale, reservoirs);
    }
  }
}
