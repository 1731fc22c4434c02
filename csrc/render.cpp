// Rendering conversations to token ids + supervision mask (C++ side of fastsft.packing.render_batch).
//
// Python validates the conversations, turns each into a short program of "ops" (a special token or a text
// span, each with its mask value packed into the op's code) and encodes all text spans of the batch in one
// tokenizer call. Here the ops are expanded into one flat ids array and one flat mask array with
// per-conversation offsets, truncated to max_tokens per conversation, with the GIL released, from owned copies of
// the inputs (array_checks.h). No Python object is touched per token except in flatten_token_lists, which copies
// the tokenizer's output lists into one int32 array.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "array_checks.h"
#include "buffer_pool.h"

namespace fastsft {

namespace {

// Token ids are small non-negative ints; where CPython exposes the int layout, read a one-digit int directly
// instead of through PyLong_AsLong (a function call and a type check per token). false = use the slow path.
inline bool read_compact_int(PyObject* o, long* out) {
#if PY_VERSION_HEX >= 0x030C0000  // the unstable C API for compact ints
  if (PyLong_CheckExact(o) && PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) {
    *out = static_cast<long>(PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o)));
    return true;
  }
#elif PY_VERSION_HEX >= 0x030B0000  // 3.11: Python.h includes cpython/longintrepr.h (sign in ob_size)
  if (PyLong_CheckExact(o)) {
    const Py_ssize_t size = Py_SIZE(o);
    if (size == 0 || size == 1) {
      *out = size == 0 ? 0 : static_cast<long>(reinterpret_cast<PyLongObject*>(o)->ob_digit[0]);
      return true;
    }
  }
#else
  (void)o;
  (void)out;
#endif
  return false;
}

// list[list[int]] (the tokenizer's encode_batch output) -> (tokens int32 (T,), span_offsets int64 (S+1,)).
// Runs with the GIL held (it reads Python ints) but with the C API, not a Python-level loop.
//
// Each list is read exactly once, straight into owned memory, and every size and item is re-read after anything
// that can run Python code: an id object's __index__ may grow, shrink or drop any of the lists (or the outer
// one), so a size or an item pointer read before it is stale after it. The outer list is snapshotted as a tuple,
// each span is held by a strong reference while it is read, and each non-int item is held while it converts.
py::tuple flatten_token_lists(const py::object& lists) {
  const char* fn = "flatten_token_lists";
  if (!PySequence_Check(lists.ptr()) || PyUnicode_Check(lists.ptr()) || PyBytes_Check(lists.ptr())) {
    throw py::type_error(std::string(fn) + ": expected a list of lists of token ids, got " +
                         Py_TYPE(lists.ptr())->tp_name);
  }
  py::tuple spans = py::reinterpret_steal<py::tuple>(PySequence_Tuple(lists.ptr()));
  if (!spans) throw py::error_already_set();
  const Py_ssize_t num_spans = PyTuple_GET_SIZE(spans.ptr());

  // The spans as lists or tuples (PySequence_Fast), held to the end; their sizes only size the first buffer.
  std::vector<py::object> inner(num_spans);
  int64_t capacity = 0;
  for (Py_ssize_t s = 0; s < num_spans; ++s) {
    PyObject* seq = PySequence_Fast(PyTuple_GET_ITEM(spans.ptr(), s),
                                    "flatten_token_lists: every span must be a list of token ids");
    if (seq == nullptr) throw py::error_already_set();
    inner[s] = py::reinterpret_steal<py::object>(seq);
    capacity += PySequence_Fast_GET_SIZE(seq);
  }

  py::array_t<int64_t> offsets_arr(num_spans + 1);
  int64_t* offsets = offsets_arr.mutable_data();
  Owned<int32_t> tokens(capacity);
  int64_t count = 0;
  offsets[0] = 0;
  // Room for `extra` more tokens after the `count` read so far (a list may grow while it is read).
  auto reserve = [&](int64_t extra) {
    if (count + extra <= tokens.size()) return;
    Owned<int32_t> larger(std::max(count + extra, 2 * tokens.size()));
    if (count > 0) std::memcpy(larger.data(), tokens.data(), static_cast<size_t>(count) * sizeof(int32_t));
    tokens = std::move(larger);
  };
  for (Py_ssize_t s = 0; s < num_spans; ++s) {
    PyObject* seq = inner[s].ptr();
    // Size and items are valid until Python code runs; only the slow path below runs any, and re-reads them.
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    reserve(len);
    for (Py_ssize_t j = 0; j < len; ++j) {
      long v;
      if (!read_compact_int(items[j], &v)) {
        {
          // Held while it converts: __index__ may drop the list's reference to it. Releasing it may run its
          // __del__, which is Python code too, so the list is re-read only after this block.
          py::object held = py::reinterpret_borrow<py::object>(items[j]);
          v = PyLong_AsLong(held.ptr());
          if (v == -1 && PyErr_Occurred()) {
            const bool overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
            const bool type = PyErr_ExceptionMatches(PyExc_TypeError);
            if (!overflow && !type) throw py::error_already_set();
            PyErr_Clear();
            const std::string at = std::string(fn) + ": span " + std::to_string(s) + " position " +
                                   std::to_string(j);
            if (overflow) throw py::value_error(at + " holds a token id outside [0, 2^31)");
            throw py::type_error(at + " holds a " + Py_TYPE(held.ptr())->tp_name + ", not an int token id");
          }
        }
        len = PySequence_Fast_GET_SIZE(seq);  // Python code ran: the list may have changed
        items = PySequence_Fast_ITEMS(seq);
        reserve(std::max<Py_ssize_t>(len - j, 1));
      }
      if (v < 0 || v > INT32_MAX) {
        throw py::value_error(std::string(fn) + ": span " + std::to_string(s) + " position " + std::to_string(j) +
                              " holds token id " + std::to_string(v) + ", outside [0, 2^31)");
      }
      tokens.data()[count++] = static_cast<int32_t>(v);
    }
    offsets[s + 1] = count;
  }
  return py::make_tuple(std::move(tokens).into_array(count), offsets_arr);
}

