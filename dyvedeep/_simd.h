/* Vector micro-kernels of the engine, written with GCC/Clang vector extensions so that they
 * compile to AVX2/AVX-512 on x86-64 and to NEON on aarch64 (Raspberry Pi) alike.
 * Used from _kernels.pyx; no Python API here. */
#ifndef DYVEDEEP_SIMD_H
#define DYVEDEEP_SIMD_H

#include <string.h>

typedef float dv_v16 __attribute__((vector_size(64)));
typedef int dv_i16 __attribute__((vector_size(64)));

/* Every lane = x (a plain broadcast: adding x to a zero vector would also flip -0.0 to +0.0). */
#define DV_SPLAT(x) ((dv_v16){(x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x)})

static inline dv_v16 dv_load16(const float *p) { dv_v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void dv_store16(float *p, dv_v16 v) { memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* The first n (1..16) floats at p, zeros in the other lanes (no read past p + n). */
static inline dv_v16 dv_load16_part(const float *p, int n)
{
#if defined(__AVX512F__)
    __m512 m = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
    dv_v16 v;
    memcpy(&v, &m, sizeof v);
    return v;
#else
    dv_v16 v = {0};
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
#endif
}

/* Rows of the unfolded input fetched ahead in the GEMM loops: its rows are a row stride apart
 * (often in different pages), where the hardware prefetchers do not follow. */
#ifndef DV_PREFETCH_ROWS
#define DV_PREFETCH_ROWS 8
#endif

/* Store the first n (1..16) lanes of v at p (nothing written past p + n). */
static inline void dv_store16_part(float *p, dv_v16 v, int n)
{
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof m);
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), m);
#else
    memcpy(p, &v, sizeof(float) * (size_t)n);
#endif
}

/* Copy n floats (short runs: whole vectors, then one partial vector). */
static inline void dv_copy_run(float *d, const float *s, int n)
{
    for (; n >= 16; n -= 16, d += 16, s += 16) dv_store16(d, dv_load16(s));
    if (n > 0) dv_store16_part(d, dv_load16_part(s, n), n);
}

/* d[i] = s[i * stride] for i < n (a constant stride 2 lets the compiler vectorise it). */
static inline void dv_copy_strided(float *restrict d, const float *restrict s, int n, int stride)
{
    if (stride == 1) dv_copy_run(d, s, n);
    else if (stride == 2) for (int i = 0; i < n; ++i) d[i] = s[2 * i];
    else for (int i = 0; i < n; ++i) d[i] = s[(long)i * stride];
}

/* The register tiles' accumulators and steps, shared by the tile kernels (panel and direct):
 * DV_T32_BEGIN declares the eight weight rows w0..w7 of wr and the accumulators a<row><half>
 * (zero, or the sums in acc when resume: the same sequence of operations as one pass);
 * DV_T32_STEP adds weight column k times the row (c0, c1); DV_T32_SAVE stores the sums to acc.
 * DV_T16_* likewise for one vector per row (a<row>). */
#define DV_T32_BEGIN(wr, acc, resume)                                                              \
    const float *w0 = (wr)[0], *w1 = (wr)[1], *w2 = (wr)[2], *w3 = (wr)[3];                       \
    const float *w4 = (wr)[4], *w5 = (wr)[5], *w6 = (wr)[6], *w7 = (wr)[7];                       \
    dv_v16 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0}; \
    dv_v16 a40 = {0}, a41 = {0}, a50 = {0}, a51 = {0}, a60 = {0}, a61 = {0}, a70 = {0}, a71 = {0}; \
    if (resume) {                                                                                  \
        a00 = (acc)[0]; a01 = (acc)[1]; a10 = (acc)[2]; a11 = (acc)[3]; a20 = (acc)[4];            \
        a21 = (acc)[5]; a30 = (acc)[6]; a31 = (acc)[7]; a40 = (acc)[8]; a41 = (acc)[9];            \
        a50 = (acc)[10]; a51 = (acc)[11]; a60 = (acc)[12]; a61 = (acc)[13]; a70 = (acc)[14];       \
        a71 = (acc)[15];                                                                           \
    }
#define DV_T32_STEP(c0, c1, k)                                                                     \
    do {                                                                                           \
        dv_v16 b;                                                                                  \
        b = DV_SPLAT(w0[k]); a00 += b * (c0); a01 += b * (c1);                                     \
        b = DV_SPLAT(w1[k]); a10 += b * (c0); a11 += b * (c1);                                     \
        b = DV_SPLAT(w2[k]); a20 += b * (c0); a21 += b * (c1);                                     \
        b = DV_SPLAT(w3[k]); a30 += b * (c0); a31 += b * (c1);                                     \
        b = DV_SPLAT(w4[k]); a40 += b * (c0); a41 += b * (c1);                                     \
        b = DV_SPLAT(w5[k]); a50 += b * (c0); a51 += b * (c1);                                     \
        b = DV_SPLAT(w6[k]); a60 += b * (c0); a61 += b * (c1);                                     \
        b = DV_SPLAT(w7[k]); a70 += b * (c0); a71 += b * (c1);                                     \
    } while (0)
#define DV_T32_SAVE(acc)                                                                           \
    do {                                                                                           \
        (acc)[0] = a00; (acc)[1] = a01; (acc)[2] = a10; (acc)[3] = a11; (acc)[4] = a20;            \
        (acc)[5] = a21; (acc)[6] = a30; (acc)[7] = a31; (acc)[8] = a40; (acc)[9] = a41;            \
        (acc)[10] = a50; (acc)[11] = a51; (acc)[12] = a60; (acc)[13] = a61; (acc)[14] = a70;       \
        (acc)[15] = a71;                                                                           \
    } while (0)
#define DV_T16_BEGIN(wr, acc, resume)                                                              \
    const float *w0 = (wr)[0], *w1 = (wr)[1], *w2 = (wr)[2], *w3 = (wr)[3];                       \
    const float *w4 = (wr)[4], *w5 = (wr)[5], *w6 = (wr)[6], *w7 = (wr)[7];                       \
    dv_v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};         \
    if (resume) {                                                                                  \
        a0 = (acc)[0]; a1 = (acc)[1]; a2 = (acc)[2]; a3 = (acc)[3];                                \
        a4 = (acc)[4]; a5 = (acc)[5]; a6 = (acc)[6]; a7 = (acc)[7];                                \
    }
#define DV_T16_STEP(c, k)                                                                          \
    do {                                                                                           \
        a0 += DV_SPLAT(w0[k]) * (c); a1 += DV_SPLAT(w1[k]) * (c);                                  \
        a2 += DV_SPLAT(w2[k]) * (c); a3 += DV_SPLAT(w3[k]) * (c);                                  \
        a4 += DV_SPLAT(w4[k]) * (c); a5 += DV_SPLAT(w5[k]) * (c);                                  \
        a6 += DV_SPLAT(w6[k]) * (c); a7 += DV_SPLAT(w7[k]) * (c);                                  \
    } while (0)
