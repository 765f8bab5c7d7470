/* Elementwise kernels of the compiled runs: a residual Add of two tensors and a ReLU. */
#ifndef DYVEDEEP_DV_ELTWISE_H
#define DYVEDEEP_DV_ELTWISE_H

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

#endif
