// Bindings for csrc/kernels/rnorm.cu (same-map response and contrast normalisation). Called from
// src/convnet/ops/rnorm.py with RnormGeometry, whose `a` is alpha / size^2.
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/rnorm.h"

using namespace convnet::bind;
using convnet::RnormGeometry;

void bind_rnorm(py::module_& m) {
  def_kernel(m, "cnorm_mean_diff", [](std::uintptr_t x, std::uintptr_t mean_diff, const RnormGeometry& g,
                                      std::uintptr_t s) {
    convnet::cnorm_mean_diff(ptr<const float>(x), ptr(mean_diff), g, stream(s));
  });
  def_kernel(m, "rnorm_forward", [](std::uintptr_t x, std::uintptr_t src, std::uintptr_t y, std::uintptr_t denom,
                                    const RnormGeometry& g, std::uintptr_t s) {
    convnet::rnorm_forward(ptr<const float>(x), ptr<const float>(src), ptr(y), ptr(denom), g, stream(s));
  });
  def_kernel(m, "rnorm_backward", [](std::uintptr_t x, std::uintptr_t src, std::uintptr_t denom, std::uintptr_t dy,
                                     std::uintptr_t out, bool adjoint_only, const RnormGeometry& g,
                                     std::uintptr_t s) {
    convnet::rnorm_backward(ptr<const float>(x), ptr<const float>(src), ptr<const float>(denom),
                            ptr<const float>(dy), ptr(out), adjoint_only, g, stream(s));
  });
  def_kernel(m, "cnorm_backward_mean", [](std::uintptr_t dy, std::uintptr_t denom, std::uintptr_t u,
                                          std::uintptr_t dx, const RnormGeometry& g, std::uintptr_t s) {
    convnet::cnorm_backward_mean(ptr<const float>(dy), ptr<const float>(denom), ptr<const float>(u), ptr(dx), g,
                                 stream(s));
  });
}
