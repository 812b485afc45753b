// Bindings for csrc/kernels/elementwise.cu (ReLU, dropout). Called from src/convnet/ops/elementwise.py.
// ReLU and dropout take float32 (relu_forward, ...) or bfloat16 storage (relu_forward_bf16, ...): for_each_storage.
#include "bindings/common.h"
#include "kernels/elementwise.h"

using namespace convnet::bind;

void bind_elementwise(py::module_& m) {
  for_each_storage([&](auto tag, const std::string& suffix) {
    using T = typename decltype(tag)::type;
    def_kernel(m, ("relu_forward" + suffix).c_str(), [](std::uintptr_t x, std::uintptr_t y, std::int64_t n,
                                                        std::uintptr_t s) {
      convnet::relu_forward(ptr<const T>(x), ptr<T>(y), n, stream(s));
    });
    def_kernel(m, ("relu_backward" + suffix).c_str(), [](std::uintptr_t y, std::uintptr_t dy, std::uintptr_t dx,
                                                         std::int64_t n, std::uintptr_t s) {
      convnet::relu_backward(ptr<const T>(y), ptr<const T>(dy), ptr<T>(dx), n, stream(s));
    });
    def_kernel(m, ("dropout_apply" + suffix).c_str(), [](std::uintptr_t x, std::uintptr_t y, std::int64_t rows,
                                                         std::int64_t cols, std::uint64_t batch, std::uint64_t first,
                                                         std::uint64_t threshold, float scale, std::uint64_t seed,
                                                         std::uint64_t offset, std::uint64_t start, std::uintptr_t s) {
      convnet::dropout_apply(ptr<const T>(x), ptr<T>(y), rows, cols, batch, first, threshold, scale, seed, offset,
                             start, stream(s));
    });
  });
  def_kernel(m, "dropout_mask", [](std::uintptr_t mask, std::int64_t rows, std::int64_t cols, std::uint64_t batch,
                                   std::uint64_t first, std::uint64_t threshold, std::uint64_t seed,
                                   std::uint64_t offset, std::uint64_t start, std::uintptr_t s) {
    convnet::dropout_mask(ptr<std::uint8_t>(mask), rows, cols, batch, first, threshold, seed, offset, start,
                          stream(s));
  });
}
