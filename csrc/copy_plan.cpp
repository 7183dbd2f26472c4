// Checking and resolving copy plans, and executing them on the CPU (see copy_plan.h).
#include "copy_plan.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace megarl {

namespace {

// The CPU executor splits copies into units of about this many output bytes: large enough that a
// unit's bookkeeping is negligible next to its memcpy, small enough that a 512 MiB bucket splits
// evenly over anything from 2 to 64 threads (2048 units).
constexpr int64_t kUnitBytes = 256 * 1024;
// Plans writing at least this many bytes write them with streaming (non-temporal) stores, which
// skip reading each output cache line before overwriting it. An output this size does not stay in
// the cache for its reader anyway; on the project's CPU machine plain stores copied 512 MiB
// buckets about 1.4x slower (copy_ vs memmove in docs/benchmarks.md, "Weight stream: C++
// resharding engine").
constexpr int64_t kStreamingBytes = 16 * 1024 * 1024;
// Plans writing fewer bytes run on the calling thread: they take well under a millisecond there,
// less than waking the thread pool can cost on a busy machine.
constexpr int64_t kParallelBytes = 1024 * 1024;

const char* dtype_name(DtypeCode code) {
  switch (code) {
    case kFloat32:
      return "float32";
    case kBFloat16:
      return "bfloat16";
    case kFloat16:
      return "float16";
    default:
      return "unknown";
  }
}

c10::ScalarType scalar_type(DtypeCode code) {
  switch (code) {
    case kFloat32:
      return c10::ScalarType::Float;
    case kBFloat16:
      return c10::ScalarType::BFloat16;
    default:
      return c10::ScalarType::Half;
  }
}

DtypeCode checked_dtype(int64_t value, int64_t row, const char* column) {
  TORCH_CHECK(value >= 0 && value < kNumDtypeCodes, "execute_copy_plan: plan row ", row, " has ", column,
              " code ", value, "; expected 0 (float32), 1 (bfloat16) or 2 (float16)");
  return static_cast<DtypeCode>(value);
}

// Throws unless the 2-D block at `offset` lies within the `extent` bytes of `what`.
void check_extent(int64_t offset, int64_t row_stride, int64_t rows, int64_t row_bytes, int64_t extent,
                  int64_t row, const char* what) {
  TORCH_CHECK(offset >= 0 && row_stride >= 0, "execute_copy_plan: plan row ", row, " has a negative offset (",
              offset, ") or row stride (", row_stride, ") into ", what);
  const int64_t end = offset + (rows - 1) * row_stride + row_bytes;
  TORCH_CHECK(end <= extent, "execute_copy_plan: plan row ", row, " reaches byte ", end, " of ", what,
              ", which holds only ", extent, " bytes; the plan does not match its tensors (rebuild it)");
}

// One unit of CPU work: rows [row_begin, row_end) of copies [copy_begin, copy_end), and of each row
// the elements [element_begin, min(element_end, row_length)).
struct Unit {
  int64_t copy_begin;
  int64_t copy_end;
  int64_t row_begin;
  int64_t row_end;
  int64_t element_begin;
  int64_t element_end;
};

// Whether `next` writes other columns of the same output rows as `first` (a row-parallel weight's
// shards side by side in its HF tensor).
bool shares_rows(const Copy& first, const Copy& next, int64_t columns_taken) {
  const int64_t next_bytes = next.row_length * element_size(next.out_dtype);
  return next.rows == first.rows && next.out_row_stride == first.out_row_stride && next.out >= first.out &&
         next.out + next_bytes <= first.out + first.out_row_stride &&
         columns_taken + next_bytes <= first.out_row_stride;
}

// Copies that share output rows run as one group, row by row, so that the output is written front
// to back: writing each copy's stretches of the rows in a pass of its own made a whole MoE step
// 4-25% slower on the project's CPU machine (`separate` in docs/benchmarks.md, "Weight stream:
// C++ resharding engine").
std::vector<Unit> split_into_units(const std::vector<Copy>& copies) {
  std::vector<Unit> units;
  const int64_t num_copies = static_cast<int64_t>(copies.size());
  for (int64_t begin = 0; begin < num_copies;) {
    const Copy& copy = copies[begin];
    int64_t group_bytes = copy.row_length * element_size(copy.out_dtype);
    int64_t end = begin + 1;
    if (copy.rows > 1) {
      while (end < num_copies && shares_rows(copy, copies[end], group_bytes)) {
        group_bytes += copies[end].row_length * element_size(copies[end].out_dtype);
        ++end;
      }
    }
    if (group_bytes >= kUnitBytes && end == begin + 1) {
      const int64_t elements_per_unit = kUnitBytes / element_size(copy.out_dtype);
      for (int64_t row = 0; row < copy.rows; ++row) {
        for (int64_t element = 0; element < copy.row_length; element += elements_per_unit) {
          units.push_back({begin, end, row, row + 1, element, element + elements_per_unit});
        }
      }
    } else {
      const int64_t rows_per_unit = std::max<int64_t>(1, kUnitBytes / group_bytes);
      for (int64_t row = 0; row < copy.rows; row += rows_per_unit) {
        units.push_back({begin, end, row, std::min(copy.rows, row + rows_per_unit), 0, INT64_MAX});
      }
    }
    begin = end;
  }
  return units;
}

// Converts `count` elements. Loads and stores go through memcpy: bucket offsets carry no
// alignment padding, so an element may sit at any byte address.
template <typename Source, typename Out>
void convert_elements(const uint8_t* source, uint8_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    Source value;
    std::memcpy(&value, source + i * sizeof(Source), sizeof(Source));
    const Out converted(static_cast<float>(value));
    std::memcpy(out + i * sizeof(Out), &converted, sizeof(Out));
  }
}

