// The blocked scan, written once and compiled once per instruction-set tier: each scan_<tier>.cpp is built with
// its own flags (CMakeLists.txt), defines AML_TIER and AML_INLINE and the kernel traits KF32, KF16, KBF16, KI8
// inside `namespace aml::<tier>`, then includes this body there. A trait K derives from KernelDefaults (scan.h)
// and supplies:
//   G (stored element), Qt (prepared query element), V (accumulator vector),
//   QV / GV (loaded query / gallery vectors), Acc (float, or int32 for int8),
//   W (elements per step), kKind, zero(), lq(p), lg(p), lg_tail(p, n) (n < W valid elements), madd(acc, q, g),
//   sum(acc) -> Acc, qconv(float) -> Qt; and overrides of the defaults where they differ:
//   kXorBias (VNNI's unsigned-operand bias, 0), kRows (gallery rows per register tile, 4), kSumTile (false):
//   whether sum_tile(acc, out) reduces a whole 4 x 4 tile at once (it must round exactly as sum() does) and
//   tile_scores() gives its scores and the mask of those that may enter their reservoirs, kPacks (false): whether
//   many queries use the tier's packed kernel (scan_packed_block, defined by the tier), kPackF32 (false): whether
//   they use the packed float32 kernel of packed_f32-inl.h (float queries; lg() gives float32 vectors,
//   st(float*, GV) stores one).
// No include guard: each tier includes it once into its own namespace.
#ifndef AML_TIER
#error "scan-inl.h is the body of a per-ISA translation unit (scan_<tier>.cpp): define AML_TIER there"
#endif

constexpr int64_t kQueryPad = 64;       // queries are zero-padded to a multiple of every W
constexpr int64_t kTileBytes = 96 << 10;  // gallery rows scored together, kept in L2
constexpr int64_t kQueryBlock = 256;    // queries sharing one pass over a tile
// Software prefetch distance for streamed rows. The L2 streamer follows one stream per 4 KiB page, but a
// register tile reads kRows rows side by side: several interleaved streams in one page once rows are
// ~1 KiB (D = 512 float16), which left single-query scans at half the read bandwidth.
constexpr int64_t kPrefetchBytes = 4096;

// From this many queries in a block, scans go through a packed tile (K::kPacks: the tier's own kernel, else
// K::kPackF32: packed_f32.h); fewer scan rows as stored.
constexpr int64_t kPackQueries = 16;
// Packed float scans repack their rows once per query block, so they take blocks this large when the rows
// alone can give every thread work.
constexpr int64_t kPackQueryBlock = 1024;
// Row chunks (tasks) are at least this long.
constexpr int64_t kMinChunkRows = 2048;

template <class Qt>
struct Prepared {
  int64_t dp = 0;
  std::vector<Qt> q;            // nq x dp, through the scanned dtype's codec
  std::vector<float> scale;     // int8: per-query scale
  std::vector<int32_t> bias;    // int8: the exact integer offset the kernel adds
  // K::kPackF32 with many queries: panels of PF32::M queries, column-major (query i, column c at
  // ((i / M) * d + c) * M + i % M; zero past nq), read by packed_f32.h.
  std::vector<float> packed;
};

// Rows handed to the register tiles: shard row r starts at base + (r - first) * stride.
template <class G>
struct Rows {
  const G* base;
  int64_t first, stride;
  const float* scale;  // int8: per-row scales, indexed by shard row
  const G* row(int64_t r) const { return base + (r - first) * stride; }
};