#define DV_T16_SAVE(acc)                                                                           \
    do {                                                                                           \
        (acc)[0] = a0; (acc)[1] = a1; (acc)[2] = a2; (acc)[3] = a3;                                \
        (acc)[4] = a4; (acc)[5] = a5; (acc)[6] = a6; (acc)[7] = a7;                                \
    } while (0)

/* The register tile of the engine's GEMMs: eight output rows (wr[r][k], k < K) times up to 32
 * columns (cols[k * ldc + j], j < jn) of the unfolded input, summed over k in order into
 * acc[2 r] (columns 0..15) and acc[2 r + 1] (16..31). Each loaded row of cols serves eight
 * output rows, each weight two vectors: 16 fused multiply-adds for 10 loads. */
static inline void dv_tile_8x32(const float *const *wr, int K, const float *cols, long ldc, int jn,
                                dv_v16 *acc, int resume)
{
    DV_T32_BEGIN(wr, acc, resume);
    const float *row = cols;
    const long ahead = DV_PREFETCH_ROWS * ldc;
    if (jn == 32) {
        for (int k = 0; k < K; ++k, row += ldc) {
            __builtin_prefetch(row + ahead);
            __builtin_prefetch(row + ahead + 16);
            dv_v16 c0 = dv_load16(row), c1 = dv_load16(row + 16);
            DV_T32_STEP(c0, c1, k);
        }
    } else {
        int n1 = jn - 16;  /* 1..15 */
        for (int k = 0; k < K; ++k, row += ldc) {
            dv_v16 c0 = dv_load16(row), c1 = dv_load16_part(row + 16, n1);
            DV_T32_STEP(c0, c1, k);
        }
    }
    DV_T32_SAVE(acc);
}

/* As dv_tile_8x32 for up to 16 columns: acc[r] holds row r. */
static inline void dv_tile_8x16(const float *const *wr, int K, const float *cols, long ldc, int jn,
                                dv_v16 *acc, int resume)
{
    DV_T16_BEGIN(wr, acc, resume);
    const float *row = cols;
    const long ahead = DV_PREFETCH_ROWS * ldc;
    if (jn == 16) {
        for (int k = 0; k < K; ++k, row += ldc) {
            __builtin_prefetch(row + ahead);
            dv_v16 c = dv_load16(row);
            DV_T16_STEP(c, k);
        }
    } else {
        for (int k = 0; k < K; ++k, row += ldc) {
            dv_v16 c = dv_load16_part(row, jn);
            DV_T16_STEP(c, k);
        }
    }
    DV_T16_SAVE(acc);
}

/* Write one register tile: for each of the `rows` output rows orow[r], columns j0..j0+jn-1 get
 * v = bias[o] + sum (bias != NULL) or out + sum (bias == NULL), only where mask[o, j] is set
 * (mask == NULL: everywhere), then ReLU if asked. `nv` vectors per row in acc. Returns the
 * entries written. */
static inline long long dv_tile_store(const dv_v16 *acc, int nv, const int *orow, int rows, int j0, int jn,
                                      float *out, long ldo, const float *bias, const unsigned char *mask,
                                      long ldm, int relu)
{
    long long done = 0;
    float sum[32];
    for (int r = 0; r < rows; ++r) {
        int o = orow[r];
        float *dst = out + (long)o * ldo + j0;
        if (mask == NULL) {
            /* whole vectors: the bias (or the output) plus the sum, ReLU as (v < 0 ? 0 : v) */
            dv_v16 base = bias != NULL ? DV_SPLAT(bias[o]) : (dv_v16){0};
            for (int v = 0; v < nv && 16 * v < jn; ++v) {
                int n = jn - 16 * v < 16 ? jn - 16 * v : 16;
                dv_v16 x = acc[r * nv + v];
                if (bias != NULL) x = base + x;
                else x = (n == 16 ? dv_load16(dst + 16 * v) : dv_load16_part(dst + 16 * v, n)) + x;
                if (relu) x = (dv_v16)((dv_i16)x & ~(dv_i16)(x < (dv_v16){0}));
                if (n == 16) dv_store16(dst + 16 * v, x);
                else dv_store16_part(dst + 16 * v, x, n);
            }
            done += jn;
        } else {
            memcpy(sum, &acc[r * nv], sizeof(float) * 16 * (size_t)nv);
            const unsigned char *m = mask + (long)o * ldm + j0;
            float b = bias != NULL ? bias[o] : 0.0f;
            for (int j = 0; j < jn; ++j) {
                if (m[j]) {
                    float v = (bias != NULL ? b : dst[j]) + sum[j];
                    dst[j] = (relu && v < 0.0f) ? 0.0f : v;
                    ++done;
                }
            }
        }
    }
    return done;
}

/* The direct convolution (stride 1 along rows): no unfolding at all. Row k of the unfolded
 * input, for a vector of output positions whose tap (0, 0) sits at consecutive source offsets
 * s, s + 1, ..., is simply the source at s + tap_off[k]: the tile loads it in place. A vector
 * is DV_VEC ints: source offset s, output offset, lanes n (1..16) and a lane mask. Either its
 * lanes are consecutive positions of one output row (mask: the first n lanes), or, when the
 * source rows are row_w >= wo floats apart (stride 1 down the rows too), they are the
 * positions of consecutive source offsets, rows included: lanes that fall on the row_w - wo
 * columns past an output row are computed and dropped (mask), the others are consecutive
 * positions of the output, stored compressed. */
#define DV_VEC 4

/* The lanes of a load of n (1..16) floats: a mask (AVX-512; computed once outside a loop) or
 * the count itself (elsewhere, where a partial load copies n floats). */
#if defined(__AVX512F__)
typedef __mmask16 dv_lanes;
static inline dv_lanes dv_lanes_of(int n) { return (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1u); }
static inline dv_v16 dv_load16_lanes(const float *p, dv_lanes m)
{
    __m512 v = _mm512_maskz_loadu_ps(m, p);
    dv_v16 r;
    memcpy(&r, &v, sizeof r);
    return r;
}
#else
typedef int dv_lanes;
static inline dv_lanes dv_lanes_of(int n) { return n; }
static inline dv_v16 dv_load16_lanes(const float *p, dv_lanes n) { return n >= 16 ? dv_load16(p) : dv_load16_part(p, n); }
#endif

/* Vectors per direct tile: with AVX-512 (32 vector registers), 8 output rows x 3 vectors (24
 * accumulators), so that each step loads 3 source vectors and 8 weights for 24 fused
 * multiply-adds; elsewhere (AVX2, NEON: a 16-float vector takes 2 or 4 of 16 or 32 registers)
 * 2 vectors, as the panel tiles. */
#if defined(__AVX512F__)
#define DV_DTILE 3
#else
#define DV_DTILE 2
#endif