using ConvertFn = void (*)(const uint8_t*, uint8_t*, int64_t);

// Conversions through float, element by element, as torch's `Tensor.to` rounds (to nearest even).
ConvertFn converter(DtypeCode source, DtypeCode out) {
  static const ConvertFn table[kNumDtypeCodes][kNumDtypeCodes] = {
      {nullptr, convert_elements<float, c10::BFloat16>, convert_elements<float, c10::Half>},
      {convert_elements<c10::BFloat16, float>, nullptr, convert_elements<c10::BFloat16, c10::Half>},
      {convert_elements<c10::Half, float>, convert_elements<c10::Half, c10::BFloat16>, nullptr},
  };
  return table[source][out];
}

// memcpy with streaming stores for the whole 64-byte cache lines of `out` (ordinary stores for the
// partial lines at either end, which streaming would make the memory controller read back).
void stream_bytes(uint8_t* out, const uint8_t* source, int64_t count) {
#if defined(__SSE2__)
  constexpr int64_t kLine = 64;
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kLine);
  const int64_t head = std::min(count, misalignment == 0 ? 0 : kLine - misalignment);
  std::memcpy(out, source, head);
  int64_t done = head;
  for (; done + kLine <= count; done += kLine) {
    const __m128i* from = reinterpret_cast<const __m128i*>(source + done);
    __m128i* to = reinterpret_cast<__m128i*>(out + done);
    const __m128i first = _mm_loadu_si128(from);
    const __m128i second = _mm_loadu_si128(from + 1);
    const __m128i third = _mm_loadu_si128(from + 2);
    const __m128i fourth = _mm_loadu_si128(from + 3);
    _mm_stream_si128(to, first);
    _mm_stream_si128(to + 1, second);
    _mm_stream_si128(to + 2, third);
    _mm_stream_si128(to + 3, fourth);
  }
  std::memcpy(out + done, source + done, count - done);
#else
  std::memcpy(out, source, count);
#endif
}

// Orders this thread's streaming stores before whatever reads the output next.
void finish_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

void copy_row(const Copy& copy, int64_t row, int64_t element_begin, int64_t element_end, bool streaming) {
  const int64_t source_size = element_size(copy.source_dtype);
  const int64_t out_size = element_size(copy.out_dtype);
  const int64_t count = std::min(element_end, copy.row_length) - element_begin;
  const uint8_t* source = copy.source + row * copy.source_row_stride + element_begin * source_size;
  uint8_t* out = copy.out + row * copy.out_row_stride + element_begin * out_size;
  const ConvertFn convert = converter(copy.source_dtype, copy.out_dtype);
  if (convert == nullptr && streaming) {
    stream_bytes(out, source, count * out_size);
  } else if (convert == nullptr) {
    std::memcpy(out, source, count * out_size);
  } else {
    convert(source, out, count);
  }
}

void run_unit(const std::vector<Copy>& copies, const Unit& unit, bool streaming) {
  for (int64_t row = unit.row_begin; row < unit.row_end; ++row) {
    for (int64_t index = unit.copy_begin; index < unit.copy_end; ++index) {
      copy_row(copies[index], row, unit.element_begin, unit.element_end, streaming);
    }
  }
}

}  // namespace

int64_t element_size(DtypeCode code) { return code == kFloat32 ? 4 : 2; }

