// A query's best (score, id) pairs, kept in a reservoir. The one ordering used everywhere is higher score
// first, then lower id, so results are deterministic under ties; a NaN score ranks after every number.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace aml {

inline bool better(float sa, int64_t ia, float sb, int64_t ib) { return sa > sb || (sa == sb && ia < ib); }

using Entry = std::pair<float, int64_t>;  // (score, row)

// The `cap` best (score, row) pairs offered, kept as a reservoir, not a heap: candidates at or above the
// threshold are appended, and when 2 * cap have gathered a selection keeps the cap best and raises the
// threshold to the worst of them. Amortised O(1) per candidate (a heap costs O(log cap), which dominates at
// cap ~ 400). NaN scores never enter the reservoir (the scan's threshold tests reject them): ranked() puts
// their rows last.
class Reservoir {
 public:
  explicit Reservoir(size_t cap) : cap_(std::max<size_t>(cap, 1)) {}  // cap >= 1: shrink() keeps cap_ - 1
  // Scores below this can never enter (-inf until cap candidates were kept once).
  float threshold() const { return thr_; }
  bool may_enter(float s) const { return s >= thr_; }
  void push(float s, int64_t id) {
    if (!(s >= thr_)) {
      if (s != s) nan_.push_back(id);  // only rescoring offers NaN (the scans test the threshold first)
      return;
    }
    if (buf_.empty()) buf_.reserve(std::min<size_t>(2 * cap_, size_t(1) << 16));  // cap may be N (huge k)
    buf_.emplace_back(s, id);
    if (buf_.size() >= 2 * cap_) shrink();
  }
  void absorb(const Reservoir& o) {
    for (const auto& e : o.buf_) push(e.first, e.second);
    nan_.insert(nan_.end(), o.nan_.begin(), o.nan_.end());
  }
  // Exactly min(cap, n) rows of 0..n-1, best first: the kept entries by score then row, then rows whose
  // score is NaN by row (score NaN). Valid when every row 0..n-1 was offered (pushed, or refused by a
  // threshold test, which refuses numbers only once cap are kept) or when at least cap rows were offered.
  // Then a reservoir short of cap numbers was offered every row with a number score, so a row never kept
  // scored NaN; the result never holds a row twice nor one outside 0..n-1.
  std::vector<Entry> ranked(int64_t n) {
    const size_t want = static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(cap_), std::max<int64_t>(n, 0)));
    if (buf_.size() > cap_) shrink();
    std::sort(buf_.begin(), buf_.end(), BetterFirst());
    std::vector<Entry> out(buf_.begin(), buf_.begin() + std::min(want, buf_.size()));
    if (out.size() == want) return out;
    std::sort(nan_.begin(), nan_.end());
    nan_.erase(std::unique(nan_.begin(), nan_.end()), nan_.end());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (size_t i = 0; i < nan_.size() && out.size() < want; ++i) out.emplace_back(nan, nan_[i]);
    if (out.size() == want) return out;
    std::vector<int64_t> held;  // rows never offered with a number: the lowest absent ones, in order
    held.reserve(out.size());
    for (const auto& e : out) held.push_back(e.second);
    std::sort(held.begin(), held.end());
    size_t h = 0;
    for (int64_t r = 0; r < n && out.size() < want; ++r) {
      while (h < held.size() && held[h] < r) ++h;
      if (h < held.size() && held[h] == r) continue;
      out.emplace_back(nan, r);
    }
    return out;
  }
  // The kept entries (at most cap), in no set order.
  const std::vector<Entry>& kept() {
    if (buf_.size() > cap_) shrink();
    return buf_;
  }

 private:
  // A function object, not a function pointer, so std::nth_element and std::sort inline the comparison
  // (selection was a sixth of a 1024-query int8 scan when every comparison was an indirect call).
  struct BetterFirst {
    bool operator()(const Entry& a, const Entry& b) const { return better(a.first, a.second, b.first, b.second); }
  };
  void shrink() {
    std::nth_element(buf_.begin(), buf_.begin() + (cap_ - 1), buf_.end(), BetterFirst());
    buf_.resize(cap_);
    thr_ = buf_[cap_ - 1].first;
  }
  std::vector<Entry> buf_;  // never holds NaN, so BetterFirst is a strict weak order over it
  std::vector<int64_t> nan_;
  size_t cap_;
  float thr_ = -std::numeric_limits<float>::infinity();
};

}  // namespace aml