/* The 8 x 48 register tile of the direct route: acc[3 r + v] (+)= sum over k < K of wr[r][k] *
 * the source vector v (s[v] + tap[k], n[v] lanes 1..16), in k order (the same operations per
 * lane as the 8 x 32 and panel tiles). With pf != 0, each step also prefetches its source lines
 * pf floats ahead (the next tile's). Named accumulators, not an array: GCC kept an array in
 * memory and stored all 24 vectors on every step. */
#define DV_T48_BEGIN(wr, acc, resume)                                                                         \
    const float *w0 = (wr)[0], *w1 = (wr)[1], *w2 = (wr)[2], *w3 = (wr)[3];                                   \
    const float *w4 = (wr)[4], *w5 = (wr)[5], *w6 = (wr)[6], *w7 = (wr)[7];                                   \
    dv_v16 a00 = {0}, a01 = {0}, a02 = {0}, a10 = {0}, a11 = {0}, a12 = {0};                                  \
    dv_v16 a20 = {0}, a21 = {0}, a22 = {0}, a30 = {0}, a31 = {0}, a32 = {0};                                  \
    dv_v16 a40 = {0}, a41 = {0}, a42 = {0}, a50 = {0}, a51 = {0}, a52 = {0};                                  \
    dv_v16 a60 = {0}, a61 = {0}, a62 = {0}, a70 = {0}, a71 = {0}, a72 = {0};                                  \
    if (resume) {                                                                                             \
        a00 = (acc)[0]; a01 = (acc)[1]; a02 = (acc)[2]; a10 = (acc)[3]; a11 = (acc)[4]; a12 = (acc)[5];       \
        a20 = (acc)[6]; a21 = (acc)[7]; a22 = (acc)[8]; a30 = (acc)[9]; a31 = (acc)[10]; a32 = (acc)[11];     \
        a40 = (acc)[12]; a41 = (acc)[13]; a42 = (acc)[14]; a50 = (acc)[15]; a51 = (acc)[16]; a52 = (acc)[17]; \
        a60 = (acc)[18]; a61 = (acc)[19]; a62 = (acc)[20]; a70 = (acc)[21]; a71 = (acc)[22]; a72 = (acc)[23]; \
    }
#define DV_T48_STEP(c0, c1, c2, k)                                                                 \
    do {                                                                                           \
        dv_v16 b;                                                                                  \
        b = DV_SPLAT(w0[k]); a00 += b * (c0); a01 += b * (c1); a02 += b * (c2);                    \
        b = DV_SPLAT(w1[k]); a10 += b * (c0); a11 += b * (c1); a12 += b * (c2);                    \
        b = DV_SPLAT(w2[k]); a20 += b * (c0); a21 += b * (c1); a22 += b * (c2);                    \
        b = DV_SPLAT(w3[k]); a30 += b * (c0); a31 += b * (c1); a32 += b * (c2);                    \
        b = DV_SPLAT(w4[k]); a40 += b * (c0); a41 += b * (c1); a42 += b * (c2);                    \
        b = DV_SPLAT(w5[k]); a50 += b * (c0); a51 += b * (c1); a52 += b * (c2);                    \
        b = DV_SPLAT(w6[k]); a60 += b * (c0); a61 += b * (c1); a62 += b * (c2);                    \
        b = DV_SPLAT(w7[k]); a70 += b * (c0); a71 += b * (c1); a72 += b * (c2);                    \
    } while (0)
#define DV_T48_SAVE(acc)                                                                                      \
    do {                                                                                                      \
        (acc)[0] = a00; (acc)[1] = a01; (acc)[2] = a02; (acc)[3] = a10; (acc)[4] = a11; (acc)[5] = a12;       \
        (acc)[6] = a20; (acc)[7] = a21; (acc)[8] = a22; (acc)[9] = a30; (acc)[10] = a31; (acc)[11] = a32;     \
        (acc)[12] = a40; (acc)[13] = a41; (acc)[14] = a42; (acc)[15] = a50; (acc)[16] = a51; (acc)[17] = a52; \
        (acc)[18] = a60; (acc)[19] = a61; (acc)[20] = a62; (acc)[21] = a70; (acc)[22] = a71; (acc)[23] = a72; \
    } while (0)

static inline void dv_dtile_8x48(const float *const *wr, int K, const float *s0, const float *s1,
                                 const float *s2, const long *tap, int n0, int n1, int n2, dv_v16 *acc,
                                 int resume, long pf)
{
    DV_T48_BEGIN(wr, acc, resume);
    if (pf != 0 && n0 == 16 && n1 == 16 && n2 == 16) {
        for (int k = 0; k < K; ++k) {
            long t = tap[k];
            __builtin_prefetch(s0 + t + pf); __builtin_prefetch(s1 + t + pf); __builtin_prefetch(s2 + t + pf);
            dv_v16 c0 = dv_load16(s0 + t), c1 = dv_load16(s1 + t), c2 = dv_load16(s2 + t);
            DV_T48_STEP(c0, c1, c2, k);
        }
    } else if (n0 == 16 && n1 == 16 && n2 == 16) {
        for (int k = 0; k < K; ++k) {
            long t = tap[k];
            dv_v16 c0 = dv_load16(s0 + t), c1 = dv_load16(s1 + t), c2 = dv_load16(s2 + t);
            DV_T48_STEP(c0, c1, c2, k);
        }
    } else {
        dv_lanes m0 = dv_lanes_of(n0), m1 = dv_lanes_of(n1), m2 = dv_lanes_of(n2);
        for (int k = 0; k < K; ++k) {
            long t = tap[k];
            dv_v16 c0 = dv_load16_lanes(s0 + t, m0), c1 = dv_load16_lanes(s1 + t, m1);
            dv_v16 c2 = dv_load16_lanes(s2 + t, m2);
            DV_T48_STEP(c0, c1, c2, k);
        }
    }
    DV_T48_SAVE(acc);
}

/* As dv_dtile_8x48 for two source vectors: acc[2 r + v]. */
static inline void dv_dtile_8x32(const float *const *wr, int K, const float *s0, const float *s1,
                                 const long *tap, int n0, int n1, dv_v16 *acc, int resume, long pf)
{
    DV_T32_BEGIN(wr, acc, resume);
    dv_lanes m0 = dv_lanes_of(n0), m1 = dv_lanes_of(n1);
    if (pf != 0) {
        for (int k = 0; k < K; ++k) {
            __builtin_prefetch(s0 + tap[k] + pf);
            __builtin_prefetch(s1 + tap[k] + pf);
            dv_v16 c0 = dv_load16_lanes(s0 + tap[k], m0), c1 = dv_load16_lanes(s1 + tap[k], m1);
            DV_T32_STEP(c0, c1, k);
        }
    } else {
        for (int k = 0; k < K; ++k) {
            dv_v16 c0 = dv_load16_lanes(s0 + tap[k], m0), c1 = dv_load16_lanes(s1 + tap[k], m1);
            DV_T32_STEP(c0, c1, k);
        }
    }
    DV_T32_SAVE(acc);
}

