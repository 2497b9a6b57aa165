// Fused lm_head + top-k KL loss on the CPU (docs/DESIGN.md, "Fused loss").
//
// Work is split into chunks of kChunkRows tokens; inside a chunk the vocabulary tiles are
// spread over threads (each thread folds its tiles into its own partial state, reduced
// deterministically at the end). A logits tile [rows, kTileVocab] is an ATen GEMM on views
// of the inputs; the [N, V] logits never exist. The per-token top-k terms (O(N k)) use
// logits at the teacher ids computed by dot products, in double.
//
// Three ops: the forward (loss, lse); the backward, which recomputes each logits tile; and
// the single pass (forward + backward for a grad_loss known up front), which keeps a token
// chunk's tiles (at most 32 MiB) between its lse pass and its gradient pass instead.
#include "common.h"

namespace pdengine {
namespace {

// The op's inputs in compute dtype (float32, or float64 for float64 inputs), contiguous.
struct LossInputs {
  int64_t n = 0, d = 0, vocab = 0, k = 0;
  at::ScalarType dtype = at::kFloat;
  Tensor h, w, a, b, sha;  // sha = s * h A^T [N, r]; a, b, sha undefined without LoRA
  Tensor h_gemm, sha_gemm;  // h and sha times logits_alpha: the tile GEMMs' left operands
  Tensor ids;              // int64 [N, k]
  Tensor lp;               // double [N, k]: teacher log-probs
  Tensor labels;           // int64 [N] or undefined
  double scale = 1.0, temperature = 1.0, softcap = 0.0, ce_weight = 0.0;
  bool tail = true;
  int64_t ignore_index = -100;

  bool has_lora() const { return a.defined(); }
  bool has_ce() const { return labels.defined() && ce_weight != 0.0; }
  bool counted(int64_t row) const {
    return !labels.defined() || labels.data_ptr<int64_t>()[row] != ignore_index;
  }
};

void check_inputs(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& lora_a,
                  const std::optional<Tensor>& lora_b, const Tensor& ids, const Tensor& lp,
                  const std::optional<Tensor>& labels, double temperature, double softcap) {
  check_hidden_and_head(hidden, weight);
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight must have at least one vocabulary row");
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(),
                    "lora_a and lora_b must be given together");
  if (lora_a.has_value()) {
    check_floating(*lora_a, "lora_a");
    check_floating(*lora_b, "lora_b");
    check_dim(*lora_a, 2, "lora_a", "2-D [r, d]");
    TORCH_CHECK_VALUE(lora_a->size(1) == hidden.size(1) && lora_a->size(0) >= 1,
                      "lora_a must have shape [r, ", hidden.size(1), "], got ", lora_a->sizes());
    TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == weight.size(0) &&
                          lora_b->size(1) == lora_a->size(0),
                      "lora_b must have shape [", weight.size(0), ", ", lora_a->size(0),
                      "], got ", lora_b->sizes());
  }
  check_integral(ids, "teacher_ids");
  check_dim(ids, 2, "teacher_ids", "2-D [N, k]");
  TORCH_CHECK_VALUE(ids.size(0) == hidden.size(0) && ids.size(1) >= 1,
                    "teacher_ids must have shape [N=", hidden.size(0), ", k >= 1], got ",
                    ids.sizes());
  check_floating(lp, "teacher_logprobs");
  TORCH_CHECK_VALUE(lp.sizes() == ids.sizes(), "teacher_logprobs must have the shape of teacher_ids ",
                    ids.sizes(), ", got ", lp.sizes());
  if (labels.has_value()) {
    check_integral(*labels, "labels");
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == hidden.size(0),
                      "labels must have shape [N=", hidden.size(0), "], got ", labels->sizes());
  }
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(softcap >= 0, "softcap must be >= 0 (0 = none), got ", softcap);
}

// Ids (and labels used by the CE term) must index the vocabulary.
void check_index_ranges(const LossInputs& in) {
  const int64_t* ids = in.ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.n * in.k; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < in.vocab, "teacher_ids must lie in [0, V=",
                      in.vocab, "), got ", ids[i]);
  }
  if (!in.has_ce()) return;
  const int64_t* labels = in.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.n; ++i) {
    TORCH_CHECK_VALUE(labels[i] == in.ignore_index || (labels[i] >= 0 && labels[i] < in.vocab),
                      "labels must lie in [0, V=", in.vocab, ") or equal ignore_index=",
                      in.ignore_index, ", got ", labels[i]);
  }
}

