/* The dense path's kernels as steps, and their run by one OpenMP team.
 *
 * A step is one dense-path kernel over a layer (or a group, or a band of rows of one) with the
 * number of threads that share it out: padding, phase planes, the direct and panel convolution
 * routes, unfolding and GEMM, max and average pooling, channel means, residual Adds, the
 * product of a fully-connected layer; and SFMA alone in a conv layer (its statistic, its choice
 * of maps, its constant). dv_run_steps runs a list of them inside one parallel region, each
 * thread doing its share of a step and then waiting at a barrier for the others before the next
 * step (the channel-vector step's shares are of units that a thread done with its own takes
 * from the others: dv_claim). The wrappers of
 * _kernels.pyx either run their steps at once or append them to a Program, which holds a whole
 * run of dense layers (docs/engine.md: one parallel region per image instead of one per kernel
 * call). Each share is the same kernel call either way, so every output is computed by the
 * same operations. */
#ifndef DYVEDEEP_PROGRAM_H
#define DYVEDEEP_PROGRAM_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include "kernels/dv_conv.h"
#include "kernels/dv_pool.h"
#include "kernels/dv_eltwise.h"
#include "kernels/dv_sfma.h"

enum {
    DV_STEP_PAD,      /* dv_pad_planes, channels shared out */
    DV_STEP_PHASE,    /* dv_phase_plane, planes shared out */
    DV_STEP_DIRECT,   /* dv_conv_direct: tiles or 8-row blocks of weights shared out */
    DV_STEP_PANEL,    /* dv_conv_panel_tiles: likewise, one panel scratch per thread */
    DV_STEP_IM2COL,   /* dv_im2col_plane_packed, channels shared out, one pad scratch per thread */
    DV_STEP_GEMM,     /* dv_gemm_tiles on packed panels: tiles or 8-row blocks shared out */
    DV_STEP_MAXPOOL,  /* dv_maxpool_plane, planes shared out, one row scratch per thread */
    DV_STEP_AVGPOOL,  /* dv_avgpool_plane, likewise */
    DV_STEP_MEAN,     /* dv_mean of each row (global average pooling), rows shared out */
    DV_STEP_ADD,      /* dv_add_relu (a residual Add, or a ReLU alone), blocks of 64 floats shared out */
    DV_STEP_ELTWISE,  /* dv_eltwise_op (Add, Sub, Mul, Div, Pow), blocks of 64 floats shared out */
    DV_STEP_SFMA_STATS,    /* SFMA (alone) in a conv layer: dv_map_sums of each input map, maps shared out */
    DV_STEP_SFMA_SELECT,   /* dv_sfma_select: the maps dropped; the kept maps' weight rows shared out */
    DV_STEP_SFMA_CONSTANT, /* the dropped maps' constant added, then the ReLU: output rows shared out */
    DV_STEP_OCVEC,    /* dv_conv_ocvec: units of (64-channel block, DV_OC_UNIT positions) claimed, running sums per thread */
    DV_STEP_GEMV      /* dv_gemv_rows (a fully-connected layer, product only: u.product), rows shared out */
};

/* The product part of a convolution or GEMM step: out (O rows, ldo floats apart) = W (O x K,
 * rows ldw apart) applied, + bias (NULL: GEMM only, out += the product), ReLU if asked. */
typedef struct {
    const float *W;
    long ldw;
    int O, K;
    const float *bias;
    int relu;
    long ldo;
} dv_product;

/* C planes (H x W) copied with their zero padding (input at row pt, column pl) into Hp x Wp. */
typedef struct { int C, H, W, pt, pl, Hp, Wp; } dv_pad_args;
/* n phase planes (s * s per channel) of H x W planes, as Hq x Wq (dv_phase_plane). */
typedef struct { int n, H, W, pt, pl, s, Hq, Wq; } dv_phase_args;
/* The direct route: nvec vectors (DV_VEC ints each) over the taps tap_off[0..K-1]; rows_first:
 * threads share out the 8-row blocks of weights whatever the tiles; else they do when the tiles
 * are fewer than rows_below_tiles per thread (dv_split_rows_below). */
typedef struct {
    dv_product p; const long *tap_off; const int *vec; int nvec; int rows_first; int rows_below_tiles;
} dv_direct_args;
/* The channel-vector route: npos positions (source offsets pos_off) over the taps tap_off; the
 * product's W is the weights in blocks of 64 output channels (ceil(O / 64) x K x 64, ldw = 64). */
