// Shared helpers for the pybind11 bindings (compiled into both convnet._emu and convnet._cuda).
//
// Bindings are deliberately thin and private: they take raw device addresses (uintptr_t) plus sizes, because the
// same function must accept NumPy memory (emu) and CuPy memory (cuda). The Python op layer in src/convnet/ops/
// validates types, shapes and devices first; launchers re-check sizes and throw std::invalid_argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

#include "cuda_compat.h"

namespace py = pybind11;

namespace convnet::bind {

template <class T = float>
inline T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

inline cudaStream_t stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Registers a binding that launches work, with the GIL released for the call: a launch must not hold it (an
// emulated grid runs synchronously on worker threads; a CUDA launch may block). pybind11 converts the arguments
// first, with the GIL held (the geometry casters of bindings/geometry.h read Python attributes), so only `fn`
// itself runs without it and must not touch Python objects. `extra`: py::arg(...) and the like, as for m.def.
template <class Fn, class... Extra>
void def_kernel(py::module_& m, const char* name, Fn&& fn, const Extra&... extra) {
  m.def(name, std::forward<Fn>(fn), py::call_guard<py::gil_scoped_release>(), extra...);
}

// The storage types of the kernels with a bfloat16 variant (pool, lrn, elementwise, softmax), and the suffix of
// their binding names: `relu_forward` (float) and `relu_forward_bf16`. The one table; Python's twin is
// convnet.ops._checks.storage_kernel. bind(StorageTag<T>{}, suffix) registers one storage type's entry points.
template <class T>
struct StorageTag {
  using type = T;
};

template <class Bind>
void for_each_storage(Bind&& bind) {
  bind(StorageTag<float>{}, std::string());
  bind(StorageTag<convnet::bf16>{}, std::string("_bf16"));
}

}  // namespace convnet::bind