LossInputs prepare(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& lora_a,
                   const std::optional<Tensor>& lora_b, const Tensor& ids, const Tensor& lp,
                   const std::optional<Tensor>& labels, double lora_scale, double temperature,
                   double softcap, bool tail, double ce_weight, int64_t ignore_index) {
  check_inputs(hidden, weight, lora_a, lora_b, ids, lp, labels, temperature, softcap);
  c10::NoGradGuard no_grad;
  LossInputs in;
  in.n = hidden.size(0);
  in.d = hidden.size(1);
  in.vocab = weight.size(0);
  in.k = ids.size(1);
  in.dtype = compute_dtype(hidden, weight);
  in.h = as_compute(hidden, in.dtype);
  in.w = as_compute(weight, in.dtype);
  if (lora_a.has_value()) {
    in.a = as_compute(*lora_a, in.dtype);
    in.b = as_compute(*lora_b, in.dtype);
    in.sha = at::mm(in.h, in.a.t()).mul_(lora_scale);
  }
  const double alpha = logits_alpha(softcap, temperature);
  in.h_gemm = in.h * alpha;
  if (in.sha.defined()) in.sha_gemm = in.sha * alpha;
  in.ids = ids.detach().to(at::kLong).contiguous();
  in.lp = lp.detach().to(at::kDouble).contiguous();
  if (labels.has_value()) in.labels = labels->detach().to(at::kLong).contiguous();
  in.scale = lora_scale;
  in.temperature = temperature;
  in.softcap = softcap;
  in.tail = tail;
  in.ce_weight = ce_weight;
  in.ignore_index = ignore_index;
  check_index_ranges(in);
  return in;
}

// z = softcap(u) / tau of token `row` at vocabulary entry `v`, by a dot product in double.
template <typename scalar_t>
double scaled_logit_at(const LossInputs& in, int64_t row, int64_t v) {
  const scalar_t* h = in.h.data_ptr<scalar_t>() + row * in.d;
  const scalar_t* w = in.w.data_ptr<scalar_t>() + v * in.d;
  double u = 0.0;
#pragma omp simd reduction(+ : u)  // lets the compiler vectorize the double sum
  for (int64_t c = 0; c < in.d; ++c) u += static_cast<double>(h[c]) * w[c];
  if (in.has_lora()) {
    const int64_t r = in.a.size(0);
    const scalar_t* sha = in.sha.data_ptr<scalar_t>() + row * r;
    const scalar_t* b = in.b.data_ptr<scalar_t>() + v * r;
#pragma omp simd reduction(+ : u)
    for (int64_t c = 0; c < r; ++c) u += static_cast<double>(sha[c]) * b[c];
  }
  return scale_logit(u, in.softcap, in.temperature);
}

// z at the teacher ids [N, k] and at the labels [N] (double; labels only with a CE term).
template <typename scalar_t>
std::pair<Tensor, Tensor> target_logits(const LossInputs& in) {
  Tensor z_ids = at::empty({in.n, in.k}, at::kDouble);
  Tensor z_label = at::zeros({in.n}, at::kDouble);
  double* zi = z_ids.data_ptr<double>();
  double* zl = z_label.data_ptr<double>();
  const int64_t* ids = in.ids.data_ptr<int64_t>();
  at::parallel_for(0, in.n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t j = 0; j < in.k; ++j) {
        zi[row * in.k + j] = scaled_logit_at<scalar_t>(in, row, ids[row * in.k + j]);
      }
      if (in.has_ce() && in.counted(row)) {
        zl[row] = scaled_logit_at<scalar_t>(in, row, in.labels.data_ptr<int64_t>()[row]);
      }
    }
  });
  return {z_ids, z_label};
}

