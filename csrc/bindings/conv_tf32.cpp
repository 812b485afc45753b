// Bindings for csrc/kernels/conv_tf32.cu (the TF32 tensor-core convolution passes). Called
// from src/convnet/ops/conv.py (precision="tf32"), which validates everything first; the geometry is re-checked in C++.
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/conv_tf32.h"

using namespace convnet::bind;
using convnet::ConvGeometry;

void bind_conv_tf32(py::module_& m) {
  def_kernel(m, "conv_forward_tf32", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y,
                                        const ConvGeometry& g, float alpha, float beta, bool relu,
                                        std::uintptr_t s) {
    convnet::conv_forward_tf32(g, ptr<const float>(x), ptr<const float>(w), ptr<const float>(bias), ptr(y), alpha,
                               beta, relu, stream(s));
  });
  def_kernel(m, "conv_backward_data_tf32", [](std::uintptr_t dy, std::uintptr_t w, std::uintptr_t dx,
                                              const ConvGeometry& g, float alpha, float beta, std::uintptr_t s) {
    convnet::conv_backward_data_tf32(g, ptr<const float>(dy), ptr<const float>(w), ptr(dx), alpha, beta, stream(s));
  });
  def_kernel(m, "conv_backward_filter_tf32", [](std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dw,
                                                std::uintptr_t ws, std::int64_t ws_floats, const ConvGeometry& g,
                                                float alpha, float beta, std::uintptr_t s) {
    convnet::conv_backward_filter_tf32(g, ptr<const float>(x), ptr<const float>(dy), ptr(dw), ptr(ws), ws_floats,
                                       alpha, beta, stream(s));
  });
  m.def("conv_backward_filter_tf32_workspace", &convnet::conv_backward_filter_tf32_workspace);
  // Tests and notes: the launch in words, the number of tiles, and the tests' overrides (tile row, planted defect,
  // filter-gradient splits).
  m.def("conv_tf32_plan", &convnet::conv_tf32_plan, py::arg("g"), py::arg("pass") = convnet::ConvPass::forward);
  m.def("conv_tf32_tile_count", &convnet::conv_tf32_tile_count);
  m.def("conv_tf32_set_overrides", &convnet::conv_tf32_set_overrides, py::arg("row"), py::arg("planted_defect") = 0,
        py::arg("wgrad_splits") = 0);
}
