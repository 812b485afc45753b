// tensor_core.cpp — the emulator's mma.sync and ldmatrix: what the last lane of the collective computes for the
// whole warp (cuemu.cpp gathers the lanes; the per-lane entry points are at the end of cuemu.h).
//
// Fragment ownership is the PTX ISA's ("Matrix Fragments for mma.m16n8k8", .tf32; "Matrix Fragments for
// mma.m16n8k16 with floating point type", .bf16), with groupID = lane >> 2 and threadID_in_group = lane % 4.
// These tables are the emulator's own; kernels carry theirs (csrc/kernels/mma_fragments.cuh), and
// tests/test_tensor_core_intrinsics.py checks both against tables written out by hand from the ISA.
#include <cstdarg>
#include <cstdio>
#include <string>

#include "cuemu.h"

namespace cuemu::detail {
namespace {

struct RowCol {
  int row, col;
};

// m16n8k8 .tf32 A (16x8), one element per register: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4).
RowCol tf32_a(int lane, int i) { return {(lane >> 2) + 8 * (i & 1), (lane & 3) + 4 * (i >> 1)}; }
// m16n8k8 .tf32 B (8x8): b0 (t, g), b1 (t+4, g).
RowCol tf32_b(int lane, int i) { return {(lane & 3) + 4 * i, lane >> 2}; }
// m16n8k16 .bf16 A (16x16), element i = 0..7 (register i / 2, low half first): rows g for i in {0,1,4,5}, else
// g+8; columns 2t + (i & 1), plus 8 for i >= 4.
RowCol bf16_a(int lane, int i) {
  return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
}
// m16n8k16 .bf16 B (16x8), element i = 0..3: rows 2t + (i & 1), plus 8 for i >= 2; column g.
RowCol bf16_b(int lane, int i) { return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2}; }
// C and D of both shapes (16x8 f32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
RowCol accumulator(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }

// A .tf32 operand as the tensor core reads it: the low 13 bits are not looked at.
float tf32_operand(uint32_t bits) { return std::bit_cast<float>(bits & 0xffffe000u); }
float bf16_half(uint32_t reg, int half) { return bf16_to_float(static_cast<uint16_t>(reg >> (16 * half))); }

std::string message(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string message(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

}  // namespace

void mma_sync(WarpOp op, void* const lanes[32]) {
  const bool tf32 = op == WarpOp::MmaTf32;
  const int k_dim = tf32 ? 8 : 16;
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaLane& p = *static_cast<const MmaLane*>(lanes[l]);
    if (tf32) {
      for (int i = 0; i < 4; ++i) a[tf32_a(l, i).row][tf32_a(l, i).col] = tf32_operand(p.a[i]);
      for (int i = 0; i < 2; ++i) b[tf32_b(l, i).row][tf32_b(l, i).col] = tf32_operand(p.b[i]);
    } else {
      for (int i = 0; i < 8; ++i) a[bf16_a(l, i).row][bf16_a(l, i).col] = bf16_half(p.a[i / 2], i & 1);
      for (int i = 0; i < 4; ++i) b[bf16_b(l, i).row][bf16_b(l, i).col] = bf16_half(p.b[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) c[accumulator(l, i).row][accumulator(l, i).col] = p.c[i];
  }
  // The products of TF32 or BF16 values are exact in float64, and so is nearly every sum of 8 or 16 of them: the
  // result is (all but always) the exact sum rounded once, whatever order the hardware uses.
  float d[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = c[m][n];
      for (int k = 0; k < k_dim; ++k) acc += double(a[m][k]) * double(b[k][n]);
      d[m][n] = static_cast<float>(acc);
    }
  for (int l = 0; l < 32; ++l) {
    MmaLane& p = *static_cast<MmaLane*>(lanes[l]);
    for (int i = 0; i < 4; ++i) p.d[i] = d[accumulator(l, i).row][accumulator(l, i).col];
  }
}

void ldmatrix_sync(int count, bool trans, void* const lanes[32], const char* file, int line) {
  if (count != 1 && count != 2 && count != 4)
    throw EmulatorError(message("ldmatrix at %s:%d: .x%d is not .x1, .x2 or .x4", file, line, count));
  for (int l = 0; l < 8 * count; ++l) {
    const void* row = static_cast<const LdmatrixLane*>(lanes[l])->row;
    if (reinterpret_cast<uintptr_t>(row) % 16)
      throw EmulatorError(message("ldmatrix at %s:%d: lane %d's row address %p is not 16-byte aligned", file, line,
                                  l, row));
    if (!in_shared_memory(row, 16))
      throw EmulatorError(message("ldmatrix at %s:%d: lane %d's row address %p is not in this block's shared memory",
                                  file, line, l, row));
  }
  // element(i, r, col): 16-bit element `col` of row r of matrix i (rows are the addresses of lanes 8i .. 8i+7).
  const auto element = [lanes](int i, int r, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(static_cast<const LdmatrixLane*>(lanes[8 * i + r])->row) + 2 * col, 2);
    return static_cast<uint32_t>(v);
  };
  for (int l = 0; l < 32; ++l) {
    LdmatrixLane& p = *static_cast<LdmatrixLane*>(lanes[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < count; ++i)
      p.r[i] = trans ? element(i, 2 * t, g) | element(i, 2 * t + 1, g) << 16
                     : element(i, g, 2 * t) | element(i, g, 2 * t + 1) << 16;
  }
}

}  // namespace cuemu::detail
