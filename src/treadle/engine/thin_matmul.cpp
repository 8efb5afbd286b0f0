// Thin fp32 matmuls for decode passes on AVX2 CPUs: W [M, K] times X [K, N] for N a
// multiple of 8 up to a few dozen (one column per running sequence).
//
// At 16 columns MKL's sgemm reaches ~85 GFLOP/s here: it packs the weight into panels
// first, and a weight read once per pass gains nothing from packing. This kernel streams W
// as it lies, one register tile of 6 rows x 16 columns at a time with X held in cache, and
// reaches ~125-155 GFLOP/s on the same shapes (benchmarks/sample_throughput.py; the
// sampler's tests hold it to torch.mm). Products and sums are plain fp32 FMAs; only the
// summation order differs from MKL's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

// One tile of R (<= 6) rows of W against 8 * V (V = 1 or 2) columns of X, accumulated over
// all of K in registers: 12 accumulators, 2 column vectors and a broadcast fill the 16
// AVX2 registers. Named variables, not arrays: GCC spills arrays of __m256.
#define TREADLE_ROW(i)                                                          \
  if constexpr (R > i) {                                                        \
    __m256 b = _mm256_broadcast_ss(w + i * ldw + k);                            \
    a##i = _mm256_fmadd_ps(b, x0, a##i);                                        \
    if constexpr (V == 2) c##i = _mm256_fmadd_ps(b, x1, c##i);                  \
  }
#define TREADLE_STORE(i)                                                        \
  if constexpr (R > i) {                                                        \
    store(y + i * ldy_m, a##i, ldy_n);                                          \
    if constexpr (V == 2) store(y + i * ldy_m + 8 * ldy_n, c##i, ldy_n);        \
  }

static inline void store(float* y, __m256 v, int64_t ldy_n) {
  if (ldy_n == 1) {
    _mm256_storeu_ps(y, v);
    return;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int j = 0; j < 8; ++j) y[j * ldy_n] = lanes[j];
}

template <int R, int V>
static inline void tile(const float* w, int64_t ldw, int64_t K, const float* x, int64_t ldx,
                        float* y, int64_t ldy_m, int64_t ldy_n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0;
  for (int64_t k = 0; k < K; ++k) {
    __m256 x0 = _mm256_loadu_ps(x + k * ldx);
    __m256 x1 = V == 2 ? _mm256_loadu_ps(x + k * ldx + 8) : x0;
    TREADLE_ROW(0) TREADLE_ROW(1) TREADLE_ROW(2) TREADLE_ROW(3) TREADLE_ROW(4) TREADLE_ROW(5)
  }
  TREADLE_STORE(0) TREADLE_STORE(1) TREADLE_STORE(2) TREADLE_STORE(3) TREADLE_STORE(4)
  TREADLE_STORE(5)
}

template <int R>
static void rows_block(const float* w, int64_t ldw, int64_t K, const float* x, int64_t ldx, int64_t N,
                       float* y, int64_t ldy_m, int64_t ldy_n) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) tile<R, 2>(w, ldw, K, x + n, ldx, y + n * ldy_n, ldy_m, ldy_n);
  if (n < N) tile<R, 1>(w, ldw, K, x + n, ldx, y + n * ldy_n, ldy_m, ldy_n);
}

// W [M, K] (row stride ldw), X [K, N] (row stride ldx, N a multiple of 8). Returns W·X as
// [M, N], or its transpose [N, M] when transpose_out.
torch::Tensor thin_matmul(torch::Tensor W, torch::Tensor X, bool transpose_out) {
  TORCH_CHECK(W.dim() == 2 && X.dim() == 2, "thin_matmul: 2-D operands only");
  TORCH_CHECK(W.scalar_type() == torch::kFloat && X.scalar_type() == torch::kFloat,
              "thin_matmul: float32 only");
  TORCH_CHECK(W.device().is_cpu() && X.device().is_cpu(), "thin_matmul: CPU tensors only");
  TORCH_CHECK(W.stride(1) == 1 && X.stride(1) == 1, "thin_matmul: rows must be contiguous");
  TORCH_CHECK(X.size(1) % 8 == 0, "thin_matmul: X needs a multiple of 8 columns");
  int64_t M = W.size(0), K = W.size(1), N = X.size(1);
  TORCH_CHECK(X.size(0) == K, "thin_matmul: inner dimensions differ");
  auto Y = transpose_out ? torch::empty({N, M}, W.options()) : torch::empty({M, N}, W.options());
  const float* w = W.data_ptr<float>();
  const float* x = X.data_ptr<float>();
  float* y = Y.data_ptr<float>();
  int64_t ldw = W.stride(0), ldx = X.stride(0);
  int64_t ldy_m = transpose_out ? 1 : N, ldy_n = transpose_out ? M : 1;
  constexpr int R = 6;
  int64_t tiles = (M + R - 1) / R;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t m = t * R;
      const float* wm = w + m * ldw;
      float* ym = y + m * ldy_m;
      switch (std::min<int64_t>(R, M - m)) {
        case 6: rows_block<6>(wm, ldw, K, x, ldx, N, ym, ldy_m, ldy_n); break;
        case 5: rows_block<5>(wm, ldw, K, x, ldx, N, ym, ldy_m, ldy_n); break;
        case 4: rows_block<4>(wm, ldw, K, x, ldx, N, ym, ldy_m, ldy_n); break;
        case 3: rows_block<3>(wm, ldw, K, x, ldx, N, ym, ldy_m, ldy_n); break;
        case 2: rows_block<2>(wm, ldw, K, x, ldx, N, ym, ldy_m, ldy_n); break;
        default: rows_block<1>(wm, ldw, K, x, ldx, N, ym, ldy_m, ldy_n); break;
      }
    }
  });
  return Y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("thin_matmul", &thin_matmul); }