/* As dv_dtile_8x48 for one source vector: acc[r] holds row r. */
static inline void dv_dtile_8x16(const float *const *wr, int K, const float *s0, const long *tap, int n0,
                                 dv_v16 *acc, int resume)
{
    DV_T16_BEGIN(wr, acc, resume);
    dv_lanes m0 = dv_lanes_of(n0);
    for (int k = 0; k < K; ++k) {
        dv_v16 c = dv_load16_lanes(s0 + tap[k], m0);
        DV_T16_STEP(c, k);
    }
    DV_T16_SAVE(acc);
}

/* One direct tile: vectors vec[0..nvec-1] (nvec 1..DV_DTILE) times rows wr, over taps
 * tap[0..K-1]; acc[nvec * r + v]. (Only a map's last tile has fewer than DV_DTILE vectors.) */
static inline void dv_dtile(const float *const *wr, int K, const float *src, const long *tap, const int *vec,
                            int nvec, dv_v16 *acc, int resume, long pf)
{
    const int *v1 = vec + DV_VEC, *v2 = vec + 2 * DV_VEC;
    if (nvec == 3)
        dv_dtile_8x48(wr, K, src + vec[0], src + v1[0], src + v2[0], tap, vec[2], v1[2], v2[2], acc, resume, pf);
    else if (nvec == 2) dv_dtile_8x32(wr, K, src + vec[0], src + v1[0], tap, vec[2], v1[2], acc, resume, pf);
    else dv_dtile_8x16(wr, K, src + vec[0], tap, vec[2], acc, resume);
}

/* Store the lanes of v that `mask` selects, in order, at p, p + 1, ... */
static inline void dv_store16_compress(float *p, dv_v16 v, unsigned mask)
{
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof m);
    _mm512_mask_compressstoreu_ps(p, (__mmask16)mask, m);
#else
    for (int l = 0; l < 16; ++l)
        if (mask >> l & 1u) *p++ = v[l];
#endif
}

/* Write a direct tile: bias[o] + sum, ReLU if asked, to row o at each vector's output offset
 * (the lanes its mask selects). */
static inline void dv_dtile_store(const dv_v16 *acc, int nvec, const int *orow, int rows, const int *vec,
                                  float *out, long ldo, const float *bias, int relu)
{
    for (int r = 0; r < rows; ++r) {
        int o = orow[r];
        dv_v16 base = DV_SPLAT(bias[o]);
        for (int v = 0; v < nvec; ++v) {
            const int *q = vec + DV_VEC * v;
            unsigned mask = (unsigned)q[3];
            dv_v16 x = base + acc[r * nvec + v];
            if (relu) x = (dv_v16)((dv_i16)x & ~(dv_i16)(x < (dv_v16){0}));
            float *dst = out + (long)o * ldo + q[1];
            if (mask == 0xFFFFu) dv_store16(dst, x);
            else if (mask == (1u << q[2]) - 1u) dv_store16_part(dst, x, q[2]);
            else dv_store16_compress(dst, x, mask);
        }
    }
}

/* Prefetch, for writing, out[o * ldo + j .. j + n - 1] for every row o < O: a tile writes one
 * short run in each output row, and the rows are far apart, too many streams for the hardware
 * prefetchers; a store that misses waits for its line (a cold 3 MB output took 1.5x the layer's
 * time). dv_tile_rows calls it for the next tile, one 8-row block at a time (a burst of
 * prefetches for all rows at once mostly went unserved). */
static inline void dv_prefetch_out(float *out, long ldo, int O, long j, int n)
{
    for (int o = 0; o < O; ++o) {
        float *p = out + (long)o * ldo + j;
        for (int i = 0; i < n; i += 16) __builtin_prefetch(p + i, 1, 3);
        __builtin_prefetch(p + n - 1, 1, 3);
    }
}

/* Inner-dimension block of the dense GEMM: the rows of a panel that one pass over all 8-row
 * blocks reads stay in L1 (DV_KC x 128 bytes), the running sums going through `accbuf`. */
#ifndef DV_KC
#define DV_KC 192
#endif

/* The B operand of one tile: 32 columns j0..j0+jn-1 of an unfolded input whose row k is at
 * cols + k * ldc (cols != NULL), or the direct route's vectors vec[0..nvec-1] of the source src,
 * row k of a vector at its source offset + tap[k]. */
typedef struct {
    const float *cols;
    long ldc;
    int j0, jn;
    const float *src;
    const long *tap;
    const int *vec;
    int nvec;
    long pf;     /* direct: the next tile's source offset minus this tile's (0: none) */
    int next_n;  /* output positions of the next tile (0: none); its output is prefetched */
    long next_j; /* ... from this output offset (panels: column) */
} dv_tile_src;

/* One tile's B times every 8-row block of W (O x K, rows ldw apart): out[o, j] = bias[o] + sum
 * (bias == NULL, panels only: out += sum), ReLU if asked. K is cut into DV_KC-row blocks so that
 * the rows of B a block reads stay in L1 while every weight block passes over them; `accbuf`
 * keeps the running sums (ceil(O / 8) * 8 * DV_DTILE vectors when K > DV_KC). While it computes
 * a block, the next tile's output lines of that block and (direct route, first block) its source
 * lines are prefetched: a 1x1 layer's source rows are a channel apart, too many streams for the
 * hardware prefetchers. */
static void dv_tile_rows(const float *W, long ldw, int O, int K, const dv_tile_src *b, float *out, long ldo,
                         const float *bias, int relu, dv_v16 *accbuf)
{
    dv_v16 acc[8 * DV_DTILE];
    int orow[8];
    const float *wr[8];
    int nv = b->cols != NULL ? (b->jn > 16 ? 2 : 1) : b->nvec;
    for (int k0 = 0; k0 < K; k0 += DV_KC) {
        int kc = K - k0 < DV_KC ? K - k0 : DV_KC;
        int first = k0 == 0, last = k0 + kc == K;
        for (int g = 0; g < O; g += 8) {
            int rows = O - g < 8 ? O - g : 8;
            dv_v16 *saved = accbuf + (long)(g / 8) * 8 * DV_DTILE;
            for (int r = 0; r < 8; ++r) {
                orow[r] = g + (r < rows ? r : 0);
                wr[r] = W + (long)orow[r] * ldw + k0;
            }
            if (!first) memcpy(acc, saved, sizeof(dv_v16) * 8 * (size_t)nv);
            if (last && b->next_n > 0) dv_prefetch_out(out + (long)g * ldo, ldo, rows, b->next_j, b->next_n);
            if (b->cols == NULL) dv_dtile(wr, kc, b->src, b->tap + k0, b->vec, nv, acc, !first, g == 0 ? b->pf : 0);
            else if (nv == 2) dv_tile_8x32(wr, kc, b->cols + (long)k0 * b->ldc, b->ldc, b->jn, acc, !first);
            else dv_tile_8x16(wr, kc, b->cols + (long)k0 * b->ldc, b->ldc, b->jn, acc, !first);
            if (!last) memcpy(saved, acc, sizeof(dv_v16) * 8 * (size_t)nv);
            else if (b->cols == NULL) dv_dtile_store(acc, nv, orow, rows, b->vec, out, ldo, bias, relu);
            else dv_tile_store(acc, nv, orow, rows, b->j0, b->jn, out, ldo, bias, NULL, 0, relu);
        }
    }
}

