// Bindings for csrc/kernels/conv.cu (forward, input/filter/bias gradients). Called from src/convnet/ops/conv.py,
// which validates everything first; the geometry arrives as a convnet.geometry.ConvGeometry (read by name, see
// bindings/geometry.h) and is re-checked by conv_geometry (std::invalid_argument -> Python ValueError).
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/conv.h"

using namespace convnet::bind;
using convnet::ConvGeometry;
using convnet::ConvPass;

void bind_conv(py::module_& m) {
  // module_local: _emu and _cuda both define it, and pybind11 types are otherwise process-global.
  py::enum_<ConvPass>(m, "ConvPass", py::module_local(), "The three convolutions (conv_plan's first argument)")
      .value("forward", ConvPass::forward)
      .value("backward_data", ConvPass::backward_data)
      .value("backward_filter", ConvPass::backward_filter);

  def_kernel(m, "conv_forward", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y,
                                   const ConvGeometry& g, float alpha, float beta, bool relu, std::uintptr_t s) {
    convnet::conv_forward(g, ptr<const float>(x), ptr<const float>(w), ptr<const float>(bias), ptr(y), alpha, beta,
                          relu, stream(s));
  });
  def_kernel(m, "conv_backward_data", [](std::uintptr_t dy, std::uintptr_t w, std::uintptr_t dx,
                                         const ConvGeometry& g, float alpha, float beta, std::uintptr_t s) {
    convnet::conv_backward_data(g, ptr<const float>(dy), ptr<const float>(w), ptr(dx), alpha, beta, stream(s));
  });
  def_kernel(m, "conv_backward_filter", [](std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dw, std::uintptr_t ws,
                                           std::int64_t ws_floats, const ConvGeometry& g, float alpha, float beta,
                                           std::uintptr_t s) {
    convnet::conv_backward_filter(g, ptr<const float>(x), ptr<const float>(dy), ptr(dw), ptr(ws), ws_floats, alpha,
                                  beta, stream(s));
  });
  def_kernel(m, "conv_backward_bias", [](std::uintptr_t dy, std::uintptr_t db, std::uintptr_t ws,
                                         std::int64_t ws_floats, int F, std::int64_t per_filter, float alpha,
                                         float beta, std::uintptr_t s) {
    convnet::conv_backward_bias(ptr<const float>(dy), ptr(db), ptr(ws), ws_floats, F, per_filter, alpha, beta,
                                stream(s));
  });

  // Planning (no launch): the workspace the filter and bias gradients need, and for tests, benchmarks and tuning
  // the launch a pass would get and the dispatch-table override.
  m.def("conv_backward_filter_workspace", &convnet::conv_backward_filter_workspace);
  m.def("conv_backward_bias_workspace", &convnet::conv_backward_bias_workspace, py::arg("F"), py::arg("per_filter"));
  m.def("conv_plan", &convnet::conv_plan);
  m.def("conv_bias_plan", &convnet::conv_bias_plan, py::arg("F"), py::arg("per_filter"));
  m.def("conv_tile_count", &convnet::conv_tile_count);
  m.def("conv_set_tile_override", &convnet::conv_set_tile_override, py::arg("row"), py::arg("wgrad_splits") = 0);
}