// Queries through the codec of the scanned copy, so every tier computes the same products.
// With `pack` (K::kPackF32 and enough queries for the packed kernel) also fills p.packed.
template <class K>
Prepared<typename K::Qt> prepare(const ScanJob& j, bool pack) {
  Prepared<typename K::Qt> p;
  p.dp = (j.d + kQueryPad - 1) / kQueryPad * kQueryPad;
  p.q.assign(static_cast<size_t>(j.nq * p.dp), typename K::Qt(0));
  p.scale.assign(j.nq, 1.f);
  p.bias.assign(j.nq, 0);
  for (int64_t i = 0; i < j.nq; ++i) {
    const float* x = j.queries + i * j.d;
    typename K::Qt* o = p.q.data() + i * p.dp;
    if constexpr (K::kKind == Dtype::int8) {
      float amax = 0.f;
      bool finite = true;
      for (int64_t c = 0; c < j.d; ++c) amax = std::max(amax, std::fabs(x[c])), finite &= std::isfinite(x[c]);
      // A query holding NaN or inf has no int8 form: its scale NaN makes every score NaN, as a float scan's
      // NaN query does (std::max alone would drop the NaN and quantize it to a finite query).
      const float s = !finite ? std::numeric_limits<float>::quiet_NaN() : amax > 0.f ? amax / 127.0f : 1.0f;
      int32_t total = 0;
      for (int64_t c = 0; c < j.d; ++c) {
        const int v = static_cast<int>(std::min(127.f, std::max(-127.f, std::nearbyint(x[c] / s))));
        o[c] = K::qconv(static_cast<float>(v));
        total += v;
      }
      p.scale[i] = s;
      p.bias[i] = K::kXorBias * total;
    } else if constexpr (K::kKind == Dtype::bfloat16) {
      for (int64_t c = 0; c < j.d; ++c) o[c] = K::qconv(bf16_bits_to_float(float_to_bf16_bits(x[c])));
    } else {
      for (int64_t c = 0; c < j.d; ++c) o[c] = K::qconv(x[c]);
    }
  }
  if constexpr (K::kPackF32) {
    if (pack) {
      constexpr int64_t M = PF32::M;
      p.packed.assign(static_cast<size_t>((j.nq + M - 1) / M * M * j.d), 0.f);
      for (int64_t i = 0; i < j.nq; ++i)
        for (int64_t c = 0; c < j.d; ++c) p.packed[((i / M) * j.d + c) * M + i % M] = p.q[i * p.dp + c];
    }
  }
  return p;
}

// Issues the prefetches for one step of a register tile: the lines `step` bytes at pf.
template <int64_t Step>
AML_INLINE void prefetch_step(const char* pf) {
#pragma GCC unroll 8
  for (int64_t b = 0; b < Step; b += 64) __builtin_prefetch(pf + b, 0, 3);
}

// M queries x N rows, dot products along d held in registers; raw sums to out[m * N + n]. With pf (rows
// contiguous, streamed from memory) each step also prefetches as many bytes as it reads, kPrefetchBytes
// ahead of the tile, so the prefetch front moves exactly as fast as the scan.
template <class K, int M, int N, bool Prefetch = false>
AML_INLINE void tile(const typename K::Qt* const* q, const typename K::G* const* g, int64_t d,
                                typename K::Acc* out, const char* pf = nullptr) {
  constexpr int64_t step = static_cast<int64_t>(K::W) * N * sizeof(typename K::G);
  typename K::V acc[M][N];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) acc[m][n] = K::zero();
  int64_t c = 0;
  for (; c + K::W <= d; c += K::W) {
    if constexpr (Prefetch && K::W > 1) {
      prefetch_step<(step < 64 ? 64 : step)>(pf);
      pf += step;
    }
    typename K::GV gv[N];
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) gv[n] = K::lg(g[n] + c);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const typename K::QV qv = K::lq(q[m] + c);
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) acc[m][n] = K::madd(acc[m][n], qv, gv[n]);
    }
  }
  if (c < d) {
    const int rem = static_cast<int>(d - c);
    typename K::GV gv[N];
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) gv[n] = K::lg_tail(g[n] + c, rem);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const typename K::QV qv = K::lq(q[m] + c);
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) acc[m][n] = K::madd(acc[m][n], qv, gv[n]);
    }
  }
  if constexpr (M == 4 && N == 4 && K::kSumTile) {
    K::sum_tile(acc, out);  // one transposing reduction for 16 sums, ~3x fewer instructions
  } else {
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) out[m * N + n] = K::sum(acc[m][n]);
  }
}

// Raw sums -> scores, each compared at once with its query's current worst kept score.
template <class K, int M, int N>
AML_INLINE void emit(const Prepared<typename K::Qt>& p, const Rows<typename K::G>& rows, int64_t qa, int64_t r,
                 const typename K::Acc* out, Reservoir* reservoirs) {
  if constexpr (M == 4 && N == 4 && K::kSumTile) {  // one vector compare rejects the whole tile
    float thr[4], s[16];
    for (int m = 0; m < 4; ++m) thr[m] = reservoirs[qa + m].threshold();
    unsigned mask = K::tile_scores(out, thr, p.bias.data() + qa, p.scale.data() + qa,
                                    rows.scale ? rows.scale + r : nullptr, s);
    for (; mask; mask &= mask - 1) {
      const int b = __builtin_ctz(mask);
      reservoirs[qa + b / 4].push(s[b], r + b % 4);
    }
    return;
  }
  for (int m = 0; m < M; ++m) {
    Reservoir& h = reservoirs[qa + m];
    for (int n = 0; n < N; ++n) {
      float s;
      if constexpr (K::kKind == Dtype::int8)
        s = static_cast<float>(out[m * N + n] - p.bias[qa + m]) * p.scale[qa + m] * rows.scale[r + n];
      else
        s = out[m * N + n];
      if (h.may_enter(s)) h.push(s, r + n);
    }
  }
}

