// Bindings for csrc/kernels/conv_bf16.cu (the BF16 tensor-core convolution passes). Called from
// src/convnet/ops/conv.py (precision="bf16"), which validates everything first (dtypes included: the flags say
// what the addresses hold); the geometry is re-checked in C++.
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/conv_bf16.h"

using namespace convnet::bind;
using convnet::ConvGeometry;

void bind_conv_bf16(py::module_& m) {
  // inputs_bf16: x and w hold bfloat16 (else float32); y_bf16: y holds bfloat16 (else float32); bias is float32;
  // relu: the fused ReLU epilogue.
  def_kernel(m, "conv_forward_bf16", [](std::uintptr_t x, std::uintptr_t w, bool inputs_bf16, std::uintptr_t bias,
                                        std::uintptr_t y, bool y_bf16, const ConvGeometry& g, float alpha, float beta,
                                        bool relu, std::uintptr_t s) {
    convnet::conv_forward_bf16(g, ptr<const void>(x), ptr<const void>(w), inputs_bf16, ptr<const float>(bias),
                               ptr<void>(y), y_bf16, alpha, beta, relu, stream(s));
  });
  // inputs_bf16: dy and w (x and dy) hold bfloat16; dx_bf16: dx holds bfloat16; dw and the workspace are float32.
  def_kernel(m, "conv_backward_data_bf16", [](std::uintptr_t dy, std::uintptr_t w, bool inputs_bf16, std::uintptr_t dx,
                                              bool dx_bf16, const ConvGeometry& g, float alpha, float beta,
                                              std::uintptr_t s) {
    convnet::conv_backward_data_bf16(g, ptr<const void>(dy), ptr<const void>(w), inputs_bf16, ptr<void>(dx), dx_bf16,
                                     alpha, beta, stream(s));
  });
  def_kernel(m, "conv_backward_filter_bf16", [](std::uintptr_t x, std::uintptr_t dy, bool inputs_bf16,
                                                std::uintptr_t dw, std::uintptr_t ws, std::int64_t ws_floats,
                                                const ConvGeometry& g, float alpha, float beta, std::uintptr_t s) {
    convnet::conv_backward_filter_bf16(g, ptr<const void>(x), ptr<const void>(dy), inputs_bf16, ptr(dw), ptr(ws),
                                       ws_floats, alpha, beta, stream(s));
  });
  m.def("conv_backward_filter_bf16_workspace", &convnet::conv_backward_filter_bf16_workspace);
  // Tests and notes: the launch in words, the number of tiles, and the tests' overrides (tile row, planted defect,
  // filter-gradient splits).
  m.def("conv_bf16_plan", &convnet::conv_bf16_plan, py::arg("geometry"), py::arg("inputs_bf16"),
        py::arg("pass") = convnet::ConvPass::forward);
  m.def("conv_bf16_tile_count", &convnet::conv_bf16_tile_count);
  m.def("conv_bf16_set_overrides", &convnet::conv_bf16_set_overrides, py::arg("row"), py::arg("planted_defect") = 0,
        py::arg("wgrad_splits") = 0);
}
