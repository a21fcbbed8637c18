// engine._search: exact top-k by inner product over one shard of a gallery.
// Python owns files, shards and merging; this module scores a block of queries
// against one shard view (pointer, rows, dtype) and keeps each query's k best.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu.h"
#include "pool.h"
#include "reservoir.h"
#include "scan.h"

namespace py = pybind11;
using namespace aml;

namespace {

// The most worker threads one search may ask for (threads = 0 means the machine's cores).
constexpr int kMaxThreads = 1024;

ScanFn scan_for(Isa isa) {
  switch (isa) {
    case Isa::scalar: return scalar::scan;
#ifdef AML_X86_TIERS
    case Isa::avx2: return avx2::scan;
    case Isa::avx512: return avx512::scan;
    case Isa::avx512_vnni: return avx512_vnni::scan;
    case Isa::avx512_bf16: return avx512_bf16::scan;
#else
    default: break;  // resolve_isa() names no other tier here
#endif
  }
  return scalar::scan;
}

// Whether `a` holds elements of numpy type `np` in the machine's byte order (a '>f4' array has float32's kind
// but not its bytes).
bool has_dtype(const py::array& a, const py::dtype& np) {
  const char order = a.dtype().byteorder();
  const bool native = order == '=' || order == '|' || order == (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? '>' : '<');
  return a.dtype().num() == np.num() && native;
}

// The kernels read a.data() as rows x cols elements, one after the other: anything else is refused, not copied
// (a gallery is a memory map of up to gigabytes).
void check_array(const py::array& a, const py::dtype& np, int ndim, const int64_t* shape, const std::string& what,
                 const std::string& expect) {
  if (!has_dtype(a, np))
    throw std::invalid_argument(what + " must be " + std::string(py::str(np)) + ", got " + std::string(py::str(a.dtype())));
  bool same = a.ndim() == ndim;
  for (int i = 0; same && i < ndim; ++i) same = a.shape(i) == shape[i];
  if (!same) {
    std::string got;
    for (int i = 0; i < a.ndim(); ++i) got += (i ? " x " : "") + std::to_string(a.shape(i));
    throw std::invalid_argument(what + " must be " + expect + ", got shape (" + got + ")");
  }
  const int flags = a.flags();
  if (!(flags & py::array::c_style)) throw std::invalid_argument(what + " must be C-contiguous");
  if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) throw std::invalid_argument(what + " must be aligned");
}

Dtype parse_dtype(const std::string& name, py::dtype& np) {
  if (name == "float32") return np = py::dtype::of<float>(), Dtype::float32;
  if (name == "float16") return np = py::dtype("float16"), Dtype::float16;
  if (name == "bfloat16") return np = py::dtype::of<uint16_t>(), Dtype::bfloat16;
  if (name == "int8") return np = py::dtype::of<int8_t>(), Dtype::int8;
  throw std::invalid_argument("unknown dtype '" + name + "': expected float32, float16, bfloat16 or int8");
}

