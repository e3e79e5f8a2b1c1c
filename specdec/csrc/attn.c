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

/* Queries that read the same key/value head (a GQA group's heads, a tree's nodes) are computed together, up to
 * TQ at a time: each key and value vector is loaded once for the tile instead of once per query head and node,
 * and the tile's scaled queries and accumulators stay in registers (a head dimension of 64 or 128 is unrolled at
 * compile time). Each query keeps its own accumulators and goes through the same operations in the same order as
 * alone, so tiling changes no bit of any query's result. A (row, key/value head) pair's queries are split into
 * `blocks` pieces when there are too few pairs to share evenly between the threads. */
#define TQ 4

static int64_t query_blocks(int64_t pairs, int64_t per_pair, int threads) {
    /* the split whose busiest thread (static schedule) runs the fewest tiles; ties: the fewer blocks (each block
     * reads its key/value head again) */
    int64_t best = 1, best_load = -1;
    for (int64_t m = 1; m <= threads && m <= per_pair; m++) {
        int64_t qb = (per_pair + m - 1) / m, items = pairs * m, chunk = (items + threads - 1) / threads, load = 0;
        for (int64_t start = 0; start < items; start += chunk) {
            int64_t tiles = 0;
            for (int64_t it = start; it < start + chunk && it < items; it++) {
                int64_t first = (it % m) * qb, n = per_pair - first < qb ? per_pair - first : qb;
                tiles += n > 0 ? (n + TQ - 1) / TQ : 0;
            }
            if (tiles > load) load = tiles;
        }
        if (best_load < 0 || load < best_load) best = m, best_load = load;
    }
    return best;
}

typedef struct {
    int kind;
    const void *q, *k, *v;
    const float *mask;
    float *out;
    int64_t Hq, N, S, D, group;
    const int64_t *qs, *ks, *vs;
    int64_t mask_b;
    float scale;
} attn_args;

/* One tile of nq <= TQ queries (t0 .. t0 + nq - 1 of key/value head kh of row b; query t is head kh * group + t / N,
 * node t % N). w: TQ rows of 2S + 32 floats (scores, then the packed weights). */
