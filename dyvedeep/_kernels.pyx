# cython: language_level=3
"""Cython kernels of the engine: im2col, BLAS GEMM, pooling, LRN, and the knobs' kernels
(channel statistics for SFMA, masked GEMM for SPET and SDSS, SDSS interpolation).

Layout: one image at a time, channels first (C, H, W), float32, C-contiguous. Every inner loop
runs without the GIL; ``threads`` spreads the outer loop over OpenMP threads. GEMM is the real
BLAS that SciPy ships (scipy.linalg.cython_blas.sgemm), called in row-major form.
"""
from cython.parallel cimport prange
cimport openmp
from libc.math cimport expf, powf, sqrt, fabs
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from scipy.linalg.cython_blas cimport sgemm, sgemv, sdot

import numpy as np
cimport numpy as cnp

cnp.import_array()

ctypedef unsigned char uint8

cdef extern from "_simd.h" nogil:
    void dv_gemm_tiles(const float* W, long ldw, int O, const float* cols, long ldc, long lds, float* out,
                       long ldo, int K, int N, const float* bias, int relu, int tile_begin, int tile_end)
    long long dv_masked_gemm_tiles(const float* W, long ldw, int O, const float* cols, long ldc, long lds,
                                   const unsigned char* mask, long ldm, float* out, long ldo,
                                   int K, int N, int tile_begin, int tile_end, int* scratch, int relu)
    long long dv_spet_finish_tiles(const float* W, long ldw, int O, const float* cols, long ldc, long lds,
                                   const unsigned char* mask, long ldm, float* out, long ldo,
                                   int lead, int K, int N, float margin, int relu,
                                   int tile_begin, int tile_end, int* scratch, unsigned char* cont)
    int dv_im2col_runs(int ho, int wo, int sh, int sw, int Wp, int* runs)
    void dv_im2col_plane_packed(const float* plane, int H, int W, int kh, int kw, int sw, int pt, int pl,
                                int dh, int dw, int Hp, int Wp, float* pad, const int* runs, int nruns,
                                float* dst, long lds)
    void dv_pack_rows(const float* src, long lda, int K, int N, float* dst, long lds)
    void dv_conv_dense_tiles(const float* src, const long* tap_off, int sw, const int* runs,
                             const int* panel_first, const float* W, int O, int K, int N,
                             const float* bias, int relu, float* out, float* panel,
                             int tile_begin, int tile_end)
    void dv_pad_planes(const float* x, int C, int H, int W, int pt, int pl, int Hp, int Wp, float* dst)
    int dv_position_runs(const int* pos, int n, int wo, int sh, int sw, int Wp, int* runs)
    void dv_unfold_runs(const float* src, const long* tap_off, int K, const int* runs, int nruns,
                        float* dst, long lds)
    void dv_maxpool_plane(const float* inp, int H, int W, float* out, int ho, int wo, int kh, int kw,
                          int sh, int sw, int pt, int pl, float* scratch)
    void dv_avgpool_plane(const float* inp, int H, int W, float* out, int ho, int wo, int kh, int kw,
                          int sh, int sw, int pt, int pl, int pb, int pr, int count_include_pad, float* scratch)


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


