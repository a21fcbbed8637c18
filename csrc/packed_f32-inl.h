// Float scans of many queries, GEMM-style: each gallery tile (kPackTileBytes, kept in L2) is repacked once, in
// depth chunks of kPackDepth columns, into panels in which a vector lane holds one row (float16 / bfloat16 widened
// to float32 on the way), and every query value is broadcast from prepare()'s query panels (p.packed). A register tile of P::M queries x P::J * P::L rows then accumulates with no horizontal sums, and one
// compare per P::L rows against the query's threshold keeps reservoir work off the hot path.
// Each score is one lane's running sum over c = 0, 1, ..., d - 1 in order, whatever the tile, chunk or thread
// split, so results do not depend on the partition (and SIMD tiers with FMA agree bit for bit).
// Included by every tier after scan-inl.h, once the tier defines the lane-vector trait PF32 (no include guard):
//   L (rows per vector), M (queries per register tile), J (vectors of rows per register tile), V,
//   zero(), load(const float*), splat(float), fma(acc, q, g) = acc + q * g, store(float*, V),
//   at_least(const float* s, float thr, unsigned lanes): bit l set when lane l < lanes has s[l] >= thr,
//   block(src, dst, stride): dst[c * stride + i] = src[i][c] for i, c < L (an L x L transpose).
#ifndef AML_TIER
#error "packed_f32-inl.h is part of a per-ISA translation unit's body (scan_<tier>.cpp)"
#endif

constexpr int64_t kPackDepth = 256;                // columns per chunk: a query register tile's chunk stays in L1
constexpr int64_t kPackTileBytes = 512 << 10;      // one packed tile (all chunks), kept in L2

// The first n values of a stored row (pointer) as float32: the row itself for float32, else widened into buf
// (n + K::W floats: the last step stores a whole vector).
template <class K>
AML_INLINE const float* row_f32(const typename K::G* row, int64_t n, float* buf) {
  if constexpr (std::is_same_v<typename K::G, float>) {
    return row;
  } else {
    int64_t c = 0;
    for (; c + K::W <= n; c += K::W) K::st(buf + c, K::lg(row + c));
    if (c < n) K::st(buf + c, K::lg_tail(row + c, static_cast<int>(n - c)));
    return buf;
  }
}

// Rows [t0, t0 + rows) x columns [k0, k0 + kc) of the gallery as panels of J * L rows: panel b holds column
// k0 + c of row t0 + b * J * L + i at (b * kc + c) * J * L + i. Rows past `rows` are zero (masked at emission).
template <class K>
void pack_chunk(const typename K::G* gal, int64_t d, int64_t t0, int64_t rows, int64_t k0, int64_t kc,
                           float* buf, const float* zeros, float* dst) {
  constexpr int64_t L = PF32::L, JL = PF32::J * L;
  for (int64_t b = 0; b * JL < rows; ++b) {
    float* panel = dst + b * kc * JL;
    const float* src[JL];
    for (int64_t i = 0; i < JL; ++i) {
      const int64_t r = b * JL + i;
      src[i] = r < rows ? row_f32<K>(gal + (t0 + r) * d + k0, kc, buf + i * (kc + K::W)) : zeros;
    }
    int64_t c0 = 0;
    for (; c0 + L <= kc; c0 += L)
      for (int64_t h = 0; h < JL; h += L) {
        const float* s[L];
        for (int64_t i = 0; i < L; ++i) s[i] = src[h + i] + c0;
        PF32::block(s, panel + c0 * JL + h, JL);
      }
    for (int64_t i = 0; i < JL; ++i)
      for (int64_t c = c0; c < kc; ++c) panel[c * JL + i] = src[i][c];
  }
}

