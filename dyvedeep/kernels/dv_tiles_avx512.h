/* The register tiles of the GEMM for AVX-512 (32 registers of 16 floats): 8 output rows times
 * one, two or three 16-float vectors held in named accumulators (up to 24 registers). The tile
 * API (dv_tile_8x32, dv_tile_8x16, dv_dtile, DV_DTILE) is the one dv_tiles_small.h implements
 * for the smaller register files. Included by dv_gemm.h. */
#ifndef DYVEDEEP_DV_TILES_AVX512_H
#define DYVEDEEP_DV_TILES_AVX512_H

#include "dv_vector.h"

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

/* Vectors per direct tile: 8 output rows x 3 vectors (24 accumulators), so that each step loads
 * 3 source vectors and 8 weights for 24 fused multiply-adds. */
#define DV_DTILE 3

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

/* A whole direct tile of three full vectors (K within one DV_KC block) stored from its
 * registers: bias + sum, ReLU if asked, for the `rows` output rows orow[r] (dv_dvec_store), the
 * operations of dv_dtile_8x48 then dv_dtile_store without the round trip of the 24 sums
 * through memory (a tenth of a 1x1 layer's time at K = 16). Returns 0, doing nothing, when a
 * vector has fewer than 16 lanes. */
#define DV_DTILE_STORES 1
static inline int dv_dtile_stores(const float *const *wr, int K, const float *src, const long *tap, const int *vec,
                                  const int *orow, int rows, float *out, long ldo, const float *bias, int relu, long pf)
{
    const int *v1 = vec + DV_VEC, *v2 = vec + 2 * DV_VEC;
    if (vec[2] != 16 || v1[2] != 16 || v2[2] != 16) return 0;
    const float *s0 = src + vec[0], *s1 = src + v1[0], *s2 = src + v2[0];
    dv_v16 *none = NULL;
    DV_T48_BEGIN(wr, none, 0);
    if (pf != 0) {
        for (int k = 0; k < K; ++k) {
            long t = tap[k];
            __builtin_prefetch(s0 + t + pf); __builtin_prefetch(s1 + t + pf); __builtin_prefetch(s2 + t + pf);
            dv_v16 c0 = dv_load16(s0 + t), c1 = dv_load16(s1 + t), c2 = dv_load16(s2 + t);
            DV_T48_STEP(c0, c1, c2, k);
        }
    } else {
        for (int k = 0; k < K; ++k) {
            long t = tap[k];
            dv_v16 c0 = dv_load16(s0 + t), c1 = dv_load16(s1 + t), c2 = dv_load16(s2 + t);
            DV_T48_STEP(c0, c1, c2, k);
        }
    }
#define DV_T48_PUT(r, x0, x1, x2)                                                                  \
    if ((r) < rows) {                                                                              \
        float *row_ = out + (long)orow[r] * ldo;                                                   \
        dv_v16 base_ = DV_SPLAT(bias[orow[r]]);                                                    \
        dv_dvec_store(row_, vec, base_, x0, relu);                                                 \
        dv_dvec_store(row_, v1, base_, x1, relu);                                                  \
        dv_dvec_store(row_, v2, base_, x2, relu);                                                  \
    }
    DV_T48_PUT(0, a00, a01, a02) DV_T48_PUT(1, a10, a11, a12) DV_T48_PUT(2, a20, a21, a22)
    DV_T48_PUT(3, a30, a31, a32) DV_T48_PUT(4, a40, a41, a42) DV_T48_PUT(5, a50, a51, a52)
    DV_T48_PUT(6, a60, a61, a62) DV_T48_PUT(7, a70, a71, a72)
#undef DV_T48_PUT
    return 1;
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

#endif
