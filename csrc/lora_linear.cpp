// LoRA linear on the CPU (docs/DESIGN.md, "LoRA matmul"): y = x W^T + b + s * (dropout(x) A^T) B^T.
// The dropout keep-mask is recomputed from (seed, flat index) wherever it is needed, as in
// reference.dropout_keep_mask; no mask is ever stored. The GEMMs are ATen's (multithreaded).
#include "common.h"

namespace pdengine {
namespace {

void check_lora_args(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                     const Tensor& lora_b, double dropout) {
  check_floating(x, "x");
  check_dim(x, 2, "x", "2-D [N, d_in]");
  check_floating(weight, "weight");
  check_dim(weight, 2, "weight", "2-D [d_out, d_in]");
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight must have shape [d_out, ", x.size(1),
                    "] (x's d_in), got ", weight.sizes());
  check_floating(lora_a, "lora_a");
  check_dim(lora_a, 2, "lora_a", "2-D [r, d_in]");
  TORCH_CHECK_VALUE(lora_a.size(1) == x.size(1), "lora_a must have shape [r, ", x.size(1),
                    "], got ", lora_a.sizes());
  check_floating(lora_b, "lora_b");
  TORCH_CHECK_VALUE(lora_b.dim() == 2 && lora_b.size(0) == weight.size(0) &&
                        lora_b.size(1) == lora_a.size(0),
                    "lora_b must have shape [", weight.size(0), ", ", lora_a.size(0), "], got ",
                    lora_b.sizes());
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1), got ", dropout);
}

// dropout(t) with reference.dropout_keep_mask(t.shape, p, seed): kept values scaled by
// 1 / (1 - p). t is contiguous [N, d_in] in compute dtype; returns a new tensor.
Tensor apply_dropout(const Tensor& t, double p, int64_t seed) {
  if (p == 0.0) return t;
  Tensor out = at::empty_like(t);
  const uint32_t threshold = dropout_threshold(p);
  const uint32_t seed32 = static_cast<uint32_t>(seed);  // seed mod 2**32, like the reference
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pdengine_dropout", [&] {
    const scalar_t* src = t.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t keep_scale = static_cast<scalar_t>(1.0 / (1.0 - p));
    at::parallel_for(0, t.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = dropout_keep(static_cast<uint64_t>(i), seed32, threshold) ? src[i] * keep_scale
                                                                            : scalar_t(0);
      }
    });
  });
  return out;
}

}  // namespace

Tensor lora_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                       const Tensor& lora_b, double scale, const std::optional<Tensor>& bias,
                       double dropout, int64_t seed) {
  check_lora_args(x, weight, lora_a, lora_b, dropout);
  if (bias.has_value()) {
    check_floating(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "bias must have shape [", weight.size(0), "], got ", bias->sizes());
  }
  c10::NoGradGuard no_grad;
  const auto dtype = compute_dtype(x, weight);
  const Tensor xc = as_compute(x, dtype);
  const Tensor w = as_compute(weight, dtype);
  const Tensor xa = at::mm(apply_dropout(xc, dropout, seed), as_compute(lora_a, dtype).t());
  Tensor y = bias.has_value() ? at::addmm(as_compute(*bias, dtype), xc, w.t()) : at::mm(xc, w.t());
  y.addmm_(xa, as_compute(lora_b, dtype).t(), 1.0, scale);
  return y.to(x.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, double scale, double dropout, int64_t seed) {
  check_lora_args(x, weight, lora_a, lora_b, dropout);
  check_floating(grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) &&
                        grad_out.size(1) == weight.size(0),
                    "grad_out must have shape [", x.size(0), ", ", weight.size(0), "], got ",
                    grad_out.sizes());
  c10::NoGradGuard no_grad;
  const auto dtype = compute_dtype(x, weight);
  const Tensor dy = as_compute(grad_out, dtype);
  const Tensor a = as_compute(lora_a, dtype);
  const Tensor b = as_compute(lora_b, dtype);
  const Tensor xd = apply_dropout(as_compute(x, dtype), dropout, seed);
  const Tensor dy_b = at::mm(dy, b);  // [N, r]
  // dx = dy W + s * dropout'(dy B A): the mask of x's flat index applies to its gradient
  Tensor grad_x = at::mm(dy, as_compute(weight, dtype));
  grad_x.add_(apply_dropout(at::mm(dy_b, a), dropout, seed), scale);
  const Tensor grad_a = at::mm(dy_b.t(), xd).mul_(scale);                   // s (dy B)^T xd
  const Tensor grad_b = at::mm(dy.t(), at::mm(xd, a.t())).mul_(scale);      // s dy^T (xd A^T)
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type())};
}

}  // namespace pdengine
