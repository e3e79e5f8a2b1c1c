/* specdec's row-invariant attention for the engine's CPU forwards: out = softmax(q k^T * scale + mask) v.
 *
 * Why: a plain decoding step (one query) and a tree forward (N queries) went through different SDPA kernels,
 * whose inner GEMMs take different paths for different query counts. In fp32 that moves logits by ~1e-6 (near-ties
 * only); in bf16/fp16 the output is rounded to 8 or 11 bits and a tree node's logits differ visibly from the plain
 * step's, so speculative output left plain decoding on most prompts. Here every query row is computed on its own,
 * in one fixed order (dot products as 16-lane fp32 partial sums over the head dimension and a fixed reduction;
 * softmax and the weighted sum of values over the keys in order), whatever the number of queries: a tree node's
 * attention is bit-identical to a plain step's. Inputs of any of fp32 / bf16 / fp16 are widened to fp32 exactly;
 * the output is fp32 (the caller rounds it to the model's dtype).
 *
 * Layout: q [B, Hq, N, D], k and v [B, Hkv, S, D] with arbitrary strides in elements (the last dimension
 * contiguous); mask fp32 [B or 1, N, S] contiguous or NULL (additive; an entry below -1e30 hides the key); out fp32
 * [B, N, Hq, D] contiguous. Query head h reads key/value head h / (Hq / Hkv).
 *
 * Built at first use by specdec/native.py (gcc -O3 -march=native -fopenmp) and called through ctypes. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

#define MAXD 512

static inline __m512 widen(int kind, const void *p, int64_t off, __mmask16 mask) {
    if (kind == 0) return _mm512_maskz_loadu_ps(mask, (const float *)p + off);
    __m256i raw = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + off);
    if (kind == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    return _mm512_cvtph_ps(raw);
}

int specdec_attention(int kind, const void *q, const void *k, const void *v, const float *mask, float *out,
                      int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t S, int64_t D, const int64_t *qs,
                      const int64_t *ks, const int64_t *vs, int64_t mask_b, float scale, int threads) {
    if (kind < 0 || kind > 2 || D > MAXD || D < 1 || Hkv < 1 || Hq % Hkv) return -1;
    int64_t group = Hq / Hkv, items = B * Hq * N, dv = (D + 15) / 16;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *w = (float *)malloc((size_t)(2 * S + 32) * sizeof(float));
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!w) continue;
            int64_t b = it / (Hq * N), h = (it / N) % Hq, i = it % N, kh = h / group;
            __m512 qv[MAXD / 16];
            for (int64_t c = 0; c < dv; c++) {
                __mmask16 mk = (c + 1) * 16 <= D ? (__mmask16)0xFFFF : (__mmask16)((1u << (D % 16)) - 1u);
                qv[c] = _mm512_mul_ps(widen(kind, q, b * qs[0] + h * qs[1] + i * qs[2] + c * 16, mk), _mm512_set1_ps(scale));
            }
            const float *mrow = mask ? mask + b * mask_b + i * S : 0;
            float top = -INFINITY;
            for (int64_t j = 0; j < S; j++) {
                if (mrow && mrow[j] < -1e30f) {
                    w[j] = -INFINITY;
                    continue;
                }
                __m512 acc = _mm512_setzero_ps();
                int64_t base = b * ks[0] + kh * ks[1] + j * ks[2];
                for (int64_t c = 0; c < dv; c++) {
                    __mmask16 mk = (c + 1) * 16 <= D ? (__mmask16)0xFFFF : (__mmask16)((1u << (D % 16)) - 1u);
                    acc = _mm512_fmadd_ps(qv[c], widen(kind, k, base + c * 16, mk), acc);
                }
                float s = _mm512_reduce_add_ps(acc) + (mrow ? mrow[j] : 0.0f);
                w[j] = s;
                if (s > top) top = s;
            }
            /* weights exp(s - top), 16 keys at a time; hidden keys give exactly 0. The visible weights are also
             * packed in key order (compress store) and summed from there: a visible key's lane in the sum is its
             * rank among the visible keys, the same in a tree forward (ancestors at tree indices) as in a plain
             * step (the same keys at consecutive positions). */
            __m512 tv = _mm512_set1_ps(top), sumv = _mm512_setzero_ps();
            float *packed = w + S + 16;
            int64_t live_n = 0;
            for (int64_t j = 0; j < S; j += 16) {
                __mmask16 mk = j + 16 <= S ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - j)) - 1u);
                __m512 s = _mm512_maskz_loadu_ps(mk, w + j);
                __mmask16 live = _mm512_mask_cmp_ps_mask(mk, s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, tv)));
                _mm512_mask_storeu_ps(w + j, mk, e);
                _mm512_mask_compressstoreu_ps(packed + live_n, live, e);
                live_n += __builtin_popcount((unsigned)live);
            }
            for (int64_t j = 0; j < live_n; j += 16) {
                __mmask16 mk = j + 16 <= live_n ? (__mmask16)0xFFFF : (__mmask16)((1u << (live_n - j)) - 1u);
                sumv = _mm512_add_ps(sumv, _mm512_maskz_loadu_ps(mk, packed + j));
            }
            float inv = 1.0f / _mm512_reduce_add_ps(sumv);
            __m512 acc[MAXD / 16];
            for (int64_t c = 0; c < dv; c++) acc[c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < S; j++) {
                if (w[j] == 0.0f) continue;
                __m512 pj = _mm512_set1_ps(w[j] * inv);
                int64_t base = b * vs[0] + kh * vs[1] + j * vs[2];
                for (int64_t c = 0; c < dv; c++) {
                    __mmask16 mk = (c + 1) * 16 <= D ? (__mmask16)0xFFFF : (__mmask16)((1u << (D % 16)) - 1u);
                    acc[c] = _mm512_fmadd_ps(pj, widen(kind, v, base + c * 16, mk), acc[c]);
                }
            }
            float *o = out + ((b * N + i) * Hq + h) * D;
            for (int64_t c = 0; c < dv; c++) {
                __mmask16 mk = (c + 1) * 16 <= D ? (__mmask16)0xFFFF : (__mmask16)((1u << (D % 16)) - 1u);
                _mm512_mask_storeu_ps(o + c * 16, mk, acc[c]);
            }
        }
        free(w);
    }
    return failed ? -2 : 0;
}
