// The copy-plan kernel and its host-side description of a plan (see copy_plan_cuda.cu), apart
// from torch's CUDA runtime: tests/weights/test_copy_plan.py (emulated-*) compiles this header for the
// host, with CUDA's few built-ins emulated, and runs the kernel's index maths thread by thread on
// the CPU. Its functions are inline or templates.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "copy_plan.h"

// Where the host emulation checks that each 16-byte (or 8-byte) access is aligned; nothing on the GPU.
#ifndef MEGARL_CHECK_ALIGNED
#define MEGARL_CHECK_ALIGNED(address, bytes)
#endif

namespace megarl {
namespace copy_kernel {

constexpr int kThreads = 256;
// Slots a thread handles per tile, their loads all issued before the first store.
constexpr int kSlotsPerThread = 4;
constexpr int64_t kTileSlots = kThreads * kSlotsPerThread;  // 16 KiB of output
constexpr int64_t kSlotBytes = 16;
// Copies are split so that every piece has fewer slots than this (32-bit index maths).
constexpr int64_t kMaxSlots = (int64_t{1} << 31) - 1;
// Row pieces hold at most this many output bytes, so a row's slots fit in 32 bits.
constexpr int64_t kMaxRowBytes = int64_t{1} << 30;

// What a copy does to each element: 0 moves bytes (same dtype); otherwise a conversion,
// 1 + 3 * source code + out code.
inline int32_t kind_of(DtypeCode source, DtypeCode out) {
  return source == out ? 0 : 1 + 3 * static_cast<int32_t>(source) + static_cast<int32_t>(out);
}

// A piece of a plan row as the kernel reads it.
struct DeviceCopy {
  const uint8_t* source;  // row 0's first source byte
  uint8_t* out;           // row 0's first output byte
  int64_t source_row_stride;
  int64_t out_row_stride;
  uint32_t row_bytes;      // output bytes in a row
  uint32_t slots_per_row;  // slots a row may touch
  uint32_t slots;          // rows * slots_per_row
  int32_t kind;
};

// Slots that a row of `row_bytes` output bytes starting `misalignment` bytes past a 16-byte
// boundary touches; misalignment -1: rows start at varying offsets, the most any of them touches.
inline int64_t slots_touched(int64_t row_bytes, int64_t misalignment) {
  const int64_t worst = misalignment < 0 ? kSlotBytes - 1 : misalignment;
  return (worst + row_bytes - 1) / kSlotBytes + 1;
}

// Appends `copy` to `pieces`, split so that rows hold at most kMaxRowBytes and pieces fewer than
// kMaxSlots slots.
inline void append_pieces(const Copy& copy, std::vector<DeviceCopy>& pieces) {
  const int64_t source_size = element_size(copy.source_dtype);
  const int64_t out_size = element_size(copy.out_dtype);
  const int64_t piece_length = kMaxRowBytes / out_size;
  for (int64_t element = 0; element < copy.row_length; element += piece_length) {
    const int64_t row_bytes = std::min(piece_length, copy.row_length - element) * out_size;
    uint8_t* out = copy.out + element * out_size;
    const bool same_alignment = copy.rows == 1 || copy.out_row_stride % kSlotBytes == 0;
    const int64_t misalignment = same_alignment ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kSlotBytes) : -1;
    const int64_t slots_per_row = slots_touched(row_bytes, misalignment);
    const int64_t rows_per_piece = std::max<int64_t>(1, kMaxSlots / slots_per_row);
    for (int64_t row = 0; row < copy.rows; row += rows_per_piece) {
      const int64_t rows = std::min(rows_per_piece, copy.rows - row);
      pieces.push_back({copy.source + row * copy.source_row_stride + element * source_size,
                        out + row * copy.out_row_stride, copy.source_row_stride, copy.out_row_stride,
                        static_cast<uint32_t>(row_bytes), static_cast<uint32_t>(slots_per_row),
                        static_cast<uint32_t>(rows * slots_per_row), kind_of(copy.source_dtype, copy.out_dtype)});
    }
  }
}

// Tag for copies that keep their dtype: they move bytes.
struct Bytes {};

template <typename T>
struct Traits {
  static constexpr int kSize = sizeof(T);
};
template <>
struct Traits<Bytes> {
  static constexpr int kSize = 1;
};

// The kBytes bytes at an address of any alignment: `issue` starts loads of min(kBytes, 16) bytes
// at aligned addresses into `raw` (one more than kBytes needs when the address is misaligned),
// and `shift_into`, once they have arrived, funnel-shifts the wanted bytes into place.
template <int kBytes>
struct AlignedLoad {
  static constexpr int kGranule = kBytes < 16 ? kBytes : 16;
  static constexpr int kWords = kBytes / 4;
  static constexpr int kRawWords = kWords + kGranule / 4;
  uint32_t raw[kRawWords];
  uint32_t shift;  // bytes from the first aligned word to `address`

