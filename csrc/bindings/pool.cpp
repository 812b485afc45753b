// Bindings for csrc/kernels/pool.cu. Called from convnet/ops/pool.py (which validates first).
#include "bindings/common.h"
#include "kernels/pool.h"

using namespace convnet::bind;

void bind_pool(py::module_& m) {
  m.def("pool_output_size", [](int C, int H, int W, int N, int wh, int ww, int sh, int sw, int ph, int pw) {
    const convnet::PoolGeom g = convnet::pool_geometry(C, H, W, N, wh, ww, sh, sw, ph, pw);
    return py::make_tuple(g.OH, g.OW);
  });
  m.def("pool_forward", [](std::uintptr_t x, std::uintptr_t y, int C, int H, int W, int N, int wh, int ww, int sh,
                           int sw, int ph, int pw, int mode, std::uintptr_t s) {
    const convnet::PoolGeom g = convnet::pool_geometry(C, H, W, N, wh, ww, sh, sw, ph, pw);
    convnet::pool_forward(ptr<const float>(x), ptr(y), g, mode, stream(s));
  }, nogil());
  m.def("pool_backward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t dy, std::uintptr_t dx, int C, int H,
                            int W, int N, int wh, int ww, int sh, int sw, int ph, int pw, int mode, std::uintptr_t s) {
    const convnet::PoolGeom g = convnet::pool_geometry(C, H, W, N, wh, ww, sh, sw, ph, pw);
    convnet::pool_backward(ptr<const float>(x), ptr<const float>(y), ptr<const float>(dy), ptr(dx), g, mode, stream(s));
  }, nogil());
}
