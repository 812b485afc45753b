// Element-wise ops: ReLU and inverted dropout. Any tensor, viewed as n contiguous elements of the storage type T:
// float or bf16 (cuda_compat.h; math in float, each result rounded once to T). Instantiated for both.
#pragma once

#include <cstdint>

#include "cuda_compat.h"

namespace convnet {

// y = max(x, 0). In place (x == y) is allowed.
template <typename T>
void relu_forward(const T* x, T* y, std::int64_t n, cudaStream_t stream);
// dx = dy where y > 0, else 0 (the gradient at the kink is 0). y is ReLU's output. In place (dy == dx) allowed.
template <typename T>
void relu_backward(const T* y, const T* dy, T* dx, std::int64_t n, cudaStream_t stream);

// Inverted dropout on a rows x cols tensor (row-major): element (r, c) is element j = start + r * batch + first + c of
// the mask's stream, kept iff philox(counter = (j/4, offset), key = seed)[j % 4] < keep_threshold, where
// keep_threshold = round(keep * 2^32) in [0, 2^32]; kept elements are multiplied by `scale` (= 1/keep rounded to
// float32 on the host), dropped ones are 0. Any tensor: rows = 1, cols = n, batch = n, first = 0 (element i is
// stream element start + i); `start` lets a slice of a larger tensor (a tower's units of the one-device layer) draw
// that slice's mask. A data-parallel shard of a CHWN (or features x N) tensor: rows = C*H*W, cols = its images,
// images [first, first + cols) of a batch of `batch` images: it draws exactly its images' part of the whole batch's
// mask. Requires first + cols <= batch and start + rows * batch below 2^64. The same function serves forward
// (x -> y) and backward (dy -> dx): the mask is regenerated, never stored. In place allowed.
template <typename T>
void dropout_apply(const T* x, T* y, std::int64_t rows, std::int64_t cols, std::uint64_t batch, std::uint64_t first,
                   std::uint64_t keep_threshold, float scale, std::uint64_t seed, std::uint64_t offset,
                   std::uint64_t start, cudaStream_t stream);
// The mask alone (1 kept, 0 dropped), for tests and visualisation.
void dropout_mask(std::uint8_t* mask, std::int64_t rows, std::int64_t cols, std::uint64_t batch, std::uint64_t first,
                  std::uint64_t keep_threshold, std::uint64_t seed, std::uint64_t offset, std::uint64_t start,
                  cudaStream_t stream);

}  // namespace convnet
