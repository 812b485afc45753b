// Bindings for csrc/kernels/lrn.cu. Called from src/convnet/ops/lrn.py once per channel group with
// LrnGeometry.group(), whose `a` is alpha with the convention resolved (alpha, or alpha / size); the backward
// variant as an int (convnet::LrnBackward's value: 0 recompute, 1 reuse).
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/lrn.h"

using namespace convnet::bind;
using convnet::LrnGeometry;

void bind_lrn(py::module_& m) {
  def_kernel(m, "lrn_forward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom, const LrnGeometry& g,
                                  std::uintptr_t s) {
    convnet::lrn_forward(ptr<const float>(x), ptr(y), ptr(denom), g, stream(s));
  });
  def_kernel(m, "lrn_backward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom, std::uintptr_t dy,
                                   std::uintptr_t dx, const LrnGeometry& g, int variant, std::uintptr_t s) {
    convnet::lrn_backward(ptr<const float>(x), ptr<const float>(y), ptr<const float>(denom), ptr<const float>(dy),
                          ptr(dx), g, convnet::lrn_backward_variant(variant), stream(s));
  });
}
