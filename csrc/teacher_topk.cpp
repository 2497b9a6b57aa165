// Teacher top-k on the CPU (docs/DESIGN.md, "Teacher top-k"): per token, the k largest
// z = softcap(h W^T) / tau and their log-probs z - lse, streaming over vocabulary tiles
// (per-row min-heaps of size k plus an online log-sum-exp); the [N, V] logits never exist.
#include "common.h"

namespace pdengine {
namespace {

using Candidate = std::pair<double, int64_t>;  // (z, id)

// Larger z first; on ties, the smaller id first (deterministic across tilings).
inline bool ranks_before(const Candidate& x, const Candidate& y) {
  return x.first > y.first || (x.first == y.first && x.second < y.second);
}

// Per-row bounded min-heap: heap.front() is the worst kept candidate.
struct RowTopK {
  std::vector<Candidate> heap;

  void offer(double z, int64_t id, int64_t k) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.emplace_back(z, id);
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else if (ranks_before({z, id}, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before);
      heap.back() = {z, id};
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    }
  }
};

struct TopKPartial {
  OnlineLse lse;
  std::vector<RowTopK> rows;
  Tensor logits, scratch;
};

// Scans a tile z [rows, cols] (vocabulary ids v0...) into the per-row heaps.
template <typename scalar_t>
void offer_tile(TopKPartial& p, const Tensor& z, int64_t v0, int64_t k) {
  const int64_t rows = z.size(0), cols = z.size(1);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) {
    RowTopK& row = p.rows[i];
    const scalar_t* zr = zp + i * cols;
    for (int64_t c = 0; c < cols; ++c) {
      // cheap reject first: most entries lose to the current k-th best
      if (static_cast<int64_t>(row.heap.size()) == k && zr[c] < row.heap.front().first) continue;
      row.offer(zr[c], v0 + c, k);
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> teacher_topk_cpu(const Tensor& hidden, const Tensor& weight,
                                            int64_t k, double temperature, double softcap) {
  check_hidden_and_head(hidden, weight);
  TORCH_CHECK_VALUE(k >= 1 && k <= weight.size(0), "k must be in [1, V=", weight.size(0),
                    "], got ", k);
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(softcap >= 0, "softcap must be >= 0 (0 = none), got ", softcap);
  c10::NoGradGuard no_grad;
  const auto dtype = compute_dtype(hidden, weight);
  const Tensor h_all = as_compute(hidden, dtype);
  const Tensor w = as_compute(weight, dtype);
  const int64_t n = h_all.size(0), vocab = w.size(0);
  Tensor ids = at::empty({n, k}, hidden.options().dtype(at::kLong));
  Tensor logprobs = at::empty({n, k}, hidden.options().dtype(at::kDouble));
  int64_t* ids_out = ids.data_ptr<int64_t>();
  double* lp_out = logprobs.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "teacher_topk_cpu", [&] {
    for (int64_t c0 = 0; c0 < n; c0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, n - c0);
      const Tensor h = h_all.narrow(0, c0, rows).mul(logits_alpha(softcap, temperature));
      auto partials = parallel_over_tiles<TopKPartial>(
          ceil_div(vocab, kTileVocab),
          [&] {
            return TopKPartial{OnlineLse(rows), std::vector<RowTopK>(rows),
                               at::empty({rows * kTileVocab}, h.options()),
                               at::empty({rows * kTileVocab}, h.options())};
          },
          [&](TopKPartial& p, int64_t tile) {
            const int64_t v0 = tile * kTileVocab;
            const int64_t cols = std::min(kTileVocab, vocab - v0);
            Tensor z = scratch_view(p.logits, rows, cols);
            Tensor scratch = scratch_view(p.scratch, rows, cols);
            tile_logits(z, h, w, Tensor(), Tensor(), v0, cols);
            finish_scaled_logits(z, softcap, temperature);
            p.lse.template fold<scalar_t>(z, scratch);
            offer_tile<scalar_t>(p, z, v0, k);
          });
      std::vector<const OnlineLse*> parts;
      for (const auto& p : partials) parts.push_back(&p.lse);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          std::vector<Candidate> merged;
          for (const auto& p : partials) {
            merged.insert(merged.end(), p.rows[i].heap.begin(), p.rows[i].heap.end());
          }
          std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), ranks_before);
          const double lse = merge_lse(parts, i);
          for (int64_t j = 0; j < k; ++j) {
            ids_out[(c0 + i) * k + j] = merged[j].second;
            lp_out[(c0 + i) * k + j] = merged[j].first - lse;
          }
        }
      });
    }
  });
  return {ids, logprobs.to(at::kFloat)};
}

}  // namespace pdengine