// A chunk's logit tiles, kept by the single pass between its lse pass and its gradient
// pass. Without a soft-cap they hold exp(z - offset), offset being the running max the lse
// fold used for that row and tile, so the gradient pass needs no second exp:
// q = exp(z - offset) exp(offset - lse). With a soft-cap they hold z, which the soft-cap
// derivative needs.
struct KeptTiles {
  Tensor tiles;    // [rows * V]: tile t is a contiguous [rows, cols] block (what BLAS wants)
  Tensor offsets;  // [n_tiles, rows]; undefined when the tiles hold z

  Tensor tile(int64_t t, int64_t rows, int64_t cols) const {
    return tiles.narrow(0, t * rows * kTileVocab, rows * cols).view({rows, cols});
  }
};

// The log-sum-exp of z = softcap(u) / tau over the vocabulary for token rows
// [c0, c0 + rows), into out[c0 ...]. With `kept`, every tile also stays in kept->tiles for
// the gradient pass; otherwise tiles are thread scratch.
template <typename scalar_t>
void chunk_lse(const LossInputs& in, int64_t c0, int64_t rows, KeptTiles* kept, double* out) {
  const Tensor h = in.h_gemm.narrow(0, c0, rows);
  const Tensor sha = in.has_lora() ? in.sha_gemm.narrow(0, c0, rows) : Tensor();
  const bool keep_exp = kept && kept->offsets.defined();
  struct Partial {
    OnlineLse lse;
    Tensor logits, scratch;
  };
  auto partials = parallel_over_tiles<Partial>(
      ceil_div(in.vocab, kTileVocab),
      [&] {
        return Partial{OnlineLse(rows),
                       kept ? Tensor() : at::empty({rows * kTileVocab}, in.h.options()),
                       keep_exp ? Tensor() : at::empty({rows * kTileVocab}, in.h.options())};
      },
      [&](Partial& p, int64_t tile) {
        const int64_t v0 = tile * kTileVocab;
        const int64_t cols = std::min(kTileVocab, in.vocab - v0);
        Tensor z = kept ? kept->tile(tile, rows, cols) : scratch_view(p.logits, rows, cols);
        tile_logits(z, h, in.w, sha, in.b, v0, cols);
        finish_scaled_logits(z, in.softcap, in.temperature);
        if (keep_exp) {
          p.lse.template fold<scalar_t>(z, z, kept->offsets.data_ptr<scalar_t>() + tile * rows);
        } else {
          Tensor scratch = scratch_view(p.scratch, rows, cols);
          p.lse.template fold<scalar_t>(z, scratch);
        }
      });
  std::vector<const OnlineLse*> parts;
  for (const auto& p : partials) parts.push_back(&p.lse);
  for (int64_t i = 0; i < rows; ++i) out[c0 + i] = merge_lse(parts, i);
}

// The log-sum-exp of z over the vocabulary, per token: [N] double.
template <typename scalar_t>
Tensor full_lse(const LossInputs& in) {
  Tensor lse = at::empty({in.n}, at::kDouble);
  for (int64_t c0 = 0; c0 < in.n; c0 += kChunkRows) {
    chunk_lse<scalar_t>(in, c0, std::min(kChunkRows, in.n - c0), nullptr, lse.data_ptr<double>());
  }
  return lse;
}

// One token's top-k KL (docs/DESIGN.md, "Fused loss") and its gradient with respect to z:
// dKL/dz_v = dense * q_v + sum_j corr[j] [v == ids_j]. `corr` may be null (forward only).
double topk_kl_row(const double* z_ids, const double* lp, int64_t k, double lse, bool tail,
                   double* dense, double* corr) {
  double kl = 0.0;
  if (!tail) {  // renorm: p^ = softmax(lp) over the k entries
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < k; ++j) m = std::max(m, lp[j]);
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(lp[j] - m);
    const double log_norm = m + std::log(s);
    double mass = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const double log_p = lp[j] - log_norm;
      const double p = std::exp(log_p);
      kl += p * (log_p - (z_ids[j] - lse));
      mass += p;
      if (corr) corr[j] = -p;
    }
    *dense = mass;
    return kl;
  }
  // tail: p = exp(lp), R = 1 - sum p, Q = sum q[ids], S = 1 - Q (clamped, gradient stopped)
  double p_sum = 0.0, q_sum = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const double p = std::exp(lp[j]);
    const double log_q = z_ids[j] - lse;
    if (p != 0) kl += p * (lp[j] - log_q);  // 0 log 0 = 0; a NaN still propagates
    p_sum += p;
    q_sum += std::exp(log_q);
  }
  const double teacher_tail = p_sum > 1.0 ? 0.0 : 1.0 - p_sum;  // clamp, NaN propagates
  const double student_tail_raw = 1.0 - q_sum;
  const double student_tail = std::max(student_tail_raw, kTailMassEps);
  if (teacher_tail != 0) kl += teacher_tail * (std::log(teacher_tail) - std::log(student_tail));
  const double ratio = student_tail_raw >= kTailMassEps ? teacher_tail / student_tail_raw : 0.0;
  *dense = p_sum - ratio * q_sum;
  if (corr) {
    for (int64_t j = 0; j < k; ++j) corr[j] = ratio * std::exp(z_ids[j] - lse) - std::exp(lp[j]);
  }
  return kl;
}

