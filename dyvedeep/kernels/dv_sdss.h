/* SDSS's bookkeeping around the grid: which cells are insignificant, which off-grid positions
 * some map still needs, and the fill of the others. Cell by cell rather than position by
 * position: a cell's decision is read once for its positions, without a branch per position
 * (whether a position's cell is insignificant changes from map to map and cell to cell: a
 * branch the predictor cannot learn). */
#ifndef DYVEDEEP_DV_SDSS_H
#define DYVEDEEP_DV_SDSS_H

#include <stdlib.h>
#include <string.h>

/* insig[o][by][bx] = all four grid corners of cell (by, bx) of map o (H x W planes of `out`)
 * are below `threshold`; grid rows gy[0..ny-1], columns gx[0..nx-1]. Returns the count. */
static long long dv_sdss_cells(const float *out, int O, int H, int W, const int *gy, int ny, const int *gx, int nx,
                               float threshold, unsigned char *insig)
{
    long long n = 0;
    unsigned char below[2][nx > 0 ? nx : 1];
    for (int o = 0; o < O; ++o) {
        const float *map = out + (long)o * H * W;
        unsigned char *cells = insig + (long)o * (ny - 1) * (nx - 1);
        for (int bx = 0; bx < nx; ++bx) below[0][bx] = map[(long)gy[0] * W + gx[bx]] < threshold;
        for (int by = 0; by + 1 < ny; ++by) {
            unsigned char *top = below[by & 1], *bottom = below[(by + 1) & 1];
            const float *row = map + (long)gy[by + 1] * W;
            for (int bx = 0; bx < nx; ++bx) bottom[bx] = row[gx[bx]] < threshold;
            unsigned char *c = cells + (long)by * (nx - 1);
            for (int bx = 0; bx + 1 < nx; ++bx) {
                c[bx] = top[bx] & top[bx + 1] & bottom[bx] & bottom[bx + 1];
                n += c[bx];
            }
        }
    }
    return n;
}

/* The off-grid positions j (0..P-1, increasing; cell[j] = its cell's index) grouped by cell:
 * first[c]..first[c + 1] - 1 index `order`, which lists each cell's positions (a counting
 * sort; `first` has ncells + 1 ints, `order` P, `next` ncells). */
static void dv_sdss_cell_positions(const int *cell, int P, int ncells, int *first, int *next, int *order)
{
    memset(first, 0, sizeof(int) * (size_t)(ncells + 1));
    for (int j = 0; j < P; ++j) first[cell[j] + 1]++;
    for (int c = 0; c < ncells; ++c) first[c + 1] += first[c];
    memcpy(next, first, sizeof(int) * (size_t)ncells);
    for (int j = 0; j < P; ++j) order[next[cell[j]]++] = j;
}

/* Which off-grid positions some map needs (cell_y[j], cell_x[j]: position j's cell among the
 * ncy x ncx): positions[i] (*n_out of them) are the off_positions[j], in order, whose cell is
 * significant in some map, and needed[o * n + i] = that cell is significant in map o. Returns the
 * number of needed entries, -1 when out of memory. `positions` holds P ints, `needed` O * P
 * bytes (the first O * n used). */
static long long dv_sdss_union(const unsigned char *insig, int O, int ncy, int ncx, const int *off_positions,
                               const int *cell_y, const int *cell_x, int P, int *positions, int *n_out,
                               unsigned char *needed)
{
    int ncells = ncy * ncx;
    unsigned char *any = (unsigned char *)calloc((size_t)(ncells > 0 ? ncells : 1), 1);
    int *cells_of = (int *)malloc(sizeof(int) * (size_t)(P > 0 ? P : 1));
    if (any == NULL || cells_of == NULL) {
        free(any);
        free(cells_of);
        return -1;
    }
    for (int o = 0; o < O; ++o) {
        const unsigned char *m = insig + (long)o * ncells;
        for (int c = 0; c < ncells; ++c) any[c] |= !m[c];
    }
    int n = 0;
    for (int j = 0; j < P; ++j) {
        int c = cell_y[j] * ncx + cell_x[j];
        if (any[c]) {
            positions[n] = off_positions[j];
            cells_of[n++] = c;
        }
    }
    long long total = 0;
    for (int o = 0; o < O; ++o) {
        const unsigned char *m = insig + (long)o * ncells;
        unsigned char *row = needed + (long)o * n;
        for (int i = 0; i < n; ++i) {
            row[i] = !m[cells_of[i]];
            total += row[i];
        }
    }
    free(any);
    free(cells_of);
    *n_out = n;
    return total;
}

/* Fill the off-grid positions (pos_y[j], pos_x[j]) of each map's insignificant cells (position
 * j's cell: (cell_y[j], cell_x[j]) of the ny - 1 x nx - 1): bilinear from the cell's corners, or
 * 0. Returns the number filled, -1 when out of memory. */
static long long dv_sdss_fill(float *out, int O, int H, int W, const int *gy, int ny, const int *gx, int nx,
                              const int *pos_y, const int *pos_x, const int *cell_y, const int *cell_x, int P,
                              const unsigned char *insig, int bilinear)
{
    int ncx = nx - 1, ncells = (ny - 1) * ncx;
    int *cell = (int *)malloc(sizeof(int) * (size_t)(P > 0 ? P : 1));
    int *first = (int *)malloc(sizeof(int) * (size_t)(ncells + 1));
    int *next = (int *)malloc(sizeof(int) * (size_t)(ncells > 0 ? ncells : 1));
    int *order = (int *)malloc(sizeof(int) * (size_t)(P > 0 ? P : 1));
    float *frac = (float *)malloc(sizeof(float) * 2 * (size_t)(P > 0 ? P : 1));
    if (cell == NULL || first == NULL || next == NULL || order == NULL || frac == NULL) {
        free(cell);
        free(first);
        free(next);
        free(order);
        free(frac);
        return -1;
    }
    /* each position's place in its cell, the same in every map */
    for (int j = 0; j < P; ++j) {
        int by = cell_y[j], bx = cell_x[j];
        cell[j] = by * ncx + bx;
        frac[2 * j] = (float)(pos_y[j] - gy[by]) / (float)(gy[by + 1] - gy[by]);
        frac[2 * j + 1] = (float)(pos_x[j] - gx[bx]) / (float)(gx[bx + 1] - gx[bx]);
    }
    dv_sdss_cell_positions(cell, P, ncells, first, next, order);
    long long n = 0;
    for (int o = 0; o < O; ++o) {
        float *map = out + (long)o * H * W;
        const unsigned char *m = insig + (long)o * ncells;
        for (int c = 0; c < ncells; ++c) {
            if (!m[c]) continue;
            n += first[c + 1] - first[c];
            int by = c / ncx, bx = c % ncx;
            int y0 = gy[by], y1 = gy[by + 1], x0 = gx[bx], x1 = gx[bx + 1];
            float c00 = map[(long)y0 * W + x0], c01 = map[(long)y0 * W + x1];
            float c10 = map[(long)y1 * W + x0], c11 = map[(long)y1 * W + x1];
            for (int k = first[c]; k < first[c + 1]; ++k) {
                int j = order[k];
                float v = 0.0f;
                if (bilinear) {
                    float fy = frac[2 * j], fx = frac[2 * j + 1];
                    float top = c00 + fx * (c01 - c00);
                    float bottom = c10 + fx * (c11 - c10);
                    v = top + fy * (bottom - top);
                }
                map[(long)pos_y[j] * W + pos_x[j]] = v;
            }
        }
    }
    free(cell);
    free(first);
    free(next);
    free(order);
    free(frac);
    return n;
}

#endif
