/* Elementwise kernels of the compiled runs: a residual Add of two tensors and a ReLU; an Add,
 * Sub, Mul, Div or Pow of a tensor and a tensor of its shape or a scalar. */
#ifndef DYVEDEEP_DV_ELTWISE_H
#define DYVEDEEP_DV_ELTWISE_H
#include <math.h>

/* out[i] = a[i] + b[i] (b == NULL: a[i]), then max(., 0) where relu, for i in [begin, end).
 * A negative value becomes 0 and anything else (-0.0, NaN) stays, as the Python path's
 * relu_inplace does, so either path gives the same bits. */
static inline void dv_add_relu(const float *a, const float *b, float *out, long begin, long end, int relu)
{
    if (b != NULL) {
        if (relu)
            for (long i = begin; i < end; ++i) { float v = a[i] + b[i]; out[i] = v < 0.0f ? 0.0f : v; }
        else
            for (long i = begin; i < end; ++i) out[i] = a[i] + b[i];
    } else {
        for (long i = begin; i < end; ++i) { float v = a[i]; out[i] = (relu && v < 0.0f) ? 0.0f : v; }
    }
}

enum { DV_ELT_ADD, DV_ELT_SUB, DV_ELT_MUL, DV_ELT_DIV, DV_ELT_POW };

static inline float dv_elt_apply(int op, float u, float v)
{
    switch (op) {
    case DV_ELT_ADD: return u + v;
    case DV_ELT_SUB: return u - v;
    case DV_ELT_MUL: return u * v;
    case DV_ELT_DIV: return u / v;
    default: return powf(u, v);
    }
}

/* out[i] = a[i] op b[i] for i in [begin, end); b == NULL: a[i] op scalar, or scalar op a[i]
 * when scalar_first. One IEEE operation (powf for Pow) per element: the Python path calls the
 * same kernel (K.eltwise), so either path gives the same bits. The op is switched on per
 * element: GCC unswitches the loop. */
static inline void dv_eltwise_op(int op, const float *a, const float *b, float scalar, int scalar_first, float *out,
                                 long begin, long end)
{
    if (op == DV_ELT_POW && b == NULL && !scalar_first && (scalar == 0.75f || scalar == -0.75f)) {
        /* x^0.75 or x^-0.75 (an LRN's (k + a/n sum)^beta with Caffe's beta): sqrt(x) sqrt(sqrt(x))
         * or its inverse, whole vectors of IEEE square roots in place of a powf call per float;
         * within 3 ulp of powf, and the lanes and the tail give the same bits
         * (docs/notes/2026-12-05-eltwise-steps.md) */
        int inverse = scalar < 0.0f;
        long i = begin;
        for (; i + DV_VW <= end; i += DV_VW) {
            dv_vn x, s;
            memcpy(&x, a + i, sizeof x);
            s = dv_sqrtn(x);
            x = s * dv_sqrtn(s);
            if (inverse) x = ((dv_vn){0} + 1.0f) / x;
            memcpy(out + i, &x, sizeof x);
        }
        for (; i < end; ++i) {
            float s = __builtin_sqrtf(a[i]), p = s * __builtin_sqrtf(s);
            out[i] = inverse ? 1.0f / p : p;
        }
        return;
    }
    if (b != NULL)
        for (long i = begin; i < end; ++i) out[i] = dv_elt_apply(op, a[i], b[i]);
    else if (scalar_first)
        for (long i = begin; i < end; ++i) out[i] = dv_elt_apply(op, scalar, a[i]);
    else
        for (long i = begin; i < end; ++i) out[i] = dv_elt_apply(op, a[i], scalar);
}

#endif
