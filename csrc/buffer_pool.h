// Reuse of the large output buffers of the data path (render, pack) across calls.
//
// Why: a training loop packs a batch of the same shape every step. Fresh multi-megabyte numpy arrays come from
// mmap (glibc returns them to the OS on free), so every 4 KiB page faults on first write: measured on the
// 2-core CI machine, 3.6k faults and ~10 ms of a 16 ms render+pack of 512 conversations (bench/RESULTS.md).
// Buffers released by numpy (when the last array view dies) go back to this pool and are handed out again.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace fastsft {

namespace py = pybind11;

// Buffers are kept by capacity in size classes (8 to 16 per power of two, at most 12.5% slack) so that batches
// of slightly different sizes still reuse memory; the oldest idle buffer is dropped first when the pool is full.
class BufferPool {
 public:
  static constexpr size_t kMaxBuffers = 16;
  static constexpr size_t kMaxBytes = size_t{128} << 20;  // idle memory kept at most
  static constexpr size_t kHeader = 64;  // holds the capacity; keeps the data 64-byte aligned

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: capsules may release after static teardown
    return *pool;
  }

  // Returns data memory of at least `bytes` bytes, recycled when an idle buffer of the same size class exists.
  void* acquire(size_t bytes) {
    const size_t capacity = size_class(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->first == capacity) {
          char* base = it->second;
          idle_.erase(it);
          idle_bytes_ -= capacity;
          return base + kHeader;
        }
      }
    }
    char* base = static_cast<char*>(std::aligned_alloc(kHeader, kHeader + capacity));
    if (base == nullptr) throw std::bad_alloc();
    *reinterpret_cast<size_t*>(base) = capacity;
    return base + kHeader;
  }

  // Takes back memory from acquire(); keeps it idle for reuse, dropping the oldest idle buffers over the limits.
  void release(void* data) {
    char* base = static_cast<char*>(data) - kHeader;
    const size_t capacity = *reinterpret_cast<size_t*>(base);
    std::vector<char*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle_.emplace_back(capacity, base);
      idle_bytes_ += capacity;
      while (!idle_.empty() && (idle_.size() > kMaxBuffers || idle_bytes_ > kMaxBytes)) {
        drop.push_back(idle_.front().second);
        idle_bytes_ -= idle_.front().first;
        idle_.pop_front();
      }
    }
    for (char* p : drop) std::free(p);
  }

 private:
  // Rounds up to a multiple of `step`, the smallest power-of-two multiple of kHeader with step * 16 > bytes, so
  // step lies in (bytes / 16, bytes / 8] once bytes exceeds 16 * kHeader.
  static size_t size_class(size_t bytes) {
    size_t step = kHeader;
    while (step * 16 <= bytes) step *= 2;
    return (bytes + step - 1) / step * step;
  }

  std::mutex mu_;
  std::deque<std::pair<size_t, char*>> idle_;
  size_t idle_bytes_ = 0;
};

// A new C-contiguous array whose memory comes from the pool and returns to it when numpy frees it.
// The contents are uninitialized: the caller writes every element.
template <typename T>
py::array_t<T> pooled_array(const std::vector<py::ssize_t>& shape) {
  size_t count = 1;
  for (py::ssize_t d : shape) count *= static_cast<size_t>(d);
  void* data = BufferPool::instance().acquire(count * sizeof(T));
  py::capsule owner(data, [](void* p) { BufferPool::instance().release(p); });
  return py::array_t<T>(shape, static_cast<T*>(data), owner);
}

}  // namespace fastsft
