/* Few-row matrix product for the decoding engine on x86-64 CPUs with AVX2 and FMA.
 *
 * out[r][n] = sum_k x[r][k] * w[n][k] for R rows of x (R a multiple of 4) and the N rows of a
 * row-major weight, both float32 with K a multiple of 8. A decode step multiplies a handful of
 * rows by every weight of the LLM, so the work is one pass over the weight: this kernel reads
 * each weight row once from memory and multiplies it with all the rows of x held in cache,
 * three weight rows by four rows of x at a time (twelve accumulators: all the registers AVX2 has
 * besides the operands). See model/rows_kernel.py for how it is built, loaded and called.
 */
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma")))

int rows_kernel_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

TARGET static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Weight rows n .. n+W-1 (W = 1..3) times x rows r .. r+3. */
#define BLOCK(W)                                                                                  \
    TARGET static void block##W(const float *x, const float *w, float *out, long K, long N, long n, \
                                long r) {                                                         \
        __m256 acc[W][4];                                                                         \
        for (int i = 0; i < W; i++)                                                               \
            for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();                          \
        const float *xr = x + r * K, *wn = w + n * K;                                             \
        for (long k = 0; k < K; k += 8) {                                                         \
            __m256 wv[W];                                                                         \
            for (int i = 0; i < W; i++) wv[i] = _mm256_loadu_ps(wn + i * K + k);                  \
            for (int j = 0; j < 4; j++) {                                                         \
                __m256 xv = _mm256_loadu_ps(xr + j * K + k);                                      \
                for (int i = 0; i < W; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);    \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < W; i++)                                                               \
            for (int j = 0; j < 4; j++) out[(r + j) * N + n + i] = sum8(acc[i][j]);               \
    }
BLOCK(1)
BLOCK(2)
BLOCK(3)

/* Weight rows n .. n+width-1 (width = 1..3) times all the rows of x. */
static void weight_rows(const float *x, const float *w, float *out, long R, long K, long N, long n, long width) {
    for (long r = 0; r < R; r += 4) {
        if (width == 3) block3(x, w, out, K, N, n, r);
        else if (width == 2) block2(x, w, out, K, N, n, r);
        else block1(x, w, out, K, N, n, r);
    }
}

/* The weight's rows are split between `threads` OpenMP threads, in one contiguous range each. Built
 * with -fopenmp and loaded after torch, this shares torch's OpenMP runtime and so its threads:
 * with a runtime of its own, torch's idle threads would spin on the cores this kernel computes on.
 * Returns 0, or -1 when the shapes break the contract above. */
int rows_matmul(const float *x, const float *w, float *out, long R, long K, long N, int threads) {
    if (R <= 0 || R % 4 || K <= 0 || K % 8 || N <= 0) return -1;
    long blocks = (N + 2) / 3;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long n = 3 * b, width = N - n < 3 ? N - n : 3;
        weight_rows(x, w, out, R, K, N, n, width);
    }
    return 0;
}
