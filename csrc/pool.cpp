#include "pool.h"

#include <unistd.h>

#include <algorithm>
#include <thread>

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

Pool::Stats Pool::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  return {running_, peak_, helpers_};
}

void Pool::grow(int helpers) {
  for (; helpers_ < helpers; ++helpers_) std::thread([this] { loop(); }).detach();
}

Pool::Job* Pool::pick() {
  // The open job with the fewest helpers: concurrent jobs share the helpers evenly as they free up.
  Job* best = nullptr;
  for (Job* job : open_)
    if (best == nullptr || job->joined < best->joined) best = job;
  return best;
}

void Pool::loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    Job* job = pick();
    if (job == nullptr) {
      work_cv_.wait(lk);
      continue;
    }
    const int w = ++job->joined;
    if (job->joined == job->want) open_.remove(job);
    lk.unlock();
    std::exception_ptr error;
    try {
      (*job->fn)(w);
    } catch (...) {
      error = std::current_exception();
    }
    lk.lock();
    if (error && !job->error) job->error = error;
    // Notified under the lock: the job lives on its caller's stack until the caller, holding mu_, sees this.
    if (++job->finished == job->joined) done_cv_.notify_all();
  }
}

void Pool::run(int n, const std::function<void(int)>& fn) {
  Job job{&fn, std::max(n, 1) - 1};
  {
    std::lock_guard<std::mutex> lk(mu_);
    peak_ = std::max(peak_, ++running_);
    if (job.want > 0) {
      grow(job.want);
      open_.push_back(&job);
    }
  }
  if (job.want > 0) work_cv_.notify_all();
  std::exception_ptr mine;
  try {
    fn(0);
  } catch (...) {
    mine = std::current_exception();
  }
  std::unique_lock<std::mutex> lk(mu_);
  // The caller's part returned: the queue is drained, so no helper is let in any more; wait for those inside.
  if (job.joined < job.want) open_.remove(&job);
  done_cv_.wait(lk, [&] { return job.finished == job.joined; });
  --running_;
  lk.unlock();
  if (mine) std::rethrow_exception(mine);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace aml
