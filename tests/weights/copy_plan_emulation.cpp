// The CUDA copy kernel (csrc/copy_plan_kernel.cuh) compiled for the host: CUDA's built-ins it uses
// are emulated below, and `emulate` runs every thread of every block one after another (the
// kernel's threads never communicate, so any order gives the GPU's result). It also counts the
// 16- and 8-byte accesses that are not aligned, which a GPU would refuse.
// tests/weights/test_copy_plan.py builds it with the host compiler (its emulated-* engines).
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

struct Dim3 {
  unsigned x;
};
static Dim3 threadIdx{0};
static Dim3 blockIdx{0};
static Dim3 gridDim{1};
struct uint4 {
  uint32_t x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline uint32_t __funnelshift_r(uint32_t low, uint32_t high, uint32_t shift) {
  return static_cast<uint32_t>(((static_cast<uint64_t>(high) << 32) | low) >> (shift & 31));
}
inline float __uint_as_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}
inline uint32_t __float_as_uint(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
static int64_t misaligned_accesses = 0;
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define MEGARL_CHECK_ALIGNED(address, bytes) \
  (misaligned_accesses += reinterpret_cast<uintptr_t>(address) % static_cast<uintptr_t>(bytes) != 0)

#include "copy_plan_kernel.cuh"

namespace megarl {
int64_t element_size(DtypeCode code) { return code == kFloat32 ? 4 : 2; }
}  // namespace megarl

// Runs `num_rows` plan rows (copy_plan.h's columns; no bounds checks) from `sources` into `out`
// with `blocks` blocks; returns the number of misaligned 16- or 8-byte accesses.
extern "C" int64_t emulate(const int64_t* plan, int64_t num_rows, const uint8_t* const* sources, uint8_t* out,
                           int64_t blocks) {
  using namespace megarl;
  std::vector<Copy> copies;
  for (int64_t row = 0; row < num_rows; ++row) {
    const int64_t* entry = plan + row * kPlanColumns;
    if (entry[kRows] == 0 || entry[kRowLength] == 0) {
      continue;
    }
    copies.push_back({sources[entry[kSource]] + entry[kSourceOffset], out + entry[kOutOffset], entry[kSourceRowStride],
                      entry[kOutRowStride], entry[kRows], entry[kRowLength],
                      static_cast<DtypeCode>(entry[kSourceDtype]), static_cast<DtypeCode>(entry[kOutDtype])});
  }
  misaligned_accesses = 0;
  if (copies.empty()) {
    return 0;
  }
  const copy_kernel::KernelPlan described = copy_kernel::plan_kernels(copies);
  gridDim.x = static_cast<unsigned>(blocks);
  for (size_t run = 0; run + 1 < described.kind_tiles.size(); ++run) {
    const int64_t first_tile = described.kind_tiles[run];
    const int32_t kind = described.pieces[described.tile_copies[first_tile]].kind;
    for (blockIdx.x = 0; blockIdx.x < gridDim.x; ++blockIdx.x) {
      for (threadIdx.x = 0; threadIdx.x < copy_kernel::kThreads; ++threadIdx.x) {
        copy_kernel::kernel_of(kind)(described.pieces.data(), described.first_slots.data(), described.tile_copies.data(),
                                     first_tile, described.kind_tiles[run + 1]);
      }
    }
  }
  return misaligned_accesses;
}
