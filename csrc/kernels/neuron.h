// Neurons (cuda-convnet's element-wise activation functions) and the element-wise joins eltsum / eltmax.
// Any tensor, viewed as n contiguous floats; every function allows in place (an output equal to an input).
#pragma once

#include <cstdint>

#include "cuda_compat.h"

namespace convnet {

// The neuron codes (src/convnet/neurons.py holds the same table: names, parameters, formulas).
enum NeuronKind : int {
  kNeuronRelu = 0,      // max(x, 0)                      dx = dy * (y > 0)
  kNeuronTanh = 1,      // a * tanh(b * x)                dx = dy * b * (a - y^2 / a)       (a != 0)
  kNeuronLogistic = 2,  // 1 / (1 + e^-x)                 dx = dy * y * (1 - y)
  kNeuronAbs = 3,       // |x|                            dx = dy * (x > 0 ? 1 : -1)
  kNeuronSquare = 4,    // x^2                            dx = dy * 2x
  kNeuronSqrt = 5,      // sqrt(x)                        dx = dy / (2y)
  kNeuronSoftrelu = 6,  // log(1 + e^x)                   dx = dy * (1 - e^-y)
  kNeuronBrelu = 7,     // min(max(x, 0), a)              dx = dy * (0 < y < a)
  kNeuronLinear = 8,    // a * x + b                      dx = dy * a
  kNeuronCount = 9,
};

// y = f(x) for neuron `kind` with parameters a, b (ignored by neurons without them).
void neuron_forward(const float* x, float* y, std::int64_t n, int kind, float a, float b, cudaStream_t stream);
// dx = f'(x) * dy, from the forward's input x and output y (each neuron reads the one its formula uses: the other
// may be null).
void neuron_backward(const float* x, const float* y, const float* dy, float* dx, std::int64_t n, int kind, float a,
                     float b, cudaStream_t stream);

// eltsum, one input at a time: y = coeff * x + beta * y; y is not read when beta == 0 (it may hold NaN).
void eltsum_accumulate(const float* x, float* y, std::int64_t n, float coeff, float beta, cudaStream_t stream);

// eltmax, one input at a time (index 0, 1, ... < 256 in order): index 0 sets y = x, which = 0; a later input
// replaces y where it is larger, or NaN where y is not (ties keep the earlier input: the lowest index wins).
void eltmax_step(const float* x, float* y, std::uint8_t* which, std::int64_t n, int index, cudaStream_t stream);
// dx = dy where which == index, else 0: the gradient goes to the one input that gave the maximum.
void eltmax_backward(const std::uint8_t* which, const float* dy, float* dx, std::int64_t n, int index,
                     cudaStream_t stream);

}  // namespace convnet
