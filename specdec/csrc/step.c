/* specdec's lean decoder forward: a whole llama-style decoder stack in one native call, for the engine's fp32 CPU
 * decode forwards (a plain step, or B rows of token trees).
 *
 * Why: with the weights streamed by the own kernels (rows.c, quant.c) a plain step of a 30-layer model spent about
 * half its time outside the multiplies: ~1,500 aten ops and the Python of the modeling code around them, each a few
 * microseconds whatever its size. Here the layers run back to back in C: RMSNorm, q/k/v, rotary embedding, the new
 * keys/values written into the engine's KV cache, attention over each row's cache and tree, o, the SiLU MLP and the
 * residuals. The multiplies and the attention are the same native kernels the engine already uses (their addresses
 * are handed in), so a row's result never depends on the other rows: a tree node gets bit for bit what a plain step
 * at its place would get.
 *
 * The arithmetic outside the kernels follows HF's modeling code (the rotary embedding with the same products and
 * sums, no fused multiply-add: this file is compiled without FP contraction); the SiLU uses exp16 (vecmath.h), so
 * the stack agrees with HF's forward up to float rounding (specdec/lean.py checks it on the model when prepared).
 *
 * Built at first use by specdec/native.py and called through ctypes from specdec/lean.py, which describes the model
 * in one int64 array (layout below) and keeps every tensor it points to alive. */
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rope.h"
#include "vecmath.h"

typedef int (*quant_fn)(int, const float *, const uint8_t *, const float *, float *, int64_t, int64_t, int64_t, int);
typedef int (*rows_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, int64_t, int);
typedef int (*attn_fn)(int, const void *, const void *, const void *, const float *, float *, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, const int64_t *, const int64_t *, const int64_t *, int64_t, float, int);
typedef int (*norm_fn)(const float *, const float *, float *, int64_t, int64_t, int64_t, float);

/* The model description (int64 each; pointers as integers, floats as their 32-bit patterns):
 *   header: layers, hidden, q heads, kv heads, head dim, intermediate, vocab, quant_linear, rows_linear, attention,
 *           rmsnorm, final norm weight, final norm eps, attention scale, then the LM head as one linear (6 fields)
 *   per layer: input norm weight, its eps, post-attention norm weight, its eps, then q, k, v, o, gate, up, down
 *   a linear: kind (0 quantized blocks, 1 fp32 weight), block format, weight or blocks, bias (0: none), N, K */
enum { D_LAYERS, D_HIDDEN, D_HQ, D_HK, D_HEAD, D_INTER, D_VOCAB, D_QUANT, D_ROWS, D_ATTN, D_NORM, D_FNORM, D_FEPS,
       D_SCALE, D_LMHEAD, D_FIRST_LAYER = D_LMHEAD + 6 };
#define LIN 6
#define PER_LAYER (4 + 7 * LIN)
enum { L_Q, L_K, L_V, L_O, L_GATE, L_UP, L_DOWN };
#define MAXD 512

static inline float fbits(int64_t v) {
    int32_t i = (int32_t)v;
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline void *ptr(int64_t v) { return (void *)(intptr_t)v; }

/* kern: the quantized and the fp32 linear kernels' addresses, side by side (a description's D_QUANT/D_ROWS or
 * E_QUANT/E_ROWS fields) */
static int linear(const int64_t *kern, const int64_t *lin, const float *x, float *y, int64_t m, int threads) {
    const float *bias = (const float *)ptr(lin[3]);
    if (lin[0] == 0)
        return ((quant_fn)ptr(kern[0]))((int)lin[1], x, (const uint8_t *)ptr(lin[2]), bias, y, m, lin[4], lin[5], threads);
    return ((rows_fn)ptr(kern[1]))(x, (const float *)ptr(lin[2]), bias, y, m, lin[4], lin[5], threads);
}

static inline void add_into(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) x[i] = x[i] + y[i];
}

/* g = silu(g) * u = g / (1 + exp(-g)) * u */
static inline void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    __m512 one = _mm512_set1_ps(1.0f);
    for (; i < n; i += 16) {
        __mmask16 mk = i + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 gv = _mm512_maskz_loadu_ps(mk, g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 r = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(mk, u + i));
        _mm512_mask_storeu_ps(g + i, mk, r);
    }
}