static inline __attribute__((always_inline)) void tile(const attn_args *a, int64_t b, int64_t kh, int64_t t0, int nq,
                                                       float *w, const int64_t dv) {
    const int64_t S = a->S, N = a->N, D = a->D, per_q = 2 * S + 32;
    __mmask16 tail = D % 16 ? (__mmask16)((1u << (D % 16)) - 1u) : (__mmask16)0xFFFF;
    __m512 qv[TQ][dv], acc[TQ][dv], kv[dv];
    const float *mrows[TQ];
    float top[TQ], inv[TQ];
    for (int t = 0; t < TQ; t++) {
        int64_t tt = t < nq ? t0 + t : t0, h = kh * a->group + tt / N, i = tt % N;
        for (int64_t c = 0; c < dv; c++)
            qv[t][c] = _mm512_mul_ps(widen(a->kind, a->q, b * a->qs[0] + h * a->qs[1] + i * a->qs[2] + c * 16, c + 1 < dv ? 0xFFFF : tail),
                                     _mm512_set1_ps(a->scale));
        mrows[t] = a->mask ? a->mask + b * a->mask_b + i * S : 0;
        top[t] = -INFINITY;
    }
    for (int64_t j = 0; j < S; j++) {
        int64_t base = b * a->ks[0] + kh * a->ks[1] + j * a->ks[2];
        for (int64_t c = 0; c < dv; c++) kv[c] = widen(a->kind, a->k, base + c * 16, c + 1 < dv ? 0xFFFF : tail);
        for (int t = 0; t < TQ; t++) {
            if (t >= nq) break;
            float *wt = w + t * per_q;
            const float *mrow = mrows[t];
            if (mrow && mrow[j] < -1e30f) {
                wt[j] = -INFINITY;
                continue;
            }
            __m512 s16 = _mm512_setzero_ps();
            for (int64_t c = 0; c < dv; c++) s16 = _mm512_fmadd_ps(qv[t][c], kv[c], s16);
            float s = _mm512_reduce_add_ps(s16) + (mrow ? mrow[j] : 0.0f);
            wt[j] = s;
            if (s > top[t]) top[t] = s;
        }
    }
    /* weights exp(s - top), 16 keys at a time; hidden keys give exactly 0. The visible weights are also packed in
     * key order (compress store) and summed from there: a visible key's lane in the sum is its rank among the
     * visible keys, the same in a tree forward (ancestors at tree indices) as in a plain step (the same keys at
     * consecutive positions). */
    for (int t = 0; t < nq; t++) {
        float *wt = w + t * per_q, *packed = wt + S + 16;
        __m512 tv = _mm512_set1_ps(top[t]), sumv = _mm512_setzero_ps();
        int64_t live_n = 0;
        for (int64_t j = 0; j < S; j += 16) {
            __mmask16 mk = j + 16 <= S ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - j)) - 1u);
            __m512 s = _mm512_maskz_loadu_ps(mk, wt + j);
            __mmask16 live = _mm512_mask_cmp_ps_mask(mk, s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, tv)));
            _mm512_mask_storeu_ps(wt + j, mk, e);
            _mm512_mask_compressstoreu_ps(packed + live_n, live, e);
            live_n += __builtin_popcount((unsigned)live);
        }
        for (int64_t j = 0; j < live_n; j += 16) {
            __mmask16 mk = j + 16 <= live_n ? (__mmask16)0xFFFF : (__mmask16)((1u << (live_n - j)) - 1u);
            sumv = _mm512_add_ps(sumv, _mm512_maskz_loadu_ps(mk, packed + j));
        }
        inv[t] = 1.0f / _mm512_reduce_add_ps(sumv);
    }
    for (int t = 0; t < TQ; t++)
        for (int64_t c = 0; c < dv; c++) acc[t][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j++) {
        int64_t base = b * a->vs[0] + kh * a->vs[1] + j * a->vs[2];
        for (int64_t c = 0; c < dv; c++) kv[c] = widen(a->kind, a->v, base + c * 16, c + 1 < dv ? 0xFFFF : tail);
        for (int t = 0; t < TQ; t++) {
            if (t >= nq) break;
            float wj = w[t * per_q + j];
            if (wj == 0.0f) continue;
            __m512 pj = _mm512_set1_ps(wj * inv[t]);
            for (int64_t c = 0; c < dv; c++) acc[t][c] = _mm512_fmadd_ps(pj, kv[c], acc[t][c]);
        }
    }
    for (int t = 0; t < nq; t++) {
        int64_t h = kh * a->group + (t0 + t) / N, i = (t0 + t) % N;
        float *o = a->out + ((b * N + i) * a->Hq + h) * D;
        for (int64_t c = 0; c < dv; c++) _mm512_mask_storeu_ps(o + c * 16, c + 1 < dv ? 0xFFFF : tail, acc[t][c]);
    }
}

static void tile_4(const attn_args *a, int64_t b, int64_t kh, int64_t t0, int nq, float *w) { tile(a, b, kh, t0, nq, w, 4); }
static void tile_8(const attn_args *a, int64_t b, int64_t kh, int64_t t0, int nq, float *w) { tile(a, b, kh, t0, nq, w, 8); }
static void tile_n(const attn_args *a, int64_t b, int64_t kh, int64_t t0, int nq, float *w, int64_t dv) { tile(a, b, kh, t0, nq, w, dv); }

int specdec_attention(int kind, const void *q, const void *k, const void *v, const float *mask, float *out,
                      int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t S, int64_t D, const int64_t *qs,
                      const int64_t *ks, const int64_t *vs, int64_t mask_b, float scale, int threads) {
    if (kind < 0 || kind > 2 || D > MAXD || D < 1 || Hkv < 1 || Hq % Hkv) return -1;
    int64_t group = Hq / Hkv, dv = (D + 15) / 16, per_pair = group * N;
    int64_t blocks = query_blocks(B * Hkv, per_pair, threads), qb = (per_pair + blocks - 1) / blocks;
    int64_t items = B * Hkv * blocks;
    attn_args a = {kind, q, k, v, mask, out, Hq, N, S, D, group, qs, ks, vs, mask_b, scale};
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *w = (float *)malloc((size_t)TQ * (2 * S + 32) * sizeof(float));
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!w) continue;
            int64_t b = it / (Hkv * blocks), kh = (it / blocks) % Hkv, first = (it % blocks) * qb;
            int64_t last = first + qb < per_pair ? first + qb : per_pair;
            for (int64_t t0 = first; t0 < last; t0 += TQ) {
                int nq = (int)(last - t0 < TQ ? last - t0 : TQ);
                if (dv == 4) tile_4(&a, b, kh, t0, nq, w);
                else if (dv == 8) tile_8(&a, b, kh, t0, nq, w);
                else tile_n(&a, b, kh, t0, nq, w, dv);
            }
        }
        free(w);
    }
    return failed ? -2 : 0;
}
