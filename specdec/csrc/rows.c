/* specdec's small-row linear kernel: y = x @ W^T (+ b) for a handful of rows, fp32 (and bf16/fp16 below), AVX-512.
 *
 * Why: a tree forward on a CPU multiplies 2-16 rows by each weight. The weights (hundreds of MB) stream
 * from DRAM; BLAS's small-M paths stop issuing loads fast enough once each weight element takes a few FMAs,
 * so a forward over 4 rows cost ~1.2-1.4 plain steps although the bytes read are the same. Here each
 * thread walks its share of W's rows in blocks of NB, prefetching two blocks ahead, and every block is
 * multiplied by all rows while it sits in L1: W is read from memory once per call, for any row count.
 *
 * Row invariance: y[m, n] is the same sum in the same order (16-lane partial sums over k, then a fixed
 * reduction tree) whatever the number of rows and wherever row m sits among them, so a tree node's product
 * is bit-identical to a plain step's.
 *
 * Built at first use by specdec/native.py (gcc -O3 -march=native -fopenmp) and called through ctypes. */
#include <immintrin.h>
#include <stdint.h>

#define NB 4      /* weight rows per block */
#define GROUP 6   /* input rows per pass over a block: GROUP * NB accumulators stay in registers */

static inline void block(const float *x, int64_t ldx, int rows, const float *const wr[NB], int nn,
                         const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K, const float *prefetch) {
    int64_t kv = K / 16, kt = K % 16;
    __mmask16 tail = (__mmask16)((1u << kt) - 1u);
    __m512 acc[GROUP][NB];
    for (int m = 0; m < GROUP; m++)
        for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < kv; c++) {
        __m512 wv[NB];
        for (int j = 0; j < NB; j++) {
            if (prefetch) _mm_prefetch((const char *)(prefetch + j * K + c * 16), _MM_HINT_T0);
            wv[j] = _mm512_loadu_ps(wr[j] + c * 16);
        }
        for (int m = 0; m < rows; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * ldx + c * 16);
            for (int j = 0; j < NB; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    if (kt) {
        __m512 wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_ps(tail, wr[j] + kv * 16);
        for (int m = 0; m < rows; m++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + kv * 16);
            for (int j = 0; j < NB; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nn; j++)
            y[m * ldy + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n0 + j] : 0.0f);
}

/* rows-specialised copies so the compiler keeps the accumulators in registers */
#define SPECIAL(R) \
    static void block_##R(const float *x, int64_t ldx, const float *const wr[NB], int nn, const float *bias, \
                          int64_t n0, float *y, int64_t ldy, int64_t K, const float *pf) {                 \
        block(x, ldx, R, wr, nn, bias, n0, y, ldy, K, pf);                                                 \
    }
SPECIAL(1) SPECIAL(2) SPECIAL(3) SPECIAL(4) SPECIAL(5) SPECIAL(6)

typedef void (*block_fn)(const float *, int64_t, const float *const *, int, const float *, int64_t, float *, int64_t,
                         int64_t, const float *);
static const block_fn BLOCKS[GROUP + 1] = {0, block_1, block_2, block_3, block_4, block_5, block_6};

