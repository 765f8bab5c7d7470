/* Vector micro-kernels of the engine, written with GCC/Clang vector extensions so that they
 * compile to AVX2/AVX-512 on x86-64 and to NEON on aarch64 (Raspberry Pi) alike.
 * Used from _kernels.pyx; no Python API here. */
#ifndef DYVEDEEP_SIMD_H
#define DYVEDEEP_SIMD_H

#include <string.h>

typedef float dv_v16 __attribute__((vector_size(64)));

static inline dv_v16 dv_load16(const float *p) { dv_v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void dv_store16(float *p, dv_v16 v) { memcpy(p, &v, sizeof v); }

/* Masked GEMM over a range of 16-column tiles (sampled dense-dense product):
 * out[o, j] += sum_{k<K} W[o, k] * cols[k, j] for each (o, j) with mask[o, j]. Per tile, the
 * output channels with a masked entry in it are gathered and computed eight at a time (register
 * blocking: each loaded row of cols serves eight channels); a channel with no masked entry in a
 * tile costs nothing there. `list` is scratch for O ints. Returns the outputs written. */
static long long dv_masked_gemm_tiles(const float *W, long ldw, int O, const float *cols, long ldc,
                                      const unsigned char *mask, long ldm, float *out, long ldo,
                                      int K, int N, int tile_begin, int tile_end, int *list, int relu)
{
    enum { R = 8 };  /* output channels per register block */
    long long done = 0;
    float acc[R][16];
    for (int t = tile_begin; t < tile_end; ++t) {
        int j0 = t * 16;
        int jn = N - j0 < 16 ? N - j0 : 16;
        int n = 0;
        for (int o = 0; o < O; ++o) {
            const unsigned char *m = mask + (long)o * ldm + j0;
            int any = 0;
            for (int jj = 0; jj < jn; ++jj) any |= m[jj];
            if (any) list[n++] = o;
        }
        for (int g = 0; g < n; g += R) {
            int rows = n - g < R ? n - g : R;
            const float *wr[R];
            for (int r = 0; r < R; ++r) wr[r] = W + (long)list[g + (r < rows ? r : 0)] * ldw;
            if (jn == 16) {
                dv_v16 a[R];
                for (int r = 0; r < R; ++r) a[r] = (dv_v16){0};
                const float *row = cols + j0;
                for (int k = 0; k < K; ++k, row += ldc) {
                    dv_v16 c = dv_load16(row);
                    for (int r = 0; r < R; ++r) a[r] += ((dv_v16){0} + wr[r][k]) * c;
                }
                for (int r = 0; r < R; ++r) dv_store16(acc[r], a[r]);
            } else {
                for (int r = 0; r < rows; ++r) {
                    for (int jj = 0; jj < 16; ++jj) acc[r][jj] = 0.0f;
                    const float *row = cols + j0;
                    for (int k = 0; k < K; ++k, row += ldc) {
                        float wk = wr[r][k];
                        for (int jj = 0; jj < jn; ++jj) acc[r][jj] += wk * row[jj];
                    }
                }
            }
            for (int r = 0; r < rows; ++r) {
                int o = list[g + r];
                const unsigned char *m = mask + (long)o * ldm + j0;
                float *dst = out + (long)o * ldo + j0;
                for (int jj = 0; jj < jn; ++jj) {
                    if (m[jj]) {
                        float v = dst[jj] + acc[r][jj];
                        dst[jj] = (relu && v < 0.0f) ? 0.0f : v;
                        ++done;
                    }
                }
            }
        }
    }
    return done;
}

/* SPET's second half over a range of 16-column tiles, in one pass: `out` holds the partial sums
 * (bias, SFMA constant and the leading `lead` inputs) of the active neurons (mask == NULL: all).
 * A neuron whose partial sum is < -margin stops: its output is 0. The others are finished with
 * inputs lead..K-1 (register blocks of eight channels, as dv_masked_gemm_tiles) and ReLU'd.
 * `cont` is scratch for O*16 bytes, `list` for O ints. Returns the number of stopped neurons. */
static long long dv_spet_finish_tiles(const float *W, long ldw, int O, const float *cols, long ldc,
                                      const unsigned char *mask, long ldm, float *out, long ldo,
                                      int lead, int K, int N, float margin, int relu,
                                      int tile_begin, int tile_end, int *list, unsigned char *cont)
{
    long long stopped = 0;
    for (int t = tile_begin; t < tile_end; ++t) {
        int j0 = t * 16;
        int jn = N - j0 < 16 ? N - j0 : 16;
        for (int o = 0; o < O; ++o) {
            float *v = out + (long)o * ldo + j0;
            const unsigned char *m = mask ? mask + (long)o * ldm + j0 : NULL;
            unsigned char *c = cont + (long)o * 16;
            for (int jj = 0; jj < 16; ++jj) c[jj] = 0;
            for (int jj = 0; jj < jn; ++jj) {
                if (m && !m[jj]) continue;
                if (v[jj] < -margin) { v[jj] = 0.0f; ++stopped; }
                else c[jj] = 1;
            }
        }
        /* finish the continuing neurons of this tile (a one-tile masked GEMM over lead..K-1) */
        dv_masked_gemm_tiles(W + lead, ldw, O, cols + (long)lead * ldc, ldc, cont - j0, 16, out, ldo,
                             K - lead, N, t, t + 1, list, relu);
    }
    return stopped;
}

/* im2col over every output position for one input channel `plane` (H x W): rows (ky, kx) of
 * `dst` (row stride ldc) get the input under tap (ky, kx) for all ho x wo positions; stride-1
 * rows are copied as contiguous runs. */
static void dv_im2col_plane(const float *plane, int H, int W, int kh, int kw, int sh, int sw, int pt, int pl,
                            int dh, int dw, int ho, int wo, float *dst, long ldc)
{
    for (int ky = 0; ky < kh; ++ky) {
        for (int kx = 0; kx < kw; ++kx) {
            float *row = dst + (long)(ky * kw + kx) * ldc;
            int off_x = kx * dw - pl;
            int x_lo = 0, x_hi = wo;  /* outputs whose tap is inside the input (stride-1 case) */
            if (sw == 1) {
                x_lo = off_x < 0 ? -off_x : 0;
                x_hi = W - off_x < wo ? W - off_x : wo;
                if (x_hi < x_lo) x_hi = x_lo;
            }
            for (int oy = 0; oy < ho; ++oy) {
                float *out = row + (long)oy * wo;
                int iy = oy * sh - pt + ky * dh;
                if ((unsigned)iy >= (unsigned)H) { memset(out, 0, sizeof(float) * wo); continue; }
                const float *in = plane + (long)iy * W;
                if (sw == 1) {
                    if (x_lo) memset(out, 0, sizeof(float) * x_lo);
                    if (x_hi > x_lo) memcpy(out + x_lo, in + x_lo + off_x, sizeof(float) * (x_hi - x_lo));
                    if (x_hi < wo) memset(out + x_hi, 0, sizeof(float) * (wo - x_hi));
                } else {
                    for (int ox = 0; ox < wo; ++ox) {
                        int ix = ox * sw + off_x;
                        out[ox] = (unsigned)ix < (unsigned)W ? in[ix] : 0.0f;
                    }
                }
            }
        }
    }
}

/* Max pooling of one H x W plane into ho x wo (windows clipped to the input: -inf padding). */
static void dv_maxpool_plane(const float *in, int H, int W, float *out, int ho, int wo, int kh, int kw,
                             int sh, int sw, int pt, int pl)
{
    for (int oy = 0; oy < ho; ++oy) {
        int y0 = oy * sh - pt, y1 = y0 + kh;
        if (y0 < 0) y0 = 0;
        if (y1 > H) y1 = H;
        for (int ox = 0; ox < wo; ++ox) {
            int x0 = ox * sw - pl, x1 = x0 + kw;
            if (x0 < 0) x0 = 0;
            if (x1 > W) x1 = W;
            float m = in[(long)y0 * W + x0];
            for (int iy = y0; iy < y1; ++iy) {
                const float *r = in + (long)iy * W;
                for (int ix = x0; ix < x1; ++ix) m = r[ix] > m ? r[ix] : m;
            }
            out[(long)oy * wo + ox] = m;
        }
    }
}

/* Average pooling of one plane, onnxruntime's divisor rule (see _kernels.avgpool). */
static void dv_avgpool_plane(const float *in, int H, int W, float *out, int ho, int wo, int kh, int kw,
                             int sh, int sw, int pt, int pl, int pb, int pr, int count_include_pad)
{
    for (int oy = 0; oy < ho; ++oy) {
        int hs = oy * sh - pt, he = hs + kh;
        if (he > H + pb) he = H + pb;
        int y0 = hs > 0 ? hs : 0, y1 = he < H ? he : H;
        for (int ox = 0; ox < wo; ++ox) {
            int ws = ox * sw - pl, we = ws + kw;
            if (we > W + pr) we = W + pr;
            int x0 = ws > 0 ? ws : 0, x1 = we < W ? we : W;
            float sum = 0.0f;
            for (int iy = y0; iy < y1; ++iy) {
                const float *r = in + (long)iy * W;
                for (int ix = x0; ix < x1; ++ix) sum += r[ix];
            }
            int count = count_include_pad ? (he - hs) * (we - ws) : (y1 - y0) * (x1 - x0);
            out[(long)oy * wo + ox] = count > 0 ? sum / count : 0.0f;
        }
    }
}

#endif
