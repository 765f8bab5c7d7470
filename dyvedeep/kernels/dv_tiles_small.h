/* The register tiles of the GEMM for the smaller register files (AVX2 with FMA: 16 registers of 8
 * floats; NEON: 32 of 4): the same tile API as dv_tiles_avx512.h (8 output rows times 16 or 32
 * columns, sums in `acc` as 16-float vectors, row r's vectors at acc[nv * r ..]), each tile computed
 * as sub-tiles of R rows x C machine vectors that keep their DV_ACCS accumulators, C source
 * vectors and one broadcast weight in registers (AVX2: 2 x 4 vectors = 2 rows x 32 columns, 4 x
 * 2 for 16 columns; NEON: 4 x 4 vectors = 4 rows x 16 columns). Every output is still summed
 * over k in order from zero (or the saved sums), so the floats equal those of the AVX-512 tiles.
 * Included by dv_gemm.h. */
#ifndef DYVEDEEP_DV_TILES_SMALL_H
#define DYVEDEEP_DV_TILES_SMALL_H

#include "dv_vector.h"

/* Vectors per direct tile: 2 (32 columns), as the panel tiles. */
#define DV_DTILE 2

/* Machine vectors per sub-tile row (C) and the rows that fit with them (R): DV_ACCS
 * accumulators for 4 vectors a row, 4 rows for 2 vectors (16 columns on AVX2). */
#define DV_NR 4
#define DV_SUB_C(nvn) ((nvn) < DV_NR ? (nvn) : DV_NR)
#define DV_SUB_R(c) ((c) >= DV_NR ? DV_ACCS / DV_NR : 4)

#if DV_VW == 8
#define DV_SPLATN(x) ((dv_vn){(x), (x), (x), (x), (x), (x), (x), (x)})
#else
#define DV_SPLATN(x) ((dv_vn){(x), (x), (x), (x)})
#endif

static inline dv_vn dv_loadn(const float *p) { dv_vn v; memcpy(&v, p, sizeof v); return v; }
static inline void dv_storen(float *p, dv_vn v) { memcpy(p, &v, sizeof v); }

/* Machine vectors in a 16-float vector. */
#define DV_PER16 (16 / DV_VW)

/* One sub-tile: rows wr[0..R-1] times the machine vectors c0..c0+C-1 of the 16-float vectors
 * whose row k is at src[v] + k * ldc (tap == NULL) or src[v] + tap[k] (vector c at
 * src[c / DV_PER16] + (c % DV_PER16) * DV_VW), all lanes. acc: row r's vector c at acc + r * ld +
 * c * DV_VW floats (the sums so far: zeros to start). With pf != 0, each step prefetches the
 * source lines pf floats ahead. R, C and c0 are constants where it is inlined, so that the
 * accumulators live in registers (named by the unrolled loops). */
static inline __attribute__((always_inline)) void
dv_subtile(const float *const *wr, int K, const float *const *src, long ldc, const long *tap, float *acc, long ld,
           long pf, const int R, const int C, const int c0)
{
    dv_vn a[8][DV_NR];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) memcpy(&a[r][c], acc + r * ld + (c0 + c) * DV_VW, sizeof(dv_vn));
    for (int k = 0; k < K; ++k) {
        long off = tap != NULL ? tap[k] : k * ldc;
        dv_vn b[DV_NR];
        if (pf != 0) {
#pragma GCC unroll 8
            for (int c = 0; c < C; c += DV_PER16) __builtin_prefetch(src[(c0 + c) / DV_PER16] + off + pf);
        }
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c)
            b[c] = dv_loadn(src[(c0 + c) / DV_PER16] + off + ((c0 + c) % DV_PER16) * DV_VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            float w = wr[r][k];
            dv_vn s = DV_SPLATN(w);
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) a[r][c] += s * b[c];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) memcpy(acc + r * ld + (c0 + c) * DV_VW, &a[r][c], sizeof(dv_vn));
    /* the sums stay in acc: without this GCC forwarded them in registers to the next sub-tile or
     * block that resumes them, keeping every sub-tile's accumulators live at once (spilled) */
    __asm__ __volatile__("" : : "r"(acc) : "memory");
}

/* The 8 rows wr times NV 16-float vectors (src, ldc, tap as dv_subtile), sums in acc (rows ld
 * floats apart), as sub-tiles of DV_SUB_R rows x DV_SUB_C machine vectors; the first rows
 * prefetch. */
