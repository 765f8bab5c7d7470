/* The dense path's kernels as steps, and their run by one OpenMP team.
 *
 * A step is one dense-path kernel over a layer (or a group, or a band of rows of one) with the
 * number of threads that share it out: padding, phase planes, the direct and fused convolution
 * routes, unfolding and GEMM, max and average pooling, channel means. dv_run_steps runs a list
 * of them inside one parallel region, each thread doing its share of a step and then waiting
 * at a barrier for the others before the next step. The wrappers of _kernels.pyx either run
 * their steps at once or append them to a Program, which holds a whole run of dense layers
 * (docs/engine.md: one parallel region per image instead of one per kernel call). Each share
 * is the same kernel call either way, so every output is computed by the same operations. */
#ifndef DYVEDEEP_PROGRAM_H
#define DYVEDEEP_PROGRAM_H

#include <omp.h>
#include "_simd.h"

enum {
    DV_STEP_PAD,      /* dv_pad_planes, channels shared out */
    DV_STEP_PHASE,    /* dv_phase_plane, planes shared out */
    DV_STEP_DIRECT,   /* dv_conv_direct: tiles or 8-row blocks of weights shared out */
    DV_STEP_DENSE,    /* dv_conv_dense_tiles: likewise, one panel scratch per thread */
    DV_STEP_IM2COL,   /* dv_im2col_plane_packed, channels shared out, one pad scratch per thread */
    DV_STEP_GEMM,     /* dv_gemm_tiles on packed panels: tiles or 8-row blocks shared out */
    DV_STEP_MAXPOOL,  /* dv_maxpool_plane, planes shared out, one row scratch per thread */
    DV_STEP_AVGPOOL,  /* dv_avgpool_plane, likewise */
    DV_STEP_MEAN      /* dv_mean of each row (global average pooling), rows shared out */
};

typedef struct {
    int kind;           /* DV_STEP_* */
    int threads;        /* how many threads share the step out (threads 0..threads-1 of the team) */
    const float *x;     /* the step's input (its source planes, panels or map) */
    long x_offset;      /* with x_from_image: x is the image's data + x_offset floats */
    int x_from_image;
    float *out;
    long ldo;           /* floats between output rows (GEMM, convolutions) or planes (pooling) */
    float *scratch;     /* thread t's scratch at scratch + t * scratch_stride */
    long scratch_stride;
    const float *W;     /* convolutions, GEMM: weights (O x K, rows ldw apart) and bias (or NULL) */
    long ldw;
    const float *bias;
    int relu;
    const long *tap_off;      /* convolutions: each unfolded row's offset in the source */
    const int *table;         /* direct: vectors; dense, im2col: runs; im2col: channels in table2 */
    const int *table2;        /* dense: each panel's first run; im2col: the channels */
    int O, K, N, n;           /* rows, inner dimension, positions; n: vectors, runs or planes */
    long ldc, lds;            /* GEMM: packed panels (column stride in a panel, panel stride) */
    int C, H, Wd;             /* pad, phase, im2col, pooling, mean: the input's channels and plane */
    int kh, kw, sh, sw, pt, pl, pb, pr, dh, dw;
    int ho, wo, Hp, Wp;       /* output plane; padded (or phase) planes */
    int flag;                 /* avgpool: count_include_pad */
} dv_step;

/* Thread t's share [*begin, *end) of n items split in T contiguous parts. */
static inline void dv_share(int n, int t, int T, int *begin, int *end)
{
    *begin = (int)((long)n * t / T);
    *end = (int)((long)n * (t + 1) / T);
}

/* First row of part `part` of `parts` when the 8-row blocks of O rows are shared out (O for
 * part == parts). */
static inline int dv_block_start(int part, int nblocks, int parts, int O)
{
    int row = 8 * (int)((long)part * nblocks / parts);
    return row < O ? row : O;
}

/* Whether a convolution's threads share out its 8-row blocks of weights rather than its tiles:
 * when the tiles are too few to share out evenly (a 14 x 14 map has 5 direct tiles) and there
 * are rows enough. Every thread then does all the tiles for its rows. */
static inline int dv_split_rows(int T, int ntiles, int O)
{
    return T > 1 && ntiles < 4 * T && (O + 7) / 8 >= 2 * T;
}

/* The share of thread t of T of a convolution with O rows and ntiles tiles: its rows
 * [*g0, *g1) and tiles [*t0, *t1); returns 0 when the thread has no part in it. `rows_first`:
 * share out the 8-row blocks (dv_split_rows, or the GEMM's rule). */
static inline int dv_conv_share(int rows_first, int O, int ntiles, int t, int T, int *g0, int *g1, int *t0,
                                int *t1)
{
    if (rows_first) {
        int nblocks = (O + 7) / 8, parts = T < nblocks ? T : nblocks;
        if (t >= parts) return 0;
        *g0 = dv_block_start(t, nblocks, parts, O);
        *g1 = dv_block_start(t + 1, nblocks, parts, O);
        *t0 = 0;
        *t1 = ntiles;
        return 1;
    }
    int parts = T < ntiles ? T : ntiles;
    if (t >= parts) return 0;
    *g0 = 0;
    *g1 = O;
    dv_share(ntiles, t, parts, t0, t1);
    return 1;
}