typedef struct { dv_product p; const long *tap_off; const int *pos_off; int npos; } dv_ocvec_args;
/* The panel route: N positions, runs (4 ints each) from panel_first[t] for panel t, columns sw apart. */
typedef struct { dv_product p; const long *tap_off; const int *runs; const int *panel_first; int N, sw; } dv_panel_args;
/* im2col of channels[0..C-1] (H x W planes) into packed panels lds floats apart (runs: nruns). */
typedef struct {
    int C, H, W, kh, kw, sw, pt, pl, dh, dw, Hp, Wp;
    const int *channels;
    const int *runs;
    int nruns;
    long lds;
} dv_im2col_args;
/* GEMM on packed panels: N columns, rows ldc apart in a panel, panels lds apart. */
typedef struct { dv_product p; int N; long ldc, lds; } dv_gemm_args;
/* Pooling of C planes (H x W) into ho x wo planes ldo floats apart. rows_shared (max pooling):
 * threads share out the output rows of every plane, not the planes (a conv band whose threads
 * shared out positions is then pooled mostly by the thread that wrote it: its own share, less
 * the units another thread took). */
typedef struct { int C, H, W, ho, wo, kh, kw, sh, sw, pt, pl, pb, pr, count_include_pad, rows_shared; long ldo; } dv_pool_args;
/* The means of C rows of N floats. */
typedef struct { int C, N; } dv_mean_args;
/* n floats: out = x + b (b == NULL: x), ReLU'd if relu. */
typedef struct { const float *b; long n; int relu; } dv_add_args;
/* n floats: out = x op b, or x op scalar, or scalar op x (scalar_first), op a DV_ELT_* code. */
typedef struct { const float *b; long n; int op, scalar_first; float scalar; } dv_eltwise_args;

/* One step: its kind, its input, output and per-thread scratch, and the arguments of its kind.
 * `sfma`: the step belongs to a conv layer with SFMA alone (DV_STEP_SFMA_*, and its DIRECT or
 * PANEL step, which then runs the kept maps that DV_STEP_SFMA_SELECT chose). */
typedef struct {
    int kind;           /* DV_STEP_*: which member of `u` holds the arguments */
    dv_sfma_state *sfma;
    int threads;        /* how many threads share the step out (threads 0..threads-1 of the team) */
    const float *x;     /* the step's input (its source planes, panels or map) */
    long x_offset;      /* with x_from_image: x is the image's data + x_offset floats */
    int x_from_image;
    float *out;
    float *scratch;     /* thread t's scratch at scratch + t * scratch_stride */
    long scratch_stride;
    union {
        dv_pad_args pad;
        dv_phase_args phase;
        dv_direct_args direct;
        dv_ocvec_args ocvec;
        dv_panel_args panel;
        dv_im2col_args im2col;
        dv_gemm_args gemm;
        dv_pool_args pool;      /* DV_STEP_MAXPOOL and DV_STEP_AVGPOOL */
        dv_mean_args mean;
        dv_add_args add;
        dv_eltwise_args elt;
        dv_product product;     /* DV_STEP_GEMV: out = W x + bias (ldo unused) */
    } u;
} dv_step;

/* Thread t's share [*begin, *end) of n items split in T contiguous parts. */
static inline void dv_share(int n, int t, int T, int *begin, int *end)
{
    *begin = (int)((long)n * t / T);
    *end = (int)((long)n * (t + 1) / T);
}

/* Thread t's share [*begin, *end) of n floats in blocks of 64 (whole cache lines but the last):
 * the elementwise steps. */
static inline void dv_share_blocks64(long n, int t, int T, long *begin, long *end)
{
    int b, e;
    dv_share((int)((n + 63) / 64), t, T, &b, &e);
    *begin = 64L * b;
    *end = 64L * e < n ? 64L * e : n;
}

/* A thread's share of a step's units, which the other threads take from its end once theirs
 * are done (a thread slower than the others, or off its core, leaves them the rest): the next
 * unit from the front (low 32 bits, its owner's) and one past the last (high 32 bits). Each on
 * its own cache line: an owner claims one unit at a time. */
typedef struct { _Alignas(64) uint64_t range; } dv_claim;