// M queries from qa against rows [r0, r1), kRows rows per register tile; Prefetch when the rows stream
// from memory (contiguous: stride == d) and this group is the first to read them.
template <class K, int M, bool Prefetch>
void scan_group(const Prepared<typename K::Qt>& p, const Rows<typename K::G>& rows, int64_t d, int64_t qa,
                           int64_t r0, int64_t r1, Reservoir* reservoirs) {
  using G = typename K::G;
  const typename K::Qt* qs[M];
  for (int m = 0; m < M; ++m) qs[m] = p.q.data() + (qa + m) * p.dp;
  constexpr int R = K::kRows;
  typename K::Acc out[M * R];
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const G* gs[R];
    for (int n = 0; n < R; ++n) gs[n] = rows.row(r + n);
    tile<K, M, R, Prefetch>(qs, gs, d, out, reinterpret_cast<const char*>(gs[0]) + kPrefetchBytes);
    emit<K, M, R>(p, rows, qa, r, out, reservoirs);
  }
  for (; r < r1; ++r) {
    const G* gs[1] = {rows.row(r)};
    tile<K, M, 1>(qs, gs, d, out);
    emit<K, M, 1>(p, rows, qa, r, out, reservoirs);
  }
}

// scan_group with its Prefetch chosen at run time.
template <class K, int M>
void scan_group_pf(bool pf, const Prepared<typename K::Qt>& p, const Rows<typename K::G>& rows, int64_t d, int64_t qa,
                   int64_t t0, int64_t t1, Reservoir* reservoirs) {
  if (pf)
    scan_group<K, M, true>(p, rows, d, qa, t0, t1, reservoirs);
  else
    scan_group<K, M, false>(p, rows, d, qa, t0, t1, reservoirs);
}

// Queries [q0, q1) in groups of up to four against rows [t0, t1); `stream`: the rows come from memory
// (the first group prefetches them, later groups find them in cache).
template <class K>
void scan_groups(const Prepared<typename K::Qt>& p, const Rows<typename K::G>& rows, int64_t d, int64_t q0, int64_t q1,
                 int64_t t0, int64_t t1, Reservoir* reservoirs, bool stream) {
  int64_t qa = q0;
  for (; qa + 4 <= q1; qa += 4) scan_group_pf<K, 4>(stream && qa == q0, p, rows, d, qa, t0, t1, reservoirs);
  const bool pf = stream && qa == q0;
  switch (q1 - qa) {
    case 3: scan_group_pf<K, 3>(pf, p, rows, d, qa, t0, t1, reservoirs); break;
    case 2: scan_group_pf<K, 2>(pf, p, rows, d, qa, t0, t1, reservoirs); break;
    case 1: scan_group_pf<K, 1>(pf, p, rows, d, qa, t0, t1, reservoirs); break;
    default: break;
  }
}

// Queries [q0, q1) against rows [r0, r1) through a packed copy of each tile (tiers whose K::kPacks).
template <class K>
void scan_packed_block(const ScanJob& j, const Prepared<typename K::Qt>& p, int64_t q0, int64_t q1, int64_t r0,
                       int64_t r1, Reservoir* reservoirs);

// The same for float32 / float16 / bfloat16 (K::kPackF32), defined in packed_f32.h.
template <class K>
void scan_packed_f32(const ScanJob& j, const Prepared<typename K::Qt>& p, int64_t q0, int64_t q1,
                                int64_t r0, int64_t r1, Reservoir* reservoirs);

