/* SFMA's kernels: each input map's statistic, the choice of the maps dropped, the kept maps'
 * weight columns and taps, and the dropped maps' constant contribution. The knob path (Python)
 * and the compiled runs (_program.h, DV_STEP_SFMA_*) call the same functions, hence make the
 * same decisions and floats. */
#ifndef DYVEDEEP_DV_SFMA_H
#define DYVEDEEP_DV_SFMA_H

#include <math.h>
#include <string.h>

/* The sums of one map x[0..n-1] in double: *sum = sum x, *sumsq = sum x^2, *sumabs = sum |x|
 * (when need_abs, else 0). Eight lanes of partial sums, each its own chain (the compiler
 * vectorises them without reassociating), combined in a fixed order: deterministic, and an
 * eighth of the dependency chain of one running sum. */
static void dv_map_sums(const float *x, long n, int need_abs, double *sum, double *sumsq, double *sumabs)
{
    double s[8] = {0}, q[8] = {0}, a[8] = {0};
    long i = 0;
    if (need_abs) {
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; ++l) { double v = x[i + l]; s[l] += v; q[l] += v * v; a[l] += fabs(v); }
    } else {
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; ++l) { double v = x[i + l]; s[l] += v; q[l] += v * v; }
    }
    for (int l = 0; i < n; ++i, ++l) { double v = x[i]; s[l] += v; q[l] += v * v; a[l] += fabs(v); }
    *sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    *sumsq = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
    *sumabs = need_abs ? ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) : 0.0;
}

/* SFMA's statistic of C maps of hw floats from their sums (dv_map_sums): per map its mean and
 * standard deviation, divided by the maps' mean |x| when `relative` (0 when that mean is 0;
 * `nonneg`: x >= 0, so |x| = x). */
static void dv_sfma_spreads(const double *sum, const double *sumsq, const double *sumabs, int C, double hw,
                            int nonneg, int relative, double *spread, double *means)
{
    double total = 0.0;
    for (int c = 0; c < C; ++c) {
        means[c] = sum[c] / hw;
        double var = sumsq[c] / hw - means[c] * means[c];
        spread[c] = sqrt(var > 0.0 ? var : 0.0);
        total += nonneg ? sum[c] : sumabs[c];
    }
    if (relative) {
        double scale = total / (C * hw);
        for (int c = 0; c < C; ++c) spread[c] = scale > 0.0 ? spread[c] / scale : 0.0;
    }
}

/* One output channel's constant map: the dropped maps dropped[0..nd-1], each its mean, through
 * the weights w (the channel's C * kk columns) restricted to each position's valid taps:
 * out[p] = sum_t (sum_i w[dropped[i] kk + t] means[i]) class_taps[tap_class[p], t], written
 * (add == 0) or added (add != 0, then ReLU'd if relu) at positions 0..P-1. `per_class` holds
 * ncls floats, `weighted` kk. */
static void dv_sfma_constant_row(const float *w, const int *dropped, const float *means, int nd, int kk,
                                 const float *class_taps, int ncls, const long *tap_class, long P, float *out,
                                 int add, int relu, float *weighted, float *per_class)
{
    for (int t = 0; t < kk; ++t) {
        float acc = 0.0f;
        for (int i = 0; i < nd; ++i) acc = acc + w[(long)dropped[i] * kk + t] * means[i];
        weighted[t] = acc;
    }
    for (int q = 0; q < ncls; ++q) {
        float acc = 0.0f;
        for (int t = 0; t < kk; ++t) acc = acc + weighted[t] * class_taps[(long)q * kk + t];
        per_class[q] = acc;
    }
    if (!add) {
        for (long p = 0; p < P; ++p) out[p] = per_class[tap_class[p]];
    } else {
        for (long p = 0; p < P; ++p) {
            float v = out[p] + per_class[tap_class[p]];
            out[p] = (relu && v < 0.0f) ? 0.0f : v;
        }
    }
}

/* An SFMA layer in a compiled run: its static data, what its steps write for the image being
 * run, and its totals over the images run (read and reset by the engine's counter). */
typedef struct dv_sfma_state {
    int C, O, kk;                 /* input maps, output channels, taps per map */
    long hw, positions;           /* floats per input map, output positions */
    int nonneg, relative;         /* the statistic (dv_sfma_spreads) */
    double threshold;             /* a map whose spread is below it is dropped */
    const float *W;               /* O x C*kk, the natural order */
    const long *tap_off;          /* C*kk: each unfolded row's offset in the route's source */
    const float *bias;
    int relu;
    const long long *channel_nnz; /* C: non-zero weights of each input map's columns (a pruned layer), or NULL */
    const float *class_taps;      /* ncls x kk */
    const long *tap_class;        /* positions */
    int ncls;
    /* the image being run */
    double *sum, *sumsq, *sumabs; /* C each (DV_STEP_SFMA_STATS) */
    float *w_kept;                /* O x C*kk: the kept maps' columns (DV_STEP_SFMA_SELECT) */
    long *tap_kept;               /* C*kk */
    int *dropped;                 /* C */
    float *dropped_means;         /* C */
    int nkept, ndrop, add_constant;
    float *scratch;               /* per thread: kk + ncls floats, scratch_stride apart */
    long scratch_stride;
    /* totals over the images run */
    long long *images_by_drops;   /* C + 1: images by the number of maps dropped */
    long long kept_nnz;           /* non-zero weights of the kept maps' columns, summed */
} dv_sfma_state;

/* DV_STEP_SFMA_SELECT, thread t of T: every thread decides (the same decisions) from the sums;
 * each gathers its share of the kept maps' weight rows; thread 0 writes the taps, the lists and
 * the totals. When nothing is dropped the conv step reads the layer's own weights. */
static void dv_sfma_select(dv_sfma_state *st, int t, int T)
{
    int C = st->C, kk = st->kk;
    double spread[C], means[C];
    int kept[C];
    dv_sfma_spreads(st->sum, st->sumsq, st->sumabs, C, (double)st->hw, st->nonneg, st->relative, spread, means);
    int nkept = 0, ndrop = 0, any_mean = 0;
    for (int c = 0; c < C; ++c) {
        if (spread[c] < st->threshold) {
            if (t == 0) {
                st->dropped[ndrop] = c;
                st->dropped_means[ndrop] = (float)means[c];
            }
            any_mean |= (float)means[c] != 0.0f;
            ++ndrop;
        } else {
            kept[nkept++] = c;
        }
    }
    if (ndrop > 0) {
        int b = (int)((long)st->O * t / T), e = (int)((long)st->O * (t + 1) / T);
        long K = (long)nkept * kk;
        for (int o = b; o < e; ++o) {
            const float *w = st->W + (long)o * C * kk;
            float *d = st->w_kept + (long)o * K;
            for (int i = 0; i < nkept; ++i) memcpy(d + (long)i * kk, w + (long)kept[i] * kk, sizeof(float) * (size_t)kk);
        }
    }
    if (t == 0) {
        for (int i = 0; i < nkept; ++i)
            for (int k = 0; k < kk; ++k) st->tap_kept[(long)i * kk + k] = st->tap_off[(long)kept[i] * kk + k];
        st->nkept = nkept;
        st->ndrop = ndrop;
        st->add_constant = ndrop > 0 && any_mean;
        st->images_by_drops[ndrop] += 1;
        if (st->channel_nnz != NULL)
            for (int i = 0; i < nkept; ++i) st->kept_nnz += st->channel_nnz[kept[i]];
    }
}

#endif