// One token's loss (top-k KL + CE) and its gradient coefficients for a loss weight
// `grad` (0: forward only): G = dL/du (before the soft-cap factor) is
// G[v] = dense q[v] + corr[j] at v = ids[j] + label_corr at v = label. `corr` may be null.
struct TokenTerms {
  double loss = 0.0, dense = 0.0, label_corr = 0.0;
};

TokenTerms token_terms(const LossInputs& in, int64_t row, double lse, const double* z_ids,
                       double z_label, double grad, double* corr) {
  TokenTerms t;
  if (!in.counted(row)) {  // exactly 0, with no gradient, for ignored tokens
    if (corr) std::fill(corr, corr + in.k, 0.0);
    return t;
  }
  const double g = grad / in.temperature;
  double c = 0.0;
  t.loss = topk_kl_row(z_ids, in.lp.data_ptr<double>() + row * in.k, in.k, lse, in.tail, &c,
                       corr);
  if (corr) {
    for (int64_t j = 0; j < in.k; ++j) corr[j] *= g;
  }
  if (in.has_ce()) {
    t.loss += in.ce_weight * (lse - z_label);
    c += in.ce_weight;
    t.label_corr = -in.ce_weight * g;
  }
  t.dense = c * g;
  return t;
}

// Per-token gradient coefficients of G = dL/du (see token_terms), in double.
struct GradCoefficients {
  Tensor dense, corr, label_corr;  // [N], [N, k], [N]
  explicit GradCoefficients(const LossInputs& in)
      : dense(at::zeros({in.n}, at::kDouble)),
        corr(at::zeros({in.n, in.k}, at::kDouble)),
        label_corr(at::zeros({in.n}, at::kDouble)) {}
};

// Fills the coefficients of token rows [c0, c0 + rows) from their lse; writes their loss
// too when `loss` is not null.
void fill_grad_coefficients(const LossInputs& in, const double* grad_loss, const double* lse,
                            const Tensor& z_ids, const Tensor& z_label, int64_t c0, int64_t rows,
                            GradCoefficients& coef, double* loss) {
  at::parallel_for(c0, c0 + rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const TokenTerms t = token_terms(in, row, lse[row], z_ids.data_ptr<double>() + row * in.k,
                                       z_label.data_ptr<double>()[row], grad_loss[row],
                                       coef.corr.data_ptr<double>() + row * in.k);
      coef.dense.data_ptr<double>()[row] = t.dense;
      coef.label_corr.data_ptr<double>()[row] = t.label_corr;
      if (loss) loss[row] = t.loss;
    }
  });
}

// One sparse term of the gradient tile: g[row, col] += value.
template <typename scalar_t>
struct Correction {
  int32_t row, col;
  scalar_t value;
};

