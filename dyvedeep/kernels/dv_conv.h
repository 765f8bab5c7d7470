/* Convolution around the GEMM tiles: im2col into packed panels, the panel route (im2col one
 * panel at a time inside the GEMM), the direct route and its vectors, zero padding, phase planes
 * of strided convolutions, and the runs of an unfolding of scattered positions. */
#ifndef DYVEDEEP_DV_CONV_H
#define DYVEDEEP_DV_CONV_H

#include "dv_gemm.h"

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

/* The panel route of a dense convolution: im2col one 32-position panel at a time inside the
 * GEMM, so that the unfolded input never leaves L1: for each tile t in [tile_begin, tile_end),
 * its panel (K rows of 32; row k is tap tap_off[k] of the source) is built from the runs
 * panel_first[t]..panel_first[t+1]-1 (see dv_im2col_runs; offsets in `src`, which is the input
 * with its zero padding, rows row_w apart), then every 8-row block of W (O x K) is applied:
 * out[o, j] = bias[o] + sum_k W[o, k] * panel[k, j], ReLU if asked. `panel` is K * 32 floats. */
static void dv_conv_panel_tiles(const float *src, const long *tap_off, int sw, const int *runs,
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

/* The channel-vector route (AVX-512): vectors over 64 output channels (four of 16) instead of
 * positions, as onnxruntime's MLAS NCHWc kernels hold them. Per tap k, four aligned weight
 * vectors (Wb: ceil(O / 64) blocks of K x 64, row k of block ob the tap's weights of output
 * channels 64 ob..64 ob+63, zeros past O; a block is read in order, as the hardware prefetcher
 * expects) and one broadcast input float per position, for six positions at a time
 * (pos_off[p]: the source offset of position p's tap (0, 0); tap k adds tap_off[k]): 24 fused
 * multiply-adds for 10 loads, no load split across cache lines, no lane on a padding column.
 * A last block of fewer than 64 channels computes all 64 and stores its own (masked bias
 * loads, fewer transposes). Positions go in groups of DV_OC_GROUP; each
 * group walks K in near-equal blocks of at most DV_OC_KB taps (a block's weights stay in L1),
 * its running sums waiting between blocks in `partial` (DV_OC_GROUP x 64 floats, 64-byte
 * aligned, where the last block leaves the finished outputs). The group's outputs then go to
 * their planes (ldo floats apart) 16 positions x 16 channels at a time, transposed in
 * registers (a scatter per vector cost 22 % of a 56 x 56 layer). Over the 64-channel blocks
 * ob_begin..ob_end-1 and positions p_begin..p_end-1; each output is bias + the sum over k in
 * order, as on every route: the same floats. */
#define DV_OC_POS 6
#define DV_OC_GROUP 48 /* a multiple of DV_OC_POS and of 16 */
#ifndef DV_OC_KB
#define DV_OC_KB 96
#endif
#if DV_VW == 16 || DV_VW == 8
/* The taps of a block of the channel-vector route: K in near-equal blocks of at most DV_OC_KB. */
static inline int dv_ocvec_kstep(int K)
{
    int nblocks = (K + DV_OC_KB - 1) / DV_OC_KB;
    return (K + nblocks - 1) / nblocks;
}

/* Prefetch the output lines of positions g0..g1-1 in channels 64 ob..64 ob+nch-1 (planes ldo
 * floats apart): the group writes them at its end. */
static inline void dv_ocvec_prefetch_outputs(const float *out, long ldo, int ob, int nch, int g0, int g1)
{
    for (int c = 0; c < nch; ++c)
        for (int q = g0; q < g1 + 16; q += 16)
            _mm_prefetch((const char *)(out + (long)(ob * 64 + c) * ldo + (q < g1 ? q : g1 - 1)), _MM_HINT_T0);
}
#endif
#if DV_VW == 16
static inline int dv_max0(int n) { return n > 0 ? n : 0; }

/* Rows 0..15 of a 16 x 16 block (`in`, rows 16-float aligned, ldi floats apart) stored as its
 * columns: column i < ncols to out + i * ldo, its first `n` floats. */
static inline void dv_transpose16_store(const float *in, long ldi, float *out, long ldo, int ncols, int n)
{
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(in + i * ldi);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
        __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    __mmask16 m = (__mmask16)((1u << n) - 1u);
    for (int i = 0; i < ncols; ++i) _mm512_mask_storeu_ps(out + i * ldo, m, r[i]);
}

/* not inlined: inside a step's switch the six source pointers of the tap loop were kept in
 * mask registers and on the stack (1.13x the time of fire2's 3x3 layer) */
__attribute__((noinline))
static void dv_conv_ocvec(const float *src, const long *tap_off, const int *pos_off, const float *Wb, int O,
                          int K, const float *bias, int relu, float *out, long ldo, int p_begin, int p_end,
                          int ob_begin, int ob_end, float *partial)
{
    int kstep = dv_ocvec_kstep(K);
    for (int ob = ob_begin; ob < ob_end; ++ob) {
        int nch = O - ob * 64 < 64 ? O - ob * 64 : 64;  /* a last block may have fewer channels */
        const float *bo = bias + ob * 64;
        dv_v16 b0 = dv_load16_lanes(bo, dv_lanes_of(nch));
        dv_v16 b1 = dv_load16_lanes(bo + 16, dv_lanes_of(dv_max0(nch - 16)));
        dv_v16 b2 = dv_load16_lanes(bo + 32, dv_lanes_of(dv_max0(nch - 32)));
        dv_v16 b3 = dv_load16_lanes(bo + 48, dv_lanes_of(dv_max0(nch - 48)));
        for (int g0 = p_begin; g0 < p_end; g0 += DV_OC_GROUP) {
            int g1 = p_end - g0 < DV_OC_GROUP ? p_end : g0 + DV_OC_GROUP;
            dv_ocvec_prefetch_outputs(out, ldo, ob, nch, g0, g1);
            for (int k0 = 0; k0 < K; k0 += kstep) {
                int kc = K - k0 < kstep ? K - k0 : kstep, first = k0 == 0, last = k0 + kc == K;
                const float *w = Wb + ((long)ob * K + k0) * 64;
                const long *tap = tap_off + k0;
                dv_v16 *part = (dv_v16 *)partial;
                for (int p0 = g0; p0 < g1; p0 += DV_OC_POS, part += 4 * DV_OC_POS) {
                    int np = g1 - p0 < DV_OC_POS ? g1 - p0 : DV_OC_POS;
                    /* a last tile of fewer positions repeats its last one (computed, not stored) */
                    const float *s0 = src + pos_off[p0], *s1 = src + pos_off[p0 + (np > 1 ? 1 : 0)];
                    const float *s2 = src + pos_off[p0 + (np > 2 ? 2 : np - 1)];
                    const float *s3 = src + pos_off[p0 + (np > 3 ? 3 : np - 1)];
                    const float *s4 = src + pos_off[p0 + (np > 4 ? 4 : np - 1)];
                    const float *s5 = src + pos_off[p0 + (np > 5 ? 5 : np - 1)];
                    dv_v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
                    dv_v16 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
                    dv_v16 a40 = {0}, a41 = {0}, a42 = {0}, a43 = {0}, a50 = {0}, a51 = {0}, a52 = {0}, a53 = {0};
                    if (!first) {
                        a00 = part[0]; a01 = part[1]; a02 = part[2]; a03 = part[3]; a10 = part[4]; a11 = part[5];
                        a12 = part[6]; a13 = part[7]; a20 = part[8]; a21 = part[9]; a22 = part[10]; a23 = part[11];
                        a30 = part[12]; a31 = part[13]; a32 = part[14]; a33 = part[15]; a40 = part[16];
                        a41 = part[17]; a42 = part[18]; a43 = part[19]; a50 = part[20]; a51 = part[21];
                        a52 = part[22]; a53 = part[23];
                    }
                    const float *wk = w;
                    for (int k = 0; k < kc; ++k, wk += 64) {
                        long t = tap[k];
                        dv_v16 w0 = dv_load16(wk), w1 = dv_load16(wk + 16), w2 = dv_load16(wk + 32);
                        dv_v16 w3 = dv_load16(wk + 48);
                        dv_v16 x;
                        x = DV_SPLAT(s0[t]); a00 += x * w0; a01 += x * w1; a02 += x * w2; a03 += x * w3;
                        x = DV_SPLAT(s1[t]); a10 += x * w0; a11 += x * w1; a12 += x * w2; a13 += x * w3;
                        x = DV_SPLAT(s2[t]); a20 += x * w0; a21 += x * w1; a22 += x * w2; a23 += x * w3;
                        x = DV_SPLAT(s3[t]); a30 += x * w0; a31 += x * w1; a32 += x * w2; a33 += x * w3;
                        x = DV_SPLAT(s4[t]); a40 += x * w0; a41 += x * w1; a42 += x * w2; a43 += x * w3;
                        x = DV_SPLAT(s5[t]); a50 += x * w0; a51 += x * w1; a52 += x * w2; a53 += x * w3;
                    }
                    if (last) {  /* bias + the sum, as every route adds them */
                        a00 = b0 + a00; a01 = b1 + a01; a02 = b2 + a02; a03 = b3 + a03;
                        a10 = b0 + a10; a11 = b1 + a11; a12 = b2 + a12; a13 = b3 + a13;
                        a20 = b0 + a20; a21 = b1 + a21; a22 = b2 + a22; a23 = b3 + a23;
                        a30 = b0 + a30; a31 = b1 + a31; a32 = b2 + a32; a33 = b3 + a33;
                        a40 = b0 + a40; a41 = b1 + a41; a42 = b2 + a42; a43 = b3 + a43;
                        a50 = b0 + a50; a51 = b1 + a51; a52 = b2 + a52; a53 = b3 + a53;
                        if (relu) {
                            a00 = dv_relu16(a00); a01 = dv_relu16(a01); a02 = dv_relu16(a02); a03 = dv_relu16(a03);
                            a10 = dv_relu16(a10); a11 = dv_relu16(a11); a12 = dv_relu16(a12); a13 = dv_relu16(a13);
                            a20 = dv_relu16(a20); a21 = dv_relu16(a21); a22 = dv_relu16(a22); a23 = dv_relu16(a23);
                            a30 = dv_relu16(a30); a31 = dv_relu16(a31); a32 = dv_relu16(a32); a33 = dv_relu16(a33);
                            a40 = dv_relu16(a40); a41 = dv_relu16(a41); a42 = dv_relu16(a42); a43 = dv_relu16(a43);
                            a50 = dv_relu16(a50); a51 = dv_relu16(a51); a52 = dv_relu16(a52); a53 = dv_relu16(a53);
                        }
                    }
                    part[0] = a00; part[1] = a01; part[2] = a02; part[3] = a03; part[4] = a10; part[5] = a11;
                    part[6] = a12; part[7] = a13; part[8] = a20; part[9] = a21; part[10] = a22; part[11] = a23;
                    part[12] = a30; part[13] = a31; part[14] = a32; part[15] = a33; part[16] = a40; part[17] = a41;
                    part[18] = a42; part[19] = a43; part[20] = a50; part[21] = a51; part[22] = a52; part[23] = a53;
                }
            }
            for (int q = g0; q < g1; q += 16)
                for (int c = 0; c < nch; c += 16)
                    dv_transpose16_store(partial + (long)(q - g0) * 64 + c, 64, out + (long)(ob * 64 + c) * ldo + q,
                                         ldo, nch - c < 16 ? nch - c : 16, g1 - q < 16 ? g1 - q : 16);
        }
    }
}
#elif DV_VW == 8
/* AVX2 (16 registers of 8 floats): the same groups, blocks and floats, the 64 channels of a
 * block taken 16 at a time (two vectors) for six positions: 12 accumulators, two weight vectors
 * and a broadcast in registers (4 x 3, MLAS's AVX2 shape, needs 17); 12 FMAs for 8 loads. */
/* Rows 0..7 of an 8 x 8 block (`in`, rows 8-float aligned, ldi floats apart) stored as its
 * columns: column i < ncols to out + i * ldo, its first `n` floats. */
static inline void dv_transpose8_store(const float *in, long ldi, float *out, long ldo, int ncols, int n)
{
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(in + i * ldi);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < ncols; ++i) dv_store8_part(out + i * ldo, t[i], n);
}

