// Checks on numpy arrays that cross into C++: the data path takes raw pointers, so a wrong dtype, a
// non-contiguous view or a wrong rank must fail loudly at the boundary instead of being reinterpreted.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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
