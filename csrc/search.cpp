// engine._search: exact top-k by inner product over one shard of a gallery.
// Python owns files, shards and merging; this module only scores one block of
// queries against one block of gallery rows and keeps each query's k best.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Order used everywhere: higher score first, then lower id (deterministic ties).
inline bool better(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// Bounded min-heap of the k best (score, id) pairs of one query; its root is
// the current k-th best, so most candidates are rejected by one comparison.
struct TopK {
  std::vector<std::pair<float, int64_t>> h;
  size_t k;
  explicit TopK(size_t k_) : k(k_) { h.reserve(k_); }
  static bool worse_first(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return better(a.first, a.second, b.first, b.second);
  }
  void push(float s, int64_t id) {
    if (h.size() < k) {
      h.emplace_back(s, id);
      std::push_heap(h.begin(), h.end(), worse_first);
    } else if (better(s, id, h.front().first, h.front().second)) {
      std::pop_heap(h.begin(), h.end(), worse_first);
      h.back() = {s, id};
      std::push_heap(h.begin(), h.end(), worse_first);
    }
  }
  void sorted_into(float* scores, int64_t* ids) {
    std::sort_heap(h.begin(), h.end(), worse_first);
    for (size_t i = 0; i < h.size(); ++i) {
      scores[i] = h[i].first;
      ids[i] = h[i].second;
    }
  }
};

py::tuple topk(py::array_t<float, py::array::c_style | py::array::forcecast> queries,
               py::array_t<float, py::array::c_style | py::array::forcecast> gallery, int64_t k,
               int64_t id_offset) {
  if (queries.ndim() != 2 || gallery.ndim() != 2) throw std::invalid_argument("queries and gallery must be 2-d");
  const int64_t nq = queries.shape(0), d = queries.shape(1), n = gallery.shape(0);
  if (gallery.shape(1) != d) throw std::invalid_argument("queries and gallery differ in dimension");
  if (k <= 0) throw std::invalid_argument("k must be positive");
  const int64_t kk = std::min(k, n);
  py::array_t<float> scores({nq, kk});
  py::array_t<int64_t> ids({nq, kk});
  const float* q = queries.data();
  const float* g = gallery.data();
  float* out_s = scores.mutable_data();
  int64_t* out_i = ids.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t qi = 0; qi < nq; ++qi) {
      TopK heap(static_cast<size_t>(kk));
      const float* qv = q + qi * d;
      for (int64_t r = 0; r < n; ++r) {
        const float* gv = g + r * d;
        float s = 0.f;
        for (int64_t j = 0; j < d; ++j) s += qv[j] * gv[j];
        heap.push(s, r + id_offset);
      }
      heap.sorted_into(out_s + qi * kk, out_i + qi * kk);
    }
  }
  return py::make_tuple(scores, ids);
}

}  // namespace

PYBIND11_MODULE(_search, m) {
  m.doc() = "Exact top-k inner-product search over one gallery shard";
  m.def("topk", &topk, py::arg("queries"), py::arg("gallery"), py::arg("k"), py::arg("id_offset") = 0,
        "Top-k rows of `gallery` (N x D float32) for each row of `queries` (Q x D float32) by inner product.\n"
        "Returns (scores float32 Q x min(k, N), ids int64 Q x min(k, N)), best first, ties by lower id;\n"
        "ids are row numbers plus `id_offset`.");
}
