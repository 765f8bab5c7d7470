/* The GEMM of the engine: register tiles (8 output rows times 16, 32 or 48 columns) over an
 * unfolded input in 32-column panels or over the direct route's vectors loaded in place, their
 * stores (bias, ReLU, masks), and the drivers sharing a layer's tiles out; and the
 * matrix-vector product of a fully-connected layer on one image. */
#ifndef DYVEDEEP_DV_GEMM_H
#define DYVEDEEP_DV_GEMM_H

#include "dv_vector.h"

/* Rows of the unfolded input fetched ahead in the GEMM loops: its rows are a row stride apart
 * (often in different pages), where the hardware prefetchers do not follow. */
#ifndef DV_PREFETCH_ROWS
#define DV_PREFETCH_ROWS 8
#endif

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
                if (relu) x = dv_relu16(x);
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

/* Write one vector of a direct tile's output row `row`: base + x, ReLU if asked, at the output
 * offset of vector q (the lanes its mask selects). */
static inline __attribute__((always_inline)) void dv_dvec_store(float *row, const int *q, dv_v16 base, dv_v16 x,
                                                             int relu)
{
    unsigned mask = (unsigned)q[3];
    x = base + x;
    if (relu) x = dv_relu16(x);
    float *dst = row + q[1];
    if (mask == 0xFFFFu) dv_store16(dst, x);
    else if (mask == (1u << q[2]) - 1u) dv_store16_part(dst, x, q[2]);
    else dv_store16_compress(dst, x, mask);
}

#if DV_VW == 16
#include "dv_tiles_avx512.h"
#else
#include "dv_tiles_small.h"
#endif

/* Write a direct tile: bias[o] + sum, ReLU if asked, to row o at each vector's output offset
 * (the lanes its mask selects). */
static inline void dv_dtile_store(const dv_v16 *acc, int nvec, const int *orow, int rows, const int *vec,
                                  float *out, long ldo, const float *bias, int relu)
{
    for (int r = 0; r < rows; ++r) {
        int o = orow[r];
        dv_v16 base = DV_SPLAT(bias[o]);
        for (int v = 0; v < nvec; ++v) dv_dvec_store(out + (long)o * ldo, vec + DV_VEC * v, base, acc[r * nvec + v], relu);
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
#ifdef DV_DTILE_STORES
            if (b->cols == NULL && first && last && nv == DV_DTILE && dv_dtile_stores(wr, kc, b->src, b->tap, b->vec,
                                                                                      orow, rows, out, ldo, bias, relu,
                                                                                      g == 0 ? b->pf : 0))
                continue;
#endif
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

/* out[o] = bias[o] + W[o, 0..K-1] . x (rows ldw floats apart), ReLU'd if relu, for o in
 * [begin, end): a fully-connected layer on one image. Each dot product in four machine-vector
 * lanes of running sums (x[k] w[k] into lane set (k / DV_VW) % 4 while whole groups of 4 DV_VW
 * last, then into the first), summed in a fixed order, then the tail in order: the same floats
 * for any split of the rows. */
static void dv_gemv_rows(const float *W, long ldw, int K, const float *x, const float *bias, int relu, float *out,
                         int begin, int end)
{
    for (int o = begin; o < end; ++o) {
        const float *w = W + (long)o * ldw;
        dv_vn acc[4], a, b;
        for (int j = 0; j < 4; ++j) acc[j] = (dv_vn){0};
        int k = 0;
        for (; k + 4 * DV_VW <= K; k += 4 * DV_VW)
            for (int j = 0; j < 4; ++j) {
                memcpy(&a, w + k + j * DV_VW, sizeof a);
                memcpy(&b, x + k + j * DV_VW, sizeof b);
                acc[j] += a * b;
            }
        for (; k + DV_VW <= K; k += DV_VW) {
            memcpy(&a, w + k, sizeof a);
            memcpy(&b, x + k, sizeof b);
            acc[0] += a * b;
        }
        dv_vn lanes = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        float sum = 0.0f;
        for (int l = 0; l < DV_VW; ++l) sum += lanes[l];
        for (; k < K; ++k) sum += w[k] * x[k];
        float v = bias[o] + sum;
        out[o] = relu && v < 0.0f ? 0.0f : v;
    }
}

#endif
