# cython: language_level=3
"""Cython kernels of the engine: im2col, BLAS GEMM, pooling, LRN, and the knobs' kernels
(channel statistics for SFMA, masked GEMM for SPET and SDSS, SDSS interpolation).

Layout: one image at a time, channels first (C, H, W), float32, C-contiguous. Every inner loop
runs without the GIL; ``threads`` spreads the outer loop over OpenMP threads. GEMM is the real
BLAS that SciPy ships (scipy.linalg.cython_blas.sgemm), called in row-major form.
"""
from cython.parallel cimport prange
from libc.math cimport expf, powf, sqrt, fabs
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from scipy.linalg.cython_blas cimport sgemm, sdot

import numpy as np
cimport numpy as cnp

cnp.import_array()

ctypedef unsigned char uint8

cdef extern from "_simd.h" nogil:
    long long dv_masked_gemm_tiles(const float* W, long ldw, int O, const float* cols, long ldc,
                                   const unsigned char* mask, long ldm, float* out, long ldo,
                                   int K, int N, int tile_begin, int tile_end, int* scratch, int relu)
    long long dv_spet_finish_tiles(const float* W, long ldw, int O, const float* cols, long ldc,
                                   const unsigned char* mask, long ldm, float* out, long ldo,
                                   int lead, int K, int N, float margin, int relu,
                                   int tile_begin, int tile_end, int* scratch, unsigned char* cont)
    void dv_im2col_plane(const float* plane, int H, int W, int kh, int kw, int sh, int sw, int pt, int pl,
                         int dh, int dw, int ho, int wo, float* dst, long ldc)
    void dv_maxpool_plane(const float* inp, int H, int W, float* out, int ho, int wo, int kh, int kw,
                          int sh, int sw, int pt, int pl)
    void dv_avgpool_plane(const float* inp, int H, int W, float* out, int ho, int wo, int kh, int kw,
                          int sh, int sw, int pt, int pl, int pb, int pr, int count_include_pad)


# --------------------------------------------------------------------------- GEMM

cdef inline void gemm_rm(const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                         int M, int N, int K, float beta) noexcept nogil:
    """C (M x N) = A (M x K) @ B (K x N) + beta * C, all row-major, via column-major sgemm."""
    cdef char trans = b'N'
    cdef float alpha = 1.0
    cdef int i
    if M == 0 or N == 0:
        return
    if K == 0:
        if beta == 0.0:
            for i in range(M):
                memset(&C[i * ldc], 0, N * sizeof(float))
        return
    sgemm(&trans, &trans, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda, &beta, C, &ldc)


