# cython: language_level=3
"""Cython kernels of the engine: convolution (im2col fused into the engine's own GEMM, see
_simd.h), pooling, LRN, softmax, fully connected (BLAS sgemv), and the knobs' kernels (SFMA's
channel statistics, the knob conv kernel with SPET inside, SDSS's cells, union and fill).

Layout: one image at a time, channels first (C, H, W), float32, C-contiguous. Every inner loop
runs without the GIL; ``threads`` spreads the outer loop over OpenMP threads. The convolutions'
GEMM is the register-tiled kernel of _simd.h (AVX-512 here, NEON on the Pi); the fully connected
layers use the BLAS that SciPy ships (scipy.linalg.cython_blas), called in row-major form.
"""
from cython.parallel cimport prange
cimport openmp
from libc.math cimport expf, powf, sqrt, fabs
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset
from scipy.linalg.cython_blas cimport sgemm, sgemv, sdot

import numpy as np
cimport numpy as cnp

cnp.import_array()

ctypedef unsigned char uint8

cdef extern from "_simd.h" nogil:
    enum: DV_DTILE  # vectors per direct tile
    void dv_gemm_tiles(const float* W, long ldw, int O, const float* cols, long ldc, long lds, float* out,
                       long ldo, int K, int N, const float* bias, int relu, int tile_begin, int tile_end)
    int dv_im2col_runs(int ho, int wo, int sh, int sw, int Wp, int* runs)
    void dv_im2col_plane_packed(const float* plane, int H, int W, int kh, int kw, int sw, int pt, int pl,
                                int dh, int dw, int Hp, int Wp, float* pad, const int* runs, int nruns,
                                float* dst, long lds)
    void dv_conv_dense_tiles(const float* src, const long* tap_off, int sw, const int* runs,
                             const int* panel_first, const float* W, int O, int K, int N,
                             const float* bias, int relu, float* out, float* panel,
                             int tile_begin, int tile_end)
    void dv_pad_planes(const float* x, int C, int H, int W, int pt, int pl, int Hp, int Wp, float* dst)
    void dv_conv_direct(const float* src, const long* tap_off, const int* vec, int nvec,
                        const float* W, int O, int K, const float* bias, int relu, float* out, long ldo,
                        int tile_begin, int tile_end)
    int dv_direct_vectors(int ho, int wo, int sh, int row_w, int across, int* vec)
    float dv_mean(const float* x, int n)
    int dv_position_runs(const int* pos, int n, int wo, int sh, int sw, int Wp, int* runs)
    void dv_knob_tiles(const float* src, const long* tap_off, const int* runs, const int* runs_first,
                       int wo, int sh, int sw, int row_width, const float* W, long ldw, int O, int K, int lead, const int* pos, int n,
                       const unsigned char* mask, const float* bias, const float* cst, float* out, int npos,
                       int spet, float margin, int relu, float* panel, int* list, int tile_begin,
                       int tile_end, long long* stats)
    void dv_phase_plane(const float* plane, int H, int W, int pt, int pl, int s, int py, int px,
                        int Hq, int Wq, float* dst)
    int dv_pool_row_stride(int W, int wo, int kw, int sw, int pl)
    int __builtin_popcount(unsigned int x)
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