static void tap(const int64_t *taps, int64_t ntaps, int64_t index, const float *x, float *out, int64_t m, int64_t h) {
    for (int64_t t = 0; t < ntaps; t++)
        if (taps[t] == index)
            for (int64_t r = 0; r < m; r++) memcpy(out + (r * ntaps + t) * h, x + r * h, (size_t)h * sizeof(float));
}

/* One forward over B rows of N nodes each (M = B * N), written after each row's committed length.
 *
 *   x        [M, hidden] the nodes' input embeddings (overwritten)
 *   lengths  [B] each row's committed cache length; node i of row b sits at cache position lengths[b] + i
 *   anc      [B, N, N] uint8 tree visibility (node i sees node j), or NULL when N == 1
 *   pos      [M] the nodes' positions (rows of the cos/sin tables [*, head dim])
 *   kc, vc   per layer, the cache buffers [R, kv heads, cap, head dim] (row b at b * kv heads * cap * head dim)
 *   taps     [ntaps] HF hidden-state indices (0 the embeddings, i the output of layer i - 1, layers: after the final
 *            norm) copied into tap_out [M, ntaps * hidden]
 *   logits   [M, vocab]
 * Returns 0, or the first non-zero code of a kernel, or -3 when scratch memory could not be allocated. */
int specdec_lean_forward(const int64_t *d, float *x, int64_t B, int64_t N, const int64_t *lengths, const uint8_t *anc,
                         const int64_t *pos, const float *cos_t, const float *sin_t, const int64_t *kc, const int64_t *vc,
                         int64_t cap, const int64_t *taps, int64_t ntaps, float *tap_out, float *logits, int threads) {
    int64_t L = d[D_LAYERS], H = d[D_HIDDEN], hq = d[D_HQ], hk = d[D_HK], dh = d[D_HEAD], I = d[D_INTER];
    int64_t M = B * N, qw = hq * dh, kw = hk * dh, smax = 0;
    if (dh > MAXD || dh % 2 || hk < 1 || hq % hk) return -1;
    for (int64_t b = 0; b < B; b++)
        if (lengths[b] + N > smax) smax = lengths[b] + N;
    size_t floats = (size_t)(M * H + M * qw + 2 * M * kw + M * qw + M * H + 2 * M * I + N * smax + dh);
    float *scratch = (float *)malloc(floats * sizeof(float));
    if (!scratch) return -3;
    float *xn = scratch, *q = xn + M * H, *k = q + M * qw, *v = k + M * kw, *att = v + M * kw, *o = att + M * qw;
    float *g = o + M * H, *u = g + M * I, *mask = u + M * I, *tmp = mask + N * smax;
    norm_fn norm = (norm_fn)ptr(d[D_NORM]);
    attn_fn attend = (attn_fn)ptr(d[D_ATTN]);
    float scale = fbits(d[D_SCALE]);
    int rc = 0;
    tap(taps, ntaps, 0, x, tap_out, M, H);
    for (int64_t l = 0; l < L && !rc; l++) {
        const int64_t *ld = d + D_FIRST_LAYER + l * PER_LAYER, *lin = ld + 4;
        float *kl = (float *)ptr(kc[l]), *vl = (float *)ptr(vc[l]);
        norm(x, (const float *)ptr(ld[0]), xn, M, H, H, fbits(ld[1]));
        if ((rc = linear(d + D_QUANT, lin + L_Q * LIN, xn, q, M, threads))) break;
        if ((rc = linear(d + D_QUANT, lin + L_K * LIN, xn, k, M, threads))) break;
        if ((rc = linear(d + D_QUANT, lin + L_V * LIN, xn, v, M, threads))) break;
        for (int64_t m = 0; m < M; m++) {
            int64_t b = m / N, i = m % N, at = lengths[b] + i;
            const float *c = cos_t + pos[m] * dh, *s = sin_t + pos[m] * dh;
            for (int64_t h = 0; h < hq; h++) {
                memcpy(tmp, q + m * qw + h * dh, (size_t)dh * sizeof(float));
                rope_head(tmp, c, s, q + m * qw + h * dh, dh);
            }
            for (int64_t h = 0; h < hk; h++) {
                int64_t off = ((b * hk + h) * cap + at) * dh;
                rope_head(k + m * kw + h * dh, c, s, kl + off, dh);
                memcpy(vl + off, v + m * kw + h * dh, (size_t)dh * sizeof(float));
            }
        }
        for (int64_t b = 0; b < B && !rc; b++) {
            int64_t S = lengths[b] + N;
            const float *mk = 0;
            if (N > 1) { /* the committed prefix is visible to every node; within the tree, a node's ancestors */
                for (int64_t i = 0; i < N; i++) {
                    float *row = mask + i * S;
                    memset(row, 0, (size_t)lengths[b] * sizeof(float));
                    for (int64_t j = 0; j < N; j++) row[lengths[b] + j] = anc[(b * N + i) * N + j] ? 0.0f : -INFINITY;
                }
                mk = mask;
            }
            int64_t qs[3] = {N * qw, dh, qw}, ks[3] = {hk * cap * dh, cap * dh, dh};
            rc = attend(0, q + b * N * qw, kl + b * hk * cap * dh, vl + b * hk * cap * dh, mk, att + b * N * qw, 1, hq, hk, N,
                        S, dh, qs, ks, ks, 0, scale, threads);
        }
        if (rc) break;
        if ((rc = linear(d + D_QUANT, lin + L_O * LIN, att, o, M, threads))) break;
        add_into(x, o, M * H);
        norm(x, (const float *)ptr(ld[2]), xn, M, H, H, fbits(ld[3]));
        if ((rc = linear(d + D_QUANT, lin + L_GATE * LIN, xn, g, M, threads))) break;
        if ((rc = linear(d + D_QUANT, lin + L_UP * LIN, xn, u, M, threads))) break;
        silu_mul(g, u, M * I);
        if ((rc = linear(d + D_QUANT, lin + L_DOWN * LIN, g, o, M, threads))) break;
        add_into(x, o, M * H);
        if (l + 1 < L) tap(taps, ntaps, l + 1, x, tap_out, M, H);
    }
    if (!rc) {
        norm(x, (const float *)ptr(d[D_FNORM]), xn, M, H, H, fbits(d[D_FEPS]));
        tap(taps, ntaps, L, xn, tap_out, M, H);
        rc = linear(d + D_QUANT, d + D_LMHEAD, xn, logits, M, threads);
    }
    free(scratch);
    return rc;
}

