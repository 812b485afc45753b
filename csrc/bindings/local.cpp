// Bindings for csrc/kernels/local.cu (locally connected layers). Called from src/convnet/ops/local.py with a
// LocalGeometry (ConvGeometry's fields, read by name); bias_mode 0 none, 1 (F,), 2 (F, OH, OW).
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/local.h"

using namespace convnet::bind;
using convnet::ConvGeometry;

void bind_local(py::module_& m) {
  def_kernel(m, "local_forward", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, int bias_mode,
                                    std::uintptr_t y, const ConvGeometry& g, float alpha, float beta,
                                    std::uintptr_t s) {
    if (bias_mode < 0 || bias_mode > 2) throw std::invalid_argument("local_forward: bias_mode must be 0, 1 or 2");
    convnet::local_forward(g, ptr<const float>(x), ptr<const float>(w), ptr<const float>(bias),
                           static_cast<convnet::LocalBias>(bias_mode), ptr(y), alpha, beta, stream(s));
  });
  def_kernel(m, "local_backward_data", [](std::uintptr_t dy, std::uintptr_t w, std::uintptr_t dx,
                                          const ConvGeometry& g, float alpha, float beta, std::uintptr_t s) {
    convnet::local_backward_data(g, ptr<const float>(dy), ptr<const float>(w), ptr(dx), alpha, beta, stream(s));
  });
  def_kernel(m, "local_backward_filter", [](std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dw,
                                            const ConvGeometry& g, float alpha, float beta, std::uintptr_t s) {
    convnet::local_backward_filter(g, ptr<const float>(x), ptr<const float>(dy), ptr(dw), alpha, beta, stream(s));
  });
}