std::vector<Copy> resolve_plan(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out) {
  TORCH_CHECK(plan.device().is_cpu() && plan.scalar_type() == c10::ScalarType::Long && plan.dim() == 2 &&
                  plan.size(1) == kPlanColumns && plan.is_contiguous(),
              "execute_copy_plan: the plan must be a contiguous int64 CPU tensor [num_copies, ", int64_t{kPlanColumns},
              "], got ", plan.scalar_type(), " ", plan.sizes(), " on ", plan.device());
  TORCH_CHECK(out.scalar_type() == c10::ScalarType::Byte && out.dim() == 1 && out.is_contiguous(),
              "execute_copy_plan: out must be a contiguous flat uint8 tensor, got ", out.scalar_type(), " ",
              out.sizes());
  for (size_t index = 0; index < sources.size(); ++index) {
    const at::Tensor& source = sources[index];
    TORCH_CHECK(source.device() == out.device(), "execute_copy_plan: source ", index, " is on ", source.device(),
                " but out is on ", out.device(), "; move them to one device");
    TORCH_CHECK(source.is_contiguous(), "execute_copy_plan: source ", index, " (", source.sizes(),
                ") is not contiguous; pass .contiguous() tensors");
  }
  const int64_t out_bytes = out.numel();
  uint8_t* out_base = static_cast<uint8_t*>(out.data_ptr());
  const int64_t* rows = plan.data_ptr<int64_t>();
  std::vector<Copy> copies;
  copies.reserve(plan.size(0));
  for (int64_t row = 0; row < plan.size(0); ++row) {
    const int64_t* entry = rows + row * kPlanColumns;
    const int64_t source_index = entry[kSource];
    TORCH_CHECK(source_index >= 0 && source_index < static_cast<int64_t>(sources.size()),
                "execute_copy_plan: plan row ", row, " reads source ", source_index, " but ", sources.size(),
                " sources were given");
    const DtypeCode source_dtype = checked_dtype(entry[kSourceDtype], row, "source dtype");
    const DtypeCode out_dtype = checked_dtype(entry[kOutDtype], row, "out dtype");
    const at::Tensor& source = sources[source_index];
    TORCH_CHECK(source.scalar_type() == c10::ScalarType::Byte || source.scalar_type() == scalar_type(source_dtype),
                "execute_copy_plan: plan row ", row, " reads source ", source_index, " as ", dtype_name(source_dtype),
                " but it holds ", source.scalar_type(), " (sources are typed tensors or raw uint8 buffers)");
    const int64_t count = entry[kRows];
    const int64_t row_length = entry[kRowLength];
    TORCH_CHECK(count >= 0 && row_length >= 0, "execute_copy_plan: plan row ", row, " has negative rows (", count,
                ") or row length (", row_length, ")");
    if (count == 0 || row_length == 0) {
      continue;
    }
    const int64_t source_bytes = source.numel() * source.element_size();
    check_extent(entry[kSourceOffset], entry[kSourceRowStride], count, row_length * element_size(source_dtype),
                 source_bytes, row, "its source");
    check_extent(entry[kOutOffset], entry[kOutRowStride], count, row_length * element_size(out_dtype), out_bytes,
                 row, "out");
    copies.push_back({static_cast<const uint8_t*>(source.data_ptr()) + entry[kSourceOffset],
                      out_base + entry[kOutOffset], entry[kSourceRowStride], entry[kOutRowStride], count, row_length,
                      source_dtype, out_dtype});
  }
  return copies;
}

void execute_copy_plan_cpu(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out) {
  const std::vector<Copy> copies = resolve_plan(plan, sources, out);
  const std::vector<Unit> units = split_into_units(copies);
  const int64_t num_units = static_cast<int64_t>(units.size());
  int64_t out_bytes = 0;
  for (const Copy& copy : copies) {
    out_bytes += copy.rows * copy.row_length * element_size(copy.out_dtype);
  }
  // Threads take units one by one rather than a fixed share each, so a thread the OS parks
  // (a busy machine, other ranks on the same cores) delays the copy by one unit, not by its share.
  std::atomic<int64_t> next_unit{0};
  const bool streaming = out_bytes >= kStreamingBytes;
  const auto run_units = [&](int64_t, int64_t) {
    for (int64_t index = next_unit++; index < num_units; index = next_unit++) {
      run_unit(copies, units[index], streaming);
    }
    if (streaming) {
      finish_streaming();
    }
  };
  if (out_bytes < kParallelBytes) {
    run_units(0, 1);
  } else {
    at::parallel_for(0, at::get_num_threads(), 1, run_units);
  }
}

}  // namespace megarl