cdef void _gemm_run(const float* W, long ldw, int O, const float* cols, long ldc, long lds, float* out,
                    long ldo, int K, int N, const float* bias, bint relu, int threads) noexcept nogil:
    """dv_gemm_tiles over every 32-column tile, split into ``threads`` chunks."""
    cdef int ntiles = (N + 31) // 32
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    if nchunks <= 1:
        dv_gemm_tiles(W, ldw, O, cols, ldc, lds, out, ldo, K, N, bias, relu, 0, ntiles)
        return
    for c in prange(nchunks, num_threads=threads, schedule="static"):
        dv_gemm_tiles(W, ldw, O, cols, ldc, lds, out, ldo, K, N, bias, relu,
                      c * ntiles // nchunks, (c + 1) * ntiles // nchunks)


cdef int _check_gemm(const float[:, :] W, int K, int N, float[:, ::1] out, const float[::1] bias) except -1:
    if W.shape[1] != K or out.shape[0] != W.shape[0] or out.shape[1] != N:
        raise ValueError("gemm: shape mismatch")
    if K and W.shape[0] and W.strides[1] != 4:
        raise ValueError("gemm: weight columns must be contiguous")
    if bias is not None and bias.shape[0] != W.shape[0]:
        raise ValueError("gemm: bias shape mismatch")
    return 0


cdef void _bias_only(float[:, ::1] out, const float[::1] bias, bint relu):
    """A product with no inner dimension: out = bias (None: out unchanged), then ReLU if asked."""
    cdef Py_ssize_t o, j
    cdef float v
    for o in range(out.shape[0]):
        for j in range(out.shape[1]):
            v = bias[o] if bias is not None else out[o, j]
            if relu and v < 0.0:
                v = 0.0
            out[o, j] = v


def conv_gemm(const float[:, :] W, const float[:, :, ::1] cols, int N, float[:, ::1] out,
              const float[::1] bias=None, bint relu=False, int threads=1):
    """The engine's own dense GEMM (register tiles of 8 rows x 32 columns, see _simd.h) on a
    packed unfolded input ``cols`` (panels x rows x 32; rows 0..K-1 used, K = W's columns, N
    columns): out = W @ cols + bias[:, None] (``bias`` None: out += W @ cols), ReLU if asked."""
    cdef int O = W.shape[0], K = W.shape[1]
    _check_gemm(W, K, N, out, bias)
    if cols.shape[0] * 32 < N or cols.shape[1] < K:
        raise ValueError("conv_gemm: unfolded input too small")
    if O == 0 or N == 0:
        return
    if K == 0:
        _bias_only(out, bias, relu)
        return
    cdef long ldw = W.strides[0] // 4 if O > 1 else K
    with nogil:
        _gemm_run(&W[0, 0], ldw, O, &cols[0, 0, 0], 32, cols.shape[1] * 32, &out[0, 0], N, K, N,
                  &bias[0] if bias is not None else NULL, relu, threads)


def conv_gemm_rows(const float[:, :] W, const float[:, ::1] cols, float[:, ::1] out,
                   const float[::1] bias=None, bint relu=False, int threads=1):
    """As conv_gemm, for a row-major ``cols`` (K x N), e.g. a 1x1 convolution's input map."""
    cdef int O = W.shape[0], K = W.shape[1], N = cols.shape[1]
    _check_gemm(W, K, N, out, bias)
    if cols.shape[0] != K:
        raise ValueError("conv_gemm_rows: shape mismatch")
    if O == 0 or N == 0:
        return
    if K == 0:
        _bias_only(out, bias, relu)
        return
    cdef long ldw = W.strides[0] // 4 if O > 1 else K
    with nogil:
        _gemm_run(&W[0, 0], ldw, O, &cols[0, 0], N, 32, &out[0, 0], N, K, N,
                  &bias[0] if bias is not None else NULL, relu, threads)


def gemv_bias(const float[:, ::1] W, const float[::1] x, const float[::1] bias, float[::1] out, bint relu=False):
    """out = W @ x + bias (fully connected, BLAS sgemv), then ReLU if asked."""
    cdef int O = W.shape[0], Kd = W.shape[1], inc = 1, o
    cdef char trans = b'T'
    cdef float one = 1.0, zero = 0.0, v
    if x.shape[0] != Kd or bias.shape[0] != O or out.shape[0] != O:
        raise ValueError("gemv_bias: shape mismatch")
    if O == 0:
        return
    with nogil:
        if Kd == 0:
            for o in range(O):
                out[o] = 0.0
        else:
            sgemv(&trans, &Kd, &O, &one, <float*>&W[0, 0], &Kd, <float*>&x[0], &inc, &zero, &out[0], &inc)
        for o in range(O):
            v = out[o] + bias[o]
            if relu and v < 0.0:
                v = 0.0
            out[o] = v


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

def im2col_packed(const float[:, :, ::1] x, const int[::1] channels, int kh, int kw, int sh, int sw,
                  int pt, int pl, int dh, int dw, int ho, int wo, float[:, :, ::1] cols, int threads=1):
    """im2col of the listed channels over every output position into packed panels ``cols``
    (panels x rows x 32): row (i*kh + ky)*kw + kx holds channel ``channels[i]`` at tap (ky, kx),
    column y * wo + x (panel column // 32, lane column % 32)."""
    cdef int H = x.shape[1], W = x.shape[2]
    cdef Py_ssize_t i, nch = channels.shape[0]
    if cols.shape[1] < nch * kh * kw or cols.shape[0] * 32 < ho * wo or cols.shape[2] != 32:
        raise ValueError("im2col_packed: output too small")
    for i in range(nch):
        if channels[i] < 0 or channels[i] >= x.shape[0]:
            raise ValueError("im2col_packed: channel out of range")
    if nch == 0 or ho * wo == 0:
        return
    if threads > nch:
        threads = <int>nch
    cdef long lds = cols.shape[1] * 32
    cdef int Hp = (ho - 1) * sh + (kh - 1) * dh + 1, Wp = (wo - 1) * sw + (kw - 1) * dw + 1
    cdef int[::1] runs = np.empty(4 * (ho * wo // 32 + ho + 2), np.int32)
    cdef int nruns = dv_im2col_runs(ho, wo, sh, sw, Wp, &runs[0])
    cdef float[:, ::1] pad = np.zeros((threads, Hp * Wp), np.float32)
    cdef int tid
    for i in prange(nch, nogil=True, num_threads=threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        dv_im2col_plane_packed(&x[channels[i], 0, 0], H, W, kh, kw, sw, pt, pl, dh, dw, Hp, Wp, &pad[tid, 0],
                               &runs[0], nruns, &cols[0, i * kh * kw, 0], lds)


def im2col_run_table(int ho, int wo, int sh, int sw, int row_width):
    """The runs of a packed im2col (see dv_im2col_runs) as an (n x 4) int32 array, and for each
    32-position panel the index of its first run (panels + 1 entries)."""
    cdef int[::1] buf = np.empty(4 * (ho * wo // 32 + ho + 2), np.int32)
    cdef int n = dv_im2col_runs(ho, wo, sh, sw, row_width, &buf[0])
    runs = np.asarray(buf)[:4 * n].reshape(n, 4).copy()
    ntiles = (ho * wo + 31) // 32
    panel_first = np.searchsorted(runs[:, 0], np.arange(ntiles + 1)).astype(np.int32)
    return runs, panel_first


def conv_dense(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp, bint pad,
               float[::1] pad_buffer, const long[::1] tap_off, int sw, const int[:, ::1] runs,
               const int[::1] panel_first, const float[:, ::1] W, const float[::1] bias, bint relu,
               float[:, ::1] out, float[:, ::1] panels, int threads=1):
    """Dense convolution of one group (input channels channel0.., W: O x K with K = that many
    channels x taps) with im2col fused into the GEMM (dv_conv_dense_tiles). With ``pad`` the
    group's channels are first copied with their zero padding into ``pad_buffer`` (Hp x Wp
    planes) and ``tap_off`` indexes it; else it indexes ``x`` itself. ``panels`` is scratch,
    one row of K * 32 floats per thread."""
    cdef int C = x.shape[0], H = x.shape[1], Wd = x.shape[2]
    cdef int O = W.shape[0], K = W.shape[1], N = out.shape[1]
    cdef int ntiles = panel_first.shape[0] - 1
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int cin = 0, c
    cdef const float* src
    if K == 0 or O == 0 or N == 0:
        raise ValueError("conv_dense: empty layer")
    if (out.shape[0] != O or bias.shape[0] != O or tap_off.shape[0] != K or panels.shape[1] < K * 32
            or panels.shape[0] < max(nchunks, 1) or ntiles * 32 < N or runs.shape[1] != 4):
        raise ValueError("conv_dense: shape mismatch")
    if pad:
        cin = (tap_off[K - 1] // (Hp * Wp)) + 1
        if channel0 + cin > C or pad_buffer.shape[0] < cin * Hp * Wp:
            raise ValueError("conv_dense: padding buffer too small")
        with nogil:
            dv_pad_planes(&x[channel0, 0, 0], cin, H, Wd, pt, pl, Hp, Wp, &pad_buffer[0])
        src = &pad_buffer[0]
    else:
        src = &x[channel0, 0, 0]
    if nchunks <= 1:
        with nogil:
            dv_conv_dense_tiles(src, &tap_off[0], sw, &runs[0, 0], &panel_first[0], &W[0, 0], O, K, N,
                                &bias[0], relu, &out[0, 0], &panels[0, 0], 0, ntiles)
        return
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        dv_conv_dense_tiles(src, &tap_off[0], sw, &runs[0, 0], &panel_first[0], &W[0, 0], O, K, N,
                            &bias[0], relu, &out[0, 0], &panels[c, 0], c * ntiles // nchunks,
                            (c + 1) * ntiles // nchunks)


def pad_planes(const float[:, :, ::1] x, int channel0, int nch, int pt, int pl, int Hp, int Wp,
               float[::1] dst):
    """Channels channel0..channel0+nch-1 of x with their zero padding, as Hp x Wp planes in dst."""
    if channel0 < 0 or channel0 + nch > x.shape[0] or dst.shape[0] < nch * Hp * Wp:
        raise ValueError("pad_planes: shape mismatch")
    if nch == 0:
        return
    with nogil:
        dv_pad_planes(&x[channel0, 0, 0], nch, x.shape[1], x.shape[2], pt, pl, Hp, Wp, &dst[0])


def unfold_positions(const float[::1] src, const long[::1] tap_off, const int[::1] positions, int wo, int sh,
                     int sw, int row_width, float[:, :, ::1] cols):
    """Unfold the listed output positions (increasing) into packed panels ``cols`` (panels x
    rows x 32, column i = positions[i]): row k reads ``src`` (padded planes, rows
    ``row_width`` apart) at tap_off[k] plus each position's offset."""
    cdef int n = positions.shape[0], K = tap_off.shape[0], nruns
    if cols.shape[0] * 32 < n or cols.shape[1] < K or cols.shape[2] != 32:
        raise ValueError("unfold_positions: output too small")
    if n == 0 or K == 0:
        return
    cdef int[::1] runs = np.empty(5 * n, np.int32)
    with nogil:
        nruns = dv_position_runs(&positions[0], n, wo, sh, sw, row_width, &runs[0])
        dv_unfold_runs(&src[0], &tap_off[0], K, &runs[0], nruns, &cols[0, 0, 0], cols.shape[1] * 32)


def pack_rows(const float[:, ::1] src, float[:, :, ::1] cols):
    """Copy a row-major (K x N) matrix into packed panels (panels x rows x 32)."""
    cdef int K = src.shape[0], N = src.shape[1]
    if cols.shape[1] < K or cols.shape[0] * 32 < N or cols.shape[2] != 32:
        raise ValueError("pack_rows: output too small")
    if K == 0 or N == 0:
        return
    with nogil:
        dv_pack_rows(&src[0, 0], N, K, N, &cols[0, 0, 0], cols.shape[1] * 32)


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


def softmax_columns(const float[:, ::1] x, float[:, ::1] out):
    """Softmax over the rows of each column: out[:, j] = exp(x[:, j] - max) / sum."""
    cdef Py_ssize_t C = x.shape[0], P = x.shape[1], c, j
    cdef float m, e, total
    if out.shape[0] != C or out.shape[1] != P:
        raise ValueError("softmax_columns: shape mismatch")
    with nogil:
        for j in range(P):
            m = x[0, j]
            for c in range(1, C):
                if x[c, j] > m:
                    m = x[c, j]
            total = 0.0
            for c in range(C):
                e = expf(x[c, j] - m)
                out[c, j] = e
                total = total + e
            for c in range(C):
                out[c, j] = out[c, j] / total


# --------------------------------------------------------------------------- pooling, LRN

def maxpool(const float[:, :, ::1] x, float[:, :, ::1] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int threads=1):
    """Max pooling with implicit -inf padding (ONNX / onnxruntime semantics)."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    cdef int span = max((Wo - 1) * sw + kw, W + pl) + 16
    cdef Py_ssize_t c
    cdef float[:, ::1] scratch = np.empty((threads, span), np.float32)
    cdef int tid
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        dv_maxpool_plane(&x[c, 0, 0], H, W, &out[c, 0, 0], Ho, Wo, kh, kw, sh, sw, pt, pl, &scratch[tid, 0])


def avgpool(const float[:, :, ::1] x, float[:, :, ::1] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int pb, int pr, bint count_include_pad, int threads=1):
    """Average pooling as onnxruntime computes it: with count_include_pad the divisor is the
    window clipped to the padded input (H + pad_end), else the taps inside the input."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    cdef int span = max((Wo - 1) * sw + kw, W + pl) + 16
    cdef Py_ssize_t c
    cdef float[:, ::1] scratch = np.empty((threads, span), np.float32)
    cdef int tid
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        dv_avgpool_plane(&x[c, 0, 0], H, W, &out[c, 0, 0], Ho, Wo, kh, kw, sh, sw, pt, pl, pb, pr,
                         count_include_pad, &scratch[tid, 0])


def global_avgpool(const float[:, ::1] x, float[::1] out):
    """Mean of each row (channel) of x (C x HW), summed in double."""
    cdef Py_ssize_t C = x.shape[0], P = x.shape[1], c, j
    cdef double total
    if out.shape[0] != C:
        raise ValueError("global_avgpool: shape mismatch")
    with nogil:
        for c in range(C):
            total = 0.0
            for j in range(P):
                total = total + x[c, j]
            out[c] = <float>(total / P)


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

def masked_gemm(const float[:, ::1] W, int k0, int k1, const float[:, :, ::1] cols, int N,
                const uint8[:, ::1] mask, float[:, ::1] out, int threads=1, bint relu=False):
    """out[o, j] += sum_{k0 <= k < k1} W[o, k] * cols[k, j] for each (o, j) with mask[o, j]
    (``cols`` packed: panels x rows x 32, N columns).

    The work is done in tiles of 16 columns; in each tile only the output channels with a
    masked entry are computed, eight at a time (the GEMM-shaped part of SPET and SDSS); with
    ``relu`` the written entries are ReLU'd. Returns the number of (o, j) pairs computed."""
    cdef int O = W.shape[0]
    cdef int K = k1 - k0
    cdef long long done = 0
    cdef int ntiles = (N + 15) // 16
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    if K <= 0 or O == 0 or N == 0:
        return 0
    if (k0 < 0 or k1 > W.shape[1] or cols.shape[1] < k1 or cols.shape[0] * 32 < N or mask.shape[0] != O
            or mask.shape[1] != N or out.shape[0] != O or out.shape[1] != N):
        raise ValueError("masked_gemm: shape mismatch")
    cdef long lds = cols.shape[1] * 32
    cdef int* scratch = <int*>malloc(max(nchunks, 1) * O * sizeof(int))
    if scratch == NULL:
        raise MemoryError()
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        done += dv_masked_gemm_tiles(&W[0, k0], W.shape[1], O, &cols[0, k0, 0], 32, lds, &mask[0, 0],
                                     mask.shape[1], &out[0, 0], out.shape[1], K, N,
                                     c * ntiles // nchunks, (c + 1) * ntiles // nchunks, scratch + c * O, relu)
    free(scratch)
    return done


def spet_finish(const float[:, ::1] W, int lead, const float[:, :, ::1] cols, int N, float[:, ::1] out,
                float margin, bint relu, const uint8[:, ::1] mask=None, int threads=1):
    """SPET after the partial sums: ``out`` (O x N) holds bias + constants + the leading ``lead``
    inputs of each active neuron (``mask``; None: all). Neurons with partial < -margin become 0;
    the others get inputs lead..K-1 of the packed ``cols`` and ReLU. Returns the number stopped."""
    cdef int O = W.shape[0], K = W.shape[1]
    cdef int ntiles = (N + 15) // 16
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    cdef long long stopped = 0
    cdef const unsigned char* m = NULL
    cdef long ldm = 0
    if O == 0 or N == 0:
        return 0
    if cols.shape[1] < K or cols.shape[0] * 32 < N or out.shape[0] != O or out.shape[1] != N or lead > K:
        raise ValueError("spet_finish: shape mismatch")
    if mask is not None:
        if mask.shape[0] != O or mask.shape[1] != N:
            raise ValueError("spet_finish: mask shape mismatch")
        m = &mask[0, 0]
        ldm = mask.shape[1]
    cdef long lds = cols.shape[1] * 32
    cdef int* scratch = <int*>malloc(max(nchunks, 1) * O * sizeof(int))
    cdef unsigned char* cont = <unsigned char*>malloc(max(nchunks, 1) * O * 16)
    if scratch == NULL or cont == NULL:
        free(scratch)
        free(cont)
        raise MemoryError()
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        stopped += dv_spet_finish_tiles(&W[0, 0], W.shape[1], O, &cols[0, 0, 0], 32, lds, m, ldm, &out[0, 0],
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