static inline void dv_claim_set(dv_claim *c, int begin, int end)
{
    __atomic_store_n(&c->range, ((uint64_t)(uint32_t)end << 32) | (uint32_t)begin, __ATOMIC_RELAXED);
}

/* The next unit of a share, from its front or its back; -1 when none is left. Relaxed: the
 * barrier after the step publishes the units' outputs. */
static inline int dv_claim_next(dv_claim *c, int front)
{
    uint64_t v = __atomic_load_n(&c->range, __ATOMIC_RELAXED);
    for (;;) {
        uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
        if (lo >= hi) return -1;
        uint64_t next = front ? v + 1 : ((uint64_t)(hi - 1) << 32) | lo;
        if (__atomic_compare_exchange_n(&c->range, &v, next, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return front ? (int)lo : (int)(hi - 1);
    }
}

/* Thread t's next unit of a step whose shares are claims[0..nshares-1]: its own from the front,
 * then the others' from their backs; -1 when every unit is taken. */
static inline int dv_claim_unit(dv_claim *claims, int t, int nshares)
{
    int u = t < nshares ? dv_claim_next(&claims[t], 1) : -1;
    for (int i = 1; u < 0 && i < nshares; ++i) u = dv_claim_next(&claims[(t + i) % nshares], 0);
    return u;
}

/* First row of part `part` of `parts` when the 8-row blocks of O rows are shared out (O for
 * part == parts). */
static inline int dv_block_start(int part, int nblocks, int parts, int O)
{
    int row = 8 * (int)((long)part * nblocks / parts);
    return row < O ? row : O;
}

/* Whether a convolution's threads share out its 8-row blocks of weights rather than its tiles:
 * when there are fewer than `per_thread` tiles per thread (the direct route's
 * rows_below_tiles, dv_direct_args) and rows enough. Every thread then does all the tiles for
 * its rows. */
static inline int dv_split_rows_below(int T, int ntiles, int O, int per_thread)
{
    return T > 1 && ntiles < per_thread * T && (O + 7) / 8 >= 2 * T;
}

/* The same below 4 tiles per thread: too few to share out evenly (a 14 x 14 map has 5 direct
 * tiles). */
static inline int dv_split_rows(int T, int ntiles, int O) { return dv_split_rows_below(T, ntiles, O, 4); }

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

/* The product a conv step runs: its own, or for an SFMA layer (s->sfma) that drops maps on this
 * image the kept maps' (their columns and taps, in `kept` and *tap_off; the ReLU left to
 * DV_STEP_SFMA_CONSTANT when it adds a constant). NULL when every map was dropped: then thread
 * t of T has written the bias (ReLU'd unless a constant follows) into its share of the rows. */
static const dv_product *dv_sfma_product(const dv_step *s, const dv_product *own, dv_product *kept,
                                        const long **tap_off, int t, int T)
{
    const dv_sfma_state *st = s->sfma;
    if (st == NULL || st->ndrop == 0) return own;
    *kept = *own;
    kept->relu = own->relu && !st->add_constant;
    if (st->nkept == 0) {
        int b, e;
        dv_share(own->O, t, T, &b, &e);
        for (int o = b; o < e; ++o) {
            float v = own->bias[o];
            if (kept->relu && v < 0.0f) v = 0.0f;
            for (long j = 0; j < st->positions; ++j) s->out[o * own->ldo + j] = v;
        }
        return NULL;
    }
    kept->W = st->w_kept;
    kept->K = st->nkept * st->kk;
    kept->ldw = kept->K;
    *tap_off = st->tap_kept;
    return kept;
}

/* Positions of a unit of the channel-vector step: half a group of dv_conv_ocvec. On two threads
 * of the AVX2 host, units of 24 took the networks 0.90x-0.99x the time of units of 48, and 12,
 * 18 or 36 less than 24 (docs/notes/2026-12-05-claimed-units.md). */
#define DV_OC_UNIT 24

/* Units of a channel-vector step per 64-channel block. */
static inline int dv_ocvec_units_per_block(const dv_ocvec_args *a) { return (a->npos + DV_OC_UNIT - 1) / DV_OC_UNIT; }

/* The units of a step whose threads claim them (dv_claim); 0 for a step shared out in fixed
 * parts. */
static inline int dv_step_units(const dv_step *s)
{
    if (s->kind == DV_STEP_OCVEC)
        return (s->u.ocvec.p.O + 63) / 64 * dv_ocvec_units_per_block(&s->u.ocvec);
    return 0;
}

/* Thread t's share of step s run by T threads (x: the step's input, rebased on the image).
 * `claims`: the nshares shares of a step of units (dv_step_units; nshares >= T, a share whose
 * thread never started is taken over by the others), NULL when one thread runs it all. */
static void dv_step_share(const dv_step *s, const float *x, int t, int T, dv_claim *claims, int nshares)
{
    int b, e, g0, g1, t0, t1;
    float *scratch = s->scratch ? s->scratch + (long)t * s->scratch_stride : NULL;
    switch (s->kind) {
    case DV_STEP_PAD: {
        const dv_pad_args *a = &s->u.pad;
        dv_share(a->C, t, T, &b, &e);
        if (e > b)
            dv_pad_planes(x + (long)b * a->H * a->W, e - b, a->H, a->W, a->pt, a->pl, a->Hp, a->Wp,
                          s->out + (long)b * a->Hp * a->Wp);
        break;
    }
    case DV_STEP_PHASE: {
        const dv_phase_args *a = &s->u.phase;
        int per_channel = a->s * a->s;
        dv_share(a->n, t, T, &b, &e);
        for (int i = b; i < e; ++i)
            dv_phase_plane(x + (long)(i / per_channel) * a->H * a->W, a->H, a->W, a->pt, a->pl, a->s,
                           (i / a->s) % a->s, i % a->s, a->Hq, a->Wq, s->out + (long)i * a->Hq * a->Wq);
        break;
    }
    case DV_STEP_DIRECT: {
        const dv_direct_args *a = &s->u.direct;
        dv_product kept;
        const long *tap_off = a->tap_off;
        const dv_product *p = dv_sfma_product(s, &a->p, &kept, &tap_off, t, T);
        if (p == NULL) break;
        int ntiles = (a->nvec + DV_DTILE - 1) / DV_DTILE;
        int rows_first = (a->rows_first && T > 1) || dv_split_rows_below(T, ntiles, p->O, a->rows_below_tiles);
        if (dv_conv_share(rows_first, p->O, ntiles, t, T, &g0, &g1, &t0, &t1) && g1 > g0)
            dv_conv_direct(x, tap_off, a->vec, a->nvec, p->W + (long)g0 * p->ldw, g1 - g0, p->K,
                           p->bias + g0, p->relu, s->out + (long)g0 * p->ldo, p->ldo, t0, t1);
        break;
    }
    case DV_STEP_OCVEC: {
        /* units of (64-channel block, DV_OC_UNIT positions) in block order, claimed (dv_claim):
         * a thread reads the weights of its blocks, and of a block whose units it takes over */
        const dv_ocvec_args *a = &s->u.ocvec;
        const dv_product *p = &a->p;
        if (claims == NULL) {
            dv_conv_ocvec(x, a->tap_off, a->pos_off, p->W, p->O, p->K, p->bias, p->relu, s->out, p->ldo,
                          0, a->npos, 0, (p->O + 63) / 64, scratch);
            break;
        }
        int per_block = dv_ocvec_units_per_block(a);
        for (int u; (u = dv_claim_unit(claims, t, nshares)) >= 0;) {
            int ob = u / per_block, p0 = u % per_block * DV_OC_UNIT;
            int p1 = p0 + DV_OC_UNIT < a->npos ? p0 + DV_OC_UNIT : a->npos;
            dv_conv_ocvec(x, a->tap_off, a->pos_off, p->W, p->O, p->K, p->bias, p->relu, s->out, p->ldo,
                          p0, p1, ob, ob + 1, scratch);
        }
        break;
    }
    case DV_STEP_PANEL: {
        const dv_panel_args *a = &s->u.panel;
        dv_product kept;
        const long *tap_off = a->tap_off;
        const dv_product *p = dv_sfma_product(s, &a->p, &kept, &tap_off, t, T);
        if (p == NULL) break;
        int ntiles = (a->N + 31) / 32;
        if (dv_conv_share(dv_split_rows(T, ntiles, p->O), p->O, ntiles, t, T, &g0, &g1, &t0, &t1) && g1 > g0)
            dv_conv_panel_tiles(x, tap_off, a->sw, a->runs, a->panel_first, p->W + (long)g0 * p->ldw, g1 - g0,
                                p->K, a->N, p->bias + g0, p->relu, s->out + (long)g0 * p->ldo, scratch, t0, t1);
        break;
    }
    case DV_STEP_IM2COL: {
        const dv_im2col_args *a = &s->u.im2col;
        dv_share(a->C, t, T, &b, &e);
        for (int i = b; i < e; ++i)
            dv_im2col_plane_packed(x + (long)a->channels[i] * a->H * a->W, a->H, a->W, a->kh, a->kw, a->sw,
                                   a->pt, a->pl, a->dh, a->dw, a->Hp, a->Wp, scratch, a->runs, a->nruns,
                                   s->out + (long)i * a->kh * a->kw * 32, a->lds);
        break;
    }
    case DV_STEP_GEMM: {
        const dv_gemm_args *a = &s->u.gemm;
        const dv_product *p = &a->p;
        /* more rows than columns: each thread streams only its share of the weights */
        int ntiles = (a->N + 31) / 32;
        int rows_first = p->O > a->N && T > 1 && (p->O + 7) / 8 > 1;
        if (dv_conv_share(rows_first, p->O, ntiles, t, T, &g0, &g1, &t0, &t1) && g1 > g0)
            dv_gemm_tiles(p->W + (long)g0 * p->ldw, p->ldw, g1 - g0, x, a->ldc, a->lds, s->out + (long)g0 * p->ldo,
                          p->ldo, p->K, a->N, p->bias ? p->bias + g0 : NULL, p->relu, t0, t1);
        break;
    }
    case DV_STEP_MAXPOOL: {
        const dv_pool_args *a = &s->u.pool;
        if (a->rows_shared) {  /* output rows b..e-1: their windows start at input row b sh - pt */
            dv_share(a->ho, t, T, &b, &e);
            int top = b * a->sh - a->pt, skip = top > 0 ? top : 0;
            for (int c = 0; c < a->C && e > b; ++c)
                dv_maxpool_plane(x + ((long)c * a->H + skip) * a->W, a->H - skip, a->W,
                                 s->out + (long)c * a->ldo + (long)b * a->wo, e - b, a->wo, a->kh, a->kw, a->sh,
                                 a->sw, skip - top, a->pl, scratch);
            break;
        }
        dv_share(a->C, t, T, &b, &e);
        for (int c = b; c < e; ++c)
            dv_maxpool_plane(x + (long)c * a->H * a->W, a->H, a->W, s->out + (long)c * a->ldo, a->ho, a->wo,
                             a->kh, a->kw, a->sh, a->sw, a->pt, a->pl, scratch);
        break;
    }
    case DV_STEP_AVGPOOL: {
        const dv_pool_args *a = &s->u.pool;
        dv_share(a->C, t, T, &b, &e);
        for (int c = b; c < e; ++c)
            dv_avgpool_plane(x + (long)c * a->H * a->W, a->H, a->W, s->out + (long)c * a->ldo, a->ho, a->wo,
                             a->kh, a->kw, a->sh, a->sw, a->pt, a->pl, a->pb, a->pr, a->count_include_pad, scratch);
        break;
    }
    case DV_STEP_MEAN: {
        const dv_mean_args *a = &s->u.mean;
        dv_share(a->C, t, T, &b, &e);
        dv_mean_rows(x, a->N, b, e, s->out);
        break;
    }
    case DV_STEP_ADD: {
        const dv_add_args *a = &s->u.add;
        long begin, end;
        dv_share_blocks64(a->n, t, T, &begin, &end);
        dv_add_relu(x, a->b, s->out, begin, end, a->relu);
        break;
    }
    case DV_STEP_GEMV: {
        const dv_product *p = &s->u.product;
        dv_share(p->O, t, T, &b, &e);
        dv_gemv_rows(p->W, p->ldw, p->K, x, p->bias, p->relu, s->out, b, e);
        break;
    }
    case DV_STEP_ELTWISE: {
        const dv_eltwise_args *a = &s->u.elt;
        long begin, end;
        dv_share_blocks64(a->n, t, T, &begin, &end);
        dv_eltwise_op(a->op, x, a->b, a->scalar, a->scalar_first, s->out, begin, end);
        break;
    }
    case DV_STEP_SFMA_STATS: {
        dv_sfma_state *st = s->sfma;
        dv_share(st->C, t, T, &b, &e);
        for (int c = b; c < e; ++c)
            dv_map_sums(x + (long)c * st->hw, st->hw, !st->nonneg, &st->sum[c], &st->sumsq[c], &st->sumabs[c]);
        break;
    }
    case DV_STEP_SFMA_SELECT:
        dv_sfma_select(s->sfma, t, T);
        break;
    case DV_STEP_SFMA_CONSTANT: {
        dv_sfma_state *st = s->sfma;
        if (!st->add_constant) break;
        float *w = st->scratch + (long)t * st->scratch_stride;
        dv_share(st->O, t, T, &b, &e);
        for (int o = b; o < e; ++o)
            dv_sfma_constant_row(st->W + (long)o * st->C * st->kk, st->dropped, st->dropped_means, st->ndrop, st->kk,
                                 st->class_taps, st->ncls, st->tap_class, st->positions, s->out + o * st->positions,
                                 1, st->relu, w, w + st->kk);
        break;
    }
    }
}

static inline const float *dv_step_input(const dv_step *s, const float *image)
{
    return s->x_from_image ? image + s->x_offset : s->x;
}

/* Shares of claimed steps (dv_claim) a run keeps on its stack (32 KB); more are allocated. */
#define DV_CLAIMS_ON_STACK 512

/* Run steps[0..n-1] in order, each shared out by its threads (at most max_threads), in one
 * parallel region (a team of as many threads as the widest step asks for; a barrier between
 * steps). Any number of threads gives the same floats. `image`: the data that steps with
 * x_from_image read (NULL when none does). `step_end` (NULL: not kept): n + 1 clock readings
 * (omp_get_wtime), the start and each step's end as thread 0 sees it, after the barrier that
 * closes the step (its slowest thread, and the wait, included). */
static void dv_run_steps(const dv_step *steps, int n, const float *image, int max_threads, double *step_end)
{
    if (step_end != NULL) step_end[0] = omp_get_wtime();
    int team = 1;
    for (int i = 0; i < n; ++i)
        if (steps[i].threads > team) team = steps[i].threads;
    if (team > max_threads) team = max_threads;
    if (team == 1) {
        for (int i = 0; i < n; ++i) {
            dv_step_share(&steps[i], dv_step_input(&steps[i], image), 0, 1, NULL, 0);
            if (step_end != NULL) step_end[i + 1] = omp_get_wtime();
        }
        return;
    }
    /* the shares of each step of units, as fixed parts would be, set before the run (so that a
     * thread that has not started yet leaves its whole share to the others) */
    int nclaimed = 0;
    for (int i = 0; i < n; ++i) nclaimed += dv_step_units(&steps[i]) > 0;
    dv_claim claims_on_stack[DV_CLAIMS_ON_STACK], *claims = claims_on_stack;
    if ((long)nclaimed * team > DV_CLAIMS_ON_STACK) {
        claims = aligned_alloc(64, (size_t)nclaimed * team * sizeof(dv_claim));
        if (claims == NULL) {  /* no memory for the shares: one thread runs every step */
            dv_run_steps(steps, n, image, 1, step_end);
            return;
        }
    }
    for (int i = 0, c = 0; i < n; ++i) {
        int units = dv_step_units(&steps[i]), T = steps[i].threads < team ? steps[i].threads : team;
        if (units == 0) continue;
        for (int t = 0; t < T; ++t)
            dv_claim_set(&claims[c * team + t], (int)((long)units * t / T), (int)((long)units * (t + 1) / T));
        ++c;
    }
#pragma omp parallel num_threads(team)
    {
        int t = omp_get_thread_num(), size = omp_get_num_threads();
        for (int i = 0, c = 0; i < n; ++i) {
            int T = steps[i].threads < size ? steps[i].threads : size;
            int shares = steps[i].threads < team ? steps[i].threads : team;  /* as set above */
            dv_claim *step_claims = NULL;
            if (dv_step_units(&steps[i]) > 0) {
                if (shares > 1) step_claims = &claims[c * team];
                ++c;
            }
            if (t < T) dv_step_share(&steps[i], dv_step_input(&steps[i], image), t, T, step_claims, shares);
            if (i + 1 < n || step_end != NULL) {
#pragma omp barrier
            }
            if (step_end != NULL && t == 0) step_end[i + 1] = omp_get_wtime();
        }
    }
    if (claims != claims_on_stack) free(claims);
}

#endif