py::tuple search_shard(py::array queries, py::array vectors, const std::string& dtype, int64_t k, py::object scale,
                       py::object exact, int64_t rescore, int64_t id_offset, int threads, const std::string& isa) {
  // Every size is checked here, once, so that the kernels' loops need no checks of their own.
  if (k <= 0) throw std::invalid_argument("k must be positive");
  if (rescore < 0) throw std::invalid_argument("rescore must be >= 0");
  if (id_offset < 0) throw std::invalid_argument("id_offset must be >= 0");
  if (threads < 0 || threads > kMaxThreads)
    throw std::invalid_argument("threads must be 0 (all cores) to " + std::to_string(kMaxThreads));
  if (queries.ndim() != 2) throw std::invalid_argument("queries must be 2-d (Q x D)");
  if (vectors.ndim() != 2) throw std::invalid_argument("vectors must be 2-d (N x D)");
  ScanJob j{};
  j.nq = queries.shape(0);
  j.d = queries.shape(1);
  j.n = vectors.shape(0);
  if (j.d < 1) throw std::invalid_argument("vectors must have D >= 1");
  const int64_t qshape[2] = {j.nq, j.d}, gshape[2] = {j.n, j.d};
  const std::string rows_x_d = std::to_string(j.n) + " x " + std::to_string(j.d) + " (N x the queries' D)";
  check_array(queries, py::dtype::of<float>(), 2, qshape, "queries", "Q x D");
  py::dtype stored;
  j.dtype = parse_dtype(dtype, stored);
  check_array(vectors, stored, 2, gshape, "a " + dtype + " gallery (vectors)", rows_x_d);
  if (j.dtype == Dtype::int8 && j.d > 65536) throw std::invalid_argument("int8 scans support D <= 65536 (int32 sums)");
  int64_t last_id;
  if (__builtin_add_overflow(id_offset, j.n, &last_id)) throw std::invalid_argument("id_offset + N overflows int64");
  j.queries = static_cast<const float*>(queries.data());
  j.gallery = vectors.data();
  if (j.dtype == Dtype::int8) {
    if (scale.is_none()) throw std::invalid_argument("an int8 gallery needs its per-row float32 scale");
    if (!py::isinstance<py::array>(scale)) throw std::invalid_argument("scale must be a numpy array");
    const auto sa = py::reinterpret_borrow<py::array>(scale);
    check_array(sa, py::dtype::of<float>(), 1, &j.n, "scale", "one float32 per gallery row (" + std::to_string(j.n) + ")");
    j.scale = static_cast<const float*>(sa.data());
  }
  const bool rescoring = rescore > 0 && j.dtype != Dtype::float32;
  if (rescoring) {
    if (exact.is_none()) throw std::invalid_argument("rescoring needs the float32 copy (exact)");
    if (!py::isinstance<py::array>(exact)) throw std::invalid_argument("exact must be a numpy array");
    const auto ex = py::reinterpret_borrow<py::array>(exact);
    check_array(ex, py::dtype::of<float>(), 2, gshape, "exact (the float32 copy)", rows_x_d);
    j.exact = static_cast<const float*>(ex.data());
  }
  const int64_t kk = std::min(k, j.n);
  int64_t candidates;  // k * rescore, which a huge k overflows: more candidates than rows are all rows
  if (__builtin_mul_overflow(k, rescore, &candidates)) candidates = j.n;
  j.k = kk;
  j.cap = rescoring ? std::min(j.n, candidates) : kk;
  j.threads = threads > 0 ? threads : Pool::hardware_threads();
  const ScanFn fn = scan_for(resolve_isa(isa));

  // The arrays and their contents are kept alive by the caller's references while the GIL is released.
  py::array_t<float> scores({j.nq, kk});
  py::array_t<int64_t> ids({j.nq, kk});
  float* out_s = scores.mutable_data();
  int64_t* out_i = ids.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<Reservoir> best;
    if (j.n > 0 && j.nq > 0) fn(j, best);
    for (int64_t i = 0; i < static_cast<int64_t>(best.size()); ++i) {
      const std::vector<Entry> row = best[i].ranked(j.n);  // exactly kk rows of 0..n-1, best first
      for (int64_t c = 0; c < kk; ++c) {
        out_s[i * kk + c] = row[c].first;
        out_i[i * kk + c] = row[c].second + id_offset;
      }
    }
  }
  return py::make_tuple(scores, ids);
}

py::dict pool_stats() {
  const Pool::Stats st = Pool::get().stats();
  py::dict out;
  out["running"] = st.running;
  out["peak"] = st.peak;
  out["helpers"] = st.helpers;
  return out;
}

