// Softmax + cross-entropy (fused gradient) and top-k error counts. Conventions: src/convnet/reference/softmax.py.
//   logits (K, N) classes outer, images fastest; labels (N,) int32.
//   probs = softmax over classes (max-subtracted; softmax_forward computes only these); dlogits = probs - onehot(label) (not divided by N);
//   loss_n = log(sum_c exp(l_c - m)) - (l_label - m);  loss_sum = sum_n loss_n (deterministic, fixed order).
//   An out-of-range label cannot be rejected without a device->host sync: its loss is NaN (the Python layer checks
//   labels on numpy/emu before launching), softmax_cross_entropy adds 1 per such label to *bad_labels (when given;
//   the caller reads it at a synchronisation point) and it counts as a top-k error.
//   Top-k: image n is an error for k when at least k other classes score at least as high as its label (ties count
//   against it: probabilities that underflowed to 0 rank the label last, not first), or when any of its scores is
//   NaN or infinite (a diverged net is never scored right).
#pragma once
#include "cuda_compat.h"

namespace convnet {

constexpr int kMaxTopK = 8;

struct TopKList {
  int count;
  int ks[kMaxTopK];
};

// T: the storage type of logits, probs and dlogits, float or bf16 (cuda_compat.h): math in float, probs and dlogits
// rounded once to T; the losses are float32 whatever T is. Instantiated for both.
// loss_per_image: (N,) scratch/output; loss_sum: one float. probs and dlogits: (K, N); either may be null.
// bad_labels: one int the kernel adds the number of labels outside [0, K) to (atomically; not zeroed), or null.
template <typename T>
void softmax_cross_entropy(const T* logits, const int* labels, T* probs, T* dlogits, float* loss_per_image,
                           float* loss_sum, int* bad_labels, int K, int N, cudaStream_t stream);

// probs = softmax(logits) over classes only (the same kernel and arithmetic as softmax_cross_entropy's probs).
template <typename T>
void softmax_forward(const T* logits, T* probs, int K, int N, cudaStream_t stream);

// errors: `ks.count` ints, zeroed by the launcher (asynchronously) then accumulated.
void topk_errors(const float* scores, const int* labels, int* errors, const TopKList& ks, int K, int N,
                 cudaStream_t stream);

}  // namespace convnet