  __device__ __forceinline__ void issue(const uint8_t* __restrict__ address) {
    const uintptr_t location = reinterpret_cast<uintptr_t>(address);
    shift = static_cast<uint32_t>(location % kGranule);
    const uint8_t* base = reinterpret_cast<const uint8_t*>(location - shift);
#pragma unroll
    for (int granule = 0; granule < kRawWords / (kGranule / 4); ++granule) {
      // The last granule holds wanted bytes only when the address is misaligned; otherwise it
      // may lie past the source's end.
      if (granule * kGranule < kBytes || shift != 0) {
        MEGARL_CHECK_ALIGNED(base + granule * kGranule, kGranule);
        if constexpr (kGranule == 16) {
          const uint4 value = *reinterpret_cast<const uint4*>(base + granule * kGranule);
          raw[4 * granule] = value.x;
          raw[4 * granule + 1] = value.y;
          raw[4 * granule + 2] = value.z;
          raw[4 * granule + 3] = value.w;
        } else {
          const uint2 value = *reinterpret_cast<const uint2*>(base + granule * kGranule);
          raw[2 * granule] = value.x;
          raw[2 * granule + 1] = value.y;
        }
      } else {
#pragma unroll
        for (int word = 0; word < kGranule / 4; ++word) {
          raw[granule * (kGranule / 4) + word] = 0;
        }
      }
    }
  }

  // Word `index + shift / 4` of `raw`, selected without indexing registers at run time.
  __device__ __forceinline__ uint32_t shifted_word(int index, uint32_t word_shift) const {
    uint32_t value = raw[index];
#pragma unroll
    for (int step = 1; step < kGranule / 4; ++step) {
      value = word_shift == static_cast<uint32_t>(step) ? raw[index + step] : value;
    }
    return value;
  }

  __device__ __forceinline__ void shift_into(uint32_t (&words)[kWords]) const {
    const uint32_t word_shift = shift / 4;
    const uint32_t bit_shift = 8 * (shift % 4);
#pragma unroll
    for (int word = 0; word < kWords; ++word) {
      words[word] = __funnelshift_r(shifted_word(word, word_shift), shifted_word(word + 1, word_shift), bit_shift);
    }
  }
};

template <typename T>
__device__ __forceinline__ float element_from_bits(uint32_t bits) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(bits);
  } else {
    return static_cast<float>(T(static_cast<uint16_t>(bits), T::from_bits()));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t bits_of(float value) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(value);
  } else {
    return T(value).x;
  }
}

