// Per-query top-k: the one ordering used everywhere is higher score first, then lower id, so results
// are deterministic under ties.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace aml {

inline bool better(float sa, int64_t ia, float sb, int64_t ib) { return sa > sb || (sa == sb && ia < ib); }

// The `cap` best (score, id) pairs seen, kept as a reservoir: candidates at or above the threshold are
// appended, and when 2 * cap have gathered a selection keeps the cap best and raises the threshold to the
// worst of them. Amortised O(1) per candidate (a heap costs O(log cap), which dominates at cap ~ 400).
class TopK {
 public:
  explicit TopK(size_t cap) : cap_(cap) {}
  // Scores below this can never enter (-inf until cap candidates were kept once).
  float threshold() const { return thr_; }
  bool may_enter(float s) const { return s >= thr_; }
  void push(float s, int64_t id) {
    if (!(s >= thr_) || cap_ == 0) return;  // also drops NaN
    if (buf_.empty()) buf_.reserve(2 * cap_);
    buf_.emplace_back(s, id);
    if (buf_.size() >= 2 * cap_) shrink();
  }
  void absorb(const TopK& o) {
    for (const auto& e : o.buf_) push(e.first, e.second);
  }
  // The kept entries (at most cap), in no set order.
  const std::vector<std::pair<float, int64_t>>& kept() {
    if (buf_.size() > cap_) shrink();
    return buf_;
  }
  // The kept entries, best first.
  const std::vector<std::pair<float, int64_t>>& sorted() {
    kept();
    std::sort(buf_.begin(), buf_.end(), BetterFirst());
    return buf_;
  }

 private:
  // A function object, not a function pointer, so std::nth_element and std::sort inline the comparison
  // (selection was a sixth of a 1024-query int8 scan when every comparison was an indirect call).
  struct BetterFirst {
    bool operator()(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) const {
      return better(a.first, a.second, b.first, b.second);
    }
  };
  void shrink() {
    std::nth_element(buf_.begin(), buf_.begin() + (cap_ - 1), buf_.end(), BetterFirst());
    buf_.resize(cap_);
    thr_ = buf_[cap_ - 1].first;
  }
  std::vector<std::pair<float, int64_t>> buf_;
  size_t cap_;
  float thr_ = -std::numeric_limits<float>::infinity();
};

}  // namespace aml
