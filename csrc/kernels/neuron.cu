// Neuron kernels (cuda-convnet's activation functions, forward and backward) and the element-wise joins eltsum and
// eltmax.
//
// Layout: any contiguous float32 tensor viewed as n floats (layout-agnostic: CHWN activations, (features, N) fc
// outputs). eltmax's `which` is n bytes, element i the index of the input that gave y[i].
// Thread mapping: 1-D grid-stride loop, one float per thread per step (consecutive threads, consecutive floats:
// coalesced for any n and alignment); kThreads threads per block, at most kMaxBlocks blocks.
// One kernel per neuron (a template on the neuron code, so the switch happens once on the host) and direction.
// Requirements: none on n or alignment (no vector path: the work is a few flops per 8-12 bytes, and any pointer is
// accepted, so views at any offset work); in place (output == input) is allowed, so no __restrict__.
// Formulas: cuda-convnet's (cudaconvnet/include/neuron.cuh) computed with the accurate library functions (tanhf,
// expf, log1pf, expm1f), not its fast __expf/__fdividef forms; softrelu as max(x, 0) + log1p(e^-|x|), exact for every
// x (cuda-convnet's "x > 4 ? x : log(1 + e^x)" is off by up to 0.018 just above 4). relu and brelu map NaN to 0, as
// this project's relu does.
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/neuron.h"

#include <cmath>
#include <string>

namespace convnet {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 8192;  // enough to fill any current GPU several times over

template <int K>
__device__ __forceinline__ float neuron_f(float x, float a, float b) {
  if (K == kNeuronRelu) return x > 0.f ? x : 0.f;
  if (K == kNeuronTanh) return a * tanhf(b * x);
  if (K == kNeuronLogistic) return 1.f / (1.f + expf(-x));
  if (K == kNeuronAbs) return fabsf(x);
  if (K == kNeuronSquare) return x * x;
  if (K == kNeuronSqrt) return sqrtf(x);
  if (K == kNeuronSoftrelu) return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
  if (K == kNeuronBrelu) return x > 0.f ? (x < a ? x : a) : 0.f;
  return a * x + b;  // linear
}

// f'(x) * dy from the forward's input x and output y (only the one the formula uses is read).
template <int K>
__device__ __forceinline__ float neuron_df(const float* x, const float* y, std::int64_t i, float dy, float a,
                                           float b) {
  if (K == kNeuronRelu) return y[i] > 0.f ? dy : 0.f;
  if (K == kNeuronTanh) {
    const float v = y[i];
    return dy * b * (a - v * v / a);
  }
  if (K == kNeuronLogistic) {
    const float v = y[i];
    return dy * v * (1.f - v);
  }
  if (K == kNeuronAbs) return x[i] > 0.f ? dy : -dy;
  if (K == kNeuronSquare) return dy * 2.f * x[i];
  if (K == kNeuronSqrt) return dy / (2.f * y[i]);
  if (K == kNeuronSoftrelu) return dy * -expm1f(-y[i]);  // e^x / (1 + e^x) = 1 - e^-y
  if (K == kNeuronBrelu) {
    const float v = y[i];
    return v > 0.f && v < a ? dy : 0.f;
  }
  return dy * a;  // linear
}

constexpr bool neuron_uses_x(int k) { return k == kNeuronAbs || k == kNeuronSquare; }
constexpr bool neuron_uses_y(int k) { return !neuron_uses_x(k) && k != kNeuronLinear; }

template <int K>
__global__ void __launch_bounds__(kThreads) neuron_forward_kernel(const float* x, float* y, std::int64_t n, float a,
                                                                  float b) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = neuron_f<K>(x[i], a, b);
}

template <int K>
__global__ void __launch_bounds__(kThreads) neuron_backward_kernel(const float* x, const float* y, const float* dy,
                                                                   float* dx, std::int64_t n, float a, float b) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dx[i] = neuron_df<K>(x, y, i, dy[i], a, b);
}

__global__ void __launch_bounds__(kThreads) eltsum_kernel(const float* x, float* y, std::int64_t n, float coeff,
                                                          float beta) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = coeff * x[i];
    y[i] = beta == 0.f ? v : v + beta * y[i];
  }
}

__global__ void __launch_bounds__(kThreads) eltmax_step_kernel(const float* x, float* y, std::uint8_t* which,
                                                               std::int64_t n, int index) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = x[i];
    if (index == 0) {
      y[i] = v, which[i] = 0;
    } else {
      const float m = y[i];
      if (v > m || (v != v && m == m)) y[i] = v, which[i] = std::uint8_t(index);  // NaN wins, then stays
    }
  }
}

__global__ void __launch_bounds__(kThreads) eltmax_backward_kernel(const std::uint8_t* which, const float* dy,
                                                                   float* dx, std::int64_t n, int index) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dx[i] = which[i] == index ? dy[i] : 0.f;
}

void check_n(std::int64_t n) { CONVNET_REQUIRE(n >= 0, "element count must be non-negative"); }

void check_ptr(std::int64_t n, const void* p, const char* what) {
  CONVNET_REQUIRE(n == 0 || p != nullptr, what);
}

dim3 grid(std::int64_t n) { return dim3(grid_for(n, kThreads, kMaxBlocks)); }

