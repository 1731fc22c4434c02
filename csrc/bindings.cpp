// Python bindings of the C++ data path (render + pack). The functions live in render.cpp and pack.cpp.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsft C++ data path: render conversations to ids + mask, pack them into rows";
}