/* dv_tile_rows on the 32-column tile t (rows ldc apart from `tile`) of an N-column product. */
static inline void dv_gemm_tile_rows(const float *W, long ldw, int O, const float *tile, long ldc, float *out,
                                     long ldo, int K, int N, const float *bias, int relu, int t, dv_v16 *accbuf)
{
    int next_n = N - (t + 1) * 32 < 32 ? N - (t + 1) * 32 : 32;  /* the next tile's output is prefetched */
    dv_tile_src b = {tile, ldc, t * 32, N - t * 32 < 32 ? N - t * 32 : 32, NULL, NULL, NULL, 0, 0,
                     next_n > 0 ? next_n : 0, (long)(t + 1) * 32};
    dv_tile_rows(W, ldw, O, K, &b, out, ldo, bias, relu, accbuf);
}

/* One 8-row block (rows g..g+rows-1) times one 32-column tile t over all of K (the row-outer
 * order, where W is the large operand). */
static inline void dv_gemm_block(const float *W, long ldw, const float *tile, long ldc, float *out,
                                 long ldo, int K, int N, const float *bias, int relu, int g, int rows, int t)
{
    dv_v16 acc[16];
    int orow[8];
    const float *wr[8];
    int j0 = t * 32;
    int jn = N - j0 < 32 ? N - j0 : 32;
    for (int r = 0; r < 8; ++r) {
        orow[r] = g + (r < rows ? r : 0);
        wr[r] = W + (long)orow[r] * ldw;
    }
    if (jn > 16) {
        dv_tile_8x32(wr, K, tile, ldc, jn, acc, 0);
        dv_tile_store(acc, 2, orow, rows, j0, jn, out, ldo, bias, NULL, 0, relu);
    } else {
        dv_tile_8x16(wr, K, tile, ldc, jn, acc, 0);
        dv_tile_store(acc, 1, orow, rows, j0, jn, out, ldo, bias, NULL, 0, relu);
    }
}

/* The unfolded input `cols` (K x N) is addressed in 32-column panels: element (k, j) is at
 * cols[(j / 32) * lds + k * ldc + j % 32]. Row-major storage is lds = 32, ldc = N; the engine's
 * packed storage (each panel's K rows of 32 contiguous) is ldc = 32, lds = rows * 32.

 * Dense GEMM over a range of 32-column tiles: out[o, j] = bias[o] + sum_k W[o, k] cols[k, j]
 * (bias == NULL: out[o, j] += the sum), ReLU if asked, for all O rows and j < N. The operand
 * re-read from cache is the smaller one: with more rows than columns (large weights, small
 * map) each 8-row block of weights stays in L1 while it sweeps the tiles. */
static void dv_gemm_tiles(const float *W, long ldw, int O, const float *cols, long ldc, long lds, float *out,
                          long ldo, int K, int N, const float *bias, int relu, int tile_begin, int tile_end)
{
    if (O > N) {
        int ntile = tile_end - tile_begin;
        long lines = ((long)K * 4 + 63) / 64;  /* cache lines of a weight row */
        for (int g = 0; g < O; g += 8) {
            /* the next 8-row block's weights, a share before each tile, are prefetched into L2:
             * they come from L3 or memory on each image (a large layer's weights outgrow L2)
             * and the 8 short row streams are too short for the hardware prefetchers */
            int next_rows = O - g - 8 < 8 ? O - g - 8 : 8;
            for (int t = tile_begin; t < tile_end; ++t) {
                long l0 = lines * (t - tile_begin) / ntile, l1 = lines * (t - tile_begin + 1) / ntile;
                for (int r = 0; r < next_rows; ++r)
                    for (long l = l0; l < l1; ++l) __builtin_prefetch(W + (long)(g + 8 + r) * ldw + l * 16, 0, 2);
                dv_gemm_block(W, ldw, cols + (long)t * lds, ldc, out, ldo, K, N, bias, relu, g, O - g < 8 ? O - g : 8, t);
            }
        }
    } else {
        dv_v16 *accbuf = (dv_v16 *)__builtin_alloca(sizeof(dv_v16) * 8 * DV_DTILE * (size_t)((O + 7) / 8) + 64);
        accbuf = (dv_v16 *)(((unsigned long)accbuf + 63) & ~63ul);
        for (int t = tile_begin; t < tile_end; ++t)
            dv_gemm_tile_rows(W, ldw, O, cols + (long)t * lds, ldc, out, ldo, K, N, bias, relu, t, accbuf);
    }
}

/* The runs of an im2col into packed panels: output positions j = oy * wo + ox, cut where a panel
 * (32 positions) or an output row ends. Run r is (panel, first lane, offset in the padded input
 * of its first position's tap (0, 0), length); a padded input has (wo - 1) * sw + (kw - 1) * dw + 1
 * columns (Wp) and row oy's taps start at row oy * sh. Returns the number of runs written to
 * `runs` (room for 4 * (ho * wo / 32 + ho + 1) ints). */
static int dv_im2col_runs(int ho, int wo, int sh, int sw, int Wp, int *runs)
{
    int n = 0, N = ho * wo;
    for (int j = 0; j < N;) {
        int oy = j / wo, ox = j % wo;
        int len = wo - ox;
        if (len > 32 - (j & 31)) len = 32 - (j & 31);
        runs[4 * n] = j >> 5;
        runs[4 * n + 1] = j & 31;
        runs[4 * n + 2] = oy * sh * Wp + ox * sw;
        runs[4 * n + 3] = len;
        ++n;
        j += len;
    }
    return n;
}

/* im2col of one input channel `plane` (H x W) into packed panels: rows (ky, kx) starting at
 * `dst` (the channel's first row in panel 0; rows 32 floats apart, panels lds apart) get the
 * input under that tap for every output position. `pad` (Hp x Wp, zero outside the copied
 * input, which lands at row pt, column pl) is the channel with its zero padding, so that every
 * run is a plain (strided) copy. */