/* One EAGLE draft layer (specdec/drafters/eagle.py) over M nodes, for a drafter's own forwards: the input pairs
 * each node's token embedding with its state, u = [RMSNorm(e); RMSNorm(s)] (2H wide), q/k/v from u with the rotary
 * embedding at pos, the new keys/values written into the drafter's cache [kv heads, cap, head dim] at entries
 * at .. at + M - 1, attention over entries 0 .. at + M - 1 (entries below `shared` visible to every node, the
 * others where vis [M, at + M - shared] is non-zero), o, the residual from s, the SiLU MLP; h [M, H] the layer's
 * output and logits [M, V'] over the draft vocabulary for the last `logit_rows` nodes (written from logits' start).
 * Drafts are only proposals the target verifies, so nothing here has to match another code bit for bit.
 *
 * The description (int64 each): hidden, q heads, kv heads, head dim, intermediate, draft vocab, quant_linear,
 * rows_linear, attention, rmsnorm, then norm weight and eps for the embedding, the state, the MLP and the output,
 * the attention scale, and the linears q, k, v, o, gate, up, down, head (LIN fields each, as above). */
enum { E_HIDDEN, E_HQ, E_HK, E_HEAD, E_INTER, E_VOCAB, E_QUANT, E_ROWS, E_ATTN, E_NORM, E_NORM_E, E_EPS_E, E_NORM_S,
       E_EPS_S, E_NORM_MLP, E_EPS_MLP, E_NORM_OUT, E_EPS_OUT, E_SCALE, E_LINEARS };
enum { EL_Q, EL_K, EL_V, EL_O, EL_GATE, EL_UP, EL_DOWN, EL_HEAD };

