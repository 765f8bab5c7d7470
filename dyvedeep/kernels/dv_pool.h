/* Pooling: max and average pooling of a plane (a window-row reduction, then the windows along
 * the rows) and channel means (global average pooling). */
#ifndef DYVEDEEP_DV_POOL_H
#define DYVEDEEP_DV_POOL_H

#include "dv_vector.h"

/* The mean of x[0..n-1]: 16 float lanes summed as they come, the lanes then in double. The
 * lanes are machine vectors (DV_VW floats), not one 16-float vector: GCC kept a 16-float vector
 * of the AVX2 build on the stack, moving it through general registers on every add (SqueezeNet's
 * 1000 x 169 means 150 us against 16 us in registers). */
static inline float dv_mean(const float *x, int n)
{
    dv_vn acc[16 / DV_VW];
    for (int j = 0; j < 16 / DV_VW; ++j) acc[j] = (dv_vn){0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16 / DV_VW; ++j) {
            dv_vn v;
            memcpy(&v, x + i + j * DV_VW, sizeof v);
            acc[j] += v;
        }
    if (i < n) {
        float tail[16];
        dv_store16(tail, dv_load16_part(x + i, n - i));
        for (int j = 0; j < 16 / DV_VW; ++j) {
            dv_vn v;
            memcpy(&v, tail + j * DV_VW, sizeof v);
            acc[j] += v;
        }
    }
    double total = 0.0;
    for (int j = 0; j < 16 / DV_VW; ++j)
        for (int l = 0; l < DV_VW; ++l) total += acc[j][l];
    return (float)(total / n);
}

/* out[c] = the mean of row c (n floats, rows n apart) for c in [begin, end). */
static void dv_mean_rows(const float *x, int n, int begin, int end, float *out)
{
    for (int c = begin; c < end; ++c) out[c] = dv_mean(x + (long)c * n, n);
}

/* Pooling works on a window-row reduction: for each output row, the rows of its window are
 * reduced into `acc` (the input row with pl padding entries on the left, enough on the right for
 * every window), then each output takes its kw entries of `acc`. Both steps run on whole vectors
 * (16 outputs at a time, strides 1 and 2 de-interleaved in registers), tails masked. */
static inline int dv_pool_span(int W, int wo, int kw, int sw, int pl)
{
    int span = (wo - 1) * sw + kw;
    return span > W + pl ? span : W + pl;
}

/* Floats of a pooling row scratch: the span plus the slack that whole-vector reads of the last
 * outputs' windows reach (16 outputs of stride <= 2 read 32 floats past their window start). */
static inline int dv_pool_scratch(int W, int wo, int kw, int sw, int pl)
{
    return dv_pool_span(W, wo, kw, sw, pl) + 2 * 16 + 16;
}

/* m[x] = max over i < rows of r[i * W + x] (in that order), for x < n; rows >= 1. Whole
 * vectors are reduced in registers and stored once: no load waits on a store just made. */
static inline void dv_col_max(float *m, const float *r, long W, int rows, int n)
{
    int x = 0;
    for (; x + 16 <= n; x += 16) {
        dv_v16 v = dv_load16(r + x);
        for (int i = 1; i < rows; ++i) v = dv_vmax(v, dv_load16(r + i * W + x));
        dv_store16(m + x, v);
    }
    if (x < n) {
        dv_v16 v = dv_load16_part(r + x, n - x);
        for (int i = 1; i < rows; ++i) v = dv_vmax(v, dv_load16_part(r + i * W + x, n - x));
        dv_store16_part(m + x, v, n - x);
    }
}

/* m[x] = 0 + r[x] + r[W + x] + ... over rows rows (in that order), for x < n; rows >= 0. */
static inline void dv_col_sum(float *m, const float *r, long W, int rows, int n)
{
    int x = 0;
    for (; x + 16 <= n; x += 16) {
        dv_v16 v = {0};
        for (int i = 0; i < rows; ++i) v += dv_load16(r + i * W + x);
        dv_store16(m + x, v);
    }
    if (x < n) {
        dv_v16 v = {0};
        for (int i = 0; i < rows; ++i) v += dv_load16_part(r + i * W + x, n - x);
        dv_store16_part(m + x, v, n - x);
    }
}