static void dv_im2col_plane_packed(const float *plane, int H, int W, int kh, int kw, int sw, int pt, int pl,
                                   int dh, int dw, int Hp, int Wp, float *pad, const int *runs, int nruns,
                                   float *dst, long lds)
{
    int rows = H < Hp - pt ? H : Hp - pt;
    int width = W < Wp - pl ? W : Wp - pl;
    for (int y = 0; y < rows; ++y)
        memcpy(pad + (long)(y + pt) * Wp + pl, plane + (long)y * W, sizeof(float) * (size_t)(width > 0 ? width : 0));
    for (int ky = 0; ky < kh; ++ky) {
        for (int kx = 0; kx < kw; ++kx) {
            float *row = dst + (long)(ky * kw + kx) * 32;
            const float *src = pad + (long)ky * dh * Wp + (long)kx * dw;
            for (int r = 0; r < nruns; ++r) {
                const int *run = runs + 4 * r;
                float *d = row + (long)run[0] * lds + run[1];
                const float *s = src + run[2];
                int len = run[3];
                if (sw == 1) {
                    dv_copy_run(d, s, len);
                } else {
                    dv_copy_strided(d, s, len, sw);
                }
            }
        }
    }
}

/* Dense convolution, im2col fused into the GEMM one 32-position panel at a time, so that the
 * unfolded input never leaves L1: for each tile t in [tile_begin, tile_end), its panel (K rows
 * of 32; row k is tap tap_off[k] of the source) is built from the runs
 * panel_first[t]..panel_first[t+1]-1 (see dv_im2col_runs; offsets in `src`, which is the input
 * with its zero padding, rows row_w apart), then every 8-row block of W (O x K) is applied:
 * out[o, j] = bias[o] + sum_k W[o, k] * panel[k, j], ReLU if asked. `panel` is K * 32 floats. */
static void dv_conv_dense_tiles(const float *src, const long *tap_off, int sw, const int *runs,
                                const int *panel_first, const float *W, int O, int K, int N,
                                const float *bias, int relu, float *out, float *panel,
                                int tile_begin, int tile_end)
{
    dv_v16 *accbuf = (dv_v16 *)__builtin_alloca(sizeof(dv_v16) * 8 * DV_DTILE * (size_t)((O + 7) / 8) + 64);
    accbuf = (dv_v16 *)(((unsigned long)accbuf + 63) & ~63ul);
    for (int t = tile_begin; t < tile_end; ++t) {
        for (int k = 0; k < K; ++k) {
            const float *base = src + tap_off[k];
            float *row = panel + (long)k * 32;
            for (int r = panel_first[t]; r < panel_first[t + 1]; ++r) {
                const int *run = runs + 4 * r;
                const float *s = base + run[2];
                float *d = row + run[1];
                int len = run[3];
                dv_copy_strided(d, s, len, sw);
            }
        }
        dv_gemm_tile_rows(W, K, O, panel, 32, out, N, K, N, bias, relu, t, accbuf);
    }
}

/* Direct convolution of one group: out[o, p] = bias[o] + sum_k W[o, k] src[s(p) + tap_off[k]],
 * ReLU if asked, for the tiles tile_begin..tile_end-1 (DV_DTILE consecutive vectors each, see
 * above), each through dv_tile_rows. */
static void dv_conv_direct(const float *src, const long *tap_off, const int *vec, int nvec,
                           const float *W, int O, int K, const float *bias, int relu, float *out, long ldo,
                           int tile_begin, int tile_end)
{
    dv_v16 *accbuf = (dv_v16 *)__builtin_alloca(sizeof(dv_v16) * 8 * DV_DTILE * (size_t)((O + 7) / 8) + 64);
    accbuf = (dv_v16 *)(((unsigned long)accbuf + 63) & ~63ul);
    for (int t = tile_begin; t < tile_end; ++t) {
        const int *v = vec + DV_DTILE * DV_VEC * t, *next = v + DV_DTILE * DV_VEC;
        int nv = nvec - DV_DTILE * t < DV_DTILE ? nvec - DV_DTILE * t : DV_DTILE;
        dv_tile_src b = {NULL, 0, 0, 0, src, tap_off, v, nv, 0, 0, 0};
        if (t + 1 < tile_end) {  /* the next tile: its source (first weight block), its output lines */
            int last_vec = nvec - 1 < DV_DTILE * (t + 2) - 1 ? nvec - 1 : DV_DTILE * (t + 2) - 1;
            const int *last = vec + DV_VEC * last_vec;
            b.pf = next[0] - v[0];
            b.next_j = next[1];
            b.next_n = last[1] + __builtin_popcount((unsigned)last[3]) - next[1];
        }
        dv_tile_rows(W, K, O, K, &b, out, ldo, bias, relu, accbuf);
    }
}

/* The vectors of a direct convolution (see above) for an ho x wo output whose position
 * (oy, ox) has its tap (0, 0) at source offset oy * sh * row_w + ox: per output row, or, with
 * `across` (needs sh == 1 and row_w >= wo), over consecutive source offsets from the first
 * position to the last. Writes DV_VEC ints per vector; returns their number (room for
 * DV_VEC * (ho * ((wo + 15) / 16) + (ho * row_w + 15) / 16) ints). */
static int dv_direct_vectors(int ho, int wo, int sh, int row_w, int across, int *vec)
{
    int n = 0;
    if (across) {
        int end = (ho - 1) * row_w + wo;  /* one past the last position's source offset */
        for (int p = 0; p < end; p += 16, ++n) {
            int lanes = end - p < 16 ? end - p : 16;
            unsigned mask = 0;
            int first = -1;
            for (int l = 0; l < lanes; ++l) {
                int oy = (p + l) / row_w, ox = (p + l) % row_w;
                if (ox < wo) {
                    mask |= 1u << l;
                    if (first < 0) first = oy * wo + ox;
                }
            }
            if (mask == 0) { --n; continue; }  /* only dropped columns */
            int *v = vec + DV_VEC * n;
            v[0] = p; v[1] = first; v[2] = lanes; v[3] = (int)mask;
        }
        return n;
    }
    for (int oy = 0; oy < ho; ++oy)
        for (int ox = 0; ox < wo; ox += 16, ++n) {
            int *v = vec + DV_VEC * n;
            v[0] = oy * sh * row_w + ox;
            v[1] = oy * wo + ox;
            v[2] = wo - ox < 16 ? wo - ox : 16;
            v[3] = (int)((1u << v[2]) - 1u);
        }
    return n;
}

/* Copy channels of a (C x H x W) input into zero-padded planes (C x Hp x Wp, input at row pt,
 * column pl); every element of the padded planes is written. */
static void dv_pad_planes(const float *x, int C, int H, int W, int pt, int pl, int Hp, int Wp, float *dst)
{
    for (int c = 0; c < C; ++c) {
        const float *plane = x + (long)c * H * W;
        float *d = dst + (long)c * Hp * Wp;
        for (int y = 0; y < Hp; ++y) {
            float *row = d + (long)y * Wp;
            int iy = y - pt;
            if (iy < 0 || iy >= H) { memset(row, 0, sizeof(float) * (size_t)Wp); continue; }
            int x0 = pl < Wp ? pl : Wp;
            int n = W < Wp - x0 ? W : Wp - x0;
            if (x0) memset(row, 0, sizeof(float) * (size_t)x0);
            if (n > 0) memcpy(row + x0, plane + (long)iy * W, sizeof(float) * (size_t)n);
            if (x0 + n < Wp) memset(row + x0 + (n > 0 ? n : 0), 0, sizeof(float) * (size_t)(Wp - x0 - (n > 0 ? n : 0)));
        }
    }
}

