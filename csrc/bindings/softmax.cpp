// Bindings for csrc/kernels/softmax.cu. Called from src/convnet/ops/softmax.py.
#include "bindings/common.h"
#include "kernels/softmax.h"

#include <pybind11/stl.h>

#include <vector>

using namespace convnet::bind;

void bind_softmax(py::module_& m) {
  // float32 (softmax_forward, ...) or bfloat16 logits/probs/dlogits (softmax_forward_bf16, ...): for_each_storage.
  // The losses are float32 in both. bad_labels: address of one int32 the kernel adds the number of out-of-range
  // labels to (0: not counted).
  for_each_storage([&](auto tag, const std::string& suffix) {
    using T = typename decltype(tag)::type;
    def_kernel(m, ("softmax_cross_entropy" + suffix).c_str(), [](std::uintptr_t logits, std::uintptr_t labels,
                                                                 std::uintptr_t probs, std::uintptr_t dlogits,
                                                                 std::uintptr_t loss_per_image,
                                                                 std::uintptr_t loss_sum, std::uintptr_t bad_labels,
                                                                 int K, int N, std::uintptr_t s) {
      convnet::softmax_cross_entropy(ptr<const T>(logits), ptr<const int>(labels), ptr<T>(probs), ptr<T>(dlogits),
                                     ptr(loss_per_image), ptr(loss_sum), ptr<int>(bad_labels), K, N, stream(s));
    });
    def_kernel(m, ("softmax_forward" + suffix).c_str(), [](std::uintptr_t logits, std::uintptr_t probs, int K, int N,
                                                           std::uintptr_t s) {
      convnet::softmax_forward(ptr<const T>(logits), ptr<T>(probs), K, N, stream(s));
    });
  });
  def_kernel(m, "topk_errors", [](std::uintptr_t scores, std::uintptr_t labels, std::uintptr_t errors,
                                  std::vector<int> ks, int K, int N, std::uintptr_t s) {
    if (ks.empty() || ks.size() > static_cast<size_t>(convnet::kMaxTopK))
      throw std::invalid_argument("topk_errors: between 1 and 8 values of k");
    convnet::TopKList list{};
    list.count = static_cast<int>(ks.size());
    for (size_t i = 0; i < ks.size(); ++i) list.ks[i] = ks[i];
    convnet::topk_errors(ptr<const float>(scores), ptr<const int>(labels), ptr<int>(errors), list, K, N, stream(s));
  });
}