// One pool job of `threads` workers whose caller waits, the GIL released, at a barrier inside the job until
// `jobs` such calls are inside their jobs at once; true when they met, false after `timeout` seconds. Run from
// `jobs` Python threads it shows that jobs run side by side, not one after the other (a test of the pool).
bool pool_rendezvous(int64_t jobs, int threads, double timeout) {
  if (jobs < 1) throw std::invalid_argument("jobs must be >= 1");
  if (threads < 1 || threads > kMaxThreads) throw std::invalid_argument("threads must be 1 to " + std::to_string(kMaxThreads));
  static std::mutex mu;
  static std::condition_variable cv;
  static int64_t arrived = 0, round = 0;  // calls waiting at the barrier; groups that met so far
  py::gil_scoped_release release;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  bool met = false;
  Pool::get().run(threads, [&](int w) {
    if (w != 0) return;
    std::unique_lock<std::mutex> lk(mu);
    const int64_t mine = round;
    if (++arrived == jobs) {
      arrived = 0;
      ++round;
      cv.notify_all();
      met = true;
    } else if (!(met = cv.wait_until(lk, until, [&] { return round != mine; }))) {
      --arrived;  // gave up: leaves the barrier as it found it
    }
  });
  return met;
}

std::vector<std::string> isa_levels() {
  std::vector<std::string> out;
  for (Isa isa : supported_isas()) out.emplace_back(isa_name(isa));
  return out;
}

}  // namespace

PYBIND11_MODULE(_search, m) {
  m.doc() = "Exact top-k inner-product search over one gallery shard (blocked SIMD kernels, own thread pool)";
  m.def("search_shard", &search_shard, py::arg("queries"), py::arg("vectors"), py::arg("dtype"), py::arg("k"),
        py::arg("scale") = py::none(), py::arg("exact") = py::none(), py::arg("rescore") = 0,
        py::arg("id_offset") = 0, py::arg("threads") = 0, py::arg("isa") = "auto",
        "Top-k rows of one shard for each query by inner product.\n\n"
        "queries: Q x D float32. vectors: N x D of `dtype` (float32; float16; bfloat16 as uint16 bits; int8 with\n"
        "`scale`, N float32). Every array must have exactly that dtype (native byte order) and shape, and be\n"
        "C-contiguous and aligned (it is read in place, never copied); ValueError otherwise. With rescore = r > 0\n"
        "and a compressed dtype, the scan keeps min(N, k*r) candidates (k*r may exceed int64: then all rows) and\n"
        "rescoring against `exact` (N x D float32, the same rows) returns exact float32 scores.\n"
        "threads: 0 = all cores, at most 1024. isa: auto, scalar, avx2, avx512, avx512_vnni or avx512_bf16.\n"
        "Returns (scores float32 Q x min(k, N), ids int64 Q x min(k, N)), best first, ties by lower id; every id\n"
        "is a distinct row number plus `id_offset`, for any input. A NaN score (a row or query holding NaN, or\n"
        "inf times 0) ranks after every number: such rows come last, by lower id, with score NaN.\n"
        "The GIL is released while scanning.");
  m.def("isa_levels", &isa_levels, "Instruction-set tiers this CPU runs, lowest first (\"scalar\" always).");
  m.def("default_threads", &Pool::hardware_threads, "Threads used when threads = 0 (the machine's cores).");
  m.def("pool_stats", &pool_stats,
        "The thread pool now: {'running': jobs in it, 'peak': the most at once so far, 'helpers': threads started}.");
  m.def("pool_rendezvous", &pool_rendezvous, py::arg("jobs"), py::arg("threads") = 2, py::arg("timeout") = 10.0,
        "Runs one pool job of `threads` workers whose caller waits (GIL released) inside the job until `jobs` such\n"
        "calls are inside theirs at once: True when they met, False after `timeout` seconds. Called from `jobs`\n"
        "Python threads at once, every call returns True: jobs run side by side (a pool running one job at a time\n"
        "would let one in and time out).");
  m.attr("MAX_THREADS") = kMaxThreads;
}
