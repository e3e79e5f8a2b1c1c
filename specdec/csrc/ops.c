/* Small fused ops for the engine's fp32 CPU forwards: fewer torch dispatches per decoder layer.
 *
 * A plain decoding step of a 30-layer model runs ~1,500 aten ops; each costs microseconds of dispatch whatever its
 * size, and at one token per step that is a third of the step. Two per-layer groups are cheap to fuse:
 *
 *  - RMSNorm (HF's: x * rsqrt(mean(x^2) + eps), then times the weight; ~8 ops): one pass per row, sums of squares
 *    as 16-lane fp32 partial sums in a fixed order (row-invariant: a row's result never depends on the others);
 *  - rotary position embedding on q and k (HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin; ~14 ops):
 *    the same products and sum per element, each rounded as torch rounds them (no fused multiply-add: this file
 *    is compiled without FP contraction), so the result is bit-identical to HF's.
 *
 * Built at first use by specdec/native.py and called through ctypes. */
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "rope.h"

/* out[r, :] = w * (x[r, :] * (1 / sqrt(sum(x[r, :]^2) / H + eps))); x rows at x_stride, out contiguous [rows, H]. */
int specdec_rmsnorm(const float *x, const float *w, float *out, int64_t rows, int64_t h, int64_t x_stride, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * h;
        __m512 acc = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= h; i += 16) {
            __m512 v = _mm512_loadu_ps(xr + i);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        if (i < h) {
            __mmask16 m = (__mmask16)((1u << (h - i)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        float mean = _mm512_reduce_add_ps(acc) / (float)h;
        float inv = 1.0f / sqrtf(mean + eps);
        __m512 s = _mm512_set1_ps(inv);
        for (i = 0; i + 16 <= h; i += 16)
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(xr + i), s)));
        if (i < h) {
            __mmask16 m = (__mmask16)((1u << (h - i)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), s));
            _mm512_mask_storeu_ps(o + i, m, v);
        }
    }
    return 0;
}

/* One tensor [B, H, T, D] (strides sb, sh, st in elements, the last dimension contiguous) into out [B, H, T, D]
 * contiguous: out = x * cos + rotate_half(x) * sin, cos/sin [B, T, D] at strides cb, ct. */
static void rotate(const float *x, const float *cs, const float *sn, float *out, int64_t b, int64_t nh, int64_t t,
                   int64_t d, int64_t sb, int64_t sh, int64_t st, int64_t cb, int64_t ct) {
    for (int64_t i = 0; i < b; i++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t p = 0; p < t; p++)
                rope_head(x + i * sb + h * sh + p * st, cs + i * cb + p * ct, sn + i * cb + p * ct,
                          out + ((i * nh + h) * t + p) * d, d);
}

int specdec_rotary(const float *q, const float *k, const float *cs, const float *sn, float *qo, float *ko, int64_t b,
                   int64_t hq, int64_t hk, int64_t t, int64_t d, const int64_t *qs, const int64_t *ks, int64_t cb,
                   int64_t ct) {
    if (d % 2) return 1;
    rotate(q, cs, sn, qo, b, hq, t, d, qs[0], qs[1], qs[2], cb, ct);
    rotate(k, cs, sn, ko, b, hk, t, d, ks[0], ks[1], ks[2], cb, ct);
    return 0;
}
