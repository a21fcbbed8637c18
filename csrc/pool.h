// The module's own thread pool (std::thread): never nested inside torch's,
// faiss's or OpenBLAS's pools, and started once per process.
//
// Several searches may run at once (Python threads, the GIL released): each `run` is a job of its own, and
// the pool's helper threads are shared among the jobs in flight instead of serving one job at a time. A job
// always progresses on its caller's thread (worker 0); idle helpers join the open job with the fewest helpers,
// and a helper that finishes its part of one job moves on to another. So the threads scanning at once are
// at most the helpers (the largest `n` asked for, less one) plus the callers: concurrent searches share the
// cores rather than multiplying the threads by the number of searches.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <list>
#include <mutex>

namespace aml {

class Pool {
 public:
  // The process-wide pool (rebuilt after fork, whose child inherits no threads).
  static Pool& get();
  // Runs fn(w) once on the caller (w = 0) and on up to n - 1 helpers (w = 1 .. n - 1, each at most once) that
  // are free while the job is open; returns when every call has returned, rethrowing the first exception.
  // Not every w need run: fn must take its work from a shared queue (an atomic counter), so that whoever
  // runs does all of it, and keep per-w state for w in [0, n) only.
  void run(int n, const std::function<void(int)>& fn);
  static int hardware_threads();

  struct Stats {
    int64_t running;  // jobs in run() now
    int64_t peak;     // the most jobs in run() at once so far
    int64_t helpers;  // helper threads started
  };
  Stats stats();

 private:
  struct Job {
    const std::function<void(int)>* fn;
    int want;          // helpers asked for (n - 1)
    int joined = 0;    // helpers that took a part
    int finished = 0;  // helpers whose part returned
    std::exception_ptr error;
  };
  void grow(int helpers);
  void loop();
  Job* pick();  // under mu_
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::list<Job*> open_;  // jobs still taking helpers
  int helpers_ = 0;
  int64_t running_ = 0, peak_ = 0;
};

}  // namespace aml