/* o[ox] = max of acc[ox * sw + kx] over kx < kw (acc with dv_pool_scratch floats). */
static inline void dv_window_max(float *o, const float *acc, int wo, int sw, int kw)
{
    if (sw > 2) {
        for (int ox = 0; ox < wo; ++ox) {
            float m = acc[ox * sw];
            for (int kx = 1; kx < kw; ++kx) m = acc[ox * sw + kx] > m ? acc[ox * sw + kx] : m;
            o[ox] = m;
        }
        return;
    }
    for (int ox = 0; ox < wo; ox += 16) {
        const float *a = acc + (long)ox * sw;
        dv_v16 v = dv_load16_stride(a, sw);
        for (int kx = 1; kx < kw; ++kx) v = dv_vmax(v, dv_load16_stride(a + kx, sw));
        if (wo - ox >= 16) dv_store16(o + ox, v);
        else dv_store16_part(o + ox, v, wo - ox);
    }
}

/* Floats from one row of a plane's pooling scratch to the next (a whole number of vectors). */
static inline int dv_pool_row_stride(int W, int wo, int kw, int sw, int pl)
{
    return (dv_pool_scratch(W, wo, kw, sw, pl) + 15) & ~15;
}

/* Max pooling of one H x W plane into ho x wo (-inf padding: windows clipped to the input)
 * through a scratch (any window and stride; dv_maxpool_plane's fallback). First every output
 * row's window rows are reduced into its own row of `acc` (ho rows of dv_pool_row_stride
 * floats), then the windows are taken along the rows: the second step reads
 * what the first stored long before (a load overlapping a store still in flight waits for it). */
static void dv_maxpool_plane_rows(const float *in, int H, int W, float *out, int ho, int wo, int kh, int kw,
                             int sh, int sw, int pt, int pl, float *acc)
{
    const float ninf = -__builtin_inff();
    int span = dv_pool_span(W, wo, kw, sw, pl), stride = dv_pool_row_stride(W, wo, kw, sw, pl);
    for (int oy = 0; oy < ho; ++oy) {
        float *row = acc + (long)oy * stride;
        int y0 = oy * sh - pt, y1 = y0 + kh;
        if (y0 < 0) y0 = 0;
        if (y1 > H) y1 = H;
        for (int p = 0; p < pl; ++p) row[p] = ninf;
        for (int p = pl + W; p < span; ++p) row[p] = ninf;
        dv_col_max(row + pl, in + (long)y0 * W, W, y1 - y0, W);  /* row[pl + x] is input column x */
    }
    for (int oy = 0; oy < ho; ++oy) dv_window_max(out + (long)oy * wo, acc + (long)oy * stride, wo, sw, kw);
}

/* The register-resident max pooling works on machine vectors (dv_vn, DV_VW floats): a 16-float
 * dv_v16 is two AVX2 or four NEON registers, and GCC lowers a permute across such a
 * wider-than-machine vector lane by lane. */

/* The larger of a and b as (b > a ? b : a), lane by lane (dv_vmax on one machine vector;
 * x86's max instruction returns its second operand unless the first is larger). */
static inline dv_vn dv_vnmax(dv_vn a, dv_vn b)
{
#if defined(__AVX512F__)
    return (dv_vn)_mm512_max_ps((__m512)b, (__m512)a);
#elif defined(__AVX2__)
    return (dv_vn)_mm256_max_ps((__m256)b, (__m256)a);
#else
    dv_in more = b > a;
    return (dv_vn)(((dv_in)b & more) | ((dv_in)a & ~more));
#endif
}

static inline dv_vn dv_vnload(const float *p) { dv_vn v; memcpy(&v, p, sizeof v); return v; }

/* Columns c..c+DV_VW-1 of an input row of W floats, `fill` in the lanes outside 0..W-1 (no
 * read outside the row). */
static inline dv_vn dv_vnload_clip(const float *row, int c, int W, float fill)
{
    if (c >= 0 && c + DV_VW <= W) return dv_vnload(row + c);
    int lo = c < 0 ? -c : 0, hi = W - c < DV_VW ? W - c : DV_VW;
    const float ninf = fill;
#if defined(__AVX512F__)
    if (hi <= lo) return (dv_vn)_mm512_set1_ps(ninf);
    /* masked-off lanes are neither read nor faulted on */
    return (dv_vn)_mm512_mask_loadu_ps(_mm512_set1_ps(ninf), (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u)),
                                       row + c);
#elif defined(__AVX2__)
    if (hi <= lo) return (dv_vn)_mm256_set1_ps(ninf);
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), lane),
                                     _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
    return (dv_vn)_mm256_blendv_ps(_mm256_set1_ps(ninf), _mm256_maskload_ps(row + c, in), _mm256_castsi256_ps(in));
