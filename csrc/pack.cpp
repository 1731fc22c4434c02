// Packing rendered conversations into fixed-size rows (C++ side of fastsft.packing.pack_rows).
//
// Two steps, both with the GIL released, both working on owned copies of their inputs (array_checks.h):
//   pack_place: best-fit placement of whole conversations into rows of seq_len tokens, longest first
//               ("decreasing") or in the order given ("arrival").
//   pack_fill:  writes input_ids / targets / position_ids / cu_seqlens for a placement.
// They are separate so that Python can choose the default max_seqs from the number of rows the placement
// used. The algorithm is documented in fastsft/packing.py, whose plain-Python reference must agree exactly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "array_checks.h"
#include "buffer_pool.h"

namespace fastsft {

namespace {

// Token ids must be >= 0 (int32 holds no larger value than 2^31 - 1) and mask values 0 or 1: a mask of 7 or a
// negative id would otherwise turn into targets that differ from the reference. Errors name the conversation.
void check_ids_and_mask(const Owned<int32_t>& ids, const Owned<uint8_t>& mask, const Owned<int64_t>& offsets,
                        const char* fn) {
  // Bitwise-OR reductions first: they vectorize with baseline SSE2 (an int32 min does not, 25x slower measured);
  // a negative id sets the sign bit, a mask value above 1 sets a bit above bit 0. The position is searched for
  // only on bad input.
  uint32_t id_bits = 0;
  uint8_t mask_bits = 0;
  for (int64_t p = 0; p < ids.size(); ++p) id_bits |= static_cast<uint32_t>(ids[p]);
  for (int64_t p = 0; p < mask.size(); ++p) mask_bits |= mask[p];
  if ((id_bits >> 31) == 0 && mask_bits <= 1) return;
  auto conversation_of = [&](int64_t p) {
    return std::upper_bound(offsets.data(), offsets.data() + offsets.size(), p) - offsets.data() - 1;
  };
  for (int64_t p = 0; p < ids.size(); ++p) {
    if (ids[p] < 0) {
      const int64_t c = conversation_of(p);
      throw py::value_error(std::string(fn) + ": conversation " + std::to_string(c) + " holds token id " +
                            std::to_string(ids[p]) + " at position " + std::to_string(p - offsets[c]) +
                            ", outside [0, 2^31)");
    }
    if (mask[p] > 1) {
      const int64_t c = conversation_of(p);
      throw py::value_error(std::string(fn) + ": conversation " + std::to_string(c) + " mask holds " +
                            std::to_string(mask[p]) + " at position " + std::to_string(p - offsets[c]) +
                            "; mask values must be 0 or 1");
    }
  }
}

// Best fit. order "decreasing": conversations are visited longest first (length clipped to seq_len; ties by
// input order); order "arrival": in input order. Each goes to the row with the least free space that still
// holds it (ties: lowest row index). With num_rows >= 0 the rows are fixed and a conversation that fits
// nowhere, or that would push the segment count past max_seqs (one padding segment reserved per row), is left
// over (row = -1). With num_rows < 0 a new row is opened whenever nothing fits, which is the same rule with
// unlimited empty rows. The two orders share everything but the visiting order.
py::tuple pack_place(const py::array& lengths_arr, const py::object& seq_len_obj, const py::object& num_rows_obj,
                     const py::object& max_seqs_obj, const std::string& order_name) {
  const char* fn = "pack_place";
  if (order_name != "decreasing" && order_name != "arrival") {
    throw py::value_error("pack_place: order must be \"decreasing\" or \"arrival\", got \"" + order_name + "\"");
  }
  const bool decreasing = order_name == "decreasing";
  const Owned<int64_t> lengths = owned_1d<int64_t>(lengths_arr, fn, "lengths");
  const int64_t n = lengths.size();
  const int64_t seq_len = int64_arg(seq_len_obj, fn, "seq_len");
  const int64_t num_rows = int64_arg(num_rows_obj, fn, "num_rows");
  const int64_t max_seqs = int64_arg(max_seqs_obj, fn, "max_seqs");
  if (seq_len < 1) throw py::value_error("pack_place: seq_len must be >= 1, got " + std::to_string(seq_len));
  // rows * seq_len must fit the int32 cu_seqlens; written as a division so that the guard cannot overflow.
  if (num_rows > INT32_MAX / seq_len) {
    throw py::value_error("pack_place: num_rows=" + std::to_string(num_rows) + " rows of seq_len=" +
                          std::to_string(seq_len) + " tokens exceed the 2^31 - 1 tokens of the int32 cu_seqlens");
  }
  if (num_rows >= 0 && max_seqs >= 0 && max_seqs < num_rows) {
    throw py::value_error("pack_place: max_seqs=" + std::to_string(max_seqs) + " is smaller than num_rows=" +
                          std::to_string(num_rows) + "; every row needs at least one cu_seqlens segment");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 1) {
      throw py::value_error("pack_place: conversation " + std::to_string(i) + " has length " +
                            std::to_string(lengths[i]) + "; every conversation needs at least one token");
    }
  }

