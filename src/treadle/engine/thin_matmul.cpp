// Thin fp32 matmuls for decode passes on AVX2 CPUs: W [M, K] times X [K, N], N one column
// per running sequence (1 to 64), plus optionally a LoRA adapter's B [M, r] times its
// low-rank input [r, N] in the same accumulators.
//
// At 16 columns MKL's sgemm reaches ~80 GFLOP/s here: it packs the weight into panels
// first, and a weight read once per pass gains nothing from packing. This kernel streams W
// as it lies, one register tile of 6 rows x 16 columns at a time with X held in cache, and
// reaches ~150-165 GFLOP/s on the same shapes (benchmarks/thin_matmul.py; the sampler's
// tests hold decoding through it to generate, to the trainer's forward and to torch.mm).
// Products and sums are plain fp32 FMAs; only the summation order differs from MKL's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

// A product term: W [M, K] (row stride ldw) times X [K, N] (row stride ldx). The output
// sums one or two: the base weight's, and a LoRA adapter's B times its low-rank input.
struct Term {
  const float* w;
  int64_t ldw;
  const float* x;
  int64_t ldx;
  int64_t k;
};

// One tile of R (<= 6) rows against 8 * V (V = 1 or 2) columns, accumulated over every
// term in registers: 12 accumulators, 2 column vectors and a broadcast fill the 16 AVX2
// registers. Named variables, not arrays: GCC spills arrays of __m256.
#define TREADLE_ROW(i)                                                   \
  if constexpr (R > i) {                                                 \
    __m256 b = _mm256_broadcast_ss(w + i * ldw + k);                     \
    a##i = _mm256_fmadd_ps(b, x0, a##i);                                 \
    if constexpr (V == 2) c##i = _mm256_fmadd_ps(b, x1, c##i);           \
  }
#define TREADLE_PREFETCH(i) \
  if constexpr (R > i) _mm_prefetch(reinterpret_cast<const char*>(next + i * ldw + k), _MM_HINT_T0);
#define TREADLE_STORE(i)                                                          \
  if constexpr (R > i) {                                                          \
    store(y + i * ldy_m, a##i, ldy_n, lanes);                                     \
    if constexpr (V == 2) store(y + i * ldy_m + 8 * ldy_n, c##i, ldy_n, lanes);   \
  }

// The first `lanes` of v to y, y[j * ldy_n] for lane j.
static inline void store(float* y, __m256 v, int64_t ldy_n, int lanes) {
  if (ldy_n == 1 && lanes == 8) {
    _mm256_storeu_ps(y, v);
    return;
  }
  alignas(32) float values[8];
  _mm256_store_ps(values, v);
  for (int j = 0; j < lanes; ++j) y[j * ldy_n] = values[j];
}

// Columns col .. col + 8 * V of the output rows row .. row + R; with MASKED (V = 1), only
// the first `lanes` columns exist and the others read as zeros.
template <int R, int V, bool MASKED>
static inline void tile(const Term* terms, int count, int64_t row, int64_t col, int lanes,
                        float* y, int64_t ldy_m, int64_t ldy_n) {
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0;
  for (int t = 0; t < count; ++t) {
    const int64_t ldw = terms[t].ldw, ldx = terms[t].ldx;
    const float* w = terms[t].w + row * ldw;
    const float* x = terms[t].x + col;
    // The hardware prefetcher needs a while to pick up six new row streams; a tile of a
    // 576-wide weight is over before it does. So each tile fetches the next tile's rows
    // (one cache line per row every 16 steps): ~20 % faster on SmolLM2's shapes.
    const float* next = w + R * ldw;
    for (int64_t k = 0; k < terms[t].k; ++k) {
      if ((k & 15) == 0) {
        TREADLE_PREFETCH(0) TREADLE_PREFETCH(1) TREADLE_PREFETCH(2) TREADLE_PREFETCH(3)
        TREADLE_PREFETCH(4) TREADLE_PREFETCH(5)
      }
      __m256 x0 = MASKED ? _mm256_maskload_ps(x + k * ldx, mask) : _mm256_loadu_ps(x + k * ldx);
      __m256 x1 = V == 2 ? _mm256_loadu_ps(x + k * ldx + 8) : x0;
      TREADLE_ROW(0) TREADLE_ROW(1) TREADLE_ROW(2) TREADLE_ROW(3) TREADLE_ROW(4) TREADLE_ROW(5)
    }
  }
  TREADLE_STORE(0) TREADLE_STORE(1) TREADLE_STORE(2) TREADLE_STORE(3) TREADLE_STORE(4)
  TREADLE_STORE(5)
}

template <int R>
static void rows_block(const Term* terms, int count, int64_t row, int64_t N, float* y,
                       int64_t ldy_m, int64_t ldy_n) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16)
    tile<R, 2, false>(terms, count, row, n, 8, y + n * ldy_n, ldy_m, ldy_n);
  if (n + 8 <= N) {
    tile<R, 1, false>(terms, count, row, n, 8, y + n * ldy_n, ldy_m, ldy_n);
    n += 8;
  }
  if (n < N) tile<R, 1, true>(terms, count, row, n, int(N - n), y + n * ldy_n, ldy_m, ldy_n);
}

