// Which library forms the kernels' fp32 block products (infonce_common.h: block_product).

#include "infonce_common.h"

#include <cstring>

namespace fastcl {
namespace detail {
namespace {

// One small product through oneDNN against plain arithmetic: a build whose mkldnn_matmul
// fails, or computes something else, is never used.
bool onednn_agrees() {
  try {
    const at::Tensor a = at::arange(15, at::kFloat).reshape({3, 5}).sub_(7).div_(4);
    const at::Tensor b = at::arange(20, at::kFloat).reshape({4, 5}).sub_(9).div_(8);
    at::Tensor c = at::full({3, 4}, 2.0, at::kFloat);
    at::native::mkldnn_matmul(a, b.t(), c, 1.0f, 1.0f);  // c = 2 + a b^T, b transposed
    const float* pa = a.data_ptr<float>();
    const float* pb = b.data_ptr<float>();
    const float* pc = c.data_ptr<float>();
    for (int64_t i = 0; i < 3; ++i) {
      for (int64_t j = 0; j < 4; ++j) {
        double expected = 2.0;
        for (int64_t d = 0; d < 5; ++d) {
          expected += double(pa[i * 5 + d]) * double(pb[j * 5 + d]);
        }
        if (std::abs(pc[i * 4 + j] - expected) > 1e-5 * (1.0 + std::abs(expected))) {
          return false;
        }
      }
    }
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace

bool onednn_products() {
  static const bool usable = [] {
    const char* choice = std::getenv("FASTCL_CPU_PRODUCTS");
    if (choice != nullptr && *choice != '\0') {
      TORCH_CHECK(std::strcmp(choice, "aten") == 0 || std::strcmp(choice, "onednn") == 0,
                  "FASTCL_CPU_PRODUCTS must be 'aten' or 'onednn', got '", choice, "'");
      if (std::strcmp(choice, "aten") == 0) {
        return false;
      }
    }
    return at::native::mkldnn_matmul != nullptr && onednn_agrees();
  }();
  return usable && at::globalContext().userEnabledMkldnn();
}

}  // namespace detail
}  // namespace fastcl