/* x [M, K] row-major, w [N, K] row-major, bias [N] or NULL, y [M, N] row-major. Returns 0. */
int specdec_rows_linear(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K, int threads) {
    int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * NB;
        int nn = (N - n0) < NB ? (int)(N - n0) : NB;
        const float *wr[NB];
        for (int j = 0; j < NB; j++) wr[j] = w + (n0 + (j < nn ? j : 0)) * K;
        /* prefetch two blocks ahead (never dereferenced: a prefetch past the end is harmless) */
        const float *pf = (b + 2 < blocks) ? w + (n0 + 2 * NB) * K : 0;
        for (int64_t m0 = 0; m0 < M; m0 += GROUP) {
            int rows = (M - m0) < GROUP ? (int)(M - m0) : GROUP;
            BLOCKS[rows](x + m0 * K, K, wr, nn, bias, n0, y + m0 * N, N, K, m0 == 0 ? pf : 0);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The same kernel for bf16 and fp16 weights and inputs (kind 0: bf16, 1: fp16): each 16-element piece is widened
 * to fp32 in registers (exact for both types) and multiplied there, so the sums are fp32 sums of exact products in
 * the same fixed order as above: row-invariant by construction, for any row count. y is fp32; the caller rounds it
 * to the model's dtype (one rounding per output, as a GEMM with fp32 accumulation does). */
static inline __m512 widen(int kind, const uint16_t *p, __mmask16 mask) {
    __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
    if (kind == 0) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    return _mm512_cvtph_ps(raw);
}

static inline void hblock(int kind, const uint16_t *x, int64_t ldx, int rows, const uint16_t *const wr[NB], int nn,
                          const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K, const uint16_t *prefetch) {
    int64_t kv = K / 16, kt = K % 16;
    __mmask16 tail = (__mmask16)((1u << kt) - 1u);
    __m512 acc[GROUP][NB];
    for (int m = 0; m < GROUP; m++)
        for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c <= kv; c++) {
        __mmask16 mask = c < kv ? (__mmask16)0xFFFF : tail;
        if (!mask) break;
        __m512 wv[NB];
        for (int j = 0; j < NB; j++) {
            if (prefetch && (c & 1) == 0) _mm_prefetch((const char *)(prefetch + j * K + c * 16), _MM_HINT_T0);
            wv[j] = widen(kind, wr[j] + c * 16, mask);
        }
        for (int m = 0; m < rows; m++) {
            __m512 xv = widen(kind, x + m * ldx + c * 16, mask);
            for (int j = 0; j < NB; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nn; j++)
            y[m * ldy + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n0 + j] : 0.0f);
}

#define HSPECIAL(KIND, R)                                                                                        \
    static void hblock_##KIND##_##R(const uint16_t *x, int64_t ldx, const uint16_t *const wr[NB], int nn,        \
                                    const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K,             \
                                    const uint16_t *pf) {                                                        \
        hblock(KIND, x, ldx, R, wr, nn, bias, n0, y, ldy, K, pf);                                                \
    }
#define HKIND(KIND) HSPECIAL(KIND, 1) HSPECIAL(KIND, 2) HSPECIAL(KIND, 3) HSPECIAL(KIND, 4) HSPECIAL(KIND, 5) HSPECIAL(KIND, 6)
HKIND(0) HKIND(1)
typedef void (*hblock_fn)(const uint16_t *, int64_t, const uint16_t *const *, int, const float *, int64_t, float *,
                          int64_t, int64_t, const uint16_t *);
static const hblock_fn HBLOCKS[2][GROUP + 1] = {
    {0, hblock_0_1, hblock_0_2, hblock_0_3, hblock_0_4, hblock_0_5, hblock_0_6},
    {0, hblock_1_1, hblock_1_2, hblock_1_3, hblock_1_4, hblock_1_5, hblock_1_6}};

/* x [M, K] and w [N, K] bf16 (kind 0) or fp16 (kind 1), row-major; bias [N] fp32 or NULL; y [M, N] fp32.
 * Returns 0, or -1 for an unknown kind. */
int specdec_rows_linear_half(int kind, const uint16_t *x, const uint16_t *w, const float *bias, float *y, int64_t M,
                             int64_t N, int64_t K, int threads) {
    if (kind < 0 || kind > 1) return -1;
    const hblock_fn *fns = HBLOCKS[kind];
    int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * NB;
        int nn = (N - n0) < NB ? (int)(N - n0) : NB;
        const uint16_t *wr[NB];
        for (int j = 0; j < NB; j++) wr[j] = w + (n0 + (j < nn ? j : 0)) * K;
        const uint16_t *pf = (b + 2 < blocks) ? w + (n0 + 2 * NB) * K : 0;
        for (int64_t m0 = 0; m0 < M; m0 += GROUP) {
            int rows = (M - m0) < GROUP ? (int)(M - m0) : GROUP;
            fns[rows](x + m0 * K, K, wr, nn, bias, n0, y + m0 * N, N, K, m0 == 0 ? pf : 0);
        }
    }
    return 0;
}