__attribute__((noinline))
static void dv_conv_ocvec(const float *src, const long *tap_off, const int *pos_off, const float *Wb, int O,
                          int K, const float *bias, int relu, float *out, long ldo, int p_begin, int p_end,
                          int ob_begin, int ob_end, float *partial)
{
    int kstep = dv_ocvec_kstep(K);
    dv_vn zero = {0};
    for (int ob = ob_begin; ob < ob_end; ++ob) {
        int nch = O - ob * 64 < 64 ? O - ob * 64 : 64;  /* a last block may have fewer channels */
        for (int g0 = p_begin; g0 < p_end; g0 += DV_OC_GROUP) {
            int g1 = p_end - g0 < DV_OC_GROUP ? p_end : g0 + DV_OC_GROUP;
            dv_ocvec_prefetch_outputs(out, ldo, ob, nch, g0, g1);
            for (int k0 = 0; k0 < K; k0 += kstep) {
                int kc = K - k0 < kstep ? K - k0 : kstep, first = k0 == 0, last = k0 + kc == K;
                const long *tap = tap_off + k0;
                for (int h = 0; h < nch; h += 16) {  /* channels h..h+15 of the block */
                    const float *w = Wb + ((long)ob * K + k0) * 64 + h, *bh = bias + ob * 64 + h;
                    dv_vn b0, b1;
                    __m256 m0 = _mm256_maskload_ps(bh, dv_mask8(nch - h)), m1 = _mm256_maskload_ps(bh + 8, dv_mask8(nch - h - 8));
                    memcpy(&b0, &m0, sizeof b0);
                    memcpy(&b1, &m1, sizeof b1);
                    float *part = partial + h;
                    for (int p0 = g0; p0 < g1; p0 += DV_OC_POS, part += 64 * DV_OC_POS) {
                        int np = g1 - p0 < DV_OC_POS ? g1 - p0 : DV_OC_POS;
                        /* a last tile of fewer positions repeats its last one (computed, not stored) */
                        const float *s0 = src + pos_off[p0], *s1 = src + pos_off[p0 + (np > 1 ? 1 : 0)];
                        const float *s2 = src + pos_off[p0 + (np > 2 ? 2 : np - 1)];
                        const float *s3 = src + pos_off[p0 + (np > 3 ? 3 : np - 1)];
                        const float *s4 = src + pos_off[p0 + (np > 4 ? 4 : np - 1)];
                        const float *s5 = src + pos_off[p0 + (np > 5 ? 5 : np - 1)];
                        dv_vn a00 = zero, a01 = zero, a10 = zero, a11 = zero, a20 = zero, a21 = zero;
                        dv_vn a30 = zero, a31 = zero, a40 = zero, a41 = zero, a50 = zero, a51 = zero;
                        if (!first) {
                            a00 = dv_loadn(part); a01 = dv_loadn(part + 8); a10 = dv_loadn(part + 64);
                            a11 = dv_loadn(part + 72); a20 = dv_loadn(part + 128); a21 = dv_loadn(part + 136);
                            a30 = dv_loadn(part + 192); a31 = dv_loadn(part + 200); a40 = dv_loadn(part + 256);
                            a41 = dv_loadn(part + 264); a50 = dv_loadn(part + 320); a51 = dv_loadn(part + 328);
                        }
                        const float *wk = w;
                        /* two taps per pass: SqueezeNet's 3 x 3 and 1 x 1 layers 0.95x-0.96x the
                         * time (docs/notes/2026-12-05-yardstick-and-unrolling.md) */
                        _Pragma("GCC unroll 2")
                        for (int k = 0; k < kc; ++k, wk += 64) {
                            long t = tap[k];
                            dv_vn w0 = dv_loadn(wk), w1 = dv_loadn(wk + 8), x;
                            x = DV_SPLATN(s0[t]); a00 += x * w0; a01 += x * w1;
                            x = DV_SPLATN(s1[t]); a10 += x * w0; a11 += x * w1;
                            x = DV_SPLATN(s2[t]); a20 += x * w0; a21 += x * w1;
                            x = DV_SPLATN(s3[t]); a30 += x * w0; a31 += x * w1;
                            x = DV_SPLATN(s4[t]); a40 += x * w0; a41 += x * w1;
                            x = DV_SPLATN(s5[t]); a50 += x * w0; a51 += x * w1;
                        }
                        if (last) {  /* bias + the sum, as every route adds them */
                            a00 = b0 + a00; a01 = b1 + a01; a10 = b0 + a10; a11 = b1 + a11;
                            a20 = b0 + a20; a21 = b1 + a21; a30 = b0 + a30; a31 = b1 + a31;
                            a40 = b0 + a40; a41 = b1 + a41; a50 = b0 + a50; a51 = b1 + a51;
                            if (relu) {
                                a00 = dv_relun(a00); a01 = dv_relun(a01); a10 = dv_relun(a10); a11 = dv_relun(a11);
                                a20 = dv_relun(a20); a21 = dv_relun(a21); a30 = dv_relun(a30); a31 = dv_relun(a31);
                                a40 = dv_relun(a40); a41 = dv_relun(a41); a50 = dv_relun(a50); a51 = dv_relun(a51);
                            }
                        }
                        dv_storen(part, a00); dv_storen(part + 8, a01); dv_storen(part + 64, a10);
                        dv_storen(part + 72, a11); dv_storen(part + 128, a20); dv_storen(part + 136, a21);
                        dv_storen(part + 192, a30); dv_storen(part + 200, a31); dv_storen(part + 256, a40);
                        dv_storen(part + 264, a41); dv_storen(part + 320, a50); dv_storen(part + 328, a51);
                    }
                }
            }
            for (int q = g0; q < g1; q += 8)
                for (int c = 0; c < nch; c += 8)
                    dv_transpose8_store(partial + (long)(q - g0) * 64 + c, 64, out + (long)(ob * 64 + c) * ldo + q,
                                        ldo, nch - c < 8 ? nch - c : 8, g1 - q < 8 ? g1 - q : 8);
        }
    }
}
#else
/* The channel-vector route is chosen with the AVX-512 and AVX2 tiles only (engine/conv_plan.py):
 * on the NEON build, the same sums one output at a time. */