cdef inline int _block_start(int chunk, int nblocks, int nchunks, int O) noexcept nogil:
    """First row of ``chunk`` when ``nchunks`` chunks share out the 8-row blocks of O rows (at
    most O: one past the last row for chunk == nchunks)."""
    return min(8 * (chunk * nblocks // nchunks), O)


cdef void _gemm_run(const float* W, long ldw, int O, const float* cols, long ldc, long lds, float* out,
                    long ldo, int K, int N, const float* bias, bint relu, int threads) noexcept nogil:
    """dv_gemm_tiles over every 32-column tile, split into ``threads`` chunks: of the 8-row
    blocks when there are more rows than columns (each thread then reads only its share of the
    weights, the large operand), else of the tiles."""
    cdef int ntiles = (N + 31) // 32, nblocks = (O + 7) // 8
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c, g0, g1
    if O > N and threads > 1 and nblocks > 1:
        nchunks = threads if threads < nblocks else nblocks
        for c in prange(nchunks, num_threads=threads, schedule="static"):
            g0 = _block_start(c, nblocks, nchunks, O)
            g1 = _block_start(c + 1, nblocks, nchunks, O)
            dv_gemm_tiles(W + g0 * ldw, ldw, g1 - g0, cols, ldc, lds, out + g0 * ldo, ldo, K, N,
                          bias + g0 if bias != NULL else NULL, relu, 0, ntiles)
        return
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


cdef int _gemm_checked(const float[:, :] W, int N, const float* cols, long ldc, long lds, float[:, ::1] out,
                       const float[::1] bias, bint relu, int threads) except -1:
    """out = W @ cols + bias (bias None: out +=), ReLU if asked; cols addressed as in _simd.h."""
    cdef int O = W.shape[0], K = W.shape[1]
    _check_gemm(W, K, N, out, bias)
    if O == 0 or N == 0:
        return 0
    if K == 0:
        _bias_only(out, bias, relu)
        return 0
    cdef long ldw = W.strides[0] // 4 if O > 1 else K
    with nogil:
        _gemm_run(&W[0, 0], ldw, O, cols, ldc, lds, &out[0, 0], N, K, N,
                  &bias[0] if bias is not None else NULL, relu, threads)
    return 0


def conv_gemm(const float[:, :] W, const float[:, :, ::1] cols, int N, float[:, ::1] out,
              const float[::1] bias=None, bint relu=False, int threads=1):
    """The engine's own dense GEMM (register tiles of 8 rows x 32 columns, see _simd.h) on a
    packed unfolded input ``cols`` (panels x rows x 32; rows 0..K-1 used, K = W's columns, N
    columns): out = W @ cols + bias[:, None] (``bias`` None: out += W @ cols), ReLU if asked."""
    if cols.shape[0] * 32 < N or cols.shape[1] < W.shape[1]:
        raise ValueError("conv_gemm: unfolded input too small")
    _gemm_checked(W, N, &cols[0, 0, 0] if cols.shape[1] and cols.shape[0] else NULL, 32, cols.shape[1] * 32,
                  out, bias, relu, threads)


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


cdef inline bint _split_rows(int threads, int ntiles, int O) noexcept nogil:
    """Whether threads should share out a conv's 8-row blocks of weights rather than its tiles:
    when the tiles are too few to share out evenly (a 14 x 14 map has 5 direct tiles) and there
    are rows enough. Every thread then does all the tiles for its rows."""
    return threads > 1 and ntiles < 4 * threads and (O + 7) // 8 >= 2 * threads


cdef const float* _group_source(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp,
                                bint pad, float[::1] pad_buffer, const long[::1] tap_off, long reach,
                                str caller) except NULL:
    """The source a conv kernel reads for the group starting at input channel ``channel0``: with
    ``pad``, its channels copied with their zero padding into ``pad_buffer`` (Hp x Wp planes,
    ``tap_off`` indexing them), else ``x`` itself. ``reach`` (one past the last float the tiles
    read; negative: not checked) must stay inside that source."""
    cdef int C = x.shape[0], H = x.shape[1], Wd = x.shape[2]
    cdef int K = tap_off.shape[0], cin
    if pad:
        cin = (tap_off[K - 1] // (Hp * Wp)) + 1
        if channel0 + cin > C or pad_buffer.shape[0] < cin * Hp * Wp or reach > cin * Hp * Wp:
            raise ValueError(f"{caller}: padding buffer too small")
        with nogil:
            dv_pad_planes(&x[channel0, 0, 0], cin, H, Wd, pt, pl, Hp, Wp, &pad_buffer[0])
        return &pad_buffer[0]
    if reach > (C - channel0) * H * Wd:
        raise ValueError(f"{caller}: vectors past the input")
    return &x[channel0, 0, 0]


def conv_dense(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp, bint pad,
               float[::1] pad_buffer, const long[::1] tap_off, int sw, const int[:, ::1] runs,
               const int[::1] panel_first, const float[:, ::1] W, const float[::1] bias, bint relu,
               float[:, ::1] out, float[:, ::1] panels, int threads=1):
    """Dense convolution of one group (input channels channel0.., W: O x K with K = that many
    channels x taps) with im2col fused into the GEMM (dv_conv_dense_tiles). With ``pad`` the
    group's channels are first copied with their zero padding into ``pad_buffer`` (Hp x Wp
    planes) and ``tap_off`` indexes it; else it indexes ``x`` itself. ``panels`` is scratch,
    one row of K * 32 floats per thread."""
    cdef int O = W.shape[0], K = W.shape[1], N = out.shape[1]
    cdef int ntiles = panel_first.shape[0] - 1
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    cdef const float* src
    if K == 0 or O == 0 or N == 0:
        raise ValueError("conv_dense: empty layer")
    if (out.shape[0] != O or bias.shape[0] != O or tap_off.shape[0] != K or panels.shape[1] < K * 32
            or panels.shape[0] < max(nchunks, 1) or ntiles * 32 < N or runs.shape[1] != 4):
        raise ValueError("conv_dense: shape mismatch")
    src = _group_source(x, channel0, pt, pl, Hp, Wp, pad, pad_buffer, tap_off, -1, "conv_dense")
    cdef int nblocks = (O + 7) // 8, g0, g1
    if _split_rows(threads, ntiles, O):
        if panels.shape[0] < threads:
            raise ValueError("conv_dense: shape mismatch")
        for c in prange(threads, nogil=True, num_threads=threads, schedule="static"):
            g0 = _block_start(c, nblocks, threads, O)
            g1 = _block_start(c + 1, nblocks, threads, O)
            dv_conv_dense_tiles(src, &tap_off[0], sw, &runs[0, 0], &panel_first[0], &W[g0, 0], g1 - g0, K, N,
                                &bias[g0], relu, &out[g0, 0], &panels[c, 0], 0, ntiles)
        return
    if nchunks <= 1:
        with nogil:
            dv_conv_dense_tiles(src, &tap_off[0], sw, &runs[0, 0], &panel_first[0], &W[0, 0], O, K, N,
                                &bias[0], relu, &out[0, 0], &panels[0, 0], 0, ntiles)
        return
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        dv_conv_dense_tiles(src, &tap_off[0], sw, &runs[0, 0], &panel_first[0], &W[0, 0], O, K, N,
                            &bias[0], relu, &out[0, 0], &panels[c, 0], c * ntiles // nchunks,
                            (c + 1) * ntiles // nchunks)


def direct_vectors(int ho, int wo, int sh, int row_width, bint across):
    """The vectors of a direct convolution (dv_direct_vectors): (n, 4) int32 rows of source
    offset of tap (0, 0), output offset, lanes (1..16), lane mask of the positions stored."""
    if across and (sh != 1 or row_width < wo):
        raise ValueError("direct_vectors: vectors across rows need stride 1 and row_width >= wo")
    vec = np.zeros((ho * ((wo + 15) // 16) + (ho * row_width + 15) // 16, 4), np.int32)
    cdef int[:, ::1] v = vec
    cdef int n = dv_direct_vectors(ho, wo, sh, row_width, across, &v[0, 0])
    return vec[:n].copy()


def conv_direct(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp, bint pad,
                float[::1] pad_buffer, const long[::1] tap_off, const int[:, ::1] vectors,
                const float[:, ::1] W, const float[::1] bias, bint relu, float[:, ::1] out, int threads=1,
                long src_offset=0):
    """Dense convolution of one group with stride 1 along rows, without unfolding
    (dv_conv_direct): each tile loads its rows of the unfolded input in place from the source
    (the group's channels, copied with their zero padding into ``pad_buffer`` when ``pad``),
    from ``src_offset`` floats on (a band of output rows). ``vectors`` from
    :func:`direct_vectors`; threads split the tiles."""
    cdef int O = W.shape[0], K = W.shape[1], N = out.shape[1]
    cdef int nvec = vectors.shape[0], ntiles = (vectors.shape[0] + DV_DTILE - 1) // DV_DTILE
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c
    cdef long reach
    cdef const float* src
    if K == 0 or O == 0 or N == 0 or nvec == 0:
        raise ValueError("conv_direct: empty layer")
    if out.shape[0] != O or bias.shape[0] != O or tap_off.shape[0] != K or vectors.shape[1] != 4:
        raise ValueError("conv_direct: shape mismatch")
    if vectors[nvec - 1, 1] + __builtin_popcount(<unsigned int>vectors[nvec - 1, 3]) > N:
        raise ValueError("conv_direct: vectors past the output")
    if src_offset < 0:
        raise ValueError("conv_direct: negative source offset")
    reach = src_offset + vectors[nvec - 1, 0] + tap_off[K - 1] + vectors[nvec - 1, 2]  # one past the last float read
    src = _group_source(x, channel0, pt, pl, Hp, Wp, pad, pad_buffer, tap_off, reach, "conv_direct") + src_offset
    cdef int nblocks = (O + 7) // 8, g0, g1
    if _split_rows(threads, ntiles, O):
        for c in prange(threads, nogil=True, num_threads=threads, schedule="static"):
            g0 = _block_start(c, nblocks, threads, O)
            g1 = _block_start(c + 1, nblocks, threads, O)
            dv_conv_direct(src, &tap_off[0], &vectors[0, 0], nvec, &W[g0, 0], g1 - g0, K, &bias[g0], relu,
                           &out[g0, 0], N, 0, ntiles)
        return
    if nchunks <= 1:
        with nogil:
            dv_conv_direct(src, &tap_off[0], &vectors[0, 0], nvec, &W[0, 0], O, K, &bias[0], relu,
                           &out[0, 0], N, 0, ntiles)
        return
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        dv_conv_direct(src, &tap_off[0], &vectors[0, 0], nvec, &W[0, 0], O, K, &bias[0], relu,
                       &out[0, 0], N, c * ntiles // nchunks, (c + 1) * ntiles // nchunks)


def pad_planes(const float[:, :, ::1] x, int channel0, int nch, int pt, int pl, int Hp, int Wp,
               float[::1] dst):
    """Channels channel0..channel0+nch-1 of x with their zero padding, as Hp x Wp planes in dst."""
    if channel0 < 0 or channel0 + nch > x.shape[0] or dst.shape[0] < nch * Hp * Wp:
        raise ValueError("pad_planes: shape mismatch")
    if nch == 0:
        return
    with nogil:
        dv_pad_planes(&x[channel0, 0, 0], nch, x.shape[1], x.shape[2], pt, pl, Hp, Wp, &dst[0])


def phase_planes(const float[:, :, ::1] x, int channel0, int nch, int pt, int pl, int s,
                 float[:, :, ::1] dst, int threads=1):
    """Channels channel0..channel0+nch-1 of x, zero-padded (input at row pt, column pl), split
    into s x s phase planes (dv_phase_plane): dst[(c * s + py) * s + px] holds rows py, py + s, ...
    and columns px, px + s, ... of channel channel0 + c, so that a stride-s convolution reads
    them with stride 1 (the engine's phase route)."""
    cdef int H = x.shape[1], W = x.shape[2], Hq = dst.shape[1], Wq = dst.shape[2]
    cdef Py_ssize_t i, n = <Py_ssize_t>nch * s * s
    if s < 1 or channel0 < 0 or nch < 0 or channel0 + nch > x.shape[0] or dst.shape[0] < n:
        raise ValueError("phase_planes: shape mismatch")
    if n == 0 or Hq == 0 or Wq == 0:
        return
    for i in prange(n, nogil=True, num_threads=threads, schedule="static"):
        dv_phase_plane(&x[channel0 + i // (s * s), 0, 0], H, W, pt, pl, s, (i // s) % s, i % s, Hq, Wq,
                       &dst[i, 0, 0])


def knob_conv(const float[::1] src, const long[::1] tap_off, const int[::1] positions, int wo, int sh, int sw,
              int row_width, const float[:, ::1] W, int lead, bint spet, float margin, bint relu,
              const float[::1] bias, const float[:, ::1] cst, const uint8[:, ::1] mask, float[:, ::1] out,
              float[:, ::1] panels, int threads=1):
    """The knobs' conv kernel for one group (see dv_knob_tiles): the outputs of ``out`` (O x
    positions of the map) at ``positions`` (increasing), over the K = W's columns rows of the
    unfolded input (row k at ``src[tap_off[k] + ...]``), SPET first when ``spet`` (partial
    over rows < ``lead``), only where ``mask`` (O x len(positions); None: all) is set, starting
    from bias (+ ``cst``, O x positions of the map, when not None). ``panels``: one row of at
    least K * 32 floats per thread. Returns (outputs stopped by SPET, outputs computed)."""
    cdef int O = W.shape[0], K = W.shape[1], n = positions.shape[0], npos = out.shape[1]
    cdef int ntiles = (n + 31) // 32
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c, nruns, i
    cdef const unsigned char* m = NULL
    cdef const float* pc = NULL
    if n == 0 or O == 0:
        return 0, 0
    if (tap_off.shape[0] != K or out.shape[0] != O or bias.shape[0] != O or lead < 0 or lead > K
            or panels.shape[1] < max(K, 1) * 32 or panels.shape[0] < max(nchunks, 1)):
        raise ValueError("knob_conv: shape mismatch")
    for i in range(n):
        if positions[i] < 0 or positions[i] >= npos or (i and positions[i] <= positions[i - 1]):
            raise ValueError("knob_conv: positions must be increasing map positions")
    if mask is not None:
        if mask.shape[0] != O or mask.shape[1] != n:
            raise ValueError("knob_conv: mask shape mismatch")
        m = &mask[0, 0]
    if cst is not None:
        if cst.shape[0] != O or cst.shape[1] != npos:
            raise ValueError("knob_conv: constant shape mismatch")
        pc = &cst[0, 0]
    # scratch in one allocation: runs (5n), each tile's first run (ntiles + 1), row lists
    # (O per chunk), and two counters per chunk
    cdef int nch = max(nchunks, 1)
    cdef int* scratch = <int*>malloc((5 * n + ntiles + 1 + nch * O) * sizeof(int))
    cdef long long* stats = <long long*>calloc(2 * nch, sizeof(long long))
    cdef int* runs
    cdef int* runs_first
    cdef int* lists
    cdef int r, t
    if scratch == NULL or stats == NULL:
        free(scratch)
        free(stats)
        raise MemoryError()
    runs = scratch
    runs_first = scratch + 5 * n
    lists = runs_first + ntiles + 1
    cdef long ldw = W.strides[0] // 4 if O > 1 else max(K, 1)
    cdef const float* pw = &W[0, 0] if K else &bias[0]
    cdef const long* pt = &tap_off[0] if K else NULL
    with nogil:
        nruns = dv_position_runs(&positions[0], n, wo, sh, sw, row_width, runs)
        r = 0
        for t in range(ntiles + 1):  # runs never cross a tile, so tile t starts at its first run
            while r < nruns and runs[5 * r] < t:
                r = r + 1
            runs_first[t] = r
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        dv_knob_tiles(&src[0], pt, runs, runs_first, wo, sh, sw, row_width, pw, ldw, O, K, lead, &positions[0], n,
                      m, &bias[0], pc, &out[0, 0], npos, spet, margin, relu, &panels[c, 0], lists + c * O,
                      c * ntiles // nchunks, (c + 1) * ntiles // nchunks, stats + 2 * c)
    cdef long long stopped = 0, active = 0
    for c in range(nch):
        stopped += stats[2 * c]
        active += stats[2 * c + 1]
    free(scratch)
    free(stats)
    return stopped, active


# --------------------------------------------------------------------------- elementwise

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

def maxpool(const float[:, :, ::1] x, float[:, :, :] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int threads=1):
    """Max pooling with implicit -inf padding (ONNX / onnxruntime semantics). ``out``'s planes
    must have contiguous rows, but may lie apart (a band of rows of a larger output)."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    if out.shape[0] != C or (Ho > 0 and Wo > 0 and (out.strides[2] != 4 or (Ho > 1 and out.strides[1] != 4 * Wo))):
        raise ValueError("maxpool: output planes must have contiguous rows")
    cdef long span = <long>Ho * dv_pool_row_stride(W, Wo, kw, sw, pl)  # a reduced row per output row
    cdef Py_ssize_t c
    cdef float[:, ::1] scratch = np.zeros((threads, span), np.float32)
    cdef int tid
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        dv_maxpool_plane(&x[c, 0, 0], H, W, &out[c, 0, 0], Ho, Wo, kh, kw, sh, sw, pt, pl, &scratch[tid, 0])


def avgpool(const float[:, :, ::1] x, float[:, :, ::1] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int pb, int pr, bint count_include_pad, int threads=1):
    """Average pooling as onnxruntime computes it: with count_include_pad the divisor is the
    window clipped to the padded input (H + pad_end), else the taps inside the input."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    cdef long span = <long>Ho * dv_pool_row_stride(W, Wo, kw, sw, pl) + Wo  # the rows, then the column counts
    cdef Py_ssize_t c
    cdef float[:, ::1] scratch = np.zeros((threads, span), np.float32)
    cdef int tid
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        dv_avgpool_plane(&x[c, 0, 0], H, W, &out[c, 0, 0], Ho, Wo, kh, kw, sh, sw, pt, pl, pb, pr,
                         count_include_pad, &scratch[tid, 0])


def global_avgpool(const float[:, ::1] x, float[::1] out, int threads=1):
    """Mean of each row (channel) of x (C x HW), vectorised (dv_mean); threads split the rows."""
    cdef Py_ssize_t C = x.shape[0], P = x.shape[1], c
    if out.shape[0] != C:
        raise ValueError("global_avgpool: shape mismatch")
    if P == 0:
        raise ValueError("global_avgpool: empty map")
    if threads <= 1:
        with nogil:
            for c in range(C):
                out[c] = dv_mean(&x[c, 0], <int>P)
        return
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        out[c] = dv_mean(&x[c, 0], <int>P)


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


def channel_spread(const float[:, :, ::1] x, bint nonneg, bint relative, double[::1] spread, double[::1] means,
                   int threads=1):
    """SFMA's statistic in one call: per channel the mean and the standard deviation (over
    H x W, in double), divided by the maps' mean |x| when ``relative`` (``nonneg``: x >= 0, so
    |x| = x) (0 when that mean is 0)."""
    cdef Py_ssize_t C = x.shape[0], c
    cdef double hw = x.shape[1] * x.shape[2], total = 0.0, var, scale
    sums = np.empty(C)
    sumsq = np.empty(C)
    sumabs = np.empty(C)
    channel_stats(x, sums, sumsq, sumabs, not nonneg, threads)
    cdef double[::1] s1 = sums, s2 = sumsq, sa = sumabs
    with nogil:
        for c in range(C):
            means[c] = s1[c] / hw
            var = s2[c] / hw - means[c] * means[c]
            spread[c] = sqrt(var if var > 0.0 else 0.0)
            total = total + (s1[c] if nonneg else sa[c])
        if relative:
            scale = total / (C * hw)
            for c in range(C):
                spread[c] = spread[c] / scale if scale > 0.0 else 0.0


def gather_channels(const float[:, ::1] W, const int[::1] channels, int kk, const long[::1] tap_off,
                    float[:, ::1] w_out, long[::1] tap_out):
    """For the kept input channels ``channels`` (in order): their weight columns (kk per channel)
    of W (O x C*kk) into ``w_out`` (O x len*kk), and their unfolded rows' offsets from
    ``tap_off`` (C*kk) into ``tap_out``."""
    cdef Py_ssize_t O = W.shape[0], n = channels.shape[0], o, i, t
    cdef int C = W.shape[1] // kk if kk else 0
    if w_out.shape[0] != O or w_out.shape[1] < n * kk or tap_out.shape[0] < n * kk or tap_off.shape[0] != W.shape[1]:
        raise ValueError("gather_channels: shape mismatch")
    for i in range(n):
        if channels[i] < 0 or channels[i] >= C:
            raise ValueError("gather_channels: channel out of range")
    with nogil:
        for i in range(n):
            for t in range(kk):
                tap_out[i * kk + t] = tap_off[channels[i] * kk + t]
        for o in range(O):
            for i in range(n):
                for t in range(kk):
                    w_out[o, i * kk + t] = W[o, channels[i] * kk + t]


def sfma_constant(const float[:, ::1] W, const int[::1] dropped, const float[::1] means, int kk,
                  const float[:, ::1] class_taps, const long[::1] tap_class, float[:, ::1] out):
    """SFMA's constant map: out[o, p] = sum over the dropped channels c of means[c] times the sum
    of W[o, c, t] over the taps t valid at position p (class_taps[tap_class[p], t] = 1)."""
    cdef Py_ssize_t O = W.shape[0], nd = dropped.shape[0], ncls = class_taps.shape[0]
    cdef Py_ssize_t P = tap_class.shape[0], o, i, t, q, p
    cdef float acc
    if out.shape[0] != O or out.shape[1] != P or class_taps.shape[1] != kk or means.shape[0] != nd:
        raise ValueError("sfma_constant: shape mismatch")
    weighted = np.zeros(kk, np.float32)
    per_class = np.empty(ncls, np.float32)
    cdef float[::1] wt = weighted, pc = per_class
    with nogil:
        for o in range(O):
            for t in range(kk):
                acc = 0.0
                for i in range(nd):
                    acc = acc + W[o, dropped[i] * kk + t] * means[i]
                wt[t] = acc
            for q in range(ncls):
                acc = 0.0
                for t in range(kk):
                    acc = acc + wt[t] * class_taps[q, t]
                pc[q] = acc
            for p in range(P):
                out[o, p] = pc[tap_class[p]]


# --------------------------------------------------------------------------- SPET (fully connected)

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


def sdss_union(const uint8[:, :, ::1] insignificant, const int[::1] off_positions, const int[::1] cell_y,
               const int[::1] cell_x):
    """The off-grid positions (increasing) that some map needs (their cell is significant in
    it), and per map which of them it needs (maps x positions). Returns (positions, needed,
    total needed)."""
    cdef Py_ssize_t O = insignificant.shape[0], P = off_positions.shape[0], o, j
    cdef long long total = 0
    cdef int n = 0
    cdef uint8[::1] any_map = np.zeros(P, np.uint8)
    with nogil:
        for o in range(O):
            for j in range(P):
                if not insignificant[o, cell_y[j], cell_x[j]]:
                    any_map[j] = 1
        for j in range(P):
            n += any_map[j]
    positions_arr = np.empty(n, np.int32)
    needed_arr = np.empty((O, n), np.uint8)
    cdef int[::1] positions = positions_arr
    cdef uint8[:, ::1] needed = needed_arr
    cdef int i
    with nogil:
        i = 0
        for j in range(P):
            if any_map[j]:
                positions[i] = off_positions[j]
                for o in range(O):
                    needed[o, i] = 0 if insignificant[o, cell_y[j], cell_x[j]] else 1
                    total += needed[o, i]
                i = i + 1
    return positions_arr, needed_arr, total


def sdss_fill(float[:, :, ::1] out, const int[::1] gy, const int[::1] gx, const int[::1] pos_y,
              const int[::1] pos_x, const int[::1] cell_y, const int[::1] cell_x,
              const uint8[:, :, ::1] insignificant, bint bilinear):
    """Fill every off-grid position (pos_y[j], pos_x[j]) whose cell (cell_y[j], cell_x[j]) is
    insignificant in its map: bilinear from the cell's corners, or 0. Returns the number filled."""
    cdef Py_ssize_t O = out.shape[0], P = pos_y.shape[0], o, j
    cdef int y, x, by, bx, y0, y1, x0, x1
    cdef float fy, fx, top, bottom
    cdef long long n = 0
    with nogil:
        for o in range(O):
            for j in range(P):
                by = cell_y[j]
                bx = cell_x[j]
                if not insignificant[o, by, bx]:
                    continue
                y = pos_y[j]
                x = pos_x[j]
                n += 1
                if not bilinear:
                    out[o, y, x] = 0.0
                    continue
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