int specdec_eagle_layer(const int64_t *d, const float *e, const float *s, int64_t M, const int64_t *pos,
                        const float *cos_t, const float *sin_t, float *kc, float *vc, int64_t cap, int64_t at,
                        int64_t shared, const uint8_t *vis, float *h, int64_t logit_rows, float *logits, int threads) {
    int64_t H = d[E_HIDDEN], hq = d[E_HQ], hk = d[E_HK], dh = d[E_HEAD], I = d[E_INTER];
    int64_t qw = hq * dh, kw = hk * dh, S = at + M, E = S - shared;
    const int64_t *lin = d + E_LINEARS;
    if (dh > MAXD || dh % 2 || hk < 1 || hq % hk || at + M > cap || shared > at || logit_rows > M || logit_rows < 0)
        return -1;
    size_t floats = (size_t)(2 * M * H + M * qw + 2 * M * kw + M * qw + M * H + 2 * M * I + M * S + dh);
    float *scratch = (float *)malloc(floats * sizeof(float));
    if (!scratch) return -3;
    float *u = scratch, *q = u + 2 * M * H, *k = q + M * qw, *v = k + M * kw, *att = v + M * kw, *o = att + M * qw;
    float *g = o + M * H, *up = g + M * I, *mask = up + M * I, *tmp = mask + M * S;
    norm_fn norm = (norm_fn)ptr(d[E_NORM]);
    attn_fn attend = (attn_fn)ptr(d[E_ATTN]);
    int rc = 0;
    for (int64_t m = 0; m < M; m++) {
        norm(e + m * H, (const float *)ptr(d[E_NORM_E]), u + m * 2 * H, 1, H, H, fbits(d[E_EPS_E]));
        norm(s + m * H, (const float *)ptr(d[E_NORM_S]), u + m * 2 * H + H, 1, H, H, fbits(d[E_EPS_S]));
    }
    const int64_t *kd = d + E_QUANT; /* the two linear kernels */
    if ((rc = linear(kd, lin + EL_Q * LIN, u, q, M, threads))) goto done;
    if ((rc = linear(kd, lin + EL_K * LIN, u, k, M, threads))) goto done;
    if ((rc = linear(kd, lin + EL_V * LIN, u, v, M, threads))) goto done;
    for (int64_t m = 0; m < M; m++) {
        const float *c = cos_t + pos[m] * dh, *sn = sin_t + pos[m] * dh;
        for (int64_t hh = 0; hh < hq; hh++) {
            memcpy(tmp, q + m * qw + hh * dh, (size_t)dh * sizeof(float));
            rope_head(tmp, c, sn, q + m * qw + hh * dh, dh);
        }
        for (int64_t hh = 0; hh < hk; hh++) {
            int64_t off = (hh * cap + at + m) * dh;
            rope_head(k + m * kw + hh * dh, c, sn, kc + off, dh);
            memcpy(vc + off, v + m * kw + hh * dh, (size_t)dh * sizeof(float));
        }
        float *row = mask + m * S;
        memset(row, 0, (size_t)shared * sizeof(float));
        for (int64_t j = 0; j < E; j++) row[shared + j] = vis[m * E + j] ? 0.0f : -INFINITY;
    }
    {
        int64_t qs[3] = {M * qw, dh, qw}, ks[3] = {hk * cap * dh, cap * dh, dh};
        if ((rc = attend(0, q, kc, vc, mask, att, 1, hq, hk, M, S, dh, qs, ks, ks, 0, fbits(d[E_SCALE]), threads)))
            goto done;
    }
    if ((rc = linear(kd, lin + EL_O * LIN, att, o, M, threads))) goto done;
    memcpy(h, s, (size_t)(M * H) * sizeof(float));
    add_into(h, o, M * H);
    norm(h, (const float *)ptr(d[E_NORM_MLP]), u, M, H, H, fbits(d[E_EPS_MLP]));
    if ((rc = linear(kd, lin + EL_GATE * LIN, u, g, M, threads))) goto done;
    if ((rc = linear(kd, lin + EL_UP * LIN, u, up, M, threads))) goto done;
    silu_mul(g, up, M * I);
    if ((rc = linear(kd, lin + EL_DOWN * LIN, g, o, M, threads))) goto done;
    add_into(h, o, M * H);
    if (logit_rows) {
        norm(h + (M - logit_rows) * H, (const float *)ptr(d[E_NORM_OUT]), u, logit_rows, H, H, fbits(d[E_EPS_OUT]));
        rc = linear(kd, lin + EL_HEAD * LIN, u, logits, logit_rows, threads);
    }
done:
    free(scratch);
    return rc;
}