/* One phase plane of a strided convolution's input: of the zero-padded plane (input at row
 * pt, column pl), the rows py, py + s, ... and columns px, px + s, ..., as Hq x Wq (zeros past
 * the padded plane). A stride-s convolution reads tap (ky, kx) of output (oy, ox) at row
 * oy + ky / s, column ox + kx / s of phase plane (ky % s, kx % s): a stride-1 read. Every
 * element of dst is written. */
static void dv_phase_plane(const float *plane, int H, int W, int pt, int pl, int s, int py, int px,
                           int Hq, int Wq, float *dst)
{
    int q0 = pl - px > 0 ? (pl - px + s - 1) / s : 0;  /* first qx with an input column */
    int q1 = (W + pl - px + s - 1) / s;                 /* one past the last */
    if (q1 > Wq) q1 = Wq;
    if (q0 > q1) q0 = q1;
    for (int qy = 0; qy < Hq; ++qy) {
        float *row = dst + (long)qy * Wq;
        int iy = qy * s + py - pt;
        if (iy < 0 || iy >= H || q0 == q1) { memset(row, 0, sizeof(float) * (size_t)Wq); continue; }
        if (q0) memset(row, 0, sizeof(float) * (size_t)q0);
        dv_copy_strided(row + q0, plane + (long)iy * W + (q0 * s + px - pl), q1 - q0, s);
        if (q1 < Wq) memset(row + q1, 0, sizeof(float) * (size_t)(Wq - q1));
    }
}

/* The runs of an unfolding of the output positions pos[0..n-1] (increasing, y * wo + x) into
 * packed panels, column i of the unfolded matrix being position pos[i]: a run is (panel, first
 * lane, offset of its first position's tap (0, 0) in the padded input (rows Wp apart), length,
 * stride in the input between its positions). A run stays in one panel and one output row, with
 * one x step. Returns the number of runs (room for 5 * n ints in `runs`). */
static int dv_position_runs(const int *pos, int n, int wo, int sh, int sw, int Wp, int *runs)
{
    int nr = 0;
    for (int i = 0; i < n;) {
        int oy = pos[i] / wo, ox = pos[i] % wo;
        int len = 1, step = 0;
        while (i + len < n && ((i + len) & 31) != 0) {
            int q = pos[i + len];
            int qy = q / wo, qx = q % wo;
            int d = qx - (ox + (len - 1) * step);
            if (qy != oy) break;
            if (len == 1) { step = qx - ox; if (step <= 0) break; }
            else if (d != step) break;
            ++len;
        }
        int *r = runs + 5 * nr++;
        r[0] = i >> 5;
        r[1] = i & 31;
        r[2] = oy * sh * Wp + ox * sw;
        r[3] = len;
        r[4] = (len > 1 ? step : 1) * sw;
        i += len;
    }
    return nr;
}

/* d[j] = s[idx[j]] for j < n. */
static inline void dv_gather(float *restrict d, const float *restrict s, const int *restrict idx, int n)
{
    for (int j = 0; j < n; ++j) d[j] = s[idx[j]];
}

/* Write a knob tile: entry (r, j) goes to out[orow[r] * npos + pos[j]]: part + sum (acc, nv
 * vectors per row; acc == NULL: part alone) ReLU'd where act, 0 where stop, else unchanged.
 * Positions that are consecutive (the whole tile in one run) are written as a block. */
static inline void dv_knob_store(float *out, int npos, const int *orow, int rows, const int *pos, int jn,
                                 float part[8][32], unsigned char act[8][32], unsigned char stop[8][32],
                                 const dv_v16 *acc, int nv, int relu)
{
    int block = pos[jn - 1] - pos[0] == jn - 1;
    for (int r = 0; r < rows; ++r) {
        float v[32];
        if (acc != NULL) memcpy(v, &acc[r * nv], sizeof(float) * 16 * (size_t)nv);
        else memset(v, 0, sizeof v);
        for (int j = 0; j < jn; ++j) {
            float x = part[r][j] + (acc != NULL ? v[j] : 0.0f);
            v[j] = (relu && x < 0.0f) ? 0.0f : x;
        }
        float *dst = out + (long)orow[r] * npos;
        if (block) {
            float *d = dst + pos[0];
            for (int j = 0; j < jn; ++j) d[j] = act[r][j] ? v[j] : (stop[r][j] ? 0.0f : d[j]);
        } else {
            for (int j = 0; j < jn; ++j) {
                float *d = dst + pos[j];
                *d = act[r][j] ? v[j] : (stop[r][j] ? 0.0f : *d);
            }
        }
    }
}

/* The knobs' conv kernel, for one group: the outputs at output positions pos[0..n-1] (the SDSS
 * grid, the positions some map still needs, or all), unfolded tile by tile into `panel` (K x 32,
 * row k = source at tap_off[k], runs from dv_position_runs with runs_first[t] indexing tile t).
 * Output (o, i) is active when mask == NULL or mask[o * n + i]; a tile computes, eight at a time,
 * the output channels with an active entry in it. Each active output starts from
 * b = bias[o] (+ cst[o * npos + pos[i]] when cst != NULL, SFMA's constant maps). Without SPET
 * (spet == 0) it is b + the dot product over all K rows; with SPET the partial p = b + the dot
 * product over rows < lead is compared first: p < -margin stops it (output 0), else it is
 * p + the dot product over rows lead..K-1. ReLU if asked. Results go to out[o * npos + pos[i]].
 * stats[0] += outputs stopped, stats[1] += outputs active. `list` holds O ints. */
