#include "pool.h"

#include <unistd.h>

namespace aml {

Pool& Pool::get() {
  // Leaked on purpose: idle workers must not be joined during interpreter shutdown. Searches from several
  // Python threads (the GIL is released) reach here at once: the check and the swap happen under a lock.
  static std::mutex mu;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid()) {
    pool = new Pool();
    owner = getpid();
  }
  return *pool;
}

int Pool::hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

void Pool::grow(int n) {
  while (static_cast<int>(threads_.size()) < n - 1) {
    int w = static_cast<int>(threads_.size()) + 1;
    threads_.emplace_back([this, w] { loop(w); });
    threads_.back().detach();
  }
}

void Pool::loop(int w) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      start_cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (w >= active_) continue;
      job = job_;
    }
    try {
      (*job)(w);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lk(mu_);
    if (--pending_ == 0) done_cv_.notify_all();
  }
}

void Pool::run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    grow(n);
    job_ = &fn;
    active_ = n;
    pending_ = n - 1;
    error_ = nullptr;
    ++generation_;
  }
  start_cv_.notify_all();
  std::exception_ptr mine;
  try {
    fn(0);
  } catch (...) {
    mine = std::current_exception();
  }
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] { return pending_ == 0; });
  if (mine) std::rethrow_exception(mine);
  if (error_) std::rethrow_exception(error_);
}

}  // namespace aml
