// Bindings for csrc/kernels/lrn.cu. Called from convnet/ops/lrn.py, which resolves the alpha convention into the
// coefficient `a` (alpha, or alpha / size) before calling.
#include "bindings/common.h"
#include "kernels/lrn.h"

using namespace convnet::bind;

void bind_lrn(py::module_& m) {
  m.def("lrn_forward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom, int C, int H, int W, int N,
                          int size, float a, float beta, float k, std::uintptr_t s) {
    const convnet::LrnGeom g = convnet::lrn_geometry(C, H, W, N, size, a, beta, k);
    convnet::lrn_forward(ptr<const float>(x), ptr(y), ptr(denom), g, stream(s));
  }, nogil());
  m.def("lrn_backward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t denom, std::uintptr_t dy,
                           std::uintptr_t dx, int C, int H, int W, int N, int size, float a, float beta, float k,
                           int variant, std::uintptr_t s) {
    const convnet::LrnGeom g = convnet::lrn_geometry(C, H, W, N, size, a, beta, k);
    convnet::lrn_backward(ptr<const float>(x), ptr<const float>(y), ptr<const float>(denom), ptr<const float>(dy),
                          ptr(dx), g, variant, stream(s));
  }, nogil());
}