static void dv_knob_tiles(const float *src, const long *tap_off, const int *runs, const int *runs_first,
                          int wo, int sh, int sw, int row_width,
                          const float *W, long ldw, int O, int K, int lead, const int *pos, int n,
                          const unsigned char *mask, const float *bias, const float *cst, float *out, int npos,
                          int spet, float margin, int relu, float *panel, int *list, int tile_begin,
                          int tile_end, long long *stats)
{
    dv_v16 acc[16];
    const float *wr[8];
    float part[8][32];
    unsigned char act[8][32], stop[8][32];
    for (int t = tile_begin; t < tile_end; ++t) {
        int j0 = t * 32;
        int jn = n - j0 < 32 ? n - j0 : 32;
        int nv = jn > 16 ? 2 : 1;
        /* the rows with an active entry in this tile */
        int nrows = 0;
        for (int o = 0; o < O; ++o) {
            int any = mask == NULL;
            if (!any) {
                const unsigned char *m = mask + (long)o * n + j0;
                for (int j = 0; j < jn; ++j) any |= m[j];
            }
            if (any) list[nrows++] = o;
        }
        if (nrows == 0) continue;
        if (runs_first[t + 1] - runs_first[t] <= 2) {  /* one or two runs: block copies */
            for (int k = 0; k < K; ++k) {
                const float *base = src + tap_off[k];
                float *row = panel + (long)k * 32;
                for (int r = runs_first[t]; r < runs_first[t + 1]; ++r) {
                    const int *run = runs + 5 * r;
                    dv_copy_strided(row + run[1], base + run[2], run[3], run[4]);
                }
            }
        } else {  /* scattered positions (SDSS): one gather per row */
            int idx[32];
            for (int j = 0; j < jn; ++j) {
                int q = pos[j0 + j];
                idx[j] = (q / wo) * sh * row_width + (q % wo) * sw;
            }
            for (int k = 0; k < K; ++k) dv_gather(panel + (long)k * 32, src + tap_off[k], idx, jn);
        }
        for (int g = 0; g < nrows; g += 8) {
            int rows = nrows - g < 8 ? nrows - g : 8;
            for (int r = 0; r < 8; ++r) wr[r] = W + (long)list[g + (r < rows ? r : 0)] * ldw;
            /* the starting values, and which entries are active (branch-free: SPET's outcome is
             * data-dependent and would defeat the branch predictor) */
            for (int r = 0; r < rows; ++r) {
                int o = list[g + r];
                const unsigned char *m = mask != NULL ? mask + (long)o * n + j0 : NULL;
                float b0 = bias[o];
                for (int j = 0; j < 32; ++j) act[r][j] = j < jn && (m == NULL || m[j < jn ? j : 0]);
                if (cst != NULL) {
                    const float *cr = cst + (long)o * npos;
                    for (int j = 0; j < jn; ++j) part[r][j] = b0 + cr[pos[j0 + j]];
                } else {
                    for (int j = 0; j < 32; ++j) part[r][j] = b0;
                }
            }
            int any_cont = 0;
            long long stopped = 0, active = 0;
            if (spet) {
                float neg = -margin;
                if (lead > 0) {
                    if (nv == 2) dv_tile_8x32(wr, lead, panel, 32, jn, acc, 0);
                    else dv_tile_8x16(wr, lead, panel, 32, jn, acc, 0);
                }
                for (int r = 0; r < rows; ++r) {
                    float sum[32];
                    if (lead > 0) memcpy(sum, &acc[r * nv], sizeof(float) * 16 * (size_t)nv);
                    else memset(sum, 0, sizeof sum);
                    if (nv == 1) memset(sum + 16, 0, sizeof(float) * 16);
                    for (int j = 0; j < 32; ++j) {
                        float p = part[r][j] + sum[j];
                        int a = act[r][j];
                        int st = a & (p < neg);
                        part[r][j] = p;
                        stop[r][j] = (unsigned char)st;
                        act[r][j] = (unsigned char)(a & !st);
                        stopped += st;
                        active += a;
                        any_cont |= a & !st;
                    }
                }
                stats[0] += stopped;
                stats[1] += active;
                if (!any_cont) {
                    dv_knob_store(out, npos, list + g, rows, pos + j0, jn, part, act, stop, NULL, 0, relu);
                    continue;
                }
                for (int r = 0; r < 8; ++r) wr[r] += lead;
                if (nv == 2) dv_tile_8x32(wr, K - lead, panel + (long)lead * 32, 32, jn, acc, 0);
                else dv_tile_8x16(wr, K - lead, panel + (long)lead * 32, 32, jn, acc, 0);
            } else {
                for (int r = 0; r < rows; ++r)
                    for (int j = 0; j < 32; ++j) { active += act[r][j]; stop[r][j] = 0; }
                stats[1] += active;
                if (nv == 2) dv_tile_8x32(wr, K, panel, 32, jn, acc, 0);
                else dv_tile_8x16(wr, K, panel, 32, jn, acc, 0);
            }
            dv_knob_store(out, npos, list + g, rows, pos + j0, jn, part, act, stop, acc, nv, relu);
        }
    }
}

/* The mean of x[0..n-1]: 16 float lanes summed as they come, the lanes then in double. */
static inline float dv_mean(const float *x, int n)
{
    dv_v16 acc = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) acc += dv_load16(x + i);
    if (i < n) acc += dv_load16_part(x + i, n - i);
    double total = 0.0;
    for (int l = 0; l < 16; ++l) total += acc[l];
    return (float)(total / n);
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

/* The larger of a and b as (b > a ? b : a), lane by lane (a NaN in b keeps a). */
static inline dv_v16 dv_vmax(dv_v16 a, dv_v16 b)
{
    dv_i16 m = (dv_i16)(b > a);
    return (dv_v16)(((dv_i16)b & m) | ((dv_i16)a & ~m));
}

/* __builtin_shufflevector: GCC >= 12 and Clang (a GCC without __has_builtin has none). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define DV_HAVE_SHUFFLEVECTOR 1
#endif
#endif
#ifndef DV_HAVE_SHUFFLEVECTOR
#define DV_HAVE_SHUFFLEVECTOR 0
#endif

/* p[0], p[s], ..., p[15 s] for s = 1 or 2 (p[0 .. 16 s - 1] readable). */
static inline dv_v16 dv_load16_stride(const float *p, int s)
{
    if (s == 1) return dv_load16(p);
#if DV_HAVE_SHUFFLEVECTOR
    dv_v16 a = dv_load16(p), b = dv_load16(p + 16);
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#else
    dv_v16 v;
    for (int l = 0; l < 16; ++l) v[l] = p[2 * l];
    return v;
#endif
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

/* Max pooling of one H x W plane into ho x wo (-inf padding: windows clipped to the input).
 * First every output row's window rows are reduced into its own row of `acc` (ho rows of
 * dv_pool_row_stride floats), then the windows are taken along the rows: the second step reads
 * what the first stored long before (a load overlapping a store still in flight waits for it). */
static void dv_maxpool_plane(const float *in, int H, int W, float *out, int ho, int wo, int kh, int kw,
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
        dv_i16 some = (dv_i16)(count > (dv_v16){0});
        count = (dv_v16)(((dv_i16)count & some) | ((dv_i16)DV_SPLAT(1.0f) & ~some));
        v = (dv_v16)((dv_i16)(v / count) & some);
        if (n == 16) dv_store16(o + ox, v);
        else dv_store16_part(o + ox, v, n);
    }
}

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

/* Average pooling of one plane, onnxruntime's divisor rule (see _kernels.avgpool): the window
 * sum over the taps inside the input (acc is zero elsewhere), divided by the window clipped
 * to the padded input (count_include_pad) or by the taps inside the input. `acc` holds ho rows
 * of dv_pool_row_stride floats (the two steps of dv_maxpool_plane), then wo floats for the
 * column counts. */
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
