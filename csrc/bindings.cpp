// Python bindings of the C++ data path (render + pack). The functions live in render.cpp and pack.cpp;
// fastsft/packing.py is the Python API over them.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastsft {
void register_render(py::module_& m);
void register_pack(py::module_& m);
}  // namespace fastsft

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsft C++ data path: render conversations to ids + mask, pack them into rows";
  fastsft::register_render(m);
  fastsft::register_pack(m);
}