#else
    dv_vn v;
    for (int l = 0; l < DV_VW; ++l) v[l] = l >= lo && l < hi ? row[c + l] : ninf;
    return v;
#endif
}

/* Store the first n (1..DV_VW) lanes of v at p (nothing written past p + n). */
static inline void dv_vnstore_part(float *p, dv_vn v, int n)
{
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#elif defined(__AVX2__)
    dv_store8_part(p, (__m256)v, n);
#else
    memcpy(p, &v, sizeof(float) * (size_t)n);
#endif
}

/* The max (sum: 0 + the rows in order) over `rows` consecutive input rows (from r, W floats
 * apart) of columns c..c+DV_VW-1, with -inf (sum: 0) outside the row; rows in order. */
static inline dv_vn dv_rows_reduce(const float *r, int W, int rows, int c, int sum)
{
    if (sum) {
        dv_vn v = {0};
        if (c >= 0 && c + DV_VW <= W)
            for (int i = 0; i < rows; ++i) v += dv_vnload(r + (long)i * W + c);
        else
            for (int i = 0; i < rows; ++i) v += dv_vnload_clip(r + (long)i * W, c, W, 0.0f);
        return v;
    }
    if (c >= 0 && c + DV_VW <= W) {
        dv_vn v = dv_vnload(r + c);
        for (int i = 1; i < rows; ++i) v = dv_vnmax(v, dv_vnload(r + (long)i * W + c));
        return v;
    }
    const float ninf = -__builtin_inff();
    dv_vn v = dv_vnload_clip(r, c, W, ninf);
    for (int i = 1; i < rows; ++i) v = dv_vnmax(v, dv_vnload_clip(r + (long)i * W, c, W, ninf));
    return v;
}

/* Lanes of the concatenation (a, b) of two machine vectors: the even ones, the odd ones, from
 * lane 1 and from lane 2 on. */
#if DV_HAVE_SHUFFLEVECTOR && DV_VW == 16
#define DV_EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define DV_ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
#define DV_FROM1(a, b) __builtin_shufflevector(a, b, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)
#define DV_FROM2(a, b) __builtin_shufflevector(a, b, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
#elif DV_HAVE_SHUFFLEVECTOR && DV_VW == 8
#define DV_EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14)
#define DV_ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15)
#define DV_FROM1(a, b) __builtin_shufflevector(a, b, 1, 2, 3, 4, 5, 6, 7, 8)
#define DV_FROM2(a, b) __builtin_shufflevector(a, b, 2, 3, 4, 5, 6, 7, 8, 9)
#elif DV_HAVE_SHUFFLEVECTOR && DV_VW == 4
#define DV_EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6)
#define DV_ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7)
#define DV_FROM1(a, b) __builtin_shufflevector(a, b, 1, 2, 3, 4)
#define DV_FROM2(a, b) __builtin_shufflevector(a, b, 2, 3, 4, 5)
#else
static inline dv_vn dv_pickn(dv_vn a, dv_vn b, int first, int step)
{
    float both[2 * DV_VW];
    memcpy(both, &a, sizeof a);
    memcpy(both + DV_VW, &b, sizeof b);
    dv_vn v;
    for (int l = 0; l < DV_VW; ++l) v[l] = both[first + l * step];
    return v;
}
#define DV_EVENS(a, b) dv_pickn(a, b, 0, 2)
#define DV_ODDS(a, b) dv_pickn(a, b, 1, 2)
#define DV_FROM1(a, b) dv_pickn(a, b, 1, 1)
#define DV_FROM2(a, b) dv_pickn(a, b, 2, 1)
#endif

/* Output row oy's window of an average pooling: its input rows y0..y1-1 (clipped to the
 * input); returns the rows its divisor counts (the window clipped to the padded input with
 * count_include_pad, else y1 - y0). */
static inline int dv_avg_window_rows(int oy, int sh, int pt, int kh, int H, int pb, int count_include_pad,
                                     int *y0, int *y1)
{
    int hs = oy * sh - pt, he = hs + kh;
    if (he > H + pb) he = H + pb;
    *y0 = hs > 0 ? hs : 0;
    *y1 = he < H ? he : H;
    return count_include_pad ? he - hs : *y1 - *y0;
}

/* One output row of dv_pool_plane_regs from its `rows` input rows at r (divisor_rows: the
 * average's row count). */
