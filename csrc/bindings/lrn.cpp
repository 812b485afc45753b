// Bindings for csrc/kernels/lrn.cu. Called from src/convnet/ops/lrn.py once per channel group with
// LrnGeometry.group(), whose `a` is alpha with the convention resolved (alpha, or alpha / size); the backward
// variant as an int (convnet::LrnBackward's value: 0 recompute, 1 reuse). float32 (lrn_forward, ...) or bfloat16
// storage (lrn_forward_bf16, ...): for_each_storage.
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/lrn.h"

using namespace convnet::bind;
using convnet::LrnGeometry;

void bind_lrn(py::module_& m) {
  for_each_storage([&](auto tag, const std::string& suffix) {
    using T = typename decltype(tag)::type;
    def_kernel(m, ("lrn_forward" + suffix).c_str(), [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom,
                                                       const LrnGeometry& g, std::uintptr_t s) {
      convnet::lrn_forward(ptr<const T>(x), ptr<T>(y), ptr<T>(denom), g, stream(s));
    });
    def_kernel(m, ("lrn_backward" + suffix).c_str(), [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom,
                                                        std::uintptr_t dy, std::uintptr_t dx, const LrnGeometry& g,
                                                        int variant, std::uintptr_t s) {
      convnet::lrn_backward(ptr<const T>(x), ptr<const T>(y), ptr<const T>(denom), ptr<const T>(dy), ptr<T>(dx), g,
                            convnet::lrn_backward_variant(variant), stream(s));
    });
  });
}