// One full slot: its source words -> its 16 output bytes.
template <typename Source, typename Out, int kSourceWords>
__device__ __forceinline__ uint4 convert_slot(const uint32_t (&in)[kSourceWords]) {
  if constexpr (std::is_same_v<Source, Out>) {
    return make_uint4(in[0], in[1], in[2], in[3]);
  } else {
    constexpr int kElements = 16 / sizeof(Out);
    uint32_t out[4] = {0, 0, 0, 0};
#pragma unroll
    for (int element = 0; element < kElements; ++element) {
      uint32_t source_bits = in[element * sizeof(Source) / 4];
      if constexpr (sizeof(Source) == 2) {
        source_bits = (source_bits >> (16 * (element % 2))) & 0xFFFFu;
      }
      const uint32_t out_bits = bits_of<Out>(element_from_bits<Source>(source_bits));
      if constexpr (sizeof(Out) == 2) {
        out[element / 2] |= out_bits << (16 * (element % 2));
      } else {
        out[element] = out_bits;
      }
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
  }
}

// Elements [begin, end) of a row, one at a time through byte copies (any alignment): a row's
// partly covered slots.
template <typename Source, typename Out>
__device__ __noinline__ void copy_elements(const uint8_t* __restrict__ source, uint8_t* __restrict__ out, uint32_t begin,
                              uint32_t end) {
  for (uint32_t element = begin; element < end; ++element) {
    if constexpr (std::is_same_v<Source, Out>) {
      out[element] = source[element];
    } else {
      Source value;
      memcpy(&value, source + element * sizeof(Source), sizeof(Source));
      const Out converted(static_cast<float>(value));
      memcpy(out + element * sizeof(Out), &converted, sizeof(Out));
    }
  }
}

// Where one slot lies: its copy's row, and the bytes [low, high) of the slot that the row covers.
struct Place {
  const uint8_t* source_row;
  uint8_t* out_row;
  uint8_t* slot_start;
  uint32_t low;   // bytes from out_row
  uint32_t high;  // likewise; low >= high: the row does not touch the slot
};

// Walks a thread's slots in increasing order, scanning the copies forward from a tile's first.
struct Cursor {
  const DeviceCopy* __restrict__ copies;
  const int64_t* __restrict__ first_slots;
  int32_t index;
  int32_t loaded;
  const DeviceCopy* copy;  // read through the cache as needed: fewer registers than a copy
  int64_t first_slot;

  __device__ __forceinline__ Cursor(const DeviceCopy* __restrict__ copies_, const int64_t* __restrict__ first_slots_,
                                    int32_t index_)
      : copies(copies_), first_slots(first_slots_), index(index_), loaded(-1), copy(copies_), first_slot(0) {}

  // False for slots past the last copy of a kind or of the plan.
  __device__ __forceinline__ bool locate(int64_t slot, Place& place) {
    // The sentinel first_slots[num_copies] (INT64_MAX) ends the scan.
    while (slot >= first_slots[index + 1]) {
      ++index;
    }
    if (index != loaded) {
      copy = copies + index;
      first_slot = first_slots[index];
      loaded = index;
    }
    if (slot - first_slot >= copy->slots) {
      return false;
    }
    const uint32_t local = static_cast<uint32_t>(slot - first_slot);
    const uint32_t row = copy->slots == copy->slots_per_row ? 0u : local / copy->slots_per_row;
    const uint32_t slot_in_row = local - row * copy->slots_per_row;
    place.out_row = copy->out + row * copy->out_row_stride;
    place.source_row = copy->source + row * copy->source_row_stride;
    const uint32_t misalignment = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(place.out_row) % kSlotBytes);
    place.slot_start = place.out_row - misalignment + slot_in_row * kSlotBytes;
    const uint32_t start = slot_in_row * kSlotBytes;  // slot_start - out_row + misalignment
    place.low = start > misalignment ? start - misalignment : 0u;
    const uint32_t row_end = copy->row_bytes + misalignment;
    place.high = (start + static_cast<uint32_t>(kSlotBytes) < row_end ? start + static_cast<uint32_t>(kSlotBytes) : row_end) -
                 misalignment;
    return true;
  }
};

// This thread's kSlotsPerThread slots of the tile that starts at slot `tile_begin`, whose first
// slot belongs to copy `index`: first the slots the rows cover whole, in batches whose loads are
// all issued before the first store, then the partly covered ones, element by element.
template <typename Source, typename Out>
__device__ __forceinline__ void copy_tile(const DeviceCopy* __restrict__ copies,
                                          const int64_t* __restrict__ first_slots, int32_t index,
                                          int64_t tile_begin) {
  constexpr int kSourceSize = Traits<Source>::kSize;
  constexpr int kOutSize = Traits<Out>::kSize;
  constexpr int kSourceBytes = 16 / kOutSize * kSourceSize;
  // Conversions from fp32 read 32 bytes a slot: two slots a batch keep the registers in bounds.
  constexpr int kBatch = kSourceBytes == 32 ? 2 : 4;
  uint32_t partial = 0;  // bit s: slot s is partly covered
  Cursor cursor(copies, first_slots, index);
#pragma unroll
  for (int batch = 0; batch < kSlotsPerThread; batch += kBatch) {
    AlignedLoad<kSourceBytes> loads[kBatch];
    uint8_t* targets[kBatch];
#pragma unroll
    for (int step = 0; step < kBatch; ++step) {
      targets[step] = nullptr;
      Place place;
      if (!cursor.locate(tile_begin + threadIdx.x + (batch + step) * kThreads, place) || place.low >= place.high) {
        continue;
      }
      if (place.high - place.low == kSlotBytes && reinterpret_cast<uintptr_t>(place.out_row) % kOutSize == 0) {
        loads[step].issue(place.source_row + place.low / kOutSize * kSourceSize);
        targets[step] = place.slot_start;
      } else {
        partial |= 1u << (batch + step);
      }
    }
#pragma unroll
    for (int step = 0; step < kBatch; ++step) {
      if (targets[step] != nullptr) {
        uint32_t words[kSourceBytes / 4];
        loads[step].shift_into(words);
        MEGARL_CHECK_ALIGNED(targets[step], kSlotBytes);
        *reinterpret_cast<uint4*>(targets[step]) = convert_slot<Source, Out>(words);
      }
    }
  }
  if (partial != 0) {
    Cursor again(copies, first_slots, index);
    for (int step = 0; step < kSlotsPerThread; ++step) {
      Place place;
      if ((partial >> step) & 1u && again.locate(tile_begin + threadIdx.x + step * kThreads, place)) {
        // The slot's elements are those whose first byte lies in it.
        copy_elements<Source, Out>(place.source_row, place.out_row, (place.low + kOutSize - 1) / kOutSize,
                                   (place.high + kOutSize - 1) / kOutSize);
      }
    }
  }
}

