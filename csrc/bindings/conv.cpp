// Bindings for csrc/kernels/conv.cu (forward, input/filter/bias gradients). Called from convnet/ops/conv.py,
// which validates everything first; the launchers re-check the geometry and throw std::invalid_argument
// (Python ValueError). The geometry travels as a 12-tuple (C, H, W, N, F, KH, KW, sh, sw, ph, pw, groups).
#include <pybind11/stl.h>

#include <array>

#include "bindings/common.h"
#include "kernels/conv.h"

using namespace convnet::bind;

namespace {
using Geom = std::array<int, 12>;

convnet::ConvGeometry geometry(const Geom& g) {
  return convnet::conv_geometry(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]);
}
}  // namespace

void bind_conv(py::module_& m) {
  m.def("conv_forward", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, Geom g,
                           float alpha, float beta, std::uintptr_t s) {
    convnet::conv_forward(geometry(g), ptr<const float>(x), ptr<const float>(w), ptr<const float>(bias), ptr(y), alpha,
                          beta, stream(s));
  }, nogil());
  m.def("conv_backward_data", [](std::uintptr_t dy, std::uintptr_t w, std::uintptr_t dx, Geom g, float alpha,
                                 float beta, std::uintptr_t s) {
    convnet::conv_backward_data(geometry(g), ptr<const float>(dy), ptr<const float>(w), ptr(dx), alpha, beta,
                                stream(s));
  }, nogil());
  m.def("conv_plan", [](int op, Geom g) { return convnet::conv_plan(op, geometry(g)); });
  m.def("conv_tile_count", &convnet::conv_tile_count);
  m.def("conv_set_tile_override", &convnet::conv_set_tile_override, py::arg("row"), py::arg("wgrad_splits") = 0);
  m.def("conv_backward_filter_workspace", [](Geom g) {
    return convnet::conv_backward_filter_workspace(geometry(g));
  });
  m.def("conv_backward_filter", [](std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dw, std::uintptr_t ws,
                                   std::int64_t ws_floats, Geom g, float alpha, float beta, std::uintptr_t s) {
    convnet::conv_backward_filter(geometry(g), ptr<const float>(x), ptr<const float>(dy), ptr(dw), ptr(ws), ws_floats,
                                  alpha, beta, stream(s));
  }, nogil());
  m.def("conv_backward_bias", [](std::uintptr_t dy, std::uintptr_t db, int F, std::int64_t per_filter, float alpha,
                                 float beta, std::uintptr_t s) {
    convnet::conv_backward_bias(ptr<const float>(dy), ptr(db), F, per_filter, alpha, beta, stream(s));
  }, nogil());
}
