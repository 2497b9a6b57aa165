// Shared helpers of the pdengine C++ (ATen) CPU kernels: dtype policy, argument checks,
// tile views, the deterministic "parallel over vocabulary tiles" driver, the online
// log-sum-exp and the dropout hash. See docs/DESIGN.md, "Fused loss", and docs/ARCHITECTURE.md.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace pdengine {

using at::Tensor;

// Token rows per chunk and vocabulary rows per tile. A [kChunkRows, kTileVocab] fp32
// tile is 512 KiB, so a logits tile and the weight tile it multiplies stay in a core's L2.
constexpr int64_t kChunkRows = 512;
constexpr int64_t kTileVocab = 256;

// reference.TAIL_MASS_EPS: the clamp on S = 1 - sum_j q[ids_j] in tail mode.
constexpr double kTailMassEps = 1e-6;

// float64 in -> float64 math (tests); everything else (fp32/fp16/bf16) -> float32 math.
inline at::ScalarType compute_dtype(const Tensor& a, const Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                             : at::kFloat;
}

// A detached, contiguous copy in `dtype` (no copy when it already is one).
inline Tensor as_compute(const Tensor& t, at::ScalarType dtype) {
  return t.detach().to(dtype).contiguous();
}

inline void check_floating(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name,
                    " must be a floating tensor (fp16/bf16/fp32/fp64), got ", t.scalar_type());
}

inline void check_integral(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                    " must be an int32/int64 tensor, got ", t.scalar_type());
}

inline void check_dim(const Tensor& t, int64_t dim, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", what, ", got shape ", t.sizes());
}

// hidden [N, d] and an lm_head weight [V, d]: the inputs of both lm_head ops.
inline void check_hidden_and_head(const Tensor& hidden, const Tensor& weight) {
  check_floating(hidden, "hidden");
  check_dim(hidden, 2, "hidden", "2-D [N, d]");
  check_floating(weight, "weight");
  check_dim(weight, 2, "weight", "2-D [V, d]");
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "weight must have shape [V, ",
                    hidden.size(1), "] (hidden's d), got ", weight.sizes());
}

inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the C++ backend, got ",
                    t.device());
}

// A contiguous [rows, cols] view at the start of a flat scratch buffer, so that a short
// last tile is still contiguous (what the BLAS calls want).
inline Tensor scratch_view(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(partial, tile) for every tile in [0, n_tiles), spread over the ATen threads.
// Each thread folds its tiles into its own partial (no shared writes, no races); the
// partials come back ordered by their first tile, so reducing them is deterministic for a
// fixed thread count.
template <typename Partial, typename MakePartial, typename Body>
std::vector<Partial> parallel_over_tiles(int64_t n_tiles, MakePartial make_partial, Body body) {
  std::vector<std::pair<int64_t, Partial>> found;
  std::mutex found_lock;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    c10::NoGradGuard no_grad;  // grad mode is thread-local: worker threads must not record
    Partial partial = make_partial();
    for (int64_t tile = begin; tile < end; ++tile) body(partial, tile);
    std::lock_guard<std::mutex> guard(found_lock);
    found.emplace_back(begin, std::move(partial));
  });
  std::sort(found.begin(), found.end(),
            [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<Partial> partials;
  partials.reserve(found.size());
  for (auto& item : found) partials.push_back(std::move(item.second));
  return partials;
}

// out = h W[v0:v0+cols]^T (+ sha B[v0:v0+cols]^T, sha = s h A^T for LoRA; may be undefined).
// Callers pass h and sha pre-multiplied by logits_alpha, so the tile comes out as u / tau
// (or u / c with a soft-cap) with no extra pass over it.
inline void tile_logits(Tensor& out, const Tensor& h, const Tensor& w, const Tensor& sha,
                        const Tensor& b, int64_t v0, int64_t cols) {
  at::mm_out(out, h, w.narrow(0, v0, cols).t());
  if (sha.defined()) out.addmm_(sha, b.narrow(0, v0, cols).t());
}

// The factor for tile_logits' inputs: 1/tau gives z directly; with a soft-cap c, 1/c gives u/c.
inline double logits_alpha(double softcap, double temperature) {
  return softcap > 0 ? 1.0 / softcap : 1.0 / temperature;
}

// z = softcap(u) / tau of a tile made by tile_logits with logits_alpha: in place.
inline void finish_scaled_logits(Tensor& z, double softcap, double temperature) {
  if (softcap > 0) z.tanh_().mul_(softcap / temperature);
}

// The same transform for one logit, in double (per-row bookkeeping).
inline double scale_logit(double u, double softcap, double temperature) {
  if (softcap > 0) u = softcap * std::tanh(u / softcap);
  return u / temperature;
}

// Running max and sum of exp(z - max) per row: the online log-sum-exp over vocabulary tiles.
struct OnlineLse {
  std::vector<double> max, sum;
  explicit OnlineLse(int64_t rows)
      : max(rows, -std::numeric_limits<double>::infinity()), sum(rows, 0.0) {}

  // Folds a tile z [rows, cols] in. `out` (same shape, may be z itself) receives
  // exp(z - offset) with offset = the running max after this tile, which is also written to
  // `offsets` (rows values) when that is not null.
  template <typename scalar_t>
  void fold(const Tensor& z, Tensor& out, scalar_t* offsets = nullptr) {
    const int64_t rows = z.size(0);
    Tensor tile_max = at::amax(z, {1});
    const scalar_t* tmax = tile_max.data_ptr<scalar_t>();
    Tensor new_max = at::empty({rows, 1}, z.options());
    scalar_t* nmax = new_max.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) nmax[i] = std::max<double>(max[i], tmax[i]);
    if (offsets) std::copy(nmax, nmax + rows, offsets);
    at::sub_out(out, z, new_max).exp_();  // vectorized exp over the tile
    Tensor tile_sum = out.sum(1);
    const scalar_t* tsum = tile_sum.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) {
      sum[i] = sum[i] * std::exp(max[i] - nmax[i]) + tsum[i];
      max[i] = nmax[i];
    }
  }
};

