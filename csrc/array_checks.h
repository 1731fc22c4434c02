// Checks on what crosses into C++: numpy arrays (dtype, rank, layout) and Python ints (range), so that a wrong
// argument fails loudly at the boundary, naming the function and the argument, instead of being reinterpreted.
//
// Memory safety rule of the extension: a caller's array is read exactly once, by owned_1d(), with the GIL held,
// into memory the extension owns; every check and every read after that (in particular all work done with the GIL
// released) uses only that copy and the extension's own outputs. Another thread that writes to, resizes or frees
// the caller's array while the GIL is released can then change nothing the extension relies on. The copy is a
// memcpy from recycled pool memory (buffer_pool.h): small next to the work that follows it.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "buffer_pool.h"

namespace fastsft {

namespace py = pybind11;

template <typename T>
inline const char* dtype_name();
template <>
inline const char* dtype_name<int32_t>() { return "int32"; }
template <>
inline const char* dtype_name<int64_t>() { return "int64"; }
template <>
inline const char* dtype_name<uint8_t>() { return "uint8"; }

inline std::string describe_array(const py::array& a) {
  std::string shape = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    shape += std::to_string(a.shape(d));
    shape += (a.ndim() == 1 || d + 1 < a.ndim()) ? "," : "";
  }
  shape += ")";
  return "dtype " + std::string(py::str(a.dtype())) + ", shape " + shape;
}

// Returns a pointer to the data of a 1-D C-contiguous array of exactly dtype T, or throws a TypeError
// (wrong dtype / layout) naming the function and the argument.
template <typename T>
const T* checked_1d(const py::array& a, const char* func, const char* arg) {
  const bool dtype_ok = a.dtype().is(py::dtype::of<T>());
  const bool layout_ok = a.ndim() == 1 && (a.flags() & py::array::c_style);
  if (!dtype_ok || !layout_ok) {
    throw py::type_error(std::string(func) + ": argument '" + arg + "' must be a 1-D C-contiguous " +
                         dtype_name<T>() + " numpy array, got " + describe_array(a) +
                         (layout_ok ? "" : " (wrong rank or not C-contiguous)"));
  }
  return static_cast<const T*>(a.data());
}

// A 1-D array the extension owns: pool memory, returned to the pool when the object dies. Move-only.
template <typename T>
class Owned {
 public:
  explicit Owned(int64_t size)
      : data_(static_cast<T*>(BufferPool::instance().acquire(static_cast<size_t>(size) * sizeof(T)))),
        size_(size) {}
  Owned(Owned&& o) noexcept : data_(o.data_), size_(o.size_) { o.data_ = nullptr; }
  Owned& operator=(Owned&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (data_ != nullptr) BufferPool::instance().release(data_);
  }
  // Hands the memory to a numpy array of the first `count` elements (count <= size), freed back to the pool.
  py::array_t<T> into_array(int64_t count) && {
    T* data = data_;
    data_ = nullptr;
    py::capsule owner(data, [](void* p) { BufferPool::instance().release(p); });
    return py::array_t<T>({static_cast<py::ssize_t>(count)}, data, owner);
  }
  const T* data() const { return data_; }
  T* data() { return data_; }
  int64_t size() const { return size_; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_;
  int64_t size_;
};

// The checked_1d() array copied into owned memory (must be called with the GIL held; see the rule at the top).
template <typename T>
Owned<T> owned_1d(const py::array& a, const char* func, const char* arg) {
  const T* src = checked_1d<T>(a, func, arg);
  Owned<T> copy(a.shape(0));
  if (copy.size() > 0) std::memcpy(copy.data(), src, static_cast<size_t>(copy.size()) * sizeof(T));
  return copy;
}

// A Python int argument as int64, or a TypeError / ValueError naming the function and the argument (pybind's own
// conversion would answer an out-of-range int with "incompatible function arguments"). bool is refused: a flag
// passed where a size belongs is a bug, not the number 0 or 1. It may run Python code (an __index__ method), so
// every caller takes its owned_1d() copies first.
inline int64_t int64_arg(const py::handle& value, const char* func, const char* arg) {
  PyObject* o = value.ptr();
  if (PyBool_Check(o) || !PyIndex_Check(o)) {
    throw py::type_error(std::string(func) + ": argument '" + arg + "' must be an int, got " +
                         Py_TYPE(o)->tp_name);
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0) {
    throw py::value_error(std::string(func) + ": argument '" + arg + "' = " + std::string(py::str(index)) +
                          " is outside the int64 range");
  }
  return static_cast<int64_t>(v);
}

// Offsets arrays (prefix sums) must start at 0, never decrease and end at the length of what they index.
inline void check_offsets(const int64_t* offsets, int64_t n_plus_1, int64_t total, const char* func,
                          const char* arg) {
  if (n_plus_1 < 1) {
    throw py::value_error(std::string(func) + ": '" + arg + "' must have at least one entry (it starts at 0)");
  }
  if (offsets[0] != 0) {
    throw py::value_error(std::string(func) + ": '" + arg + "'[0] must be 0, got " + std::to_string(offsets[0]));
  }
  for (int64_t i = 1; i < n_plus_1; ++i) {
    if (offsets[i] < offsets[i - 1]) {
      throw py::value_error(std::string(func) + ": '" + arg + "' must be non-decreasing, but entry " +
                            std::to_string(i) + " (" + std::to_string(offsets[i]) + ") < entry " +
                            std::to_string(i - 1) + " (" + std::to_string(offsets[i - 1]) + ")");
    }
  }
  if (offsets[n_plus_1 - 1] != total) {
    throw py::value_error(std::string(func) + ": last entry of '" + arg + "' is " +
                          std::to_string(offsets[n_plus_1 - 1]) + " but the indexed array has " +
                          std::to_string(total) + " elements");
  }
}

}  // namespace fastsft
