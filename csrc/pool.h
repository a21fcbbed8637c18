// The module's own thread pool (std::thread): never nested inside torch's,
// faiss's or OpenBLAS's pools, and started once per process.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace aml {

class Pool {
 public:
  // The process-wide pool (rebuilt after fork, whose child inherits no threads).
  static Pool& get();
  // Runs fn(w) for w in [0, n) on n threads (the caller is worker 0); rethrows a worker's exception.
  void run(int n, const std::function<void(int)>& fn);
  static int hardware_threads();

 private:
  void grow(int n);
  void loop(int w);
  std::mutex run_mu_;  // one parallel region at a time
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

}  // namespace aml