// The sparse corrections of token rows [c0, c0 + rows) (teacher ids and labels), bucketed
// by vocabulary tile, so each tile touches only its own O(rows k / n_tiles) entries.
template <typename scalar_t>
std::vector<std::vector<Correction<scalar_t>>> bucket_corrections(
    const LossInputs& in, const GradCoefficients& coef, int64_t c0, int64_t rows) {
  std::vector<std::vector<Correction<scalar_t>>> buckets(ceil_div(in.vocab, kTileVocab));
  const int64_t* ids = in.ids.data_ptr<int64_t>();
  const double* corr = coef.corr.data_ptr<double>();
  const double* label_corr = coef.label_corr.data_ptr<double>();
  const int64_t* labels = in.has_ce() ? in.labels.data_ptr<int64_t>() : nullptr;
  auto add = [&](int64_t i, int64_t v, double value) {
    buckets[v / kTileVocab].push_back({static_cast<int32_t>(i),
                                       static_cast<int32_t>(v % kTileVocab),
                                       static_cast<scalar_t>(value)});
  };
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = c0 + i;
    for (int64_t j = 0; j < in.k; ++j) add(i, ids[row * in.k + j], corr[row * in.k + j]);
    if (labels && labels[row] != in.ignore_index) add(i, labels[row], label_corr[row]);
  }
  return buckets;
}

struct Grads {
  Tensor h, w, a, b;  // compute dtype; w undefined unless needed, a/b without LoRA
};

Grads zero_grads(const LossInputs& in, bool needs_weight_grad) {
  Grads grads;
  grads.h = at::zeros({in.n, in.d}, in.h.options());
  if (needs_weight_grad) grads.w = at::zeros({in.vocab, in.d}, in.h.options());
  if (in.has_lora()) {
    grads.a = at::zeros_like(in.a);
    grads.b = at::zeros_like(in.b);
  }
  return grads;
}

// The op outputs (dh, dW, dA, dB) in the inputs' dtypes; an empty tensor for a gradient not
// computed (distinct empties: outputs of an op must not alias each other).
std::tuple<Tensor, Tensor, Tensor, Tensor> grads_as_outputs(
    const Grads& grads, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b) {
  return {grads.h.to(hidden.scalar_type()),
          grads.w.defined() ? grads.w.to(weight.scalar_type()) : weight.new_empty({0}),
          grads.a.defined() ? grads.a.to(lora_a->scalar_type()) : hidden.new_empty({0}),
          grads.b.defined() ? grads.b.to(lora_b->scalar_type()) : hidden.new_empty({0})};
}