/* Thread t's share of step s run by T threads (x: the step's input, rebased on the image). */
static void dv_step_share(const dv_step *s, const float *x, int t, int T)
{
    int b, e, g0, g1, t0, t1;
    float *scratch = s->scratch ? s->scratch + (long)t * s->scratch_stride : NULL;
    switch (s->kind) {
    case DV_STEP_PAD:
        dv_share(s->C, t, T, &b, &e);
        if (e > b)
            dv_pad_planes(x + (long)b * s->H * s->Wd, e - b, s->H, s->Wd, s->pt, s->pl, s->Hp, s->Wp,
                          s->out + (long)b * s->Hp * s->Wp);
        break;
    case DV_STEP_PHASE: {
        int per_channel = s->sh * s->sh;
        dv_share(s->n, t, T, &b, &e);
        for (int i = b; i < e; ++i)
            dv_phase_plane(x + (long)(i / per_channel) * s->H * s->Wd, s->H, s->Wd, s->pt, s->pl, s->sh,
                           (i / s->sh) % s->sh, i % s->sh, s->Hp, s->Wp, s->out + (long)i * s->Hp * s->Wp);
        break;
    }
    case DV_STEP_DIRECT: {
        int ntiles = (s->n + DV_DTILE - 1) / DV_DTILE;
        if (dv_conv_share(dv_split_rows(T, ntiles, s->O), s->O, ntiles, t, T, &g0, &g1, &t0, &t1) && g1 > g0)
            dv_conv_direct(x, s->tap_off, s->table, s->n, s->W + (long)g0 * s->ldw, g1 - g0, s->K,
                           s->bias + g0, s->relu, s->out + (long)g0 * s->ldo, s->ldo, t0, t1);
        break;
    }
    case DV_STEP_DENSE: {
        int ntiles = (s->N + 31) / 32;
        if (dv_conv_share(dv_split_rows(T, ntiles, s->O), s->O, ntiles, t, T, &g0, &g1, &t0, &t1) && g1 > g0)
            dv_conv_dense_tiles(x, s->tap_off, s->sw, s->table, s->table2, s->W + (long)g0 * s->ldw, g1 - g0,
                                s->K, s->N, s->bias + g0, s->relu, s->out + (long)g0 * s->ldo, scratch, t0, t1);
        break;
    }
    case DV_STEP_IM2COL:
        dv_share(s->C, t, T, &b, &e);
        for (int i = b; i < e; ++i)
            dv_im2col_plane_packed(x + (long)s->table2[i] * s->H * s->Wd, s->H, s->Wd, s->kh, s->kw, s->sw,
                                   s->pt, s->pl, s->dh, s->dw, s->Hp, s->Wp, scratch, s->table, s->n,
                                   s->out + (long)i * s->kh * s->kw * 32, s->lds);
        break;
    case DV_STEP_GEMM: {
        /* more rows than columns: each thread streams only its share of the weights */
        int ntiles = (s->N + 31) / 32;
        int rows_first = s->O > s->N && T > 1 && (s->O + 7) / 8 > 1;
        if (dv_conv_share(rows_first, s->O, ntiles, t, T, &g0, &g1, &t0, &t1) && g1 > g0)
            dv_gemm_tiles(s->W + (long)g0 * s->ldw, s->ldw, g1 - g0, x, s->ldc, s->lds, s->out + (long)g0 * s->ldo,
                          s->ldo, s->K, s->N, s->bias ? s->bias + g0 : NULL, s->relu, t0, t1);
        break;
    }
    case DV_STEP_MAXPOOL:
        dv_share(s->C, t, T, &b, &e);
        for (int c = b; c < e; ++c)
            dv_maxpool_plane(x + (long)c * s->H * s->Wd, s->H, s->Wd, s->out + (long)c * s->ldo, s->ho, s->wo,
                             s->kh, s->kw, s->sh, s->sw, s->pt, s->pl, scratch);
        break;
    case DV_STEP_AVGPOOL:
        dv_share(s->C, t, T, &b, &e);
        for (int c = b; c < e; ++c)
            dv_avgpool_plane(x + (long)c * s->H * s->Wd, s->H, s->Wd, s->out + (long)c * s->ldo, s->ho, s->wo,
                             s->kh, s->kw, s->sh, s->sw, s->pt, s->pl, s->pb, s->pr, s->flag, scratch);
        break;
    case DV_STEP_MEAN:
        dv_share(s->C, t, T, &b, &e);
        for (int c = b; c < e; ++c)
            s->out[c] = dv_mean(x + (long)c * s->N, s->N);
        break;
    }
}

static inline const float *dv_step_input(const dv_step *s, const float *image)
{
    return s->x_from_image ? image + s->x_offset : s->x;
}

/* Run steps[0..n-1] in order, each shared out by its threads, in one parallel region (a team
 * of as many threads as the widest step asks for; a barrier between steps). `image`: the data
 * that steps with x_from_image read (NULL when none does). */
static void dv_run_steps(const dv_step *steps, int n, const float *image)
{
    int team = 1;
    for (int i = 0; i < n; ++i)
        if (steps[i].threads > team) team = steps[i].threads;
    if (team == 1) {
        for (int i = 0; i < n; ++i) dv_step_share(&steps[i], dv_step_input(&steps[i], image), 0, 1);
        return;
    }
#pragma omp parallel num_threads(team)
    {
        int t = omp_get_thread_num(), size = omp_get_num_threads();
        for (int i = 0; i < n; ++i) {
            int T = steps[i].threads < size ? steps[i].threads : size;
            if (t < T) dv_step_share(&steps[i], dv_step_input(&steps[i], image), t, T);
            if (i + 1 < n) {
#pragma omp barrier
            }
        }
    }
}

#endif
