// Bindings for csrc/kernels/pool.cu. Called from src/convnet/ops/pool.py (which validates first); the geometry
// arrives as a convnet.geometry.PoolGeometry (read by name, see bindings/geometry.h), the mode as an int
// (convnet::PoolMode's value: 0 max, 1 avg). float32 (pool_forward, ...) or bfloat16 storage (pool_forward_bf16, ...):
// for_each_storage.
#include "bindings/common.h"
#include "bindings/geometry.h"
#include "kernels/pool.h"

using namespace convnet::bind;
using convnet::PoolGeometry;

void bind_pool(py::module_& m) {
  for_each_storage([&](auto tag, const std::string& suffix) {
    using T = typename decltype(tag)::type;
    def_kernel(m, ("pool_forward" + suffix).c_str(), [](std::uintptr_t x, std::uintptr_t y, const PoolGeometry& g,
                                                        int mode, std::uintptr_t s) {
      convnet::pool_forward(ptr<const T>(x), ptr<T>(y), g, convnet::pool_mode(mode), stream(s));
    });
    def_kernel(m, ("pool_backward" + suffix).c_str(), [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t dy,
                                                         std::uintptr_t dx, const PoolGeometry& g, int mode,
                                                         std::uintptr_t s) {
      convnet::pool_backward(ptr<const T>(x), ptr<const T>(y), ptr<const T>(dy), ptr<T>(dx), g,
                             convnet::pool_mode(mode), stream(s));
    });
  });
}
