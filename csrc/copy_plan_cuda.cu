// Executing copy plans on a GPU (see copy_plan.h): the plan is checked and resolved on the host,
// uploaded once per call, and run by one batched kernel on the current stream.
//
// Work is cut into tiles of kTileUnits units; a unit is a word of 1 to 16 bytes for copies that
// keep their dtype (the widest word every address and stride of the copy is aligned to) or one
// element for copies that convert. Blocks stride over the tiles of all copies and find a tile's
// copy by binary search over the copies' first tiles, so a plan of ten thousand small copies
// and one of a few huge copies both spread evenly over the GPU.
#include "copy_plan.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

namespace megarl {

namespace {

constexpr int kThreads = 256;
// 16 units per thread per tile: enough to hide the tile's binary search.
constexpr int64_t kTileUnits = kThreads * 16;
// Resident blocks per SM the grid aims for; the blocks stride over the remaining tiles.
constexpr int kBlocksPerSM = 8;

// A plan row as the kernel reads it.
struct DeviceCopy {
  const uint8_t* source;
  uint8_t* out;
  int64_t source_row_stride;
  int64_t out_row_stride;
  int64_t rows;
  int64_t row_units;   // units in a row
  int64_t first_tile;  // tiles of all the copies before this one
  int32_t word_bytes;  // 16, 8, 4, 2 or 1 for copies that keep their dtype; 0 for conversions
  int32_t source_dtype;
  int32_t out_dtype;
  int32_t source_aligned;  // conversions: every source element sits at a multiple of its size
  int32_t out_aligned;     // conversions: likewise for the output elements
};

bool aligned_to(const void* address, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(address) % bytes == 0;
}

// Whether a copy's every row starts at a multiple of `bytes` in its tensor and in `out`.
bool rows_aligned_to(const Copy& copy, int64_t bytes) {
  return aligned_to(copy.source, bytes) && aligned_to(copy.out, bytes) &&
         (copy.rows == 1 || (copy.source_row_stride % bytes == 0 && copy.out_row_stride % bytes == 0));
}

DeviceCopy describe(const Copy& copy, int64_t first_tile) {
  DeviceCopy device{copy.source, copy.out, copy.source_row_stride, copy.out_row_stride, copy.rows, copy.row_length,
                    first_tile, 0, static_cast<int32_t>(copy.source_dtype), static_cast<int32_t>(copy.out_dtype),
                    0, 0};
  if (copy.source_dtype == copy.out_dtype) {
    const int64_t row_bytes = copy.row_length * element_size(copy.out_dtype);
    device.word_bytes = 1;
    for (int32_t bytes : {16, 8, 4, 2}) {
      if (row_bytes % bytes == 0 && rows_aligned_to(copy, bytes)) {
        device.word_bytes = bytes;
        break;
      }
    }
    device.row_units = row_bytes / device.word_bytes;
  } else {
    const int64_t source_size = element_size(copy.source_dtype);
    const int64_t out_size = element_size(copy.out_dtype);
    device.source_aligned = aligned_to(copy.source, source_size) &&
                            (copy.rows == 1 || copy.source_row_stride % source_size == 0);
    device.out_aligned = aligned_to(copy.out, out_size) && (copy.rows == 1 || copy.out_row_stride % out_size == 0);
  }
  return device;
}

template <typename T>
__device__ T load(const uint8_t* address, bool aligned) {
  if (aligned) {
    return *reinterpret_cast<const T*>(address);
  }
  T value;
  memcpy(&value, address, sizeof(T));
  return value;
}

template <typename T>
__device__ void store(uint8_t* address, T value, bool aligned) {
  if (aligned) {
    *reinterpret_cast<T*>(address) = value;
  } else {
    memcpy(address, &value, sizeof(T));
  }
}

__device__ float load_as_float(const uint8_t* address, int32_t dtype, bool aligned) {
  switch (dtype) {
    case kFloat32:
      return load<float>(address, aligned);
    case kBFloat16:
      return static_cast<float>(load<c10::BFloat16>(address, aligned));
    default:
      return static_cast<float>(load<c10::Half>(address, aligned));
  }
}

// Rounds to nearest even, as torch's `Tensor.to` does on the GPU.
__device__ void store_from_float(uint8_t* address, float value, int32_t dtype, bool aligned) {
  switch (dtype) {
    case kFloat32:
      store<float>(address, value, aligned);
      break;
    case kBFloat16:
      store<c10::BFloat16>(address, c10::BFloat16(value), aligned);
      break;
    default:
      store<c10::Half>(address, c10::Half(value), aligned);
      break;
  }
}

template <typename Word>
__device__ void copy_words(const DeviceCopy& copy, int64_t begin, int64_t end) {
  for (int64_t unit = begin + threadIdx.x; unit < end; unit += blockDim.x) {
    const int64_t row = unit / copy.row_units;
    const int64_t word = unit - row * copy.row_units;
    const Word* source = reinterpret_cast<const Word*>(copy.source + row * copy.source_row_stride) + word;
    Word* out = reinterpret_cast<Word*>(copy.out + row * copy.out_row_stride) + word;
    *out = *source;
  }
}

__device__ void convert_elements(const DeviceCopy& copy, int64_t begin, int64_t end) {
  const int64_t source_size = copy.source_dtype == kFloat32 ? 4 : 2;
  const int64_t out_size = copy.out_dtype == kFloat32 ? 4 : 2;
  for (int64_t unit = begin + threadIdx.x; unit < end; unit += blockDim.x) {
    const int64_t row = unit / copy.row_units;
    const int64_t element = unit - row * copy.row_units;
    const float value = load_as_float(copy.source + row * copy.source_row_stride + element * source_size,
                                      copy.source_dtype, copy.source_aligned);
    store_from_float(copy.out + row * copy.out_row_stride + element * out_size, value, copy.out_dtype,
                     copy.out_aligned);
  }
}

__global__ void copy_plan_kernel(const DeviceCopy* copies, int64_t num_copies, int64_t num_tiles) {
  __shared__ int64_t tile_copy;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    if (threadIdx.x == 0) {
      int64_t low = 0;
      int64_t high = num_copies - 1;
      while (low < high) {
        const int64_t middle = (low + high + 1) / 2;
        if (copies[middle].first_tile <= tile) {
          low = middle;
        } else {
          high = middle - 1;
        }
      }
      tile_copy = low;
    }
    __syncthreads();
    const DeviceCopy copy = copies[tile_copy];
    // Every thread has read tile_copy before thread 0 overwrites it for the next tile.
    __syncthreads();
    const int64_t begin = (tile - copy.first_tile) * kTileUnits;
    const int64_t units = copy.rows * copy.row_units;
    const int64_t end = begin + kTileUnits < units ? begin + kTileUnits : units;
    switch (copy.word_bytes) {
      case 16:
        copy_words<uint4>(copy, begin, end);
        break;
      case 8:
        copy_words<uint2>(copy, begin, end);
        break;
      case 4:
        copy_words<uint32_t>(copy, begin, end);
        break;
      case 2:
        copy_words<uint16_t>(copy, begin, end);
        break;
      case 1:
        copy_words<uint8_t>(copy, begin, end);
        break;
      default:
        convert_elements(copy, begin, end);
        break;
    }
  }
}

}  // namespace

void execute_copy_plan_cuda(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out) {
  const std::vector<Copy> copies = resolve_plan(plan, sources, out);
  if (copies.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t num_copies = static_cast<int64_t>(copies.size());
  at::Tensor host = at::empty({num_copies * static_cast<int64_t>(sizeof(DeviceCopy))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  DeviceCopy* described = reinterpret_cast<DeviceCopy*>(host.data_ptr());
  int64_t num_tiles = 0;
  for (int64_t index = 0; index < num_copies; ++index) {
    described[index] = describe(copies[index], num_tiles);
    num_tiles += (described[index].rows * described[index].row_units + kTileUnits - 1) / kTileUnits;
  }
  // Pinned memory and the caching host allocator keep `host` alive until the upload is done.
  const at::Tensor device = host.to(out.device(), /*non_blocking=*/true);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, out.device().index()));
  const int64_t blocks = std::min<int64_t>(num_tiles, static_cast<int64_t>(sm_count) * kBlocksPerSM);
  copy_plan_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const DeviceCopy*>(device.data_ptr()), num_copies, num_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace megarl
