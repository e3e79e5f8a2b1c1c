/* HF's rotary embedding for one head, shared by specdec's native files that compute it (ops.c, step.c): out =
 * x * cos + rotate_half(x) * sin, each product and sum rounded as torch rounds it. The including file must be
 * compiled without FP contraction (#pragma GCC optimize("fp-contract=off")), or a fused multiply-add would round
 * differently from HF. */
#ifndef SPECDEC_ROPE_H
#define SPECDEC_ROPE_H
#include <stdint.h>

static inline void rope_head(const float *x, const float *c, const float *s, float *o, int64_t d) {
    int64_t half = d / 2;
    for (int64_t e = 0; e < half; e++) {
        float a = x[e] * c[e];
        float r = -x[e + half] * s[e];
        o[e] = a + r;
    }
    for (int64_t e = half; e < d; e++) {
        float a = x[e] * c[e];
        float r = x[e - half] * s[e];
        o[e] = a + r;
    }
}

#endif
