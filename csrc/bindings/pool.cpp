// Bindings for csrc/kernels/pool.cu. Called from src/convnet/ops/pool.py (which validates first); the geometry
// arrives as a convnet.geometry.PoolGeometry (read by name, see bindings/geometry.h), the mode as an int
// (convnet::PoolMode's value: 0 max, 1 avg).
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/pool.h"

using namespace convnet::bind;
using convnet::PoolGeometry;

void bind_pool(py::module_& m) {
  def_kernel(m, "pool_forward", [](std::uintptr_t x, std::uintptr_t y, const PoolGeometry& g, int mode,
                                   std::uintptr_t s) {
    convnet::pool_forward(ptr<const float>(x), ptr(y), g, convnet::pool_mode(mode), stream(s));
  });
  def_kernel(m, "pool_backward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t dy, std::uintptr_t dx,
                                    const PoolGeometry& g, int mode, std::uintptr_t s) {
    convnet::pool_backward(ptr<const float>(x), ptr<const float>(y), ptr<const float>(dy), ptr(dx), g,
                           convnet::pool_mode(mode), stream(s));
  });
}
