// Bindings for csrc/kernels/conv_tf32.cu (the TF32 tensor-core convolution forward). Called from
// src/convnet/ops/conv.py (precision="tf32"), which validates everything first; the geometry is re-checked in C++.
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/conv_tf32.h"

using namespace convnet::bind;
using convnet::ConvGeometry;

void bind_conv_tf32(py::module_& m) {
  def_kernel(m, "conv_forward_tf32", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y,
                                        const ConvGeometry& g, float alpha, float beta, std::uintptr_t s) {
    convnet::conv_forward_tf32(g, ptr<const float>(x), ptr<const float>(w), ptr<const float>(bias), ptr(y), alpha,
                               beta, stream(s));
  });
  // Tests and notes: the launch in words, the number of tiles, and the tests' overrides (tile row, planted defect).
  m.def("conv_tf32_plan", &convnet::conv_tf32_plan);
  m.def("conv_tf32_tile_count", &convnet::conv_tf32_tile_count);
  m.def("conv_tf32_set_overrides", &convnet::conv_tf32_set_overrides, py::arg("row"), py::arg("planted_defect") = 0);
}