// One register tile over kc columns: M packed queries (qp) x one panel (gp), continuing the running sums in acc
// (M * J * L floats, query-major) unless `first`.
AML_INLINE void packed_f32_tile(const float* qp, const float* gp, int64_t kc, bool first, float* acc) {
  using P = PF32;
  typename P::V a[P::M][P::J];
#pragma GCC unroll 16
  for (int m = 0; m < P::M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < P::J; ++j) a[m][j] = first ? P::zero() : P::load(acc + (m * P::J + j) * P::L);
  for (int64_t c = 0; c < kc; ++c) {
    typename P::V g[P::J];
#pragma GCC unroll 4
    for (int j = 0; j < P::J; ++j) g[j] = P::load(gp + (c * P::J + j) * P::L);
#pragma GCC unroll 16
    for (int m = 0; m < P::M; ++m) {
      const typename P::V q = P::splat(qp[c * P::M + m]);
#pragma GCC unroll 4
      for (int j = 0; j < P::J; ++j) a[m][j] = P::fma(a[m][j], q, g[j]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < P::M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < P::J; ++j) P::store(acc + (m * P::J + j) * P::L, a[m][j]);
}

// A finished register tile's scores (acc) into the reservoirs of queries qa.. (mv of them real), rows r.. (rows_left).
inline void packed_f32_emit(const float* acc, int mv, int64_t qa, int64_t r, int64_t rows_left,
                                       Reservoir* reservoirs) {
  using P = PF32;
  for (int m = 0; m < mv; ++m) {
    Reservoir& h = reservoirs[qa + m];
    for (int j = 0; j < P::J; ++j) {
      const int64_t valid = std::min<int64_t>(P::L, rows_left - j * P::L);
      if (valid <= 0) break;
      const float* s = acc + (m * P::J + j) * P::L;
      for (unsigned mask = P::at_least(s, h.threshold(), static_cast<unsigned>(valid)); mask; mask &= mask - 1) {
        const int b = __builtin_ctz(mask);
        h.push(s[b], r + j * P::L + b);
      }
    }
  }
}

// Queries [q0, q1) (q0 a multiple of M: a panel of p.packed) against rows [r0, r1): each tile of rows is packed
// whole (all depth chunks), then every query register tile runs chunk by chunk over its panels, the running sums of
// one query tile staying in L1 (running them in the chunk loop, from L3, cost a third of the time at D = 2048).
template <class K>
void scan_packed_f32(const ScanJob& j, const Prepared<typename K::Qt>& p, int64_t q0, int64_t q1,
                                int64_t r0, int64_t r1, Reservoir* reservoirs) {
  constexpr int64_t M = PF32::M, JL = PF32::J * PF32::L;
  const int64_t d = j.d, nb = (q1 - q0 + M - 1) / M;
  const int64_t depth = std::min(d, kPackDepth);
  const int64_t tile_rows = std::max(JL, kPackTileBytes / static_cast<int64_t>(d * sizeof(float)) / JL * JL);
  std::vector<float> gpack(static_cast<size_t>(tile_rows * d));  // chunk k0 at k0 * tile_rows
  std::vector<float> acc(static_cast<size_t>(tile_rows * M));
  std::vector<float> buf(std::is_same_v<typename K::G, float> ? 0 : static_cast<size_t>(JL * (depth + K::W)));
  const std::vector<float> zeros(static_cast<size_t>(depth), 0.f);
  const auto* gal = static_cast<const typename K::G*>(j.gallery);
  for (int64_t t0 = r0; t0 < r1; t0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, r1 - t0), np = (rows + JL - 1) / JL;
    for (int64_t k0 = 0; k0 < d; k0 += depth)
      pack_chunk<K>(gal, d, t0, rows, k0, std::min(depth, d - k0), buf.data(), zeros.data(), gpack.data() + k0 * tile_rows);
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t k0 = 0; k0 < d; k0 += depth) {
        const int64_t kc = std::min(depth, d - k0);
        const float* qp = p.packed.data() + (q0 / M + b) * d * M + k0 * M;
        for (int64_t pn = 0; pn < np; ++pn)
          packed_f32_tile(qp, gpack.data() + k0 * tile_rows + pn * kc * JL, kc, k0 == 0, acc.data() + pn * M * JL);
      }
      const int mv = static_cast<int>(std::min<int64_t>(M, q1 - q0 - b * M));
      for (int64_t pn = 0; pn < np; ++pn)
        packed_f32_emit(acc.data() + pn * M * JL, mv, q0 + b * M, t0 + pn * JL, rows - pn * JL, reservoirs);
    }
  }
}