template <int K>
void forward_as(const float* x, float* y, std::int64_t n, float a, float b, cudaStream_t stream) {
  launch(neuron_forward_kernel<K>, grid(n), dim3(kThreads), 0, stream, x, y, n, a, b);
}

template <int K>
void backward_as(const float* x, const float* y, const float* dy, float* dx, std::int64_t n, float a, float b,
                 cudaStream_t stream) {
  if (neuron_uses_x(K)) check_ptr(n, x, "this neuron's backward reads its input x: null pointer");
  if (neuron_uses_y(K)) check_ptr(n, y, "this neuron's backward reads its output y: null pointer");
  launch(neuron_backward_kernel<K>, grid(n), dim3(kThreads), 0, stream, x, y, dy, dx, n, a, b);
}

// The one switch from a runtime neuron code to the template instance (C++17: no template lambdas under nvcc).
#define CONVNET_NEURON_CASES(CALL)                                          \
  case kNeuronRelu: CALL(kNeuronRelu); break;                               \
  case kNeuronTanh: CALL(kNeuronTanh); break;                               \
  case kNeuronLogistic: CALL(kNeuronLogistic); break;                       \
  case kNeuronAbs: CALL(kNeuronAbs); break;                                 \
  case kNeuronSquare: CALL(kNeuronSquare); break;                           \
  case kNeuronSqrt: CALL(kNeuronSqrt); break;                               \
  case kNeuronSoftrelu: CALL(kNeuronSoftrelu); break;                       \
  case kNeuronBrelu: CALL(kNeuronBrelu); break;                             \
  case kNeuronLinear: CALL(kNeuronLinear); break;                           \
  default: throw std::invalid_argument("unknown neuron code " + std::to_string(kind));

void check_params(int kind, float a, float b) {
  CONVNET_REQUIRE(std::isfinite(a) && std::isfinite(b), "neuron parameters must be finite");
  CONVNET_REQUIRE(kind != kNeuronTanh || a != 0.f, "tanh[a,b] needs a != 0");
  CONVNET_REQUIRE(kind != kNeuronBrelu || a > 0.f, "brelu[a] needs a > 0");
}

}  // namespace

void neuron_forward(const float* x, float* y, std::int64_t n, int kind, float a, float b, cudaStream_t stream) {
  check_n(n);
  check_ptr(n, x, "null pointer x");
  check_ptr(n, y, "null pointer y");
  CONVNET_REQUIRE(kind >= 0 && kind < kNeuronCount, "unknown neuron code " + std::to_string(kind));
  check_params(kind, a, b);
  if (n == 0) return;
#define CONVNET_CALL(K) forward_as<K>(x, y, n, a, b, stream)
  switch (kind) { CONVNET_NEURON_CASES(CONVNET_CALL) }
#undef CONVNET_CALL
}

void neuron_backward(const float* x, const float* y, const float* dy, float* dx, std::int64_t n, int kind, float a,
                     float b, cudaStream_t stream) {
  check_n(n);
  check_ptr(n, dy, "null pointer dy");
  check_ptr(n, dx, "null pointer dx");
  CONVNET_REQUIRE(kind >= 0 && kind < kNeuronCount, "unknown neuron code " + std::to_string(kind));
  check_params(kind, a, b);
  if (n == 0) return;
#define CONVNET_CALL(K) backward_as<K>(x, y, dy, dx, n, a, b, stream)
  switch (kind) { CONVNET_NEURON_CASES(CONVNET_CALL) }
#undef CONVNET_CALL
}

void eltsum_accumulate(const float* x, float* y, std::int64_t n, float coeff, float beta, cudaStream_t stream) {
  check_n(n);
  check_ptr(n, x, "null pointer x");
  check_ptr(n, y, "null pointer y");
  CONVNET_REQUIRE(std::isfinite(coeff) && std::isfinite(beta), "eltsum coefficients must be finite");
  if (n == 0) return;
  launch(eltsum_kernel, grid(n), dim3(kThreads), 0, stream, x, y, n, coeff, beta);
}

void eltmax_step(const float* x, float* y, std::uint8_t* which, std::int64_t n, int index, cudaStream_t stream) {
  check_n(n);
  check_ptr(n, x, "null pointer x");
  check_ptr(n, y, "null pointer y");
  check_ptr(n, which, "null pointer which");
  CONVNET_REQUIRE(index >= 0 && index < 256, "eltmax input index must be in [0, 256)");
  if (n == 0) return;
  launch(eltmax_step_kernel, grid(n), dim3(kThreads), 0, stream, x, y, which, n, index);
}

void eltmax_backward(const std::uint8_t* which, const float* dy, float* dx, std::int64_t n, int index,
                     cudaStream_t stream) {
  check_n(n);
  check_ptr(n, which, "null pointer which");
  check_ptr(n, dy, "null pointer dy");
  check_ptr(n, dx, "null pointer dx");
  CONVNET_REQUIRE(index >= 0 && index < 256, "eltmax input index must be in [0, 256)");
  if (n == 0) return;
  launch(eltmax_backward_kernel, grid(n), dim3(kThreads), 0, stream, which, dy, dx, n, index);
}

}  // namespace convnet
