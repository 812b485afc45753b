// The output-size rule shared by convolution and pooling, the launchers' re-check of the Python geometry values
// (src/convnet/geometry.py holds the only other copy): OH = (H + 2*pad - window) / stride + 1, floor.
// 64-bit arithmetic: the callers have checked every size >= 1, so the result fits an int when the tensors do.
#pragma once

#include <cstdint>

namespace convnet {

inline int output_size(int size, int window, int stride, int pad) {
  return static_cast<int>((static_cast<std::int64_t>(size) + 2 * static_cast<std::int64_t>(pad) - window) / stride + 1);
}

}  // namespace convnet
