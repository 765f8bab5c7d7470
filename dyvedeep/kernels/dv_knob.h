/* The knobs' convolution kernel: SPET's early stop inside the tile, SDSS's scattered positions,
 * SFMA's constant maps, masks of the outputs still needed. */
#ifndef DYVEDEEP_DV_KNOB_H
#define DYVEDEEP_DV_KNOB_H

#include "dv_gemm.h"

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
            /* as bits (act and stop never both set): a branch on each entry's outcome was
             * mispredicted on SDSS's scattered positions */
            for (int j = 0; j < jn; ++j) {
                float *d = dst + pos[j];
                unsigned int a = 0u - act[r][j], keep = ~a & (stop[r][j] - 1u), vb, db;
                memcpy(&vb, &v[j], sizeof vb);
                memcpy(&db, d, sizeof db);
                db = (vb & a) | (db & keep);
                memcpy(d, &db, sizeof db);
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
 * product over rows < lead is compared first: p < -margins[o] stops it (output 0), else it is
 * p + the dot product over rows lead..K-1, accumulated as if nothing had stopped (a stop never
 * changes another output's floats). ReLU if asked. Results go to out[o * npos + pos[i]].
 * stats[0] += outputs stopped, stats[1] += outputs active, stats[2] += the multiply-adds run
 * (docs/ops.md, executed MACs): rows x jn x the rows of K a tile runs, over the tile's real
 * positions (jn) and the channels it computes (rows), inactive and stopped entries included;
 * not the repeated weight rows of a block of fewer than 8 nor the lanes past jn. `list` holds
 * O ints. Unless NULL, row_counts[2 o] += output o's active entries and row_counts[2 o + 1] +=
 * those that went on past SPET's test (all active ones without SPET): with the non-zero weights
 * of each row's lead and rest they give the non-zero MACs of a pruned layer. */
static void dv_knob_tiles(const float *src, const long *tap_off, const int *runs, const int *runs_first,
                          int wo, int sh, int sw, int row_width,
                          const float *W, long ldw, int O, int K, int lead, const int *pos, int n,
                          const unsigned char *mask, const float *bias, const float *cst, float *out, int npos,
                          int spet, const float *margins, int relu, float *panel, int *list, int tile_begin,
                          int tile_end, long long *stats, long long *row_counts)
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
                for (int j = 0; j < 32; ++j) act[r][j] = j < jn;
                if (m != NULL)
                    for (int j = 0; j < jn; ++j) act[r][j] = m[j] != 0;
                if (cst != NULL) {
                    const float *cr = cst + (long)o * npos;
                    for (int j = 0; j < jn; ++j) part[r][j] = b0 + cr[pos[j0 + j]];
                } else {
                    for (int j = 0; j < 32; ++j) part[r][j] = b0;
                }
            }
            int any_cont = 0;
            long long stopped = 0, active = 0, entries = (long long)rows * jn;
            if (spet) {
                if (lead > 0) {
                    if (nv == 2) dv_tile_8x32(wr, lead, panel, 32, jn, acc, 0);
                    else dv_tile_8x16(wr, lead, panel, 32, jn, acc, 0);
                }
                for (int r = 0; r < rows; ++r) {
                    float sum[32], neg = -margins[list[g + r]];
                    if (lead > 0) memcpy(sum, &acc[r * nv], sizeof(float) * 16 * (size_t)nv);
                    else memset(sum, 0, sizeof sum);
                    if (nv == 1) memset(sum + 16, 0, sizeof(float) * 16);
                    long long row_active = 0, row_cont = 0;
                    for (int j = 0; j < 32; ++j) {
                        float p = part[r][j] + sum[j];
                        int a = act[r][j];
                        int st = a & (p < neg);
                        part[r][j] = p;
                        stop[r][j] = (unsigned char)st;
                        act[r][j] = (unsigned char)(a & !st);
                        row_active += a;
                        row_cont += a & !st;
                    }
                    stopped += row_active - row_cont;
                    active += row_active;
                    any_cont |= row_cont > 0;
                    if (row_counts != NULL) {
                        row_counts[2 * list[g + r]] += row_active;
                        row_counts[2 * list[g + r] + 1] += row_cont;
                    }
                }
                stats[0] += stopped;
                stats[1] += active;
                stats[2] += entries * lead;
                if (!any_cont) {
                    dv_knob_store(out, npos, list + g, rows, pos + j0, jn, part, act, stop, NULL, 0, relu);
                    continue;
                }
                stats[2] += entries * (K - lead);
                for (int r = 0; r < 8; ++r) wr[r] += lead;
                if (nv == 2) dv_tile_8x32(wr, K - lead, panel + (long)lead * 32, 32, jn, acc, 0);
                else dv_tile_8x16(wr, K - lead, panel + (long)lead * 32, 32, jn, acc, 0);
            } else {
                for (int r = 0; r < rows; ++r) {
                    long long row_active = 0;
                    for (int j = 0; j < 32; ++j) { row_active += act[r][j]; stop[r][j] = 0; }
                    active += row_active;
                    if (row_counts != NULL) {
                        row_counts[2 * list[g + r]] += row_active;
                        row_counts[2 * list[g + r] + 1] += row_active;
                    }
                }
                stats[1] += active;
                stats[2] += entries * K;
                if (nv == 2) dv_tile_8x32(wr, K, panel, 32, jn, acc, 0);
                else dv_tile_8x16(wr, K, panel, 32, jn, acc, 0);
            }
            dv_knob_store(out, npos, list + g, rows, pos + j0, jn, part, act, stop, acc, nv, relu);
        }
    }
}

#endif
