/* specdec's quantized small-row linear kernel: y = x @ W^T (+ b), W held as GGUF blocks, x and y fp32, AVX-512.
 *
 * Why: a GGUF model's linear weights are 4-8 bits a weight; the dequantized fp32 copy is 4-8x the bytes, and a
 * decoding step on a CPU is bound by the bytes it reads. Here the weights stay in their blocks and are decoded in
 * registers, block by block, while the block sits in L1: the same walk as rows.c (each thread takes its share of
 * W's rows in groups of NB, prefetches ahead, multiplies every input row by a decoded block).
 *
 * Exactness: decoding a block gives exactly the fp32 weights a dequantizer gives (q*d is exact in fp32 for these
 * formats, and q*d + m is rounded once, as fma rounds it), so the product is the fp32 model's product up to the
 * summation order. The activations stay fp32 (llama.cpp quantizes them to 8 bits; that would change the model).
 *
 * Row invariance: y[m, n] is the same sum in the same order (16-lane partial sums over k, then a fixed reduction
 * tree) whatever the number of rows and wherever row m sits among them.
 *
 * Formats (one chunk = 32 weights of a row; a row is K/32 chunks, back to back):
 *   0 Q4_0   18 bytes: f16 d, 16 bytes of nibbles (byte j: weight j low, weight j+16 high); w = (q - 8) d
 *   1 Q4_1   20 bytes: f16 d, f16 m, 16 bytes of nibbles; w = q d + m
 *   2 Q8_0   34 bytes: f16 d, 32 int8; w = q d
 *   3 Q4F    24 bytes: f32 d, f32 m, 16 bytes of nibbles; w = q d + m   (specdec's repacking of Q4_K)
 *   4 Q8F16  40 bytes: two halves of [f32 d, 16 int8]; w = q d          (specdec's repacking of Q6_K)
 * The GGUF's own Q4_0, Q4_1 and Q8_0 blocks are read as they are in the file.
 *
 * Built at first use by specdec/native.py (gcc -O3 -march=native -fopenmp) and called through ctypes. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define NB 4     /* weight rows per block */
#define GROUP 4  /* input rows per pass: GROUP * NB accumulators + 2 * NB decoded vectors stay in registers */
#define WNB 2    /* the wide path (5-16 input rows): 2 weight rows per block, */
#define WGROUP 8 /* 8 input rows per pass, so a decoded chunk serves twice as many rows */
#define PF_AHEAD 2 /* blocks prefetched ahead (4 and 8 measured no better on Zen 5) */

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
static inline float f32(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

/* 4-bit weights through a table: the 16 values a nibble can stand for, q d + m for q = 0..15 (each rounded once by
 * the fma, exactly as decoding weight by weight rounds it), are computed once per chunk, and each 16-lane vector of
 * weights is one permute of the table by its nibbles (vpermps reads the low 4 bits of each 32-bit index: the byte
 * itself for the low nibbles, the byte shifted right by 4 for the high ones). Same weights bit for bit, about half
 * the instructions of converting every nibble to float and scaling it. */
static inline void nibbles(const uint8_t *q, __m512 d, __m512 m, __m512 *w0, __m512 *w1) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 table = _mm512_fmadd_ps(iota, d, m);
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *w0 = _mm512_permutexvar_ps(bytes, table);
    *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

static inline __m512 bytes16(const uint8_t *q, __m512 d) {
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), d);
}

/* decode chunk c of a row (32 weights) into two 16-lane vectors */
static inline void decode(int fmt, const uint8_t *row, int64_t c, __m512 *w0, __m512 *w1) {
    switch (fmt) {
    case 0: {
        const uint8_t *b = row + c * 18;
        float d = f16(b);
        nibbles(b + 2, _mm512_set1_ps(d), _mm512_set1_ps(-8.0f * d), w0, w1);
        break;
    }
    case 1: {
        const uint8_t *b = row + c * 20;
        nibbles(b + 4, _mm512_set1_ps(f16(b)), _mm512_set1_ps(f16(b + 2)), w0, w1);
        break;
    }
    case 2: {
        const uint8_t *b = row + c * 34;
        __m512 d = _mm512_set1_ps(f16(b));
        *w0 = bytes16(b + 2, d);
        *w1 = bytes16(b + 18, d);
        break;
    }
    case 3: {
        const uint8_t *b = row + c * 24;
        nibbles(b + 8, _mm512_set1_ps(f32(b)), _mm512_set1_ps(f32(b + 4)), w0, w1);
        break;
    }
    default: {
        const uint8_t *b = row + c * 40;
        *w0 = bytes16(b + 4, _mm512_set1_ps(f32(b)));
        *w1 = bytes16(b + 24, _mm512_set1_ps(f32(b + 20)));
        break;
    }
    }
}

static const int CHUNK_BYTES[5] = {18, 20, 34, 24, 40};