// lse of one row from several partial online states.
inline double merge_lse(const std::vector<const OnlineLse*>& parts, int64_t row) {
  double m = -std::numeric_limits<double>::infinity();
  for (const auto* p : parts) m = std::max(m, p->max[row]);
  double s = 0.0;
  for (const auto* p : parts) {
    if (p->sum[row] > 0) s += p->sum[row] * std::exp(p->max[row] - m);
  }
  return m + std::log(s);
}

// reference.dropout_keep_mask: a pure function of (seed, flat index), in uint32 arithmetic.
inline bool dropout_keep(uint64_t index, uint32_t seed, uint32_t threshold) {
  uint32_t h = static_cast<uint32_t>(index) * 0x9E3779B1u + seed * 0x85EBCA6Bu + 0x27D4EB2Fu;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return (h >> 8) >= threshold;
}

inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * static_cast<double>(1u << 24));
}

// ---------------------------------------------------------------------------- the ops

std::tuple<Tensor, Tensor> linear_topk_kl_cpu(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& lora_a,
    const std::optional<Tensor>& lora_b, const Tensor& teacher_ids,
    const Tensor& teacher_logprobs, const std::optional<Tensor>& labels, double lora_scale,
    double temperature, double softcap, bool tail, double ce_weight, int64_t ignore_index);

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_topk_kl_backward_cpu(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
    const Tensor& teacher_ids, const Tensor& teacher_logprobs,
    const std::optional<Tensor>& labels, const Tensor& lse, double lora_scale,
    double temperature, double softcap, bool tail, double ce_weight, int64_t ignore_index,
    bool needs_weight_grad);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_topk_kl_forward_backward_cpu(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
    const Tensor& teacher_ids, const Tensor& teacher_logprobs,
    const std::optional<Tensor>& labels, double lora_scale, double temperature, double softcap,
    bool tail, double ce_weight, int64_t ignore_index, bool needs_weight_grad);

Tensor lora_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                       const Tensor& lora_b, double scale, const std::optional<Tensor>& bias,
                       double dropout, int64_t seed);

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, double scale, double dropout, int64_t seed);

std::tuple<Tensor, Tensor> teacher_topk_cpu(const Tensor& hidden, const Tensor& weight,
                                            int64_t k, double temperature, double softcap);

}  // namespace pdengine