  py::array_t<int64_t> row_arr(n), offset_arr(n), placed_arr(n);
  int64_t* row = row_arr.mutable_data();
  int64_t* offset = offset_arr.mutable_data();
  int64_t* placed_len = placed_arr.mutable_data();
  int64_t rows_used = 0;
  int64_t num_segments = 0;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    if (decreasing) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return std::min(lengths[a], seq_len) > std::min(lengths[b], seq_len);
      });
    }
    // (free space, row index): lower_bound({len, -1}) is the tightest row that fits, lowest index first.
    std::set<std::pair<int64_t, int64_t>> open_rows;
    std::vector<int64_t> free_space;
    if (num_rows >= 0) {
      free_space.assign(num_rows, seq_len);
      for (int64_t r = 0; r < num_rows; ++r) open_rows.emplace(seq_len, r);
      rows_used = num_rows;
    }
    int64_t num_placed = 0;
    for (int64_t i : order) {
      const int64_t len = std::min(lengths[i], seq_len);
      row[i] = -1;
      offset[i] = -1;
      placed_len[i] = 0;
      if (num_rows >= 0 && max_seqs >= 0 && num_placed + 1 + num_rows > max_seqs) continue;
      auto it = open_rows.lower_bound({len, -1});
      int64_t r;
      if (it != open_rows.end()) {
        r = it->second;
        open_rows.erase(it);
      } else if (num_rows < 0) {
        r = rows_used++;
        free_space.push_back(seq_len);
      } else {
        continue;  // fits nowhere: left over for the next batch
      }
      row[i] = r;
      offset[i] = seq_len - free_space[r];
      placed_len[i] = len;
      free_space[r] -= len;
      if (free_space[r] > 0) open_rows.emplace(free_space[r], r);
      ++num_placed;
    }
    num_segments = num_placed;
    for (int64_t r = 0; r < rows_used; ++r) num_segments += free_space[r] > 0;
  }
  return py::make_tuple(row_arr, offset_arr, placed_arr, rows_used, num_segments);
}