// One chunk of the backward: vocabulary tiles over threads; each thread accumulates its
// own dh / (G B) partials, dW and dB rows belong to exactly one tile (no races). The tiles
// come from `kept` when the single pass kept them, else the logits are recomputed.
template <typename scalar_t>
void backward_chunk(const LossInputs& in, const GradCoefficients& coef, const Tensor& lse,
                    int64_t c0, int64_t rows, const KeptTiles* kept, Grads& grads) {
  const Tensor h = in.h.narrow(0, c0, rows);
  const Tensor sha = in.has_lora() ? in.sha.narrow(0, c0, rows) : Tensor();
  const Tensor h_gemm = in.h_gemm.narrow(0, c0, rows);
  const Tensor sha_gemm = in.has_lora() ? in.sha_gemm.narrow(0, c0, rows) : Tensor();
  const auto corrections = bucket_corrections<scalar_t>(in, coef, c0, rows);
  const Tensor lse_c = lse.narrow(0, c0, rows).to(in.dtype).unsqueeze(1);
  const Tensor dense_c = coef.dense.narrow(0, c0, rows).to(in.dtype).unsqueeze(1);
  const bool kept_exp = kept && kept->offsets.defined();
  const int64_t r = in.has_lora() ? in.a.size(0) : 0;
  struct Partial {
    Tensor dh, gb, logits, g;
  };
  auto partials = parallel_over_tiles<Partial>(
      ceil_div(in.vocab, kTileVocab),
      [&] {
        return Partial{at::zeros({rows, in.d}, in.h.options()),
                       r ? at::zeros({rows, r}, in.h.options()) : Tensor(),
                       kept ? Tensor() : at::empty({rows * kTileVocab}, in.h.options()),
                       kept_exp ? Tensor() : at::empty({rows * kTileVocab}, in.h.options())};
      },
      [&](Partial& p, int64_t tile) {
        const int64_t v0 = tile * kTileVocab;
        const int64_t cols = std::min(kTileVocab, in.vocab - v0);
        Tensor z, g;  // z: the logits (not with kept exps); g: the gradient tile
        if (kept_exp) {  // dense * q = exp(z - offset) * dense exp(offset - lse)
          g = kept->tile(tile, rows, cols);
          g.mul_(at::sub(kept->offsets[tile].unsqueeze(1), lse_c).exp_().mul_(dense_c));
        } else {
          z = kept ? kept->tile(tile, rows, cols) : scratch_view(p.logits, rows, cols);
          if (!kept) {
            tile_logits(z, h_gemm, in.w, sha_gemm, in.b, v0, cols);
            finish_scaled_logits(z, in.softcap, in.temperature);
          }
          g = scratch_view(p.g, rows, cols);
          at::sub_out(g, z, lse_c).exp_().mul_(dense_c);  // dense part: coefficient * q
        }
        scalar_t* g_ptr = g.data_ptr<scalar_t>();
        for (const auto& c : corrections[tile]) g_ptr[c.row * cols + c.col] += c.value;
        if (in.softcap > 0) {  // d softcap / du = 1 - t^2, t = tanh(u / c) = z tau / c (z kept)
          Tensor t = z.mul_(in.temperature / in.softcap);
          g.mul_(t.mul_(t).neg_().add_(1.0));
        }
        p.dh.addmm_(g, in.w.narrow(0, v0, cols));
        if (r) p.gb.addmm_(g, in.b.narrow(0, v0, cols));
        if (grads.w.defined()) grads.w.narrow(0, v0, cols).addmm_(g.t(), h);
        if (r) grads.b.narrow(0, v0, cols).addmm_(g.t(), sha);  // dB = s G^T (h A^T)
      });
  Tensor dh = grads.h.narrow(0, c0, rows);
  Tensor gb = r ? at::zeros({rows, r}, in.h.options()) : Tensor();
  for (const auto& p : partials) {
    dh.add_(p.dh);
    if (r) gb.add_(p.gb);
  }
  if (r) {
    dh.addmm_(gb, in.a, 1.0, in.scale);                // dh += s (G B) A
    grads.a.addmm_(gb.t(), h, 1.0, in.scale);          // dA += s (G B)^T h
  }
}

// Token rows per chunk of the single-pass forward + backward, whose z tiles [rows, V] are
// kept between the lse pass and the gradient pass: at most 32 MiB of them. Tests shrink the
// budget with PDENGINE_CPU_CHUNK_BYTES to cover several chunks and a short last one.
int64_t single_pass_chunk_rows(const LossInputs& in) {
  int64_t budget = int64_t{32} << 20;
  if (const char* env = std::getenv("PDENGINE_CPU_CHUNK_BYTES")) {
    char* end = nullptr;
    budget = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && budget > 0,
                      "PDENGINE_CPU_CHUNK_BYTES must be a positive whole number of bytes, got '",
                      env, "'");
  }
  const int64_t per_row = in.vocab * static_cast<int64_t>(c10::elementSize(in.dtype));
  return std::max<int64_t>(1, std::min(in.n, budget / per_row));
}

}  // namespace

