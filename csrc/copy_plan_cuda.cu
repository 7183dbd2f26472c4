// Executing copy plans on a GPU (see copy_plan.h): the plan is checked and resolved on the host,
// described once per call (a few arrays uploaded together), and run on the current stream by one
// batched kernel launch per kind of copy in the plan (same-dtype bytes, or one of six conversions).
//
// The unit of work is a slot: one 16-byte-aligned word of the output. Each output row is cut into
// the slots it touches; a slot the row covers whole (the row's body) is written with one 16-byte
// store from registers, its source bytes read with 16-byte (8-byte for a 16-bit -> fp32
// conversion) loads at aligned addresses and shifted into place with funnel shifts, so a source
// misaligned against the output by any number of bytes (a bucket offset 2 bytes off) still moves
// in 16-byte words. A slot the row covers only in part (its head or tail, at most two a row) is
// written element by element. Conversions convert a slot's 4-8 elements in registers, rounding to
// nearest even with c10's conversions (those of `Tensor.to` on the GPU), bit for bit as before.
//
// Slots are numbered copy after copy; tiles of kTileSlots consecutive slots go to blocks, which
// stride over the tiles (the grid is what the occupancy calculator says fits on the GPU at once).
// A tile may span several small copies, so a thread finds its slot's copy by a short forward scan
// from the tile's first copy (one table lookup). The host groups the copies by kind (their order
// is free: they never overlap), each kind's run starting a tile of its own, and launches each
// kind's kernel over its tiles. Index maths is 32-bit: the host splits any copy over 2^31 slots.
//
// Registers from nvcc 13.0,
// -arch=sm_90 -Xptxas -v (tests/weights/test_copy_plan_build.py checks them): bytes 80, fp32 ->
// bf16/fp16 76, bf16/fp16 -> fp32 64, bf16 <-> fp16 80; 0 bytes of stack frame and 0 bytes of
// spill stores and loads in every kernel. At 80 registers three 256-thread blocks are resident per
// SM, each thread with up to 64 bytes of loads in flight (4 slots; fp32 sources 2 at a time). The
// kernel this replaces (one unit a thread per iteration, a 64-bit division each) used 32.
#include "copy_plan_kernel.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>

namespace megarl {

namespace {

using namespace copy_kernel;

constexpr int kKinds = 1 + 3 * kNumDtypeCodes;

// Blocks of a kind's kernel that fit on the device at once (SMs x resident blocks per SM), from
// the occupancy calculator (it reads the kernel's registers), once per device and kind.
int64_t resident_blocks(int device, int32_t kind) {
  static std::array<std::array<std::atomic<int64_t>, kKinds>, 64> cache{};
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  if (cached && cache[device][kind].load() > 0) {
    return cache[device][kind].load();
  }
  int sm_count = 0;
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel_of(kind), kThreads, 0));
  const int64_t blocks = static_cast<int64_t>(sm_count) * std::max(blocks_per_sm, 1);
  if (cached) {
    cache[device][kind].store(blocks);
  }
  return blocks;
}

}  // namespace

void execute_copy_plan_cuda(const at::Tensor& plan, at::TensorList sources, const at::Tensor& out) {
  const std::vector<Copy> copies = resolve_plan(plan, sources, out);
  if (copies.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const KernelPlan described = plan_kernels(copies);
  // One pinned upload: the pieces, their first slots, each tile's first piece.
  const int64_t pieces_bytes = static_cast<int64_t>(described.pieces.size() * sizeof(DeviceCopy));
  const int64_t first_bytes = static_cast<int64_t>(described.first_slots.size() * sizeof(int64_t));
  const int64_t tiles_bytes = static_cast<int64_t>(described.tile_copies.size() * sizeof(int32_t));
  at::Tensor host = at::empty({pieces_bytes + first_bytes + tiles_bytes},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* staged = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(staged, described.pieces.data(), pieces_bytes);
  std::memcpy(staged + pieces_bytes, described.first_slots.data(), first_bytes);
  std::memcpy(staged + pieces_bytes + first_bytes, described.tile_copies.data(), tiles_bytes);
  // Pinned memory and the caching host allocator keep `host` alive until the upload is done.
  const at::Tensor device = host.to(out.device(), /*non_blocking=*/true);
  const uint8_t* uploaded = static_cast<const uint8_t*>(device.data_ptr());
  const int device_index = out.device().index();
  for (size_t run = 0; run + 1 < described.kind_tiles.size(); ++run) {
    const int64_t first_tile = described.kind_tiles[run];
    const int64_t end_tile = described.kind_tiles[run + 1];
    const int32_t kind = described.pieces[described.tile_copies[first_tile]].kind;
    const int64_t blocks = std::min<int64_t>(end_tile - first_tile, resident_blocks(device_index, kind));
    kernel_of(kind)<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const DeviceCopy*>(uploaded), reinterpret_cast<const int64_t*>(uploaded + pieces_bytes),
        reinterpret_cast<const int32_t*>(uploaded + pieces_bytes + first_bytes), first_tile, end_tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace megarl