static inline __attribute__((always_inline)) void dv_pool_row_regs(const float *r, int W, int rows, float *o,
                                                                   int wo, int kw, int sw, int pl, int avg,
                                                                   int divisor_rows, const float *cols)
{
#define DV_POOL_OP(a, b) (avg ? (a) + (b) : dv_vnmax(a, b))
    int c = -pl;
    dv_vn m0 = dv_rows_reduce(r, W, rows, c, avg);
    for (int ox = 0; ox < wo; ox += DV_VW, c += DV_VW * sw) {
        dv_vn m1 = dv_rows_reduce(r, W, rows, c + DV_VW, avg), v;
        if (sw == 2) {
            dv_vn even = DV_EVENS(m0, m1);
            v = even;
            if (kw > 1) v = DV_POOL_OP(v, DV_ODDS(m0, m1));
            m0 = dv_rows_reduce(r, W, rows, c + 2 * DV_VW, avg);  /* where the next outputs start */
            if (kw > 2) v = DV_POOL_OP(v, DV_FROM1(even, m0));
        } else {
            v = m0;
            if (kw > 1) v = DV_POOL_OP(v, DV_FROM1(m0, m1));
            if (kw > 2) v = DV_POOL_OP(v, DV_FROM2(m0, m1));
            m0 = m1;
        }
        if (avg) {
            dv_vn count = dv_vnload_clip(cols, ox, wo, 0.0f);
            v = dv_divn_where_positive(v, (float)divisor_rows * count);
        }
        if (wo - ox >= DV_VW) memcpy(o + ox, &v, sizeof v);
        else dv_vnstore_part(o + ox, v, wo - ox);
    }
#undef DV_POOL_OP
}

/* Max or average pooling of one H x W plane into ho x wo in registers, for windows of 1 to 3
 * columns at stride 1 or 2 (SqueezeNet's and the CIFAR nets' 3 x 3 / 2, the ceil-mode edges
 * included): per DV_VW outputs of a row, the window rows' max (sum) of the input columns they
 * start in (and of the next DV_VW * stride columns, where the next outputs start), then the
 * window's columns picked by lane permutes: no scratch and no strided load; columns outside
 * the input are -inf (0) lanes of a masked load. The operations are those of the scratch path
 * (dv_maxpool_plane_rows, dv_avgpool_plane's rows), in its order (rows, then columns): the
 * same floats. Average: rows divided as dv_avg_window_rows says, by cols[ox] columns. Inlined
 * with constant windows and strides by its callers (as run-time values, the row loops and the
 * tap choices took 1.5x the time). */
static inline __attribute__((always_inline)) void dv_pool_plane_regs(const float *in, int H, int W, float *out,
                                                                     int ho, int wo, int kh, int kw, int sh,
                                                                     int sw, int pt, int pl, int avg, int pb,
                                                                     int count_include_pad, const float *cols)
{
    for (int oy = 0; oy < ho; ++oy) {
        int y0, y1, divisor_rows = 0;
        if (avg) {
            divisor_rows = dv_avg_window_rows(oy, sh, pt, kh, H, pb, count_include_pad, &y0, &y1);
        } else {
            y0 = oy * sh - pt, y1 = y0 + kh;
            if (y0 < 0) y0 = 0;
            if (y1 > H) y1 = H;
        }
        const float *r = in + (long)y0 * W;
        float *o = out + (long)oy * wo;
        if (y1 - y0 == kh)  /* the whole window: a constant row count */
            dv_pool_row_regs(r, W, kh, o, wo, kw, sw, pl, avg, divisor_rows, cols);
        else
            dv_pool_row_regs(r, W, y1 - y0, o, wo, kw, sw, pl, avg, divisor_rows, cols);
    }
}

/* Max pooling of one H x W plane into ho x wo (-inf padding: windows clipped to the input): in
 * registers (dv_pool_plane_regs) or, for other windows and strides, through the scratch `acc`. */
