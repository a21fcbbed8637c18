// engine._search: exact top-k by inner product over one shard of a gallery.
// Python owns files, shards and merging; this module scores a block of queries
// against one shard view (pointer, rows, dtype) and keeps each query's k best.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu.h"
#include "pool.h"
#include "scan.h"

namespace py = pybind11;
using namespace aml;

namespace {

ScanFn scan_for(Isa isa) {
  switch (isa) {
    case Isa::scalar: return scalar::scan;
    case Isa::avx2: return avx2::scan;
    case Isa::avx512: return avx512::scan;
    case Isa::avx512_vnni: return avx512_vnni::scan;
    case Isa::avx512_bf16: return avx512_bf16::scan;
  }
  return scalar::scan;
}

Dtype parse_dtype(const std::string& name, const py::array& a) {
  struct Entry { const char* name; Dtype dtype; py::dtype np; };
  const Entry table[] = {{"float32", Dtype::float32, py::dtype::of<float>()},
                         {"float16", Dtype::float16, py::dtype("float16")},
                         {"bfloat16", Dtype::bfloat16, py::dtype::of<uint16_t>()},
                         {"int8", Dtype::int8, py::dtype::of<int8_t>()}};
  for (const auto& e : table) {
    if (name != e.name) continue;
    if (!a.dtype().is(e.np))
      throw std::invalid_argument("a " + name + " gallery must be stored as " + std::string(py::str(e.np)) +
                                  ", got " + std::string(py::str(a.dtype())));
    return e.dtype;
  }
  throw std::invalid_argument("unknown dtype '" + name + "': expected float32, float16, bfloat16 or int8");
}

void check_rows(const py::array& a, int64_t n, int64_t d, const char* what) {
  if (a.ndim() != 2 || a.shape(0) != n || a.shape(1) != d)
    throw std::invalid_argument(std::string(what) + " must be " + std::to_string(n) + " x " + std::to_string(d));
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(what) + " must be C-contiguous");
}

py::tuple search_shard(py::array_t<float, py::array::c_style | py::array::forcecast> queries, py::array vectors,
                       const std::string& dtype, int64_t k, py::object scale, py::object exact, int64_t rescore,
                       int64_t id_offset, int threads, const std::string& isa) {
  if (queries.ndim() != 2) throw std::invalid_argument("queries must be 2-d (Q x D)");
  if (vectors.ndim() != 2) throw std::invalid_argument("vectors must be 2-d (N x D)");
  if (k <= 0) throw std::invalid_argument("k must be positive");
  if (rescore < 0) throw std::invalid_argument("rescore must be >= 0");
  ScanJob j{};
  j.nq = queries.shape(0);
  j.d = queries.shape(1);
  j.n = vectors.shape(0);
  j.dtype = parse_dtype(dtype, vectors);
  check_rows(vectors, j.n, j.d, "vectors");
  if (j.dtype == Dtype::int8 && j.d > 65536) throw std::invalid_argument("int8 scans support D <= 65536 (int32 sums)");
  j.queries = queries.data();
  j.gallery = vectors.data();
  py::array_t<float> scale_arr, exact_arr;
  if (j.dtype == Dtype::int8) {
    if (scale.is_none()) throw std::invalid_argument("an int8 gallery needs its per-row float32 scale");
    scale_arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(scale);
    if (!scale_arr || scale_arr.ndim() != 1 || scale_arr.shape(0) != j.n)
      throw std::invalid_argument("scale must hold one float32 per gallery row");
    j.scale = scale_arr.data();
  }
  const bool rescoring = rescore > 0 && j.dtype != Dtype::float32;
  if (rescoring) {
    if (exact.is_none()) throw std::invalid_argument("rescoring needs the float32 copy (exact)");
    py::array ex = py::reinterpret_borrow<py::array>(exact);
    if (!ex.dtype().is(py::dtype::of<float>())) throw std::invalid_argument("exact must be float32");
    check_rows(ex, j.n, j.d, "exact");
    exact_arr = py::reinterpret_borrow<py::array_t<float>>(exact);
    j.exact = exact_arr.data();
  }
  const int64_t kk = std::min(k, j.n);
  j.k = kk;
  j.cap = rescoring ? std::min(j.n, k * rescore) : kk;
  j.threads = threads > 0 ? threads : Pool::hardware_threads();
  const ScanFn fn = scan_for(resolve_isa(isa));

  py::array_t<float> scores({j.nq, kk});
  py::array_t<int64_t> ids({j.nq, kk});
  float* out_s = scores.mutable_data();
  int64_t* out_i = ids.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<TopK> best;
    if (j.n > 0 && j.nq > 0) fn(j, best);
    for (int64_t i = 0; i < static_cast<int64_t>(best.size()); ++i) {
      const auto& row = best[i].sorted();
      for (int64_t c = 0; c < kk; ++c) {
        out_s[i * kk + c] = row[c].first;
        out_i[i * kk + c] = row[c].second + id_offset;
      }
    }
  }
  return py::make_tuple(scores, ids);
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
        "queries: Q x D float32. vectors: N x D, C-contiguous, of `dtype` (float32; float16; bfloat16 as uint16\n"
        "bits; int8 with `scale`, N float32). With rescore = r > 0 and a compressed dtype, the scan keeps k*r\n"
        "candidates and rescoring against `exact` (N x D float32) returns exact float32 scores.\n"
        "threads: 0 = all cores. isa: auto, scalar, avx2, avx512, avx512_vnni or avx512_bf16.\n"
        "Returns (scores float32 Q x min(k, N), ids int64 Q x min(k, N)), best first, ties by lower id;\n"
        "ids are row numbers plus `id_offset`. The GIL is released while scanning.");
  m.def("isa_levels", &isa_levels, "Instruction-set tiers this CPU runs, lowest first (\"scalar\" always).");
  m.def("default_threads", &Pool::hardware_threads, "Threads used when threads = 0 (the machine's cores).");
}