/* nb weight rows by up to G input rows; nb and G are constants in every specialised copy below */
static inline void gblock(int fmt, int nb, int G, const float *x, int64_t ldx, int rows, const uint8_t *const *wr,
                          int nn, const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K, int64_t row_bytes,
                          const uint8_t *prefetch) {
    int64_t chunks = K / 32;
    int cb = CHUNK_BYTES[fmt];
    __m512 acc[WGROUP][NB];
    for (int m = 0; m < G; m++)
        for (int j = 0; j < nb; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        __m512 w0[NB], w1[NB];
        if (prefetch && (c * cb) % 64 < cb)
            for (int j = 0; j < nb; j++) _mm_prefetch((const char *)(prefetch + j * row_bytes + c * cb), _MM_HINT_T0);
        for (int j = 0; j < nb; j++) decode(fmt, wr[j], c, &w0[j], &w1[j]);
        for (int m = 0; m < rows; m++) {
            __m512 x0 = _mm512_loadu_ps(x + m * ldx + c * 32);
            __m512 x1 = _mm512_loadu_ps(x + m * ldx + c * 32 + 16);
            for (int j = 0; j < nb; j++) {
                acc[m][j] = _mm512_fmadd_ps(x0, w0[j], acc[m][j]);
                acc[m][j] = _mm512_fmadd_ps(x1, w1[j], acc[m][j]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nn; j++)
            y[m * ldy + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n0 + j] : 0.0f);
}

static inline void block(int fmt, const float *x, int64_t ldx, int rows, const uint8_t *const wr[NB], int nn,
                         const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K, int64_t row_bytes,
                         const uint8_t *prefetch) {
    gblock(fmt, NB, GROUP, x, ldx, rows, wr, nn, bias, n0, y, ldy, K, row_bytes, prefetch);
}

/* copies specialised by format and row count, so the compiler unrolls and keeps accumulators in registers */
#define SPECIAL(F, R)                                                                                           \
    static void block_##F##_##R(const float *x, int64_t ldx, const uint8_t *const wr[NB], int nn,             \
                                const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K, int64_t rb,  \
                                const uint8_t *pf) {                                                          \
        block(F, x, ldx, R, wr, nn, bias, n0, y, ldy, K, rb, pf);                                             \
    }
#define FORMAT(F) SPECIAL(F, 1) SPECIAL(F, 2) SPECIAL(F, 3) SPECIAL(F, 4)
FORMAT(0) FORMAT(1) FORMAT(2) FORMAT(3) FORMAT(4)

typedef void (*block_fn)(const float *, int64_t, const uint8_t *const *, int, const float *, int64_t, float *,
                         int64_t, int64_t, int64_t, const uint8_t *);
#define ROWFNS(F) {0, block_##F##_1, block_##F##_2, block_##F##_3, block_##F##_4}
static const block_fn BLOCKS[5][GROUP + 1] = {ROWFNS(0), ROWFNS(1), ROWFNS(2), ROWFNS(3), ROWFNS(4)};

#define WSPECIAL(F, R)                                                                                          \
    static void wblock_##F##_##R(const float *x, int64_t ldx, const uint8_t *const *wr, int nn,               \
                                 const float *bias, int64_t n0, float *y, int64_t ldy, int64_t K, int64_t rb, \
                                 const uint8_t *pf) {                                                         \
        gblock(F, WNB, WGROUP, x, ldx, R, wr, nn, bias, n0, y, ldy, K, rb, pf);                               \
    }
#define WFORMAT(F) WSPECIAL(F, 1) WSPECIAL(F, 2) WSPECIAL(F, 3) WSPECIAL(F, 4) WSPECIAL(F, 5) WSPECIAL(F, 6) \
    WSPECIAL(F, 7) WSPECIAL(F, 8)
WFORMAT(0) WFORMAT(1) WFORMAT(2) WFORMAT(3) WFORMAT(4)
#define WROWFNS(F) {0, wblock_##F##_1, wblock_##F##_2, wblock_##F##_3, wblock_##F##_4, wblock_##F##_5, \
                    wblock_##F##_6, wblock_##F##_7, wblock_##F##_8}
static const block_fn WBLOCKS[5][WGROUP + 1] = {WROWFNS(0), WROWFNS(1), WROWFNS(2), WROWFNS(3), WROWFNS(4)};

/* More rows than the wide path takes: each block of NB weight rows is decoded once into an L1 buffer and multiplied from there,
 * FGROUP input rows per pass. The FMAs run over the same 16-lane vectors in the same k order as block(), so every
 * output is bit-identical to the direct path's (row invariance across the two paths). */
#define FGROUP 6

