// Shared helpers for the pybind11 bindings (compiled into both convnet._emu and convnet._cuda).
//
// Bindings are deliberately thin and private: they take raw device addresses (uintptr_t) plus sizes, because the
// same function must accept NumPy memory (emu) and CuPy memory (cuda). The Python op layer in convnet/ops/
// validates types, shapes and devices first; launchers re-check sizes and throw std::invalid_argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda_compat.h"

namespace py = pybind11;

namespace convnet::bind {

template <class T = float>
inline T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

inline cudaStream_t stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Kernel launches (and emulated grids, which run synchronously) must not hold the GIL.
using nogil = py::call_guard<py::gil_scoped_release>;

}  // namespace convnet::bind