std::tuple<Tensor, Tensor> linear_topk_kl_cpu(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& lora_a,
    const std::optional<Tensor>& lora_b, const Tensor& teacher_ids,
    const Tensor& teacher_logprobs, const std::optional<Tensor>& labels, double lora_scale,
    double temperature, double softcap, bool tail, double ce_weight, int64_t ignore_index) {
  const LossInputs in = prepare(hidden, weight, lora_a, lora_b, teacher_ids, teacher_logprobs,
                                labels, lora_scale, temperature, softcap, tail, ce_weight,
                                ignore_index);
  c10::NoGradGuard no_grad;
  Tensor loss = at::zeros({in.n}, at::kDouble);
  Tensor lse;
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "linear_topk_kl_cpu", [&] {
    lse = full_lse<scalar_t>(in);
    auto [z_ids, z_label] = target_logits<scalar_t>(in);
    double* out = loss.data_ptr<double>();
    at::parallel_for(0, in.n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        out[row] = token_terms(in, row, lse.data_ptr<double>()[row],
                               z_ids.data_ptr<double>() + row * in.k,
                               z_label.data_ptr<double>()[row], 0.0, nullptr)
                       .loss;
      }
    });
  });
  return {loss.to(at::kFloat), lse.to(at::kFloat)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_topk_kl_backward_cpu(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
    const Tensor& teacher_ids, const Tensor& teacher_logprobs,
    const std::optional<Tensor>& labels, const Tensor& lse, double lora_scale,
    double temperature, double softcap, bool tail, double ce_weight, int64_t ignore_index,
    bool needs_weight_grad) {
  const LossInputs in = prepare(hidden, weight, lora_a, lora_b, teacher_ids, teacher_logprobs,
                                labels, lora_scale, temperature, softcap, tail, ce_weight,
                                ignore_index);
  check_floating(grad_loss, "grad_loss");
  check_floating(lse, "lse");
  TORCH_CHECK_VALUE(grad_loss.numel() == in.n, "grad_loss must have N=", in.n,
                    " elements, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.numel() == in.n, "lse must have N=", in.n, " elements, got shape ",
                    lse.sizes());
  c10::NoGradGuard no_grad;
  const Tensor gl = grad_loss.detach().reshape({in.n}).to(at::kDouble).contiguous();
  const Tensor lse_d = lse.detach().reshape({in.n}).to(at::kDouble).contiguous();
  Grads grads = zero_grads(in, needs_weight_grad);
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "linear_topk_kl_backward_cpu", [&] {
    auto [z_ids, z_label] = target_logits<scalar_t>(in);
    GradCoefficients coef(in);
    fill_grad_coefficients(in, gl.data_ptr<double>(), lse_d.data_ptr<double>(), z_ids, z_label, 0,
                           in.n, coef, nullptr);
    for (int64_t c0 = 0; c0 < in.n; c0 += kChunkRows) {
      backward_chunk<scalar_t>(in, coef, lse_d, c0, std::min(kChunkRows, in.n - c0), nullptr,
                               grads);
    }
  });
  return grads_as_outputs(grads, hidden, weight, lora_a, lora_b);
}


std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_topk_kl_forward_backward_cpu(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
    const Tensor& teacher_ids, const Tensor& teacher_logprobs,
    const std::optional<Tensor>& labels, double lora_scale, double temperature, double softcap,
    bool tail, double ce_weight, int64_t ignore_index, bool needs_weight_grad) {
  const LossInputs in = prepare(hidden, weight, lora_a, lora_b, teacher_ids, teacher_logprobs,
                                labels, lora_scale, temperature, softcap, tail, ce_weight,
                                ignore_index);
  check_floating(grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == in.n, "grad_loss must have N=", in.n,
                    " elements, got shape ", grad_loss.sizes());
  c10::NoGradGuard no_grad;
  const Tensor gl = grad_loss.detach().reshape({in.n}).to(at::kDouble).contiguous();
  Tensor loss = at::zeros({in.n}, at::kDouble);
  Tensor lse = at::empty({in.n}, at::kDouble);
  Grads grads = zero_grads(in, needs_weight_grad);
  GradCoefficients coef(in);
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "linear_topk_kl_forward_backward_cpu", [&] {
    auto [z_ids, z_label] = target_logits<scalar_t>(in);
    const int64_t chunk = single_pass_chunk_rows(in);
    KeptTiles kept;
    kept.tiles = at::empty({chunk * in.vocab}, in.h.options());
    for (int64_t c0 = 0; c0 < in.n; c0 += chunk) {
      const int64_t rows = std::min(chunk, in.n - c0);
      if (in.softcap == 0) kept.offsets = at::empty({ceil_div(in.vocab, kTileVocab), rows}, in.h.options());
      chunk_lse<scalar_t>(in, c0, rows, &kept, lse.data_ptr<double>());
      fill_grad_coefficients(in, gl.data_ptr<double>(), lse.data_ptr<double>(), z_ids, z_label,
                             c0, rows, coef, loss.data_ptr<double>());
      backward_chunk<scalar_t>(in, coef, lse, c0, rows, &kept, grads);
    }
  });
  auto [gh, gw, ga, gb] = grads_as_outputs(grads, hidden, weight, lora_a, lora_b);
  return {loss.to(at::kFloat), gh, gw, ga, gb};
}

}  // namespace pdengine