// Tiles [first_tile, end_tile) of the plan, all of one kind.
template <typename Source, typename Out>
__global__ void __launch_bounds__(kThreads) copy_plan_kernel(const DeviceCopy* __restrict__ copies,
                                                             const int64_t* __restrict__ first_slots,
                                                             const int32_t* __restrict__ tile_copies,
                                                             int64_t first_tile, int64_t end_tile) {
  for (int64_t tile = first_tile + blockIdx.x; tile < end_tile; tile += gridDim.x) {
    copy_tile<Source, Out>(copies, first_slots, tile_copies[tile], tile * kTileSlots);
  }
}

using Kernel = void (*)(const DeviceCopy*, const int64_t*, const int32_t*, int64_t, int64_t);

// The kernel of each kind (kind_of).
inline Kernel kernel_of(int32_t kind) {
  switch (kind) {
    case 0:
      return copy_plan_kernel<Bytes, Bytes>;
    case 1 + 3 * kFloat32 + kBFloat16:
      return copy_plan_kernel<float, c10::BFloat16>;
    case 1 + 3 * kFloat32 + kFloat16:
      return copy_plan_kernel<float, c10::Half>;
    case 1 + 3 * kBFloat16 + kFloat32:
      return copy_plan_kernel<c10::BFloat16, float>;
    case 1 + 3 * kBFloat16 + kFloat16:
      return copy_plan_kernel<c10::BFloat16, c10::Half>;
    case 1 + 3 * kFloat16 + kFloat32:
      return copy_plan_kernel<c10::Half, float>;
    default:
      return copy_plan_kernel<c10::Half, c10::BFloat16>;
  }
}


inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// What the kernels read: the plan's copies cut into pieces (grouped by kind), where each piece's
// slots start, each tile's first piece, and the tiles of each kind.
struct KernelPlan {
  std::vector<DeviceCopy> pieces;
  std::vector<int64_t> first_slots;  // a piece's first slot; then the sentinel INT64_MAX
  std::vector<int32_t> tile_copies;  // the piece that holds a tile's first slot
  std::vector<int64_t> kind_tiles;   // the first tile of each kind's run, then the number of tiles
};

inline KernelPlan plan_kernels(const std::vector<Copy>& copies) {
  KernelPlan plan;
  plan.pieces.reserve(copies.size());
  for (const Copy& copy : copies) {
    append_pieces(copy, plan.pieces);
  }
  // Copies never overlap in `out`, so their order is free: grouped by kind, each kind's pieces
  // take a run of tiles of their own and one launch of that kind's kernel.
  std::stable_sort(plan.pieces.begin(), plan.pieces.end(),
                   [](const DeviceCopy& first, const DeviceCopy& second) { return first.kind < second.kind; });
  const int64_t num_pieces = static_cast<int64_t>(plan.pieces.size());
  plan.first_slots.resize(num_pieces + 1);
  int64_t next_slot = 0;
  for (int64_t index = 0; index < num_pieces; ++index) {
    if (index == 0 || plan.pieces[index].kind != plan.pieces[index - 1].kind) {
      next_slot = round_up(next_slot, kTileSlots);
      plan.kind_tiles.push_back(next_slot / kTileSlots);
    }
    plan.first_slots[index] = next_slot;
    next_slot += plan.pieces[index].slots;
  }
  plan.first_slots[num_pieces] = INT64_MAX;
  const int64_t num_tiles = round_up(next_slot, kTileSlots) / kTileSlots;
  plan.kind_tiles.push_back(num_tiles);
  plan.tile_copies.resize(num_tiles);
  for (int64_t tile = 0, index = 0; tile < num_tiles; ++tile) {
    while (plan.first_slots[index + 1] <= tile * kTileSlots) {
      ++index;
    }
    plan.tile_copies[tile] = static_cast<int32_t>(index);
  }
  return plan;
}

}  // namespace copy_kernel
}  // namespace megarl