static inline __attribute__((always_inline)) void
dv_tile_full(const float *const *wr, int K, const float *const *src, long ldc, const long *tap, float *acc, long ld,
             int resume, long pf, const int NV)
{
    const int NVN = NV * DV_PER16, C = DV_SUB_C(NVN), R = DV_SUB_R(DV_SUB_C(NVN));
    if (!resume) {
        /* the sub-tiles start from zeros in memory: zeros set in registers were hoisted out of
         * every sub-tile by GCC and kept live at once (spilled) */
        memset(acc, 0, sizeof(float) * 8 * (size_t)ld);
        __asm__ __volatile__("" : : "r"(acc) : "memory");
    }
#pragma GCC unroll 8
    for (int c0 = 0; c0 < NVN; c0 += C) {
        int r0 = 0;
        if (pf != 0) {  /* separate loops with and without the prefetches: GCC spilled merged ones */
            dv_subtile(wr, K, src, ldc, tap, acc, ld, pf, R, C, c0);
            r0 = R;
        }
        for (; r0 + R <= 8; r0 += R)
            dv_subtile(wr + r0, K, src, ldc, tap, acc + r0 * ld, ld, 0, R, C, c0);
        if (8 % R != 0) dv_subtile(wr + r0, K, src, ldc, tap, acc + r0 * ld, ld, 0, 8 % R, C, c0);
    }
}

/* Rows of the source a partial tile copies at a time (see dv_tile_any). */
#define DV_PART_ROWS 64

/* dv_tile_full where the 16-float vectors v have n[v] (0..16) lanes: a tile with a partial
 * vector copies DV_PART_ROWS rows of its source at a time into a zero-padded block and runs on
 * that (masked loads cannot be folded into the FMAs, and their masks would take the registers
 * the accumulators need). */
static inline __attribute__((always_inline)) void
dv_tile_any(const float *const *wr, int K, const float *const *src, const int *n, long ldc, const long *tap,
            float *acc, long ld, int resume, long pf, const int NV)
{
    int full = 1;
    for (int v = 0; v < NV; ++v) full &= n[v] == 16;
    if (full) {
        if (tap != NULL) dv_tile_full(wr, K, src, 0, tap, acc, ld, resume, pf, NV);
        else dv_tile_full(wr, K, src, ldc, NULL, acc, ld, resume, pf, NV);
        return;
    }
    if (K <= 0) {  /* an empty sum (SPET's rest when the lead is every input): zeros */
        if (!resume)
            for (int r = 0; r < 8; ++r) memset(acc + (long)r * ld, 0, sizeof(float) * 16 * (size_t)NV);
        return;
    }
    float block[DV_PART_ROWS * 32] __attribute__((aligned(64)));
    const float *bsrc[2] = {block, block + 16};
    for (int k0 = 0; k0 < K; k0 += DV_PART_ROWS) {
        int kc = K - k0 < DV_PART_ROWS ? K - k0 : DV_PART_ROWS;
        const float *w[8];
        for (int r = 0; r < 8; ++r) w[r] = wr[r] + k0;
        memset(block, 0, sizeof(float) * (size_t)kc * 16 * NV);
        for (int k = 0; k < kc; ++k) {
            long off = tap != NULL ? tap[k0 + k] : (long)(k0 + k) * ldc;
            for (int v = 0; v < NV; ++v)
                if (n[v] > 0) memcpy(block + (long)(k * NV + v) * 16, src[v] + off, sizeof(float) * (size_t)n[v]);
        }
        dv_tile_full(w, kc, bsrc, 16 * NV, NULL, acc, ld, resume || k0 > 0, 0, NV);
    }
}

/* The panel tiles: eight output rows (wr[r][k], k < K) times up to 32 (16) columns
 * (cols[k * ldc + j], j < jn) of the unfolded input, summed over k in order into acc[2 r] and
 * acc[2 r + 1] (acc[r]). Rows of the panel are read DV_PREFETCH_ROWS rows ahead. */
static inline void dv_tile_8x32(const float *const *wr, int K, const float *cols, long ldc, int jn,
                                dv_v16 *acc, int resume)
{
    const float *src[2] = {cols, cols + 16};
    int n[2] = {jn < 16 ? jn : 16, jn > 16 ? jn - 16 : 0};
    dv_tile_any(wr, K, src, n, ldc, NULL, (float *)acc, 32, resume, jn == 32 ? DV_PREFETCH_ROWS * ldc : 0, 2);
}

static inline void dv_tile_8x16(const float *const *wr, int K, const float *cols, long ldc, int jn,
                                dv_v16 *acc, int resume)
{
    const float *src[1] = {cols};
    int n[1] = {jn};
    dv_tile_any(wr, K, src, n, ldc, NULL, (float *)acc, 16, resume, jn == 16 ? DV_PREFETCH_ROWS * ldc : 0, 1);
}

/* One direct tile: vectors vec[0..nvec-1] (nvec 1..DV_DTILE) times rows wr, over taps
 * tap[0..K-1]; acc[nvec * r + v]. With pf != 0 the source lines pf floats ahead (the next
 * tile's) are prefetched. */
static inline void dv_dtile(const float *const *wr, int K, const float *src, const long *tap, const int *vec,
                            int nvec, dv_v16 *acc, int resume, long pf)
{
    const float *s[2] = {src + vec[0], src + vec[nvec > 1 ? DV_VEC : 0]};
    int n[2] = {vec[2], vec[nvec > 1 ? DV_VEC + 2 : 2]};
    if (nvec == 2) dv_tile_any(wr, K, s, n, 0, tap, (float *)acc, 32, resume, pf, 2);
    else dv_tile_any(wr, K, s, n, 0, tap, (float *)acc, 16, resume, pf, 1);
}

#endif
