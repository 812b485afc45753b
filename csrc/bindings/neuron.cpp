// Bindings for csrc/kernels/neuron.cu (neurons, eltsum, eltmax). Called from src/convnet/ops/neuron.py.
#include "bindings/common.h"
#include "kernels/neuron.h"

using namespace convnet::bind;

void bind_neuron(py::module_& m) {
  def_kernel(m, "neuron_forward", [](std::uintptr_t x, std::uintptr_t y, std::int64_t n, int kind, float a, float b,
                                     std::uintptr_t s) {
    convnet::neuron_forward(ptr<const float>(x), ptr(y), n, kind, a, b, stream(s));
  });
  def_kernel(m, "neuron_backward", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t dy, std::uintptr_t dx,
                                      std::int64_t n, int kind, float a, float b, std::uintptr_t s) {
    convnet::neuron_backward(ptr<const float>(x), ptr<const float>(y), ptr<const float>(dy), ptr(dx), n, kind, a, b,
                             stream(s));
  });
  def_kernel(m, "eltsum_accumulate", [](std::uintptr_t x, std::uintptr_t y, std::int64_t n, float coeff, float beta,
                                        std::uintptr_t s) {
    convnet::eltsum_accumulate(ptr<const float>(x), ptr(y), n, coeff, beta, stream(s));
  });
  def_kernel(m, "eltmax_step", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t which, std::int64_t n,
                                  int index, std::uintptr_t s) {
    convnet::eltmax_step(ptr<const float>(x), ptr(y), ptr<std::uint8_t>(which), n, index, stream(s));
  });
  def_kernel(m, "eltmax_backward", [](std::uintptr_t which, std::uintptr_t dy, std::uintptr_t dx, std::int64_t n,
                                      int index, std::uintptr_t s) {
    convnet::eltmax_backward(ptr<const std::uint8_t>(which), ptr<const float>(dy), ptr(dx), n, index, stream(s));
  });
}
