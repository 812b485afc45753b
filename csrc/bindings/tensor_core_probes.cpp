// Bindings for csrc/kernels/tensor_core_probes.cu: the `tensor_core_probes` submodule of convnet._emu and
// convnet._cuda, called by tests/test_tensor_core_intrinsics.py (device pointers, like every binding).
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "kernels/tensor_core_probes.h"

using namespace convnet::bind;
namespace probes = convnet::tensor_core_probes;

void bind_tensor_core_probes(py::module_& m) {
  py::module_ t = m.def_submodule("tensor_core_probes", "Probe kernels of the tensor-core and cp.async intrinsics");
  def_kernel(t, "mma_registers", [](bool bf16, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d,
                                    std::uintptr_t s) {
    probes::mma_registers(bf16, ptr<const std::uint32_t>(a), ptr<const std::uint32_t>(b), ptr<const float>(c), ptr(d),
                          stream(s));
  });
  def_kernel(t, "mma_gemm", [](bool bf16, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d,
                               int m, int n, int k, bool swap_a_registers, std::uintptr_t s) {
    probes::mma_gemm(bf16, ptr<const float>(a), ptr<const float>(b), ptr<const float>(c), ptr(d), m, n, k,
                     swap_a_registers, stream(s));
  });
  def_kernel(t, "ldmatrix", [](std::uintptr_t matrix, int elements, std::uintptr_t row_offsets, int count, bool trans,
                               std::uintptr_t out, std::uintptr_t s) {
    probes::ldmatrix(ptr<const std::uint16_t>(matrix), elements, ptr<const int>(row_offsets), count, trans,
                     ptr<std::uint32_t>(out), stream(s));
  });
  def_kernel(t, "convert", [](int kind, std::uintptr_t x, std::uintptr_t out, std::int64_t n, std::uintptr_t s) {
    probes::convert(kind, ptr<const float>(x), ptr<void>(out), n, stream(s));
  });
  t.attr("PIPELINE_TILE") = probes::kPipelineTile;
  def_kernel(t, "pipeline_copy", [](std::uintptr_t x, std::uintptr_t y, int tiles, int variant, std::uintptr_t s) {
    probes::pipeline_copy(ptr<const float>(x), ptr(y), tiles, variant, stream(s));
  });
#if CONVNET_EMU
  def_kernel(t, "cp_async_groups", [](std::uintptr_t x, std::uintptr_t out) {
    probes::cp_async_groups(ptr<const float>(x), ptr(out));
  });
  t.def("error_case_names", &probes::error_case_names);
  def_kernel(t, "run_error_case", &probes::run_error_case, py::arg("name"));
#endif
}
