// Bindings for csrc/kernels/lrn.cu. Called from src/convnet/ops/lrn.py once per channel group with
// LrnGeometry.group(), whose `a` is alpha with the convention resolved (alpha, or alpha / size).
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/lrn.h"

using namespace convnet::bind;
using convnet::LrnGeom;

void bind_lrn(py::module_& m) {
  m.def("lrn_forward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom, const LrnGeom& g,
                          std::uintptr_t s) {
    convnet::lrn_forward(ptr<const float>(x), ptr(y), ptr(denom), g, stream(s));
  }, nogil());
  m.def("lrn_backward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom, std::uintptr_t dy,
                           std::uintptr_t dx, const LrnGeom& g, int variant, std::uintptr_t s) {
    convnet::lrn_backward(ptr<const float>(x), ptr<const float>(y), ptr<const float>(denom), ptr<const float>(dy),
                          ptr(dx), g, variant, stream(s));
  }, nogil());
}