static inline void fblock(const float *x, int64_t ldx, int rows, const float *buf, int nn, const float *bias,
                          int64_t n0, float *y, int64_t ldy, int64_t K) {
    __m512 acc[FGROUP][NB];
    for (int m = 0; m < FGROUP; m++)
        for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K / 16; c++) {
        __m512 wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_ps(buf + j * K + c * 16);
        for (int m = 0; m < rows; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * ldx + c * 16);
            for (int j = 0; j < NB; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nn; j++)
            y[m * ldy + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n0 + j] : 0.0f);
}

#define FSPECIAL(R)                                                                                              \
    static void fblock_##R(const float *x, int64_t ldx, const float *buf, int nn, const float *bias, int64_t n0, \
                           float *y, int64_t ldy, int64_t K) {                                                  \
        fblock(x, ldx, R, buf, nn, bias, n0, y, ldy, K);                                                        \
    }
FSPECIAL(1) FSPECIAL(2) FSPECIAL(3) FSPECIAL(4) FSPECIAL(5) FSPECIAL(6)
typedef void (*fblock_fn)(const float *, int64_t, const float *, int, const float *, int64_t, float *, int64_t, int64_t);
static const fblock_fn FBLOCKS[FGROUP + 1] = {0, fblock_1, fblock_2, fblock_3, fblock_4, fblock_5, fblock_6};

#define DECODER(F)                                                                                   \
    static void decode_rows_##F(const uint8_t *const wr[NB], int64_t K, float *buf) {                \
        for (int j = 0; j < NB; j++)                                                                 \
            for (int64_t c = 0; c < K / 32; c++) {                                                   \
                __m512 w0, w1;                                                                       \
                decode(F, wr[j], c, &w0, &w1);                                                       \
                _mm512_storeu_ps(buf + j * K + c * 32, w0);                                          \
                _mm512_storeu_ps(buf + j * K + c * 32 + 16, w1);                                     \
            }                                                                                        \
    }
DECODER(0) DECODER(1) DECODER(2) DECODER(3) DECODER(4)
typedef void (*decode_fn)(const uint8_t *const *, int64_t, float *);
static const decode_fn DECODERS[5] = {decode_rows_0, decode_rows_1, decode_rows_2, decode_rows_3, decode_rows_4};

/* Bytes one row of K weights takes in format fmt (K a multiple of 32), or -1 for an unknown format. */
int64_t specdec_quant_row_bytes(int fmt, int64_t K) {
    if (fmt < 0 || fmt > 4 || K % 32) return -1;
    return K / 32 * CHUNK_BYTES[fmt];
}

/* x [M, K] fp32 row-major; w: N rows of specdec_quant_row_bytes(fmt, K) bytes; bias [N] or NULL; y [M, N].
 * Returns 0, -1 when fmt or K is not supported, -2 when a thread's decode buffer could not be allocated. */
int specdec_quant_linear(int fmt, const float *x, const uint8_t *w, const float *bias, float *y, int64_t M,
                         int64_t N, int64_t K, int threads) {
    int64_t row_bytes = specdec_quant_row_bytes(fmt, K);
    if (row_bytes < 0) return -1;
    int64_t M_WIDE = 8; /* measured on Zen 5: above 8 rows one decode into the L1 buffer beats decoding per pass */
    int buffered = M > M_WIDE, wide = !buffered && M > GROUP;
    int nb = wide ? WNB : NB, G = wide ? WGROUP : GROUP;
    const block_fn *fns = wide ? WBLOCKS[fmt] : BLOCKS[fmt];
    int64_t blocks = (N + nb - 1) / nb;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buf = buffered ? (float *)_mm_malloc((size_t)(NB * K) * sizeof(float), 64) : 0;
        if (buffered && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (buffered && !buf) continue;
            int64_t n0 = b * nb;
            int nn = (N - n0) < nb ? (int)(N - n0) : nb;
            const uint8_t *wr[NB];
            for (int j = 0; j < nb; j++) wr[j] = w + (n0 + (j < nn ? j : 0)) * row_bytes;
            if (buffered) {
                DECODERS[fmt](wr, K, buf);
                for (int64_t m0 = 0; m0 < M; m0 += FGROUP) {
                    int rows = (M - m0) < FGROUP ? (int)(M - m0) : FGROUP;
                    FBLOCKS[rows](x + m0 * K, K, buf, nn, bias, n0, y + m0 * N, N, K);
                }
                continue;
            }
            /* prefetch PF_AHEAD blocks ahead (never dereferenced: a prefetch past the end is harmless) */
            const uint8_t *pf = (b + PF_AHEAD < blocks) ? w + (n0 + PF_AHEAD * nb) * row_bytes : 0;
            for (int64_t m0 = 0; m0 < M; m0 += G) {
                int rows = (M - m0) < G ? (int)(M - m0) : G;
                fns[rows](x + m0 * K, K, wr, nn, bias, n0, y + m0 * N, N, K, row_bytes, m0 == 0 ? pf : 0);
            }
        }
        if (buf) _mm_free(buf);
    }
    return failed ? -2 : 0;
}