static void dv_conv_ocvec(const float *src, const long *tap_off, const int *pos_off, const float *Wb, int O,
                          int K, const float *bias, int relu, float *out, long ldo, int p_begin, int p_end,
                          int ob_begin, int ob_end, float *partial)
{
    (void)partial;
    for (int o = ob_begin * 64; o < ob_end * 64 && o < O; ++o)
        for (int p = p_begin; p < p_end; ++p) {
            float sum = 0.0f;
            const float *w = Wb + (long)(o / 64) * K * 64 + o % 64;
            for (int k = 0; k < K; ++k) sum += w[(long)k * 64] * src[pos_off[p] + tap_off[k]];
            float y = bias[o] + sum;
            out[(long)o * ldo + p] = relu && y < 0.0f ? 0.0f : y;
        }
}
#endif

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
 * column pl); every element of the padded planes is written. Rows are short (8 to 56 floats in
 * the CIFAR ResNets and SqueezeNet): copied and zeroed with inline vector stores, not memcpy and
 * memset calls (three per row cost resnet56_caffe a tenth of its time). */
static void dv_pad_planes(const float *x, int C, int H, int W, int pt, int pl, int Hp, int Wp, float *dst)
{
    for (int c = 0; c < C; ++c) {
        const float *plane = x + (long)c * H * W;
        float *d = dst + (long)c * Hp * Wp;
        for (int y = 0; y < Hp; ++y) {
            float *row = d + (long)y * Wp;
            int iy = y - pt;
            if (iy < 0 || iy >= H) { dv_zero_run(row, Wp); continue; }
            int x0 = pl < Wp ? pl : Wp;
            int n = W < Wp - x0 ? W : Wp - x0;
            if (n < 0) n = 0;
            dv_zero_run(row, x0);
            dv_copy_run(row + x0, plane + (long)iy * W, n);
            dv_zero_run(row + x0 + n, Wp - x0 - n);
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

#endif