// Elements of a row side by side (a single column has no stride to speak of).
static bool unit_stride(const torch::Tensor& t) { return t.size(1) == 1 || t.stride(1) == 1; }

static Term term(const torch::Tensor& w, const torch::Tensor& x, int64_t M, int64_t N) {
  TORCH_CHECK(w.dim() == 2 && x.dim() == 2, "thin_matmul: 2-D operands only");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat,
              "thin_matmul: float32 only");
  TORCH_CHECK(w.device().is_cpu() && x.device().is_cpu(), "thin_matmul: CPU tensors only");
  TORCH_CHECK(unit_stride(w) && unit_stride(x), "thin_matmul: rows must be contiguous");
  TORCH_CHECK(w.size(0) == M && x.size(1) == N && w.size(1) == x.size(0),
              "thin_matmul: shapes do not match");
  return Term{w.data_ptr<float>(), w.stride(0), x.data_ptr<float>(), x.stride(0), w.size(1)};
}

// Y = W·X (+ B·L): Y [M, N] with any strides (a transposed view writes [N, M] rows), W
// [M, K], X [K, N], B [M, r], L [r, N].
void thin_matmul(torch::Tensor Y, const torch::Tensor& W, const torch::Tensor& X,
                 const c10::optional<torch::Tensor>& B, const c10::optional<torch::Tensor>& L) {
  TORCH_CHECK(Y.dim() == 2 && Y.scalar_type() == torch::kFloat && Y.device().is_cpu(),
              "thin_matmul: Y must be a 2-D float32 CPU tensor");
  const int64_t M = Y.size(0), N = Y.size(1);
  Term terms[2] = {term(W, X, M, N), {}};
  int count = 1;
  if (B.has_value() && L.has_value()) terms[count++] = term(*B, *L, M, N);
  float* y = Y.data_ptr<float>();
  const int64_t ldy_m = Y.stride(0), ldy_n = Y.stride(1);
  constexpr int R = 6;
  at::parallel_for(0, (M + R - 1) / R, 8, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t row = t * R;
      float* yr = y + row * ldy_m;
      switch (std::min<int64_t>(R, M - row)) {
        case 6: rows_block<6>(terms, count, row, N, yr, ldy_m, ldy_n); break;
        case 5: rows_block<5>(terms, count, row, N, yr, ldy_m, ldy_n); break;
        case 4: rows_block<4>(terms, count, row, N, yr, ldy_m, ldy_n); break;
        case 3: rows_block<3>(terms, count, row, N, yr, ldy_m, ldy_n); break;
        case 2: rows_block<2>(terms, count, row, N, yr, ldy_m, ldy_n); break;
        default: rows_block<1>(terms, count, row, N, yr, ldy_m, ldy_n); break;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("thin_matmul", &thin_matmul); }