// Fills the row tensors for a placement (row, offset, placed length per conversation; row -1 = left over).
// targets[p] = next token of the same conversation where that token is supervised, else -1; the last
// token of each placed conversation and all padding get -1. Padding fills each row's tail as one segment.
py::tuple pack_fill(const py::array& ids_arr, const py::array& mask_arr, const py::array& offsets_arr,
                    const py::array& row_arr, const py::array& offset_arr, const py::array& placed_arr,
                    const py::object& rows_obj, const py::object& seq_len_obj, const py::object& pad_id_obj,
                    const py::object& max_seqs_obj) {
  const char* fn = "pack_fill";
  // Owned copies (array_checks.h): everything below, with or without the GIL, reads only these.
  const Owned<int32_t> ids = owned_1d<int32_t>(ids_arr, fn, "ids");
  const Owned<uint8_t> mask = owned_1d<uint8_t>(mask_arr, fn, "mask");
  const Owned<int64_t> conv_offsets = owned_1d<int64_t>(offsets_arr, fn, "offsets");
  const Owned<int64_t> row = owned_1d<int64_t>(row_arr, fn, "row");
  const Owned<int64_t> offset = owned_1d<int64_t>(offset_arr, fn, "offset");
  const Owned<int64_t> placed_len = owned_1d<int64_t>(placed_arr, fn, "placed_len");
  const int64_t rows = int64_arg(rows_obj, fn, "rows");
  const int64_t seq_len = int64_arg(seq_len_obj, fn, "seq_len");
  const int64_t pad_id = int64_arg(pad_id_obj, fn, "pad_id");
  const int64_t max_seqs = int64_arg(max_seqs_obj, fn, "max_seqs");
  const int64_t total_in = ids.size();
  if (mask.size() != total_in) {
    throw py::value_error("pack_fill: ids has " + std::to_string(total_in) + " tokens but mask has " +
                          std::to_string(mask.size()));
  }
  const int64_t n = conv_offsets.size() - 1;
  check_offsets(conv_offsets.data(), n + 1, total_in, fn, "offsets");
  if (row.size() != n || offset.size() != n || placed_len.size() != n) {
    throw py::value_error("pack_fill: row/offset/placed_len must each have one entry per conversation (" +
                          std::to_string(n) + ")");
  }
  check_ids_and_mask(ids, mask, conv_offsets, fn);
  if (seq_len < 1 || rows < 0) {
    throw py::value_error("pack_fill: need seq_len >= 1 and rows >= 0, got seq_len=" + std::to_string(seq_len) +
                          ", rows=" + std::to_string(rows));
  }
  if (max_seqs < 0 || max_seqs >= INT32_MAX) {
    throw py::value_error("pack_fill: max_seqs must be in [0, 2^31 - 1), got " + std::to_string(max_seqs));
  }
  // The cu_seqlens are int32: rows * seq_len must fit. A division, so that the guard itself cannot overflow.
  if (rows > INT32_MAX / seq_len) {
    throw py::value_error("pack_fill: rows=" + std::to_string(rows) + " x seq_len=" + std::to_string(seq_len) +
                          " tokens exceed the 2^31 - 1 tokens of the int32 cu_seqlens");
  }
  // The placement must tile each row: in range, and no two conversations overlapping.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> per_row(rows);
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] < 0) continue;
    const int64_t conv_len = conv_offsets[i + 1] - conv_offsets[i];
    if (row[i] >= rows || offset[i] < 0 || placed_len[i] < 1 || placed_len[i] > conv_len ||
        offset[i] > seq_len - placed_len[i]) {  // not offset + length > seq_len: that sum could overflow
      throw py::value_error("pack_fill: placement of conversation " + std::to_string(i) + " (row " +
                            std::to_string(row[i]) + ", offset " + std::to_string(offset[i]) + ", length " +
                            std::to_string(placed_len[i]) + ") does not fit " + std::to_string(rows) +
                            " rows of " + std::to_string(seq_len) + " tokens (conversation length " +
                            std::to_string(conv_len) + ")");
    }
    per_row[row[i]].emplace_back(offset[i], i);
  }

  const int64_t total = rows * seq_len;
  // Every element of the three row tensors is written below, so recycled (uninitialized) buffers are fine.
  py::array_t<int64_t> input_arr = pooled_array<int64_t>({rows, seq_len});
  py::array_t<int64_t> target_arr = pooled_array<int64_t>({rows, seq_len});
  py::array_t<int64_t> pos_arr = pooled_array<int64_t>({rows, seq_len});
  py::array_t<int32_t> cu_arr(max_seqs + 1);
  int64_t* input_ids = input_arr.mutable_data();
  int64_t* targets = target_arr.mutable_data();
  int64_t* positions = pos_arr.mutable_data();
  int32_t* cu_seqlens = cu_arr.mutable_data();
  int64_t num_supervised = 0;
  int64_t num_tokens = 0;
  int64_t num_segments = 0;
  bool overlap = false;
  int64_t bad_row = -1;
  {
    py::gil_scoped_release release;
    // cu_seqlens is built while walking the rows in order; it may overflow max_seqs, checked after.
    std::vector<int64_t> bounds;
    bounds.reserve(static_cast<size_t>(std::min(max_seqs, n + rows)) + 1);  // segments <= conversations + rows
    bounds.push_back(0);
    for (int64_t r = 0; r < rows && !overlap; ++r) {
      auto& convs = per_row[r];
      std::sort(convs.begin(), convs.end());
      int64_t* row_ids = input_ids + r * seq_len;
      int64_t* row_tgt = targets + r * seq_len;
      int64_t* row_pos = positions + r * seq_len;
      int64_t cursor = 0;
      for (const auto& [start, i] : convs) {
        if (start != cursor) {  // a gap or an overlap: the placement does not tile the row
          overlap = true;
          bad_row = r;
          break;
        }
        const int64_t len = placed_len[i];
        const int32_t* src = ids.data() + conv_offsets[i];
        const uint8_t* src_mask = mask.data() + conv_offsets[i];
        for (int64_t j = 0; j < len; ++j) {
          row_ids[start + j] = src[j];
          row_pos[start + j] = j;
        }
        for (int64_t j = 0; j + 1 < len; ++j) {
          const bool sup = src_mask[j + 1] != 0;
          row_tgt[start + j] = sup ? static_cast<int64_t>(src[j + 1]) : -1;
          num_supervised += sup;
        }
        row_tgt[start + len - 1] = -1;
        cursor += len;
        num_tokens += len;
        bounds.push_back(r * seq_len + cursor);
      }
      if (overlap) break;
      for (int64_t j = cursor; j < seq_len; ++j) {
        row_ids[j] = pad_id;
        row_tgt[j] = -1;
        row_pos[j] = j - cursor;
      }
      if (cursor < seq_len) bounds.push_back((r + 1) * seq_len);
    }
    num_segments = static_cast<int64_t>(bounds.size()) - 1;
    if (!overlap && num_segments <= max_seqs) {
      for (int64_t s = 0; s <= max_seqs; ++s) {
        cu_seqlens[s] = static_cast<int32_t>(s < static_cast<int64_t>(bounds.size()) ? bounds[s] : total);
      }
    }
  }
  if (overlap) {
    throw py::value_error("pack_fill: the placement does not tile row " + std::to_string(bad_row) +
                          " (conversations must start where the previous one ends)");
  }
  if (num_segments > max_seqs) {
    throw py::value_error("pack_fill: the packing into " + std::to_string(rows) + " rows needs " +
                          std::to_string(num_segments) + " cu_seqlens segments (conversations + padded row tails) " +
                          "but max_seqs=" + std::to_string(max_seqs) + "; pass a larger max_seqs");
  }
  return py::make_tuple(input_arr, target_arr, pos_arr, cu_arr, num_supervised, num_tokens, num_segments);
}

}  // namespace

void register_pack(py::module_& m) {
  m.def("pack_place", &pack_place, py::arg("lengths"), py::arg("seq_len"), py::arg("num_rows"),
        py::arg("max_seqs"), py::arg("order") = "decreasing",
        "Best-fit placement. lengths: int64 (N,). num_rows < 0: as many rows as needed; max_seqs < 0: no segment "
        "budget; order: \"decreasing\" (longest first) or \"arrival\" (input order). Returns (row, offset, "
        "placed_len, rows_used, num_segments); row -1 = left over.");
  m.def("pack_fill", &pack_fill, py::arg("ids"), py::arg("mask"), py::arg("offsets"), py::arg("row"),
        py::arg("offset"), py::arg("placed_len"), py::arg("rows"), py::arg("seq_len"), py::arg("pad_id"),
        py::arg("max_seqs"),
        "Fill (rows, seq_len) int64 input_ids / targets / position_ids and int32 cu_seqlens (max_seqs + 1) for a "
        "placement. Returns (input_ids, targets, position_ids, cu_seqlens, num_supervised, num_tokens, "
        "num_segments).");
}

}  // namespace fastsft
