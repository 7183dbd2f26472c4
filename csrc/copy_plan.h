// Copy plans: the only thing the C++ resharding engine knows about. It has no notion of models,
// layers or parallel layouts; the Python planner (megarl/weights/planner.py) turns those into plans.
//
// A plan is an int64 CPU tensor [num_copies, kPlanColumns]. Row i copies a 2-D block of `rows`
// rows of `row_length` elements from sources[source] to `out`, converting each element from
// `source_dtype` to `out_dtype`:
//
//   for r in [0, rows), e in [0, row_length):
//     out[out_offset + r * out_row_stride + e * size(out_dtype)] =
//         convert(sources[source][source_offset + r * source_row_stride + e * size(source_dtype)])
//
// Offsets and strides are in bytes (a source may be a raw uint8 staging buffer holding several
// dtypes). Sources and `out` must be contiguous and on one device; copies must not overlap in
// `out`. Keep the columns and dtype codes in sync with megarl/weights/copy_plan.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace megarl {

enum PlanColumn : int64_t {
  kSource = 0,
  kSourceOffset,
  kSourceRowStride,
  kOutOffset,
  kOutRowStride,
  kRows,
  kRowLength,
  kSourceDtype,
  kOutDtype,
  kPlanColumns,
};

enum DtypeCode : int64_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kNumDtypeCodes,
};

int64_t element_size(DtypeCode code);

// One plan row with its offsets resolved to pointers, checked against the tensors' extents.
struct Copy {
  const uint8_t* source;
  uint8_t* out;
  int64_t source_row_stride;  // bytes
  int64_t out_row_stride;     // bytes
  int64_t rows;
  int64_t row_length;  // elements
  DtypeCode source_dtype;
  DtypeCode out_dtype;
};

// Checks `plan` against `sources` and `out` (dtypes, devices, every byte range in bounds) and
// resolves each row to pointers; throws naming the offending row otherwise. Empty copies are
// dropped.
std::vector<Copy> resolve_plan(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out);

// Executes `plan` on the CPU with the intra-op thread pool (torch.get_num_threads() threads).
void execute_copy_plan_cpu(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out);

#ifdef MEGARL_WITH_CUDA
// Executes `plan` on the output's GPU with one batched kernel on the current stream.
void execute_copy_plan_cuda(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out);
#endif

}  // namespace megarl