// ops: int64 (M,), one program for the whole batch; every op carries the mask value m of what it emits:
//   op >= 0: the special token op >> 1 with mask op & 1;
//   op == -1 / -2: the NEXT text span (spans are used in order, each exactly once) with mask 0 / 1.
// conv_ops: int64 (N+1,), the ops of conversation i are ops[conv_ops[i]:conv_ops[i+1]].
// Returns (ids int32 (L,), mask uint8 (L,), offsets int64 (N+1,)), each conversation cut to max_tokens.
py::tuple render_assemble(const py::array& tokens_arr, const py::array& span_offsets_arr, const py::array& ops_arr,
                          const py::array& conv_ops_arr, const py::object& max_tokens_obj) {
  const char* fn = "render_assemble";
  // Owned copies (array_checks.h): everything below, with or without the GIL, reads only these.
  const Owned<int32_t> tokens = owned_1d<int32_t>(tokens_arr, fn, "tokens");
  const Owned<int64_t> span_offsets = owned_1d<int64_t>(span_offsets_arr, fn, "span_offsets");
  const Owned<int64_t> ops = owned_1d<int64_t>(ops_arr, fn, "ops");
  const Owned<int64_t> conv_ops = owned_1d<int64_t>(conv_ops_arr, fn, "conv_ops");
  const int64_t max_tokens = int64_arg(max_tokens_obj, fn, "max_tokens");
  const int64_t num_spans = span_offsets.size() - 1;
  const int64_t num_ops = ops.size();
  const int64_t n = conv_ops.size() - 1;
  if (max_tokens < 1) {
    throw py::value_error("render_assemble: max_tokens must be >= 1, got " + std::to_string(max_tokens));
  }
  check_offsets(span_offsets.data(), num_spans + 1, tokens.size(), fn, "span_offsets");
  check_offsets(conv_ops.data(), n + 1, num_ops, fn, "conv_ops");
  uint32_t token_bits = 0;  // an OR of the sign bits vectorizes (see check_ids_and_mask); positions on bad input only
  for (int64_t t = 0; t < tokens.size(); ++t) token_bits |= static_cast<uint32_t>(tokens[t]);
  if (token_bits >> 31) {
    const int64_t t = std::find_if(tokens.data(), tokens.data() + tokens.size(), [](int32_t v) { return v < 0; }) -
                      tokens.data();
    throw py::value_error("render_assemble: tokens[" + std::to_string(t) + "] = " + std::to_string(tokens[t]) +
                          " is not a token id (ids are >= 0)");
  }
  int64_t span_ops = 0;
  for (int64_t k = 0; k < num_ops; ++k) {
    if (ops[k] < -2 || (ops[k] >> 1) > INT32_MAX) {
      throw py::value_error("render_assemble: op " + std::to_string(k) + " = " + std::to_string(ops[k]) +
                            " is neither 2 * token id + mask (token id < 2^31) nor -1 / -2 (next text span)");
    }
    span_ops += ops[k] < 0;
  }
  if (span_ops != num_spans) {
    throw py::value_error("render_assemble: the ops use " + std::to_string(span_ops) + " text spans but " +
                          std::to_string(num_spans) + " were given");
  }

  // Pass 1: the rendered length of every conversation (then prefix sums) and its first text span.
  py::array_t<int64_t> offsets_arr(n + 1);
  int64_t* offsets = offsets_arr.mutable_data();
  std::vector<int64_t> first_span(n);
  {
    py::gil_scoped_release release;
    offsets[0] = 0;
    int64_t span = 0;
    for (int64_t i = 0; i < n; ++i) {
      first_span[i] = span;
      int64_t len = 0;
      for (int64_t k = conv_ops[i]; k < conv_ops[i + 1]; ++k) {
        if (ops[k] >= 0) {
          len += 1;
        } else {
          len += span_offsets[span + 1] - span_offsets[span];
          ++span;
        }
      }
      offsets[i + 1] = offsets[i] + std::min(len, max_tokens);
    }
  }
  // Pass 2: copy the tokens, stopping each conversation at its (possibly truncated) length.
  // Every element is written (the ops cover each conversation up to its length), so pooled memory is fine.
  py::array_t<int32_t> ids_arr = pooled_array<int32_t>({offsets[n]});
  py::array_t<uint8_t> mask_arr = pooled_array<uint8_t>({offsets[n]});
  int32_t* ids = ids_arr.mutable_data();
  uint8_t* mask = mask_arr.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) {
      int64_t pos = offsets[i];
      const int64_t end = offsets[i + 1];
      int64_t span = first_span[i];
      for (int64_t k = conv_ops[i]; k < conv_ops[i + 1] && pos < end; ++k) {
        if (ops[k] >= 0) {
          ids[pos] = static_cast<int32_t>(ops[k] >> 1);
          mask[pos] = static_cast<uint8_t>(ops[k] & 1);
          ++pos;
        } else {
          const int64_t len = std::min(span_offsets[span + 1] - span_offsets[span], end - pos);
          std::memcpy(ids + pos, tokens.data() + span_offsets[span], static_cast<size_t>(len) * sizeof(int32_t));
          std::memset(mask + pos, ops[k] == -2 ? 1 : 0, static_cast<size_t>(len));
          pos += len;
          ++span;
        }
      }
    }
  }
  return py::make_tuple(ids_arr, mask_arr, offsets_arr);
}

}  // namespace

void register_render(py::module_& m) {
  m.def("flatten_token_lists", &flatten_token_lists, py::arg("lists"),
        "list[list[int]] -> (tokens int32 (T,), span_offsets int64 (S+1,)).");
  m.def("render_assemble", &render_assemble, py::arg("tokens"), py::arg("span_offsets"), py::arg("ops"),
        py::arg("conv_ops"), py::arg("max_tokens"),
        "Expand per-conversation ops (2 * special id + mask, or -1 / -2: the next text span with mask 0 / 1) into "
        "flat ids int32 / mask uint8 with offsets int64 (N+1), truncating each conversation to max_tokens.");
}

}  // namespace fastsft