static void dv_maxpool_plane(const float *in, int H, int W, float *out, int ho, int wo, int kh, int kw,
                             int sh, int sw, int pt, int pl, float *acc)
{
    if (sw > 2 || kw > 3) dv_maxpool_plane_rows(in, H, W, out, ho, wo, kh, kw, sh, sw, pt, pl, acc);
    else if (kh == 3 && kw == 3 && sw == 2) dv_pool_plane_regs(in, H, W, out, ho, wo, 3, 3, sh, 2, pt, pl, 0, 0, 0, NULL);
    else if (kh == 2 && kw == 2 && sw == 2) dv_pool_plane_regs(in, H, W, out, ho, wo, 2, 2, sh, 2, pt, pl, 0, 0, 0, NULL);
    else if (kh == 3 && kw == 3 && sw == 1) dv_pool_plane_regs(in, H, W, out, ho, wo, 3, 3, sh, 1, pt, pl, 0, 0, 0, NULL);
    else dv_pool_plane_regs(in, H, W, out, ho, wo, kh, kw, sh, sw, pt, pl, 0, 0, 0, NULL);
}

/* o[ox] = sum of acc[ox * sw + kx] over kx < kw (kx in order), divided by rows * cols[ox]
 * (0 where that count is 0). */
static inline void dv_window_mean(float *o, const float *acc, int wo, int sw, int kw, int rows, const float *cols)
{
    if (sw > 2) {
        for (int ox = 0; ox < wo; ++ox) {
            float m = acc[ox * sw];
            for (int kx = 1; kx < kw; ++kx) m += acc[ox * sw + kx];
            float count = (float)rows * cols[ox];
            o[ox] = count > 0.0f ? m / count : 0.0f;
        }
        return;
    }
    for (int ox = 0; ox < wo; ox += 16) {
        const float *a = acc + (long)ox * sw;
        int n = wo - ox < 16 ? wo - ox : 16;
        dv_v16 v = dv_load16_stride(a, sw);
        for (int kx = 1; kx < kw; ++kx) v += dv_load16_stride(a + kx, sw);
        dv_v16 count = DV_SPLAT((float)rows) * dv_load16_part(cols + ox, n);
        v = dv_div_where_positive(v, count);
        if (n == 16) dv_store16(o + ox, v);
        else dv_store16_part(o + ox, v, n);
    }
}

/* Average pooling of one plane, onnxruntime's divisor rule (see _kernels.avgpool): the window
 * sum over the taps inside the input (acc is zero elsewhere), divided by the window clipped
 * to the padded input (count_include_pad) or by the taps inside the input. `acc` holds ho rows
 * of dv_pool_row_stride floats (the two steps of dv_maxpool_plane_rows; windows of up to 3
 * columns at stride 1 or 2 run in registers instead, dv_pool_plane_regs), then wo floats for
 * the column counts. */
static void dv_avgpool_plane(const float *in, int H, int W, float *out, int ho, int wo, int kh, int kw,
                             int sh, int sw, int pt, int pl, int pb, int pr, int count_include_pad, float *acc)
{
    int span = dv_pool_span(W, wo, kw, sw, pl), stride = dv_pool_row_stride(W, wo, kw, sw, pl);
    float *cols = acc + (long)ho * stride;
    for (int ox = 0; ox < wo; ++ox) {
        int ws = ox * sw - pl, we = ws + kw;
        if (we > W + pr) we = W + pr;
        int x0 = ws > 0 ? ws : 0, x1 = we < W ? we : W;
        cols[ox] = (float)(count_include_pad ? we - ws : x1 - x0);
    }
    if (kh == 3 && kw == 3 && sw == 2) {
        dv_pool_plane_regs(in, H, W, out, ho, wo, 3, 3, sh, 2, pt, pl, 1, pb, count_include_pad, cols);
        return;
    }
    if (sw <= 2 && kw <= 3) {
        dv_pool_plane_regs(in, H, W, out, ho, wo, kh, kw, sh, sw, pt, pl, 1, pb, count_include_pad, cols);
        return;
    }
    for (int oy = 0; oy < ho; ++oy) {
        float *row = acc + (long)oy * stride;
        int y0, y1;
        dv_avg_window_rows(oy, sh, pt, kh, H, pb, count_include_pad, &y0, &y1);
        for (int p = 0; p < pl; ++p) row[p] = 0.0f;
        for (int p = pl + W; p < span; ++p) row[p] = 0.0f;
        dv_col_sum(row + pl, in + (long)y0 * W, W, y1 - y0, W);
    }
    for (int oy = 0; oy < ho; ++oy) {
        int y0, y1;
        int rows = dv_avg_window_rows(oy, sh, pt, kh, H, pb, count_include_pad, &y0, &y1);
        dv_window_mean(out + (long)oy * wo, acc + (long)oy * stride, wo, sw, kw, rows, cols);
    }
}

#endif