def gemm(const float[:, :] A, const float[:, :] B, float[:, :] C, float beta=0.0):
    """C = A @ B + beta * C for row-major matrices (rows may be strided, columns contiguous)."""
    cdef int M = A.shape[0], K = A.shape[1], N = B.shape[1]
    if B.shape[0] != K or C.shape[0] != M or C.shape[1] != N:
        raise ValueError("gemm: shape mismatch")
    if (K and A.strides[1] != 4) or (N and (B.strides[1] != 4 or C.strides[1] != 4)):
        raise ValueError("gemm: columns must be contiguous")
    if M == 0 or N == 0:
        return
    cdef int lda = <int>(A.strides[0] // 4) if M > 1 else max(K, 1)
    cdef int ldb = <int>(B.strides[0] // 4) if K > 1 else max(N, 1)
    cdef int ldc = <int>(C.strides[0] // 4) if M > 1 else max(N, 1)
    cdef const float* pa = &A[0, 0] if K else NULL
    cdef const float* pb = &B[0, 0] if K else NULL
    with nogil:
        gemm_rm(pa, lda, pb, ldb, &C[0, 0], ldc, M, N, K, beta)


def gemv_rows(const float[:, ::1] W, const float[::1] x, float[::1] out, int k0, int k1,
              const uint8[::1] mask, int threads=1):
    """out[o] += W[o, k0:k1] . x[k0:k1] for every o with mask[o] (fully-connected SPET finish)."""
    cdef Py_ssize_t O = W.shape[0], o
    cdef int n = k1 - k0, inc = 1
    if n <= 0:
        return
    for o in prange(O, nogil=True, num_threads=threads, schedule="static"):
        if mask[o]:
            out[o] = out[o] + sdot(&n, <float*>&W[o, k0], &inc, <float*>&x[k0], &inc)


# --------------------------------------------------------------------------- im2col

def im2col_dense(const float[:, :, ::1] x, const int[::1] channels, int kh, int kw, int sh, int sw,
                 int pt, int pl, int dh, int dw, int ho, int wo, float[:, ::1] cols, int threads=1):
    """im2col of the listed channels over every output position (row-contiguous fast path):
    row (i*kh + ky)*kw + kx holds channel ``channels[i]`` at tap (ky, kx), column y * wo + x."""
    cdef int H = x.shape[1], W = x.shape[2]
    cdef Py_ssize_t i, nch = channels.shape[0]
    if cols.shape[0] < nch * kh * kw or cols.shape[1] < ho * wo:
        raise ValueError("im2col_dense: output too small")
    if nch == 0:
        return
    for i in prange(nch, nogil=True, num_threads=threads, schedule="static"):
        dv_im2col_plane(&x[channels[i], 0, 0], H, W, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo,
                        &cols[i * kh * kw, 0], cols.shape[1])


# --------------------------------------------------------------------------- elementwise

def bias_act(float[:, ::1] out, const float[::1] bias, bint relu, int threads=1):
    """out[o, :] += bias[o], then ReLU if asked."""
    cdef Py_ssize_t O = out.shape[0], N = out.shape[1], o, j
    cdef float b, v
    for o in prange(O, nogil=True, num_threads=threads, schedule="static"):
        b = bias[o]
        for j in range(N):
            v = out[o, j] + b
            if relu and v < 0.0:
                v = 0.0
            out[o, j] = v


def relu_rows(float[:, ::1] x):
    """x = max(x, 0) elementwise, for a C-contiguous matrix."""
    cdef Py_ssize_t n = x.shape[0] * x.shape[1], i
    cdef float* p = &x[0, 0] if n else NULL
    with nogil:
        for i in range(n):
            if p[i] < 0.0:
                p[i] = 0.0


def relu_inplace(float[::1] x):
    """x = max(x, 0) elementwise."""
    cdef Py_ssize_t n = x.shape[0], i
    with nogil:
        for i in range(n):
            if x[i] < 0.0:
                x[i] = 0.0


# --------------------------------------------------------------------------- pooling, LRN

def maxpool(const float[:, :, ::1] x, float[:, :, ::1] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int threads=1):
    """Max pooling with implicit -inf padding (ONNX / onnxruntime semantics)."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    cdef Py_ssize_t c
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        dv_maxpool_plane(&x[c, 0, 0], H, W, &out[c, 0, 0], Ho, Wo, kh, kw, sh, sw, pt, pl)


def avgpool(const float[:, :, ::1] x, float[:, :, ::1] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int pb, int pr, bint count_include_pad, int threads=1):
    """Average pooling as onnxruntime computes it: with count_include_pad the divisor is the
    window clipped to the padded input (H + pad_end), else the taps inside the input."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    cdef Py_ssize_t c
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        dv_avgpool_plane(&x[c, 0, 0], H, W, &out[c, 0, 0], Ho, Wo, kh, kw, sh, sw, pt, pl, pb, pr,
                         count_include_pad)


def lrn_across(const float[:, :, ::1] x, float[:, :, ::1] out, int size, float alpha, float beta,
               float bias, int threads=1):
    """ONNX LRN: x / (bias + alpha / size * sum of x^2 over neighbouring channels) ** beta."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2]
    cdef int lo = (size - 1) // 2, hi = size - 1 - (size - 1) // 2
    cdef Py_ssize_t c
    cdef int y, xx, k, k0, k1
    cdef float s, v
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        k0 = c - lo if c - lo > 0 else 0
        k1 = c + hi + 1 if c + hi + 1 < C else C
        for y in range(H):
            for xx in range(W):
                s = 0.0
                for k in range(k0, k1):
                    v = x[k, y, xx]
                    s = s + v * v
                out[c, y, xx] = x[c, y, xx] / powf(bias + alpha / size * s, beta)


# --------------------------------------------------------------------------- SFMA

def channel_stats(const float[:, :, ::1] x, double[::1] sums, double[::1] sumsq, double[::1] sumabs,
                  bint need_abs, int threads=1):
    """Per channel: sum, sum of squares and (if asked) sum of absolute values, in double."""
    cdef Py_ssize_t C = x.shape[0], c
    cdef int H = x.shape[1], W = x.shape[2], y, xx
    cdef double s, q, a, v
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        s = 0.0
        q = 0.0
        a = 0.0
        for y in range(H):
            for xx in range(W):
                v = x[c, y, xx]
                s = s + v
                q = q + v * v
                if need_abs:
                    a = a + fabs(v)
        sums[c] = s
        sumsq[c] = q
        sumabs[c] = a


# --------------------------------------------------------------------------- masked GEMM

def masked_gemm(const float[:, ::1] W, int k0, int k1, const float[:, ::1] cols, const uint8[:, ::1] mask,
                float[:, ::1] out, int threads=1, bint relu=False):
    """out[o, j] += sum_{k0 <= k < k1} W[o, k] * cols[k - k0, j] for each (o, j) with mask[o, j].

    ``cols`` holds rows k0..k1-1 of the unfolded input. The work is done in tiles of 16 columns;
    in each tile only the output channels with a masked entry are computed, eight at a time (the
    GEMM-shaped part of SPET and SDSS); with ``relu`` the written entries are ReLU'd. Returns
    the number of (o, j) pairs computed."""
    cdef int O = W.shape[0], N = cols.shape[1]
    cdef int K = k1 - k0
    cdef long long done = 0
    cdef int ntiles = (N + 15) // 16
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    if K <= 0 or O == 0 or N == 0:
        return 0
    if cols.shape[0] < K or mask.shape[0] != O or mask.shape[1] != N or out.shape[0] != O or out.shape[1] != N:
        raise ValueError("masked_gemm: shape mismatch")
    cdef int* scratch = <int*>malloc(max(nchunks, 1) * O * sizeof(int))
    if scratch == NULL:
        raise MemoryError()
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        done += dv_masked_gemm_tiles(&W[0, k0], W.shape[1], O, &cols[0, 0], cols.shape[1], &mask[0, 0],
                                     mask.shape[1], &out[0, 0], out.shape[1], K, N,
                                     c * ntiles // nchunks, (c + 1) * ntiles // nchunks, scratch + c * O, relu)
    free(scratch)
    return done


def spet_finish(const float[:, ::1] W, int lead, const float[:, ::1] cols, float[:, ::1] out,
                float margin, bint relu, const uint8[:, ::1] mask=None, int threads=1):
    """SPET after the partial sums: ``out`` (O x N) holds bias + constants + the leading ``lead``
    inputs of each active neuron (``mask``; None: all). Neurons with partial < -margin become 0;
    the others get inputs lead..K-1 of ``cols`` (K x N) and ReLU. Returns the number stopped."""
    cdef int O = W.shape[0], N = cols.shape[1], K = W.shape[1]
    cdef int ntiles = (N + 15) // 16
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    cdef long long stopped = 0
    cdef const unsigned char* m = NULL
    cdef long ldm = 0
    if O == 0 or N == 0:
        return 0
    if cols.shape[0] < K or out.shape[0] != O or out.shape[1] != N or lead > K:
        raise ValueError("spet_finish: shape mismatch")
    if mask is not None:
        if mask.shape[0] != O or mask.shape[1] != N:
            raise ValueError("spet_finish: mask shape mismatch")
        m = &mask[0, 0]
        ldm = mask.shape[1]
    cdef int* scratch = <int*>malloc(max(nchunks, 1) * O * sizeof(int))
    cdef unsigned char* cont = <unsigned char*>malloc(max(nchunks, 1) * O * 16)
    if scratch == NULL or cont == NULL:
        free(scratch)
        free(cont)
        raise MemoryError()
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        stopped += dv_spet_finish_tiles(&W[0, 0], W.shape[1], O, &cols[0, 0], cols.shape[1], m, ldm, &out[0, 0],
                                        out.shape[1], lead, K, N, margin, relu, c * ntiles // nchunks,
                                        (c + 1) * ntiles // nchunks, scratch + c * O, cont + c * O * 16)
    free(scratch)
    free(cont)
    return stopped


def spet_decide(const float[:, ::1] partial, float margin, const uint8[:, ::1] active, uint8[:, ::1] cont):
    """cont[o, j] = active[o, j] and partial[o, j] >= -margin. Returns the number terminated
    (active entries predicted negative)."""
    cdef Py_ssize_t O = partial.shape[0], N = partial.shape[1], o, j
    cdef long long terminated = 0
    cdef float neg = -margin
    with nogil:
        for o in range(O):
            for j in range(N):
                if active[o, j]:
                    if partial[o, j] < neg:
                        cont[o, j] = 0
                        terminated += 1
                    else:
                        cont[o, j] = 1
                else:
                    cont[o, j] = 0
    return terminated


def finish_act(float[:, ::1] out, const uint8[:, ::1] active, const uint8[:, ::1] cont, bint relu):
    """After SPET: terminated neurons (active but not continued) become 0; ReLU the rest."""
    cdef Py_ssize_t O = out.shape[0], N = out.shape[1], o, j
    with nogil:
        for o in range(O):
            for j in range(N):
                if active[o, j]:
                    if not cont[o, j]:
                        out[o, j] = 0.0
                    elif relu and out[o, j] < 0.0:
                        out[o, j] = 0.0


# --------------------------------------------------------------------------- SDSS

def sdss_cells(const float[:, :, ::1] out, const int[::1] gy, const int[::1] gx, float threshold,
               uint8[:, :, ::1] insignificant):
    """insignificant[o, by, bx] = all four grid corners of cell (by, bx) of map o are < threshold.
    Returns the number of insignificant cells."""
    cdef Py_ssize_t O = out.shape[0], o
    cdef int nby = gy.shape[0] - 1, nbx = gx.shape[0] - 1, by, bx
    cdef long long n = 0
    with nogil:
        for o in range(O):
            for by in range(nby):
                for bx in range(nbx):
                    if (out[o, gy[by], gx[bx]] < threshold and out[o, gy[by], gx[bx + 1]] < threshold
                            and out[o, gy[by + 1], gx[bx]] < threshold and out[o, gy[by + 1], gx[bx + 1]] < threshold):
                        insignificant[o, by, bx] = 1
                        n += 1
                    else:
                        insignificant[o, by, bx] = 0
    return n


def sdss_needed(const uint8[:, :, ::1] insignificant, const int[::1] off_positions, const int[::1] cell_y,
                const int[::1] cell_x, uint8[:, ::1] needed):
    """needed[o, p] = 1 for each off-grid position p (``off_positions[j]``, in cell
    (cell_y[j], cell_x[j])) whose cell is significant in map o; other entries are left as they
    are (the caller zeroes them). Returns the number of (o, p) needed."""
    cdef Py_ssize_t O = insignificant.shape[0], P = off_positions.shape[0], o, j
    cdef long long n = 0
    with nogil:
        for o in range(O):
            for j in range(P):
                if not insignificant[o, cell_y[j], cell_x[j]]:
                    needed[o, off_positions[j]] = 1
                    n += 1
    return n


def sdss_fill(float[:, :, ::1] out, const int[::1] gy, const int[::1] gx, const int[::1] pos_y,
              const int[::1] pos_x, const int[::1] cell_y, const int[::1] cell_x,
              const uint8[:, ::1] needed, bint bilinear):
    """Fill every off-grid position (pos_y[j], pos_x[j]) that its map does not need
    (``needed`` over all positions, y * width + x): bilinear from its cell's corners, or 0.
    Returns the number of positions filled."""
    cdef Py_ssize_t O = out.shape[0], P = pos_y.shape[0], o, j
    cdef int y, x, by, bx, y0, y1, x0, x1, wo = out.shape[2]
    cdef float fy, fx, top, bottom
    cdef long long n = 0
    with nogil:
        for o in range(O):
            for j in range(P):
                y = pos_y[j]
                x = pos_x[j]
                if needed[o, y * wo + x]:
                    continue
                n += 1
                if not bilinear:
                    out[o, y, x] = 0.0
                    continue
                by = cell_y[j]
                bx = cell_x[j]
                y0 = gy[by]
                y1 = gy[by + 1]
                x0 = gx[bx]
                x1 = gx[bx + 1]
                fy = <float>(y - y0) / <float>(y1 - y0)
                fx = <float>(x - x0) / <float>(x1 - x0)
                top = out[o, y0, x0] + fx * (out[o, y0, x1] - out[o, y0, x0])
                bottom = out[o, y1, x0] + fx * (out[o, y1, x1] - out[o, y1, x0])
                out[o, y, x] = top + fy * (bottom - top)
    return n