// Queries [q0, q1) against rows [r0, r1), tile by tile so each tile is reused from cache by every query.
template <class K>
void scan_block(const ScanJob& j, const Prepared<typename K::Qt>& p, int64_t q0, int64_t q1, int64_t r0, int64_t r1,
                Reservoir* reservoirs) {
  using G = typename K::G;
  const G* gal = static_cast<const G*>(j.gallery);
  const int64_t row_bytes = std::max<int64_t>(1, j.d * static_cast<int64_t>(sizeof(G)));
  const int64_t tile_rows = std::max<int64_t>(4, kTileBytes / row_bytes / 4 * 4);
  if constexpr (K::kPacks) {
    if (q1 - q0 >= kPackQueries) return scan_packed_block<K>(j, p, q0, q1, r0, r1, reservoirs);
  }
  if constexpr (K::kPackF32) {
    if (q1 - q0 >= kPackQueries) return scan_packed_f32<K>(j, p, q0, q1, r0, r1, reservoirs);
  }
  for (int64_t t0 = r0; t0 < r1; t0 += tile_rows)
    scan_groups<K>(p, Rows<G>{gal, 0, j.d, j.scale}, j.d, q0, q1, t0, std::min(r1, t0 + tile_rows), reservoirs, true);
}

inline float exact_dot(const float* q, const float* row, int64_t d) {
  const float* qs[1] = {q};
  const float* gs[1] = {row};
  float out;
  tile<KF32, 1, 1>(qs, gs, d, &out);
  return out;
}

// Recompute each candidate's score in float32 against the exact copy and keep the k best. The candidates are
// the scan's min(cap, n) ranked rows (rows the scan scored NaN included), so at least k rows are offered and
// the result ranks exactly min(k, n) rows.
inline void rescore(const ScanJob& j, std::vector<Reservoir>& cand) {
  const Prepared<float> p = prepare<KF32>(j, false);
  std::vector<Reservoir> best(j.nq, Reservoir(static_cast<size_t>(j.k)));
  std::atomic<int64_t> next{0};
  Pool::get().run(static_cast<int>(std::min<int64_t>(j.threads, j.nq)), [&](int) {
    for (int64_t i; (i = next++) < j.nq;) {
      const float* q = p.q.data() + i * p.dp;
      for (const auto& e : cand[i].ranked(j.n)) best[i].push(exact_dot(q, j.exact + e.second * j.d, j.d), e.second);
    }
  });
  cand = std::move(best);
}

// Tasks are (query block, row chunk) pairs: many queries split into blocks, few queries split
// the rows; each worker keeps its own reservoirs, merged at the end.
template <class K>
void run(const ScanJob& j, std::vector<Reservoir>& out) {
  // Packed float blocks start at multiples of PF32::M (the panels of p.packed); they take large blocks when the
  // rows alone give every thread work, in many short chunks (a chunk costs no extra packing) so that a thread
  // slowed by other load does not leave the other waiting.
  const bool packs = K::kPackF32 && j.nq >= kPackQueries;
  const Prepared<typename K::Qt> p = prepare<K>(j, packs);
  const int64_t T = j.threads;
  const bool big = packs && j.n >= 2 * T * kMinChunkRows;
  const int64_t unit = packs ? PF32::M : 1;
  const int64_t qb = std::min<int64_t>(j.nq, (big ? kPackQueryBlock : kQueryBlock) / unit * unit);
  const int64_t nqb = (j.nq + qb - 1) / qb;
  const int64_t nrc = nqb >= 2 * T ? 1 : std::max<int64_t>(1, std::min<int64_t>((big ? 32 : 8) * T, j.n / kMinChunkRows));
  const int64_t rc = ((j.n + nrc - 1) / nrc + 3) / 4 * 4;
  const int64_t ntasks = nqb * nrc;
  const int workers = static_cast<int>(std::min<int64_t>(T, ntasks));
  std::vector<std::vector<Reservoir>> reservoirs(workers, std::vector<Reservoir>(j.nq, Reservoir(static_cast<size_t>(j.cap))));
  std::atomic<int64_t> next{0};
  Pool::get().run(workers, [&](int w) {
    for (int64_t t; (t = next++) < ntasks;) {
      const int64_t b = t / nrc, c = t % nrc;
      const int64_t r0 = std::min(j.n, c * rc), r1 = std::min(j.n, r0 + rc);
      scan_block<K>(j, p, b * qb, std::min(j.nq, (b + 1) * qb), r0, r1, reservoirs[w].data());
    }
  });
  out = std::move(reservoirs[0]);
  for (int w = 1; w < workers; ++w)
    for (int64_t i = 0; i < j.nq; ++i) out[i].absorb(reservoirs[w][i]);
  if (j.exact) rescore(j, out);
}

void scan(const ScanJob& j, std::vector<Reservoir>& out) {
  switch (j.dtype) {
    case Dtype::float32: run<KF32>(j, out); break;
    case Dtype::float16: run<KF16>(j, out); break;
    case Dtype::bfloat16: run<KBF16>(j, out); break;
    case Dtype::int8: run<KI8>(j, out); break;
  }
}
