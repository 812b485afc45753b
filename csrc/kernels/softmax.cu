// Softmax + cross-entropy (fused gradient, per-image loss, deterministic batch sum) and top-k error counts.
// See softmax.h / src/convnet/reference/softmax.py.
//
// Mapping: a block of 32 x kLanes threads owns 32 consecutive images (threadIdx.x, coalesced along the image axis)
// and splits the K classes among kLanes lanes (threadIdx.y); per-image max and sum are reduced across the lanes in
// shared memory (fixed tree order: deterministic, schedule-independent).  Three passes over the logits (max, sum,
// write): the logits of a block (K x 32 floats, 128 KB for K = 1000) stay in L1/L2 between passes.
// The batch loss is summed by a second single-block kernel in a fixed order (no float atomics), in double.
// Storage: logits, probs and dlogits are float32 or bfloat16 (template parameter T; math in float, one rounding on
// store); the per-image and summed losses are float32 in both. Top-k reads float32 scores.
#include "cuda_compat.h"
#include "kernels/softmax.h"

#include <stdexcept>
#include <string>

namespace convnet {
namespace {

constexpr int kImgs = 32;
constexpr int kLanes = 16;

__device__ __forceinline__ bool valid_label(int lab, int K) { return lab >= 0 && lab < K; }

// T: the storage type of logits, probs and dlogits (float or bf16): every load converts to float, the math runs in
// float and probs/dlogits are rounded once to T on store; the per-image loss is float in both.
template <typename T>
__global__ void softmax_xent_kernel(const T* __restrict__ logits, const int* __restrict__ labels,
                                    T* __restrict__ probs, T* __restrict__ dlogits, float* __restrict__ loss,
                                    int* __restrict__ bad_labels, int K, int N) {
  SHARED(float, red, [kLanes][kImgs + 1]);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int n = blockIdx.x * kImgs + tx;
  const bool active = n < N;
  // pass 1: max
  float m = -INFINITY;
  if (active)
    for (int c = ty; c < K; c += kLanes) m = fmaxf(m, to_float(logits[static_cast<size_t>(c) * N + n]));
  red[ty][tx] = m;
  __syncthreads();
  for (int s = kLanes / 2; s > 0; s >>= 1) {
    if (ty < s) red[ty][tx] = fmaxf(red[ty][tx], red[ty + s][tx]);
    __syncthreads();
  }
  m = red[0][tx];
  __syncthreads();
  // pass 2: sum of exp(l - m)
  float sum = 0.0f;
  if (active)
    for (int c = ty; c < K; c += kLanes) sum += expf(to_float(logits[static_cast<size_t>(c) * N + n]) - m);
  red[ty][tx] = sum;
  __syncthreads();
  for (int s = kLanes / 2; s > 0; s >>= 1) {
    if (ty < s) red[ty][tx] += red[ty + s][tx];
    __syncthreads();
  }
  sum = red[0][tx];
  if (!active) return;  // no barrier follows
  // labels == null: softmax only (probs), no gradient and no loss.
  const int lab = labels ? labels[n] : -1;
  const bool ok = labels && valid_label(lab, K);
  // pass 3: probabilities and the fused gradient
  for (int c = ty; c < K; c += kLanes) {
    const size_t o = static_cast<size_t>(c) * N + n;
    const float p = expf(to_float(logits[o]) - m) / sum;
    if (probs) probs[o] = from_float<T>(p);
    if (dlogits) dlogits[o] = from_float<T>((ok && c == lab) ? p - 1.0f : p);
  }
  if (ty == 0 && loss) loss[n] = ok ? logf(sum) - (to_float(logits[static_cast<size_t>(lab) * N + n]) - m) : NAN;
  // An out-of-range label is counted (integer atomics: the count is exact whatever the order) so the host can raise
  // at its next synchronisation point instead of training on a NaN loss.
  if (ty == 0 && labels && !ok && bad_labels) atomicAdd(bad_labels, 1);
}

constexpr int kSumThreads = 256;

__global__ void sum_kernel(const float* __restrict__ v, float* __restrict__ out, int n) {
  SHARED(double, part, [kSumThreads]);
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += kSumThreads) s += v[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kSumThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(part[0]);
}

__global__ void zero_ints_kernel(int* p, int n) {
  if (static_cast<int>(threadIdx.x) < n) p[threadIdx.x] = 0;
}

__global__ void topk_kernel(const float* __restrict__ scores, const int* __restrict__ labels, int* __restrict__ errors,
                            TopKList ks, int K, int N) {
  SHARED(int, red, [kLanes][kImgs + 1]);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int n = blockIdx.x * kImgs + tx;
  const bool active = n < N;
  int higher = 0;
  int lab = 0;
  bool ok = false;
  if (active) {
    lab = labels[n];
    ok = valid_label(lab, K);
    if (ok) {
      const float t = scores[static_cast<size_t>(lab) * N + n];
      bool finite = true;  // a NaN or infinite score (the label's included) makes the image an error for every k
      for (int c = ty; c < K; c += kLanes) {  // ties count against the label: saturated scores rank it last
        const float v = scores[static_cast<size_t>(c) * N + n];
        higher += (c != lab && v >= t) ? 1 : 0;
        finite = finite && fabsf(v) < INFINITY;
      }
      if (!finite) higher = K;
    }
  }
  red[ty][tx] = higher;
  __syncthreads();
  for (int s = kLanes / 2; s > 0; s >>= 1) {  // saturating at K (counts of finite scores never reach it)
    if (ty < s)
      red[ty][tx] = static_cast<int>(min(static_cast<unsigned>(red[ty][tx]) + static_cast<unsigned>(red[ty + s][tx]),
                                         static_cast<unsigned>(K)));
    __syncthreads();
  }
  if (!active || ty != 0) return;
  higher = ok ? red[0][tx] : K;  // an invalid label is always an error
  for (int i = 0; i < ks.count; ++i)
    if (higher >= ks.ks[i]) atomicAdd(&errors[i], 1);
}

void check_kn(int K, int N, const char* who) {
  if (K < 1 || N < 1)
    throw std::invalid_argument(std::string(who) + ": need classes >= 1 and images >= 1, got K=" + std::to_string(K) +
                                ", N=" + std::to_string(N));
  if (1ll * K * N >= (1ll << 31)) throw std::invalid_argument(std::string(who) + ": K*N must be < 2^31");
}

}  // namespace

template <typename T>
void softmax_cross_entropy(const T* logits, const int* labels, T* probs, T* dlogits, float* loss_per_image,
                           float* loss_sum, int* bad_labels, int K, int N, cudaStream_t stream) {
  check_kn(K, N, "softmax_cross_entropy");
  if (!logits || !labels || !loss_per_image || !loss_sum)
    throw std::invalid_argument("softmax_cross_entropy: null pointer");
  launch(softmax_xent_kernel<T>, dim3(ceil_div(N, kImgs)), dim3(kImgs, kLanes), 0, stream, logits, labels, probs,
         dlogits, loss_per_image, bad_labels, K, N);
  launch(sum_kernel, dim3(1), dim3(kSumThreads), 0, stream, loss_per_image, loss_sum, N);
}

template <typename T>
void softmax_forward(const T* logits, T* probs, int K, int N, cudaStream_t stream) {
  check_kn(K, N, "softmax_forward");
  if (!logits || !probs) throw std::invalid_argument("softmax_forward: null pointer");
  launch(softmax_xent_kernel<T>, dim3(ceil_div(N, kImgs)), dim3(kImgs, kLanes), 0, stream, logits,
         static_cast<const int*>(nullptr), probs, static_cast<T*>(nullptr), static_cast<float*>(nullptr),
         static_cast<int*>(nullptr), K, N);
}

#define CONVNET_SOFTMAX_INSTANTIATE(T)                                                                    \
  template void softmax_cross_entropy<T>(const T*, const int*, T*, T*, float*, float*, int*, int, int,   \
                                         cudaStream_t);                                                   \
  template void softmax_forward<T>(const T*, T*, int, int, cudaStream_t);
CONVNET_SOFTMAX_INSTANTIATE(float)
CONVNET_SOFTMAX_INSTANTIATE(bf16)
#undef CONVNET_SOFTMAX_INSTANTIATE

void topk_errors(const float* scores, const int* labels, int* errors, const TopKList& ks, int K, int N,
                 cudaStream_t stream) {
  check_kn(K, N, "topk_errors");
  if (!scores || !labels || !errors) throw std::invalid_argument("topk_errors: null pointer");
  if (ks.count < 1 || ks.count > kMaxTopK)
    throw std::invalid_argument("topk_errors: between 1 and " + std::to_string(kMaxTopK) + " values of k");
  for (int i = 0; i < ks.count; ++i)
    if (ks.ks[i] < 1) throw std::invalid_argument("topk_errors: every k must be >= 1");
  launch(zero_ints_kernel, dim3(1), dim3(32), 0, stream, errors, ks.count);
  launch(topk_kernel, dim3(ceil_div(N, kImgs)), dim3(kImgs, kLanes), 0, stream, scores, labels, errors, ks, K, N);
}

}  // namespace convnet
