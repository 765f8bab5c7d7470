# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels of the engine: convolution (im2col inside the engine's own GEMM, see
kernels/), pooling, LRN, softmax, fully connected (dv_gemv_rows), and the knobs' kernels (SFMA's
channel statistics, the knob conv kernel with SPET inside, SDSS's cells, union and fill), and a
decision gate's decision (GateKernel, docs/gates.md).

Layout: one image at a time, channels first (C, H, W), float32, C-contiguous. Every inner loop
runs without the GIL; ``threads`` spreads the outer loop over OpenMP threads. The convolutions'
GEMM is the register-tiled kernel of kernels/dv_gemm.h (tiles sized per instruction set at build
time: AVX-512, AVX2, NEON), as is the fully connected layers' product (a step of a compiled run);
the knobs' fully-connected partial sums use the BLAS that SciPy ships (scipy.linalg.cython_blas),
called in row-major form.
"""
from cython.parallel cimport prange
from libc.math cimport exp, expf, powf, sqrt, fabs
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from scipy.linalg.cython_blas cimport sgemm, sdot

import numpy as np
cimport numpy as cnp

cnp.import_array()

ctypedef unsigned char uint8

cdef extern from "kernels/dv_vector.h":
    const char* DV_ISA
    int DV_VW

cdef extern from "kernels/dv_conv.h" nogil:
    # the dense kernels are called from _program.h's steps; these are what the wrappers call
    int dv_im2col_runs(int ho, int wo, int sh, int sw, int Wp, int* runs)
    int dv_direct_vectors(int ho, int wo, int sh, int row_w, int across, int* vec)
    int dv_position_runs(const int* pos, int n, int wo, int sh, int sw, int Wp, int* runs)

cdef extern from "kernels/dv_knob.h" nogil:
    void dv_knob_tiles(const float* src, const long* tap_off, const int* runs, const int* runs_first,
                       int wo, int sh, int sw, int row_width, const float* W, long ldw, int O, int K, int lead, const int* pos, int n,
                       const unsigned char* mask, const float* bias, const float* cst, float* out, int npos,
                       int spet, const float* margins, int relu, float* panel, int* list, int tile_begin,
                       int tile_end, long long* stats, long long* row_counts)

cdef extern from "kernels/dv_pool.h" nogil:
    int dv_pool_row_stride(int W, int wo, int kw, int sw, int pl)
    int __builtin_popcount(unsigned int x)

cdef extern from "kernels/dv_sdss.h" nogil:
    long long dv_sdss_cells(const float* out, int O, int H, int W, const int* gy, int ny, const int* gx, int nx,
                            float threshold, uint8* insig)
    long long dv_sdss_union(const uint8* insig, int O, int ncy, int ncx, const int* off_positions,
                            const int* cell_y, const int* cell_x, int P, int* positions, int* n_out,
                            uint8* needed)
    long long dv_sdss_fill(float* out, int O, int H, int W, const int* gy, int ny, const int* gx, int nx,
                           const int* pos_y, const int* pos_x, const int* cell_y, const int* cell_x, int P,
                           const uint8* insig, int bilinear)

cdef extern from "kernels/dv_yardstick.h" nogil:
    double dv_yardstick(int threads, int units, int iters)

cdef extern from "kernels/dv_sfma.h" nogil:
    void dv_map_sums(const float* x, long n, int need_abs, double* sum, double* sumsq, double* sumabs)
    void dv_sfma_spreads(const double* sum, const double* sumsq, const double* sumabs, int C, double hw,
                         int nonneg, int relative, double* spread, double* means)
    void dv_sfma_constant_row(const float* w, const int* dropped, const float* means, int nd, int kk,
                              const float* class_taps, int ncls, const long* tap_class, long P, float* out,
                              int add, int relu, float* weighted, float* per_class)
    ctypedef struct dv_sfma_state:
        int C, O, kk
        long hw, positions
        int nonneg, relative
        double threshold
        const float* W
        const long* tap_off
        const float* bias
        int relu
        const long long* channel_nnz
        const float* class_taps
        const long* tap_class
        int ncls
        double* sum
        double* sumsq
        double* sumabs
        float* w_kept
        long* tap_kept
        int* dropped
        float* dropped_means
        int nkept, ndrop, add_constant
        float* scratch
        long scratch_stride
        long long* images_by_drops
        long long kept_nnz

cdef extern from "_program.h" nogil:
    enum:
        DV_STEP_PAD
        DV_STEP_PHASE
        DV_STEP_DIRECT
        DV_STEP_PANEL
        DV_STEP_IM2COL
        DV_STEP_GEMM
        DV_STEP_MAXPOOL
        DV_STEP_AVGPOOL
        DV_STEP_MEAN
        DV_STEP_ADD
        DV_STEP_ELTWISE
        DV_STEP_SFMA_STATS
        DV_STEP_SFMA_SELECT
        DV_STEP_SFMA_CONSTANT
        DV_STEP_OCVEC
        DV_STEP_GEMV
    enum:
        DV_ELT_ADD
        DV_ELT_SUB
        DV_ELT_MUL
        DV_ELT_DIV
        DV_ELT_POW
    ctypedef struct dv_product:
        const float* W
        long ldw
        int O, K
        const float* bias
        int relu
        long ldo
    ctypedef struct dv_pad_args:
        int C, H, W, pt, pl, Hp, Wp
    ctypedef struct dv_phase_args:
        int n, H, W, pt, pl, s, Hq, Wq
    ctypedef struct dv_direct_args:
        dv_product p
        const long* tap_off
        const int* vec
        int nvec
        int rows_first
        int rows_below_tiles
    ctypedef struct dv_ocvec_args:
        dv_product p
        const long* tap_off
        const int* pos_off
        int npos
    ctypedef struct dv_panel_args:
        dv_product p
        const long* tap_off
        const int* runs
        const int* panel_first
        int N, sw
    ctypedef struct dv_im2col_args:
        int C, H, W, kh, kw, sw, pt, pl, dh, dw, Hp, Wp
        const int* channels
        const int* runs
        int nruns
        long lds
    ctypedef struct dv_gemm_args:
        dv_product p
        int N
        long ldc, lds
    ctypedef struct dv_pool_args:
        int C, H, W, ho, wo, kh, kw, sh, sw, pt, pl, pb, pr, count_include_pad, rows_shared
        long ldo
    ctypedef struct dv_mean_args:
        int C, N
    ctypedef struct dv_add_args:
        const float* b
        long n
        int relu
    ctypedef struct dv_eltwise_args:
        const float* b
        long n
        int op, scalar_first
        float scalar
    ctypedef union dv_step_args:
        dv_pad_args pad
        dv_phase_args phase
        dv_direct_args direct
        dv_ocvec_args ocvec
        dv_panel_args panel
        dv_im2col_args im2col
        dv_gemm_args gemm
        dv_pool_args pool
        dv_mean_args mean
        dv_add_args add
        dv_eltwise_args elt
        dv_product product
    ctypedef struct dv_step:
        int kind, threads
        dv_sfma_state* sfma
        const float* x
        long x_offset
        int x_from_image
        float* out
        float* scratch
        long scratch_stride
        dv_step_args u
    int dv_split_rows(int T, int ntiles, int O)
    int DV_OC_GROUP
    void dv_run_steps(const dv_step* steps, int n, const float* image, int max_threads, double* step_end)


#: The instruction set the kernels were built for ("avx512", "avx2", "neon" or "generic"; setup.py)
ISA = DV_ISA.decode()


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


# --------------------------------------------------------------------------- steps and programs

#: The step kinds by their DV_STEP_* value (_program.h), as Program.step_kinds names them.
STEP_KINDS = {DV_STEP_PAD: "pad", DV_STEP_PHASE: "phase", DV_STEP_DIRECT: "direct", DV_STEP_PANEL: "panel",
              DV_STEP_IM2COL: "im2col", DV_STEP_GEMM: "gemm", DV_STEP_MAXPOOL: "maxpool",
              DV_STEP_AVGPOOL: "avgpool", DV_STEP_MEAN: "mean", DV_STEP_ADD: "add", DV_STEP_ELTWISE: "eltwise",
              DV_STEP_SFMA_STATS: "sfma-stats", DV_STEP_SFMA_SELECT: "sfma-select",
              DV_STEP_SFMA_CONSTANT: "sfma-constant", DV_STEP_OCVEC: "ocvec", DV_STEP_GEMV: "gemv"}

#: Program.run tries the way it is not using (all threads or one) for two runs in a row (the
#: first, cold, not judged): PROBE_FIRST runs after it settled on a way, then twice as long after
#: each probe that left it there, up to PROBE_EVERY runs (an eighth of the runs on the slower way).
PROBE_FIRST = 4
PROBE_EVERY = 16
#: Program.run judges each way by the fastest of its last this many times.
cdef enum:
    RECENT_RUNS = 3


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Program:
    """Dense-path steps (see _program.h) run by one OpenMP team in one parallel region, a
    barrier between steps: built once (the wrappers below append their steps to it when given
    ``program=``, instead of running them), then run per image. A step whose input lies in
    ``image`` (an array shaped as the graph input, whose data stands for the image) reads the
    array given to :meth:`run` instead. The program keeps every array its steps point into.

    On a busy machine a barrier waits for a thread the scheduler has taken off its core: with
    several threads, :meth:`run` keeps its last RECENT_RUNS times with all of them and with one
    (the same floats either way), takes the way whose fastest is lower, and tries the other at
    least once in PROBE_EVERY runs (ThreadChoice). The fastest, not a mean or a median: another
    process only ever adds time, and a burst of it (another engine's thread pool spinning on
    after its own runs) slows a few runs in a row; only a way slow in all its recent runs is
    left.
    ``last_one_thread``: whether the last run took one thread."""
    cdef dv_step* steps
    cdef int n, capacity
    cdef ThreadChoice choice
    cdef list keep
    cdef const float* image_data
    cdef Py_ssize_t image_floats
    cdef bint reads_image
    cdef double* step_end  # with profiling: the clock at the start and after each step of the last run
    cdef int step_end_size  # its length; 0: no run kept
    cdef public bint profiling
    cdef readonly bint last_one_thread

    def __cinit__(self, cnp.ndarray image=None):
        self.steps = NULL
        self.step_end = NULL
        self.step_end_size = 0
        self.profiling = False
        self.last_one_thread = False
        self.n = 0
        self.capacity = 0
        self.keep = [image]
        self.image_data = NULL
        self.image_floats = 0
        self.reads_image = False
        self.choice = ThreadChoice()
        if image is not None:
            if cnp.PyArray_TYPE(image) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(image):
                raise ValueError("Program: the image must be C-contiguous float32")
            self.image_data = <const float*>cnp.PyArray_DATA(image)
            self.image_floats = cnp.PyArray_SIZE(image)

    def __dealloc__(self):
        free(self.steps)
        free(self.step_end)

    def __len__(self):
        return self.n

    def step_kinds(self):
        """Each step's kind (STEP_KINDS), in order."""
        return [STEP_KINDS[self.steps[i].kind] for i in range(self.n)]

    def step_seconds(self):
        """With ``profiling`` set before the last run: each step's seconds in it, from the end of
        the step before (the barrier after it included: the slowest thread and the wait for
        it); None when no profiled run happened since the last append."""
        if self.step_end_size != self.n + 1:
            return None
        return [self.step_end[i + 1] - self.step_end[i] for i in range(self.n)]

    cdef int append(self, const dv_step* steps, int n, tuple keep) except -1:
        """Append n steps; those reading inside the image placeholder will read the run's image."""
        cdef int i, capacity
        cdef dv_step* grown
        if self.n + n > self.capacity:
            capacity = max(2 * self.capacity, self.n + n, 16)
            grown = <dv_step*>realloc(self.steps, capacity * sizeof(dv_step))
            if grown == NULL:
                raise MemoryError()
            self.steps = grown
            self.capacity = capacity
        for i in range(n):
            self.steps[self.n] = steps[i]
            if self.image_data != NULL and self.image_data <= steps[i].x < self.image_data + self.image_floats:
                self.steps[self.n].x_from_image = 1
                self.steps[self.n].x_offset = steps[i].x - self.image_data
                self.reads_image = True
            self.n += 1
        self.keep.extend(keep)
        self.step_end_size = 0
        return 0

    def run(self, cnp.ndarray image=None):
        """Run every step in order on ``image`` (shaped as the placeholder, float32, C-contiguous)."""
        cdef const float* data = NULL
        if self.reads_image:
            if (image is None or cnp.PyArray_TYPE(image) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(image)
                    or cnp.PyArray_SIZE(image) != self.image_floats):
                raise ValueError(f"Program.run: the image must be C-contiguous float32 of {self.image_floats} floats")
            data = <const float*>cnp.PyArray_DATA(image)
        cdef int limit = self._thread_limit()
        cdef double start, elapsed
        cdef double* step_end = NULL
        if self.profiling:
            step_end = <double*>realloc(self.step_end, (self.n + 1) * sizeof(double))
            if step_end == NULL:
                raise MemoryError()
            self.step_end = step_end
            self.step_end_size = self.n + 1
        with nogil:
            start = _now()
            dv_run_steps(self.steps, self.n, data, limit, step_end)
            elapsed = _now() - start
        self.last_one_thread = limit == 1
        self.choice.record(limit == 1, elapsed)

    cdef int _thread_limit(self):
        """1 or every thread (a large limit) for the next run (ThreadChoice)."""
        cdef int i
        for i in range(self.n):
            if self.steps[i].threads > 1:
                return 1 if self.choice.one_thread_next() else 1 << 30
        return 1 << 30


cdef class ThreadChoice:
    """Whether a program's next run takes one thread or all of them: each way judged by the
    fastest of its last RECENT_RUNS times, the faster taken; all threads first, then one, so
    that both are measured. The other way is tried (a probe) PROBE_FIRST runs after the choice
    settled on a way, then at intervals that double up to PROBE_EVERY while probes leave it
    there: a way left for a burst of slow runs is soon tried again, and a way that stays the
    faster costs few runs the other way.

    The first run, and a run right after a run the other way, is not judged, and the next run
    goes the same way: its time is cold (the threads that sat idle wake, their caches hold
    another core's data, or nothing of the network). On a 0.65 ms network a probe with all
    threads after seven runs on one took 0.8-1.0 ms, and the program stayed on one thread for
    good (docs/notes/2026-12-04-two-threads-squeezenet.md). The fastest and not the median:
    SqueezeNet right after onnxruntime's runs took 4.7, 13.5 and 28 ms with two threads (its
    pool still spinning), 4.0 ms after; judged by the median, it then ran on one thread
    (6.5 ms) until three probes had replaced the slow times, 54 of 90 timed runs
    (docs/notes/2026-12-05-thread-choice-bursts.md)."""
    cdef double recent_team[RECENT_RUNS]
    cdef double recent_one[RECENT_RUNS]
    cdef long runs, runs_team, runs_one
    cdef int last_way  # -1 before the first run, else whether it took one thread
    cdef bint repeat  # the last run switched ways: the next goes the same way and is judged
    cdef int settled  # -1 until both ways were measured, else the way taken but for probes
    cdef long probe_at, probe_interval  # the run of the next probe; the runs from the last one to it

    def __cinit__(self):
        self.runs = 0
        self.settled = -1
        self.probe_at = 0
        self.probe_interval = PROBE_FIRST
        self.runs_team = 0
        self.runs_one = 0
        self.last_way = -1
        self.repeat = False

    cpdef record(self, bint one_thread, double seconds):
        """A run's time, with one thread or all of them."""
        self.runs += 1
        self.repeat = self.last_way != one_thread  # the first run too (last_way -1)
        self.last_way = one_thread
        if self.repeat:
            return
        if one_thread:
            self.recent_one[self.runs_one % RECENT_RUNS] = seconds
            self.runs_one += 1
        else:
            self.recent_team[self.runs_team % RECENT_RUNS] = seconds
            self.runs_team += 1

    cpdef bint one_thread_next(self):
        """Whether the next run should take one thread."""
        if self.repeat:
            return self.last_way == 1
        if self.runs_team == 0:
            return False
        if self.runs_one == 0:
            return True
        cdef bint one_faster = (_recent_fastest(self.recent_one, self.runs_one)
                                < _recent_fastest(self.recent_team, self.runs_team))
        if self.settled != one_faster:
            self.settled = one_faster
            self.probe_interval = PROBE_FIRST
            self.probe_at = self.runs + PROBE_FIRST
        elif self.runs >= self.probe_at:
            self.probe_interval = min(2 * self.probe_interval, PROBE_EVERY)
            self.probe_at = self.runs + self.probe_interval
            return not one_faster
        return one_faster


cdef double _recent_fastest(const double* recent, long count) noexcept:
    """The fastest of a way's last RECENT_RUNS times (of all of them, when fewer)."""
    cdef double fastest = recent[0]
    cdef long i
    for i in range(1, min(count, RECENT_RUNS)):
        fastest = min(fastest, recent[i])
    return fastest


cdef int _emit(Program program, dv_step* steps, int n, tuple keep) except -1:
    """Run the steps now (program None) or append them to ``program``."""
    if program is None:
        with nogil:
            dv_run_steps(steps, n, NULL, 1 << 30, NULL)
    else:
        program.append(steps, n, keep)
    return 0


cdef dv_sfma_state* _sfma_state(SfmaLayer sfma, Program program, int O, int K, str caller) except? NULL:
    """The SFMA state a conv step runs under (NULL: none); it needs a program (its select steps
    run before it there) and the layer's own weights' shape."""
    if sfma is None:
        return NULL
    if program is None:
        raise ValueError(f"{caller}: an SFMA layer's conv step runs in a program only")
    if sfma.st.O != O or sfma.st.C * sfma.st.kk != K:
        raise ValueError(f"{caller}: the SFMA layer's shape differs from the conv's")
    return &sfma.st


cdef inline dv_product _product(const float* W, long ldw, int O, int K, const float* bias, bint relu,
                              long ldo) noexcept nogil:
    """The product part of a convolution or GEMM step: out (O rows, ldo apart) = W (O x K, rows
    ldw apart) applied, + bias, ReLU if asked."""
    cdef dv_product p
    p.W = W
    p.ldw = ldw
    p.O = O
    p.K = K
    p.bias = bias
    p.relu = relu
    p.ldo = ldo
    return p


def conv_gemm(const float[:, :] W, const float[:, :, ::1] cols, int N, float[:, ::1] out,
              const float[::1] bias=None, bint relu=False, int threads=1, Program program=None):
    """The engine's own dense GEMM (register tiles of 8 rows x 32 columns, see kernels/dv_gemm.h) on a
    packed unfolded input ``cols`` (panels x rows x 32; rows 0..K-1 used, K = W's columns, N
    columns): out = W @ cols + bias[:, None] (``bias`` None: out += W @ cols), ReLU if asked.
    Threads share out the 8-row blocks of weights when there are more rows than columns (each
    thread then reads only its share of the weights, the large operand), else the tiles."""
    cdef int O = W.shape[0], K = W.shape[1]
    if cols.shape[0] * 32 < N or cols.shape[1] < K:
        raise ValueError("conv_gemm: unfolded input too small")
    if out.shape[0] != O or out.shape[1] != N:
        raise ValueError("gemm: shape mismatch")
    if K and O and W.strides[1] != 4:
        raise ValueError("gemm: weight columns must be contiguous")
    if bias is not None and bias.shape[0] != O:
        raise ValueError("gemm: bias shape mismatch")
    if O == 0 or N == 0:
        return
    if K == 0:
        if program is not None:
            raise ValueError("conv_gemm: a product without inner dimension cannot join a program")
        _bias_only(out, bias, relu)
        return
    cdef dv_step s
    memset(&s, 0, sizeof(dv_step))
    s.kind = DV_STEP_GEMM
    s.threads = threads
    s.x = &cols[0, 0, 0]
    s.out = &out[0, 0]
    s.u.gemm.p = _product(&W[0, 0], W.strides[0] // 4 if O > 1 else K, O, K,
                          &bias[0] if bias is not None else NULL, relu, N)
    s.u.gemm.N = N
    s.u.gemm.ldc = 32
    s.u.gemm.lds = cols.shape[1] * 32
    _emit(program, &s, 1, (W, cols, out, bias) if program is not None else None)


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


def gemv_bias(const float[:, ::1] W, const float[::1] x, const float[::1] bias, float[::1] out, bint relu=False,
              int threads=1, Program program=None):
    """out = W @ x + bias (a fully-connected layer on one image, dv_gemv_rows), then ReLU if
    asked; threads share out the rows."""
    cdef int O = W.shape[0], Kd = W.shape[1]
    if x.shape[0] != Kd or bias.shape[0] != O or out.shape[0] != O:
        raise ValueError("gemv_bias: shape mismatch")
    if O == 0:
        return
    cdef dv_step s
    memset(&s, 0, sizeof(dv_step))
    s.kind = DV_STEP_GEMV
    s.threads = threads
    s.x = &x[0] if Kd > 0 else NULL
    s.out = &out[0]
    s.u.product.W = &W[0, 0] if Kd > 0 else NULL
    s.u.product.ldw = Kd
    s.u.product.O = O
    s.u.product.K = Kd
    s.u.product.bias = &bias[0]
    s.u.product.relu = relu
    _emit(program, &s, 1, (W, x, bias, out) if program is not None else None)


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
                  int pt, int pl, int dh, int dw, int ho, int wo, float[:, :, ::1] cols, int threads=1,
                  Program program=None):
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
    cdef int Hp = (ho - 1) * sh + (kh - 1) * dh + 1, Wp = (wo - 1) * sw + (kw - 1) * dw + 1
    runs = np.empty(4 * (ho * wo // 32 + ho + 2), np.int32)
    cdef int[::1] r = runs
    pad = np.zeros((threads, Hp * Wp), np.float32)
    cdef float[:, ::1] p = pad
    cdef dv_step s
    memset(&s, 0, sizeof(dv_step))
    s.kind = DV_STEP_IM2COL
    s.threads = threads
    s.x = &x[0, 0, 0]
    s.u.im2col.C, s.u.im2col.H, s.u.im2col.W = <int>nch, H, W
    s.u.im2col.kh, s.u.im2col.kw, s.u.im2col.sw, s.u.im2col.pt, s.u.im2col.pl = kh, kw, sw, pt, pl
    s.u.im2col.dh, s.u.im2col.dw, s.u.im2col.Hp, s.u.im2col.Wp = dh, dw, Hp, Wp
    s.u.im2col.runs = &r[0]
    s.u.im2col.nruns = dv_im2col_runs(ho, wo, sh, sw, Wp, &r[0])
    s.u.im2col.channels = &channels[0]
    s.scratch = &p[0, 0]
    s.scratch_stride = Hp * Wp
    s.out = &cols[0, 0, 0]
    s.u.im2col.lds = cols.shape[1] * 32
    _emit(program, &s, 1, (x, channels, cols, runs, pad) if program is not None else None)


def im2col_run_table(int ho, int wo, int sh, int sw, int row_width):
    """The runs of a packed im2col (see dv_im2col_runs) as an (n x 4) int32 array, and for each
    32-position panel the index of its first run (panels + 1 entries)."""
    cdef int[::1] buf = np.empty(4 * (ho * wo // 32 + ho + 2), np.int32)
    cdef int n = dv_im2col_runs(ho, wo, sh, sw, row_width, &buf[0])
    runs = np.asarray(buf)[:4 * n].reshape(n, 4).copy()
    ntiles = (ho * wo + 31) // 32
    panel_first = np.searchsorted(runs[:, 0], np.arange(ntiles + 1)).astype(np.int32)
    return runs, panel_first


cdef inline void _pad_step(dv_step* s, const float* x, int C, int H, int W, int pt, int pl, int Hp, int Wp,
                           float* dst, int threads) noexcept nogil:
    """A step copying C planes (H x W) of x with their zero padding into Hp x Wp planes of dst."""
    memset(s, 0, sizeof(dv_step))
    s.kind = DV_STEP_PAD
    s.threads = threads
    s.x = x
    s.u.pad.C, s.u.pad.H, s.u.pad.W, s.u.pad.pt, s.u.pad.pl, s.u.pad.Hp, s.u.pad.Wp = C, H, W, pt, pl, Hp, Wp
    s.out = dst


cdef const float* _group_source(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp,
                                bint pad, float[::1] pad_buffer, const long[::1] tap_off, long reach,
                                int threads, dv_step* pad_step, str caller) except NULL:
    """The source a conv kernel reads for the group starting at input channel ``channel0``: with
    ``pad``, its channels copied with their zero padding into ``pad_buffer`` (Hp x Wp planes,
    ``tap_off`` indexing them) by the step written to ``pad_step``, else ``x`` itself.
    ``reach`` (one past the last float the tiles read; negative: not checked) must stay inside
    that source."""
    cdef int C = x.shape[0], H = x.shape[1], Wd = x.shape[2]
    cdef int K = tap_off.shape[0], cin
    if pad:
        cin = (tap_off[K - 1] // (Hp * Wp)) + 1
        if channel0 + cin > C or pad_buffer.shape[0] < cin * Hp * Wp or reach > cin * Hp * Wp:
            raise ValueError(f"{caller}: padding buffer too small")
        _pad_step(pad_step, &x[channel0, 0, 0], cin, H, Wd, pt, pl, Hp, Wp, &pad_buffer[0], threads)
        return &pad_buffer[0]
    if reach > (C - channel0) * H * Wd:
        raise ValueError(f"{caller}: vectors past the input")
    return &x[channel0, 0, 0]


cdef inline dv_step* _conv_step(dv_step* s, bint pad, int kind, int threads, const float* src,
                                float* out) noexcept nogil:
    """The conv step of ``s``, zeroed with its kind, threads, source and output set: s[1] after
    the padding step that _group_source wrote to s[0] (``pad``), else s[0]."""
    cdef dv_step* c = &s[1] if pad else &s[0]
    memset(c, 0, sizeof(dv_step))
    c.kind, c.threads, c.x, c.out = kind, threads, src, out
    return c


def conv_panel(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp, bint pad,
               float[::1] pad_buffer, const long[::1] tap_off, int sw, const int[:, ::1] runs,
               const int[::1] panel_first, const float[:, ::1] W, const float[::1] bias, bint relu,
               float[:, ::1] out, float[:, ::1] panels, int threads=1, Program program=None, SfmaLayer sfma=None):
    """Dense convolution of one group (input channels channel0.., W: O x K with K = that many
    channels x taps) on the panel route: im2col one panel at a time inside the GEMM
    (dv_conv_panel_tiles). With ``pad`` the group's channels are first copied with their zero
    padding into ``pad_buffer`` (Hp x Wp planes) and ``tap_off`` indexes it; else it indexes ``x`` itself. ``panels`` is scratch,
    one row of K * 32 floats per thread. Threads share out the tiles, or the 8-row blocks of
    weights when the tiles are too few (dv_split_rows). With ``sfma`` (appended to a program
    after its select steps) the step runs the kept maps of the image (dv_sfma_product)."""
    cdef int O = W.shape[0], K = W.shape[1], N = out.shape[1]
    cdef int ntiles = panel_first.shape[0] - 1
    if K == 0 or O == 0 or N == 0:
        raise ValueError("conv_panel: empty layer")
    if (out.shape[0] != O or bias.shape[0] != O or tap_off.shape[0] != K or panels.shape[1] < K * 32
            or panels.shape[0] < max(min(threads, ntiles), 1) or ntiles * 32 < N or runs.shape[1] != 4
            or (O > 1 and W.strides[0] != 4 * K)
            or (dv_split_rows(threads, ntiles, O) and panels.shape[0] < threads)):
        raise ValueError("conv_panel: shape mismatch")
    cdef dv_step s[2]
    cdef const float* src = _group_source(x, channel0, pt, pl, Hp, Wp, pad, pad_buffer, tap_off, -1, threads, &s[0],
                                          "conv_panel")
    cdef dv_step* c = _conv_step(s, pad, DV_STEP_PANEL, threads, src, &out[0, 0])
    c.u.panel.p = _product(&W[0, 0], K, O, K, &bias[0], relu, N)
    c.u.panel.N = N
    c.u.panel.tap_off = &tap_off[0]
    c.u.panel.sw = sw
    c.u.panel.runs = &runs[0, 0]
    c.u.panel.panel_first = &panel_first[0]
    c.scratch = &panels[0, 0]
    c.scratch_stride = panels.shape[1]
    c.sfma = _sfma_state(sfma, program, O, K, "conv_panel")
    _emit(program, s, 2 if pad else 1,
          (x, pad_buffer, tap_off, runs, panel_first, W, bias, out, panels, sfma) if program is not None else None)


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
                long src_offset=0, Program program=None, SfmaLayer sfma=None, bint rows_first=False,
                int rows_below_tiles=4):
    """Dense convolution of one group with stride 1 along rows, without unfolding
    (dv_conv_direct): each tile loads its rows of the unfolded input in place from the source
    (the group's channels, copied with their zero padding into ``pad_buffer`` when ``pad``),
    from ``src_offset`` floats on (a band of output rows). ``vectors`` from
    :func:`direct_vectors`; threads share out the tiles, or the 8-row blocks of weights when
    the tiles are fewer than ``rows_below_tiles`` per thread or ``rows_first`` asks (a conv+pool
    band: the pooling shares out planes). With ``sfma`` (appended to a program after its select
    steps) the step runs the kept maps of the image (dv_sfma_product)."""
    cdef int O = W.shape[0], K = W.shape[1], N = out.shape[1]
    cdef int nvec = vectors.shape[0]
    cdef long reach
    if K == 0 or O == 0 or N == 0 or nvec == 0:
        raise ValueError("conv_direct: empty layer")
    if (out.shape[0] != O or bias.shape[0] != O or tap_off.shape[0] != K or vectors.shape[1] != 4
            or (O > 1 and W.strides[0] != 4 * K)):
        raise ValueError("conv_direct: shape mismatch")
    if vectors[nvec - 1, 1] + __builtin_popcount(<unsigned int>vectors[nvec - 1, 3]) > N:
        raise ValueError("conv_direct: vectors past the output")
    if src_offset < 0:
        raise ValueError("conv_direct: negative source offset")
    reach = src_offset + vectors[nvec - 1, 0] + tap_off[K - 1] + vectors[nvec - 1, 2]  # one past the last float read
    cdef dv_step s[2]
    cdef const float* src = _group_source(x, channel0, pt, pl, Hp, Wp, pad, pad_buffer, tap_off, reach, threads,
                                          &s[0], "conv_direct")
    cdef dv_step* c = _conv_step(s, pad, DV_STEP_DIRECT, threads, src + src_offset, &out[0, 0])
    c.u.direct.p = _product(&W[0, 0], K, O, K, &bias[0], relu, N)
    c.u.direct.tap_off = &tap_off[0]
    c.u.direct.vec = &vectors[0, 0]
    c.u.direct.nvec = nvec
    c.u.direct.rows_first = rows_first
    c.u.direct.rows_below_tiles = rows_below_tiles
    c.sfma = _sfma_state(sfma, program, O, K, "conv_direct")
    _emit(program, s, 2 if pad else 1,
          (x, pad_buffer, tap_off, vectors, W, bias, out, sfma) if program is not None else None)


def conv_ocvec(const float[:, :, ::1] x, int channel0, int pt, int pl, int Hp, int Wp, bint pad,
               float[::1] pad_buffer, const long[::1] tap_off, const int[::1] pos_off,
               const float[:, :, ::1] Wb, const float[::1] bias, bint relu, float[:, ::1] out,
               float[:, ::1] partial, int threads=1, Program program=None):
    """Dense convolution of one group on the channel-vector route (dv_conv_ocvec): vectors over
    64 output channels at a time, one broadcast input float per position (``pos_off``: each
    output position's source offset of its tap (0, 0); ``tap_off``: each tap's offset from it).
    ``Wb`` is the weights in blocks of 64 output channels (ceil(O / 64) x K x 64: block b, row
    k the tap's weights of output channels 64 b..64 b+63, zeros past the last). The source is
    the group's channels, copied with their zero padding into ``pad_buffer`` when ``pad``.
    Threads share out (block, tile of positions) in block order; ``partial`` holds each
    thread's running sums between blocks of taps (a row per thread of
    :func:`ocvec_partial_floats`, 64-byte aligned)."""
    cdef int K = Wb.shape[1], O = out.shape[0], N = out.shape[1], npos = pos_off.shape[0]
    if K == 0 or O == 0 or npos == 0:
        raise ValueError("conv_ocvec: empty layer")
    if (Wb.shape[2] != 64 or Wb.shape[0] != (O + 63) // 64 or bias.shape[0] != O or tap_off.shape[0] != K
            or npos > N
            or <size_t>&Wb[0, 0, 0] % 64 != 0 or partial.shape[0] < threads
            or partial.shape[1] < ocvec_partial_floats() or <size_t>&partial[0, 0] % 64 != 0
            or (partial.shape[1] * 4) % 64 != 0):
        raise ValueError("conv_ocvec: shape mismatch")
    cdef int p
    cdef long last = 0
    for p in range(npos):
        if pos_off[p] < 0:
            raise ValueError("conv_ocvec: negative position offset")
        last = max(last, pos_off[p])
    cdef long reach = last + tap_off[K - 1] + 1  # one past the last float read
    cdef dv_step s[2]
    cdef const float* src = _group_source(x, channel0, pt, pl, Hp, Wp, pad, pad_buffer, tap_off, reach, threads,
                                          &s[0], "conv_ocvec")
    cdef dv_step* c = _conv_step(s, pad, DV_STEP_OCVEC, threads, src, &out[0, 0])
    c.u.ocvec.p = _product(&Wb[0, 0, 0], 64, O, K, &bias[0], relu, N)
    c.u.ocvec.tap_off = &tap_off[0]
    c.u.ocvec.pos_off = &pos_off[0]
    c.u.ocvec.npos = npos
    c.scratch = &partial[0, 0]
    c.scratch_stride = partial.shape[1]
    _emit(program, s, 2 if pad else 1,
          (x, pad_buffer, tap_off, pos_off, Wb, bias, out, partial) if program is not None else None)


def ocvec_partial_floats():
    """Floats of one thread's running sums on the channel-vector route (conv_ocvec): 64 for
    each position of a group of DV_OC_GROUP."""
    return DV_OC_GROUP * 64


def pad_planes(const float[:, :, ::1] x, int channel0, int nch, int pt, int pl, int Hp, int Wp,
               float[::1] dst, int threads=1, Program program=None):
    """Channels channel0..channel0+nch-1 of x with their zero padding, as Hp x Wp planes in dst."""
    if channel0 < 0 or channel0 + nch > x.shape[0] or dst.shape[0] < nch * Hp * Wp:
        raise ValueError("pad_planes: shape mismatch")
    if nch == 0:
        return
    cdef dv_step s
    _pad_step(&s, &x[channel0, 0, 0], nch, x.shape[1], x.shape[2], pt, pl, Hp, Wp, &dst[0], threads)
    _emit(program, &s, 1, (x, dst) if program is not None else None)


def phase_planes(const float[:, :, ::1] x, int channel0, int nch, int pt, int pl, int s,
                 float[:, :, ::1] dst, int threads=1, Program program=None):
    """Channels channel0..channel0+nch-1 of x, zero-padded (input at row pt, column pl), split
    into s x s phase planes (dv_phase_plane): dst[(c * s + py) * s + px] holds rows py, py + s, ...
    and columns px, px + s, ... of channel channel0 + c, so that a stride-s convolution reads
    them with stride 1 (the engine's phase route)."""
    cdef int H = x.shape[1], W = x.shape[2], Hq = dst.shape[1], Wq = dst.shape[2]
    cdef Py_ssize_t n = <Py_ssize_t>nch * s * s
    if s < 1 or channel0 < 0 or nch < 0 or channel0 + nch > x.shape[0] or dst.shape[0] < n:
        raise ValueError("phase_planes: shape mismatch")
    if n == 0 or Hq == 0 or Wq == 0:
        return
    cdef dv_step step
    memset(&step, 0, sizeof(dv_step))
    step.kind = DV_STEP_PHASE
    step.threads = threads
    step.x = &x[channel0, 0, 0]
    step.u.phase.n = <int>n
    step.u.phase.H, step.u.phase.W, step.u.phase.pt, step.u.phase.pl = H, W, pt, pl
    step.u.phase.s, step.u.phase.Hq, step.u.phase.Wq = s, Hq, Wq
    step.out = &dst[0, 0, 0]
    _emit(program, &step, 1, (x, dst) if program is not None else None)


def knob_conv(const float[::1] src, const long[::1] tap_off, const int[::1] positions, int wo, int sh, int sw,
              int row_width, const float[:, ::1] W, int lead, bint spet, const float[::1] margins, bint relu,
              const float[::1] bias, const float[:, ::1] cst, const uint8[:, ::1] mask, float[:, ::1] out,
              float[:, ::1] panels, int threads=1, cnp.int64_t[::1] executed=None,
              cnp.int64_t[:, ::1] row_counts=None):
    """The knobs' conv kernel for one group (see dv_knob_tiles): the outputs of ``out`` (O x
    positions of the map) at ``positions`` (increasing), over the K = W's columns rows of the
    unfolded input (row k at ``src[tap_off[k] + ...]``), SPET first when ``spet`` (partial
    over rows < ``lead``; output o stops when it is < -``margins[o]``), only where ``mask`` (O x len(positions); None: all) is set, starting
    from bias (+ ``cst``, O x positions of the map, when not None). ``panels``: one row of at
    least K * 32 floats per thread. Returns (outputs stopped by SPET, outputs computed); the
    multiply-adds the tiles ran (docs/ops.md, executed MACs) are added to ``executed[0]`` when
    given; per output o, its active entries to ``row_counts[o, 0]`` and those that went on past
    SPET's test to ``row_counts[o, 1]`` when given (O x 2)."""
    cdef int O = W.shape[0], K = W.shape[1], n = positions.shape[0], npos = out.shape[1]
    cdef int ntiles = (n + 31) // 32
    cdef int nchunks = threads if threads < ntiles else ntiles
    cdef int c, nruns, i
    cdef const unsigned char* m = NULL
    cdef const float* pc = NULL
    if executed is not None and executed.shape[0] != 1:
        raise ValueError("knob_conv: executed holds one count")
    if row_counts is not None and (row_counts.shape[0] != W.shape[0] or row_counts.shape[1] != 2):
        raise ValueError("knob_conv: row_counts must be O x 2")
    if n == 0 or O == 0:
        return 0, 0
    if (tap_off.shape[0] != K or out.shape[0] != O or bias.shape[0] != O or margins.shape[0] != O
            or lead < 0 or lead > K
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
    # (O per chunk), and three counters per chunk
    cdef int nch = max(nchunks, 1)
    cdef int* scratch = <int*>malloc((5 * n + ntiles + 1 + nch * O) * sizeof(int))
    cdef long long* stats = <long long*>calloc(3 * nch, sizeof(long long))
    # per chunk, two counts per output row (row_counts)
    cdef long long* rows = <long long*>calloc(2 * O * nch, sizeof(long long)) if row_counts is not None else NULL
    cdef int* runs
    cdef int* runs_first
    cdef int* lists
    cdef int r, t
    if scratch == NULL or stats == NULL or (row_counts is not None and rows == NULL):
        free(scratch)
        free(stats)
        free(rows)
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
                      m, &bias[0], pc, &out[0, 0], npos, spet, &margins[0], relu, &panels[c, 0], lists + c * O,
                      c * ntiles // nchunks, (c + 1) * ntiles // nchunks, stats + 3 * c,
                      rows + 2 * O * c if rows != NULL else NULL)
    cdef long long stopped = 0, active = 0, macs = 0
    for c in range(nch):
        stopped += stats[3 * c]
        active += stats[3 * c + 1]
        macs += stats[3 * c + 2]
    if rows != NULL:
        for c in range(nch):
            for i in range(O):
                row_counts[i, 0] += rows[2 * O * c + 2 * i]
                row_counts[i, 1] += rows[2 * O * c + 2 * i + 1]
    free(rows)
    free(scratch)
    free(stats)
    if executed is not None:
        executed[0] += macs
    return stopped, active


# --------------------------------------------------------------------------- elementwise

def yardstick(int threads, int units, int iters):
    """The reference parallel loop of ``bench --load`` (dv_yardstick): ``units`` units of
    ``iters`` multiply-adds on registers, taken by whichever of ``threads`` threads is free;
    returns units times one unit's result (any thread count gives the same)."""
    if threads < 1 or units < 0 or iters < 0:
        raise ValueError(f"yardstick: threads {threads} >= 1, units {units} and iters {iters} >= 0")
    cdef double total
    with nogil:
        total = dv_yardstick(threads, units, iters)
    return total


def relu_inplace(float[::1] x):
    """x = max(x, 0) elementwise."""
    cdef Py_ssize_t n = x.shape[0], i
    with nogil:
        for i in range(n):
            if x[i] < 0.0:
                x[i] = 0.0


def add_relu(const float[::1] x, const float[::1] b, float[::1] out, bint relu=False, int threads=1,
             Program program=None):
    """out = x + b (b None: x), then max(., 0) where ``relu`` (dv_add_relu: a residual Add, or a
    ReLU alone); the same bits as numpy's add and relu_inplace. Threads split blocks of 64 floats."""
    cdef long n = x.shape[0]
    if out.shape[0] != n or (b is not None and b.shape[0] != n):
        raise ValueError("add_relu: shape mismatch")
    if n == 0:
        return
    cdef dv_step s
    memset(&s, 0, sizeof(dv_step))
    s.kind = DV_STEP_ADD
    s.threads = threads
    s.x = &x[0]
    s.u.add.b = &b[0] if b is not None else NULL
    s.u.add.n = n
    s.u.add.relu = relu
    s.out = &out[0]
    _emit(program, &s, 1, (x, b, out) if program is not None else None)


#: The ops of :func:`eltwise` (dv_eltwise.h's DV_ELT_* codes), by the plan's elementwise kind.
ELTWISE_OPS = {"add": DV_ELT_ADD, "sub": DV_ELT_SUB, "mul": DV_ELT_MUL, "div": DV_ELT_DIV, "pow": DV_ELT_POW}


def eltwise(const float[::1] x, const float[::1] b, float[::1] out, str kind, float scalar=0.0,
            bint scalar_first=False, int threads=1, Program program=None):
    """out = x kind b (b None: x kind scalar, or scalar kind x with ``scalar_first``), kind one
    of ELTWISE_OPS; one IEEE operation per element (powf for pow), the same bits on either path.
    Threads split blocks of 64 floats."""
    cdef long n = x.shape[0]
    if kind not in ELTWISE_OPS:
        raise ValueError(f"eltwise: unknown op {kind!r}")
    if out.shape[0] != n or (b is not None and b.shape[0] != n):
        raise ValueError("eltwise: shape mismatch")
    if n == 0:
        return
    cdef dv_step s
    memset(&s, 0, sizeof(dv_step))
    s.kind = DV_STEP_ELTWISE
    s.threads = threads
    s.x = &x[0]
    s.u.elt.b = &b[0] if b is not None else NULL
    s.u.elt.n = n
    s.u.elt.op = ELTWISE_OPS[kind]
    s.u.elt.scalar = scalar
    s.u.elt.scalar_first = scalar_first
    s.out = &out[0]
    _emit(program, &s, 1, (x, b, out) if program is not None else None)


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

cdef inline void _pool_step(dv_step* s, int kind, const float[:, :, ::1] x, float* out, long out_plane, int ho,
                            int wo, int kh, int kw, int sh, int sw, int pt, int pl, float* scratch, long stride,
                            int threads) noexcept:
    """A pooling step over the planes of x into ho x wo planes out_plane floats apart."""
    memset(s, 0, sizeof(dv_step))
    s.kind = kind
    s.threads = threads
    s.x = &x[0, 0, 0]
    s.u.pool.C, s.u.pool.H, s.u.pool.W = x.shape[0], x.shape[1], x.shape[2]
    s.out = out
    s.u.pool.ldo = out_plane
    s.u.pool.ho, s.u.pool.wo, s.u.pool.kh, s.u.pool.kw = ho, wo, kh, kw
    s.u.pool.sh, s.u.pool.sw, s.u.pool.pt, s.u.pool.pl = sh, sw, pt, pl
    s.scratch = scratch
    s.scratch_stride = stride


def maxpool(const float[:, :, ::1] x, float[:, :, :] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int threads=1, Program program=None, bint rows_shared=False):
    """Max pooling with implicit -inf padding (ONNX / onnxruntime semantics). ``out``'s planes
    must have contiguous rows, but may lie apart (a band of rows of a larger output). Threads
    share out the planes, or with ``rows_shared`` the output rows of every plane."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    if out.shape[0] != C or (Ho > 0 and Wo > 0 and (out.strides[2] != 4 or (Ho > 1 and out.strides[1] != 4 * Wo))):
        raise ValueError("maxpool: output planes must have contiguous rows")
    if C == 0 or Ho == 0 or Wo == 0:
        return
    cdef long span = <long>Ho * dv_pool_row_stride(W, Wo, kw, sw, pl)  # a reduced row per output row
    scratch = np.zeros((threads, span), np.float32)
    cdef float[:, ::1] rows = scratch
    cdef dv_step s
    _pool_step(&s, DV_STEP_MAXPOOL, x, &out[0, 0, 0], out.strides[0] // 4, Ho, Wo, kh, kw, sh, sw, pt, pl,
               &rows[0, 0], span, threads)
    s.u.pool.rows_shared = rows_shared
    _emit(program, &s, 1, (x, out, scratch) if program is not None else None)


def avgpool(const float[:, :, ::1] x, float[:, :, ::1] out, int kh, int kw, int sh, int sw,
            int pt, int pl, int pb, int pr, bint count_include_pad, int threads=1, Program program=None):
    """Average pooling as onnxruntime computes it: with count_include_pad the divisor is the
    window clipped to the padded input (H + pad_end), else the taps inside the input."""
    cdef int C = x.shape[0], H = x.shape[1], W = x.shape[2], Ho = out.shape[1], Wo = out.shape[2]
    if out.shape[0] != C or (Ho > 1 and out.strides[1] != 4 * Wo):
        raise ValueError("avgpool: output planes must have contiguous rows")
    if C == 0 or Ho == 0 or Wo == 0:
        return
    cdef long span = <long>Ho * dv_pool_row_stride(W, Wo, kw, sw, pl) + Wo  # the rows, then the column counts
    scratch = np.zeros((threads, span), np.float32)
    cdef float[:, ::1] rows = scratch
    cdef dv_step s
    _pool_step(&s, DV_STEP_AVGPOOL, x, &out[0, 0, 0], out.strides[0] // 4, Ho, Wo, kh, kw, sh, sw, pt, pl, &rows[0, 0], span,
               threads)
    s.u.pool.pb, s.u.pool.pr, s.u.pool.count_include_pad = pb, pr, count_include_pad
    _emit(program, &s, 1, (x, out, scratch) if program is not None else None)


def global_avgpool(const float[:, ::1] x, float[::1] out, int threads=1, Program program=None):
    """Mean of each row (channel) of x (C x HW), vectorised (dv_mean); threads split the rows."""
    cdef int C = x.shape[0], P = x.shape[1]
    if out.shape[0] != C:
        raise ValueError("global_avgpool: shape mismatch")
    if P == 0:
        raise ValueError("global_avgpool: empty map")
    if C == 0:
        return
    cdef dv_step s
    memset(&s, 0, sizeof(dv_step))
    s.kind = DV_STEP_MEAN
    s.threads = threads
    s.x = &x[0, 0]
    s.u.mean.C = C
    s.u.mean.N = P
    s.out = &out[0]
    _emit(program, &s, 1, (x, out) if program is not None else None)


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
    """Per channel: sum, sum of squares and (if asked) sum of absolute values, in double
    (dv_map_sums)."""
    cdef Py_ssize_t C = x.shape[0], c
    cdef long hw = x.shape[1] * x.shape[2]
    if sums.shape[0] < C or sumsq.shape[0] < C or sumabs.shape[0] < C:
        raise ValueError("channel_stats: shape mismatch")
    if hw == 0:
        for c in range(C):
            sums[c] = sumsq[c] = sumabs[c] = 0.0
        return
    for c in prange(C, nogil=True, num_threads=threads, schedule="static"):
        dv_map_sums(&x[c, 0, 0], hw, need_abs, &sums[c], &sumsq[c], &sumabs[c])


def channel_spread(const float[:, :, ::1] x, bint nonneg, bint relative, double[::1] spread, double[::1] means,
                   int threads=1):
    """SFMA's statistic in one call: per channel the mean and the standard deviation (over
    H x W, in double), divided by the maps' mean |x| when ``relative`` (``nonneg``: x >= 0, so
    |x| = x) (0 when that mean is 0): dv_sfma_spreads of the sums."""
    cdef int C = x.shape[0]
    if spread.shape[0] < C or means.shape[0] < C:
        raise ValueError("channel_spread: shape mismatch")
    if C == 0:
        return
    sums = np.empty(C)
    sumsq = np.empty(C)
    sumabs = np.empty(C)
    channel_stats(x, sums, sumsq, sumabs, not nonneg, threads)
    cdef double[::1] s1 = sums, s2 = sumsq, sa = sumabs
    with nogil:
        dv_sfma_spreads(&s1[0], &s2[0], &sa[0], C, <double>x.shape[1] * x.shape[2], nonneg, relative, &spread[0],
                        &means[0])


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
    of W[o, c, t] over the taps t valid at position p (class_taps[tap_class[p], t] = 1):
    dv_sfma_constant_row per output channel."""
    cdef Py_ssize_t O = W.shape[0], nd = dropped.shape[0], ncls = class_taps.shape[0]
    cdef Py_ssize_t P = tap_class.shape[0], o, i
    if (out.shape[0] != O or out.shape[1] != P or class_taps.shape[1] != kk or means.shape[0] != nd
            or (O and W.shape[1] % kk) or ncls == 0):
        raise ValueError("sfma_constant: shape mismatch")
    for i in range(nd):
        if dropped[i] < 0 or dropped[i] * kk >= W.shape[1]:
            raise ValueError("sfma_constant: channel out of range")
    for i in range(P):
        if tap_class[i] < 0 or tap_class[i] >= ncls:
            raise ValueError("sfma_constant: border class out of range")
    if O == 0 or P == 0:
        return
    scratch = np.zeros(kk + ncls, np.float32)
    cdef float[::1] sc = scratch
    cdef const int* d = &dropped[0] if nd else NULL
    cdef const float* m = &means[0] if nd else NULL
    with nogil:
        for o in range(O):
            dv_sfma_constant_row(&W[o, 0], d, m, <int>nd, kk, &class_taps[0, 0], <int>ncls, &tap_class[0], P,
                                 &out[o, 0], 0, 0, &sc[0], &sc[kk])


cdef class SfmaLayer:
    """A conv layer with SFMA alone (one group) in a compiled run: the state its steps share
    (dv_sfma_state, kernels/dv_sfma.h) and the arrays it points into. Its steps: :meth:`select_steps`
    (each input map's statistic, then the maps dropped and the kept maps' weight rows), the conv
    route's own steps given ``sfma=`` (they run the kept maps), :meth:`constant_step`. The
    totals over the images run are read, and reset, by :meth:`take_counts`."""
    cdef dv_sfma_state st
    cdef list keep
    cdef object by_drops

    def __cinit__(self, const float[:, ::1] W, const long[::1] tap_off, const float[::1] bias, bint relu, int kk,
                  long hw, bint nonneg, bint relative, double threshold, const float[:, ::1] class_taps,
                  const long[::1] tap_class, const long long[::1] channel_nnz=None, int threads=1):
        cdef int O = W.shape[0], C = W.shape[1] // kk if kk > 0 else 0
        cdef Py_ssize_t i
        if (kk <= 0 or C <= 0 or O <= 0 or W.shape[1] != C * kk or tap_off.shape[0] != C * kk or bias.shape[0] != O
                or class_taps.shape[1] != kk or class_taps.shape[0] == 0 or tap_class.shape[0] == 0 or hw <= 0
                or (channel_nnz is not None and channel_nnz.shape[0] != C) or threads < 1):
            raise ValueError("SfmaLayer: shape mismatch")
        for i in range(tap_class.shape[0]):
            if tap_class[i] < 0 or tap_class[i] >= class_taps.shape[0]:
                raise ValueError("SfmaLayer: border class out of range")
        sums = np.zeros((3, C))
        w_kept = np.zeros((O, C * kk), np.float32)
        tap_kept = np.zeros(C * kk, np.int64)
        dropped = np.zeros(C, np.int32)
        means = np.zeros(C, np.float32)
        scratch = np.zeros((threads, kk + class_taps.shape[0]), np.float32)
        self.by_drops = np.zeros(C + 1, np.int64)
        cdef double[:, ::1] sm = sums
        cdef float[:, ::1] wk = w_kept, sc = scratch
        cdef long[::1] tk = tap_kept
        cdef int[::1] dr = dropped
        cdef float[::1] mn = means
        cdef long long[::1] bd = self.by_drops
        memset(&self.st, 0, sizeof(dv_sfma_state))
        self.st.C, self.st.O, self.st.kk = C, O, kk
        self.st.hw, self.st.positions = hw, tap_class.shape[0]
        self.st.nonneg, self.st.relative, self.st.threshold = nonneg, relative, threshold
        self.st.W, self.st.tap_off, self.st.bias, self.st.relu = &W[0, 0], &tap_off[0], &bias[0], relu
        self.st.channel_nnz = &channel_nnz[0] if channel_nnz is not None else NULL
        self.st.class_taps, self.st.tap_class, self.st.ncls = &class_taps[0, 0], &tap_class[0], class_taps.shape[0]
        self.st.sum, self.st.sumsq, self.st.sumabs = &sm[0, 0], &sm[1, 0], &sm[2, 0]
        self.st.w_kept, self.st.tap_kept, self.st.dropped, self.st.dropped_means = &wk[0, 0], &tk[0], &dr[0], &mn[0]
        self.st.scratch, self.st.scratch_stride = &sc[0, 0], sc.shape[1]
        self.st.images_by_drops = &bd[0]
        self.keep = [W, tap_off, bias, channel_nnz, class_taps, tap_class, sums, w_kept, tap_kept, dropped, means,
                     scratch, self.by_drops]

    def select_steps(self, const float[:, :, ::1] x, int threads, Program program):
        """Append the statistic of the input maps ``x`` (C x H x W) and the choice of maps."""
        if x.shape[0] != self.st.C or <long>x.shape[1] * x.shape[2] != self.st.hw:
            raise ValueError("SfmaLayer.select_steps: input shape mismatch")
        cdef dv_step s[2]
        memset(s, 0, 2 * sizeof(dv_step))
        s[0].kind, s[0].threads, s[0].sfma, s[0].x = DV_STEP_SFMA_STATS, threads, &self.st, &x[0, 0, 0]
        s[1].kind, s[1].threads, s[1].sfma = DV_STEP_SFMA_SELECT, threads, &self.st
        program.append(s, 2, (self, x))

    def constant_step(self, float[:, ::1] out, int threads, Program program):
        """Append the dropped maps' constant added to ``out`` (O x positions), then the ReLU."""
        if out.shape[0] != self.st.O or out.shape[1] != self.st.positions:
            raise ValueError("SfmaLayer.constant_step: output shape mismatch")
        if threads > (<object>self.keep[11]).shape[0]:
            raise ValueError("SfmaLayer.constant_step: more threads than scratch rows")
        cdef dv_step s
        memset(&s, 0, sizeof(dv_step))
        s.kind, s.threads, s.sfma, s.out = DV_STEP_SFMA_CONSTANT, threads, &self.st, &out[0, 0]
        program.append(&s, 1, (self, out))

    def take_counts(self):
        """The totals since the last call: images by the number of maps dropped (C + 1 ints) and
        the non-zero weights of the kept maps' columns, summed; then zeroes them."""
        counts, nnz = self.by_drops.copy(), self.st.kept_nnz
        self.by_drops[:] = 0
        self.st.kept_nnz = 0
        return counts, int(nnz)


# --------------------------------------------------------------------------- SPET (fully connected)

def spet_decide(const float[:, ::1] partial, const float[::1] margins, const uint8[:, ::1] active,
                uint8[:, ::1] cont):
    """cont[o, j] = active[o, j] and partial[o, j] >= -margins[j] (one margin per column: a
    fully-connected layer's neurons). Returns the number terminated (active entries predicted
    negative)."""
    cdef Py_ssize_t O = partial.shape[0], N = partial.shape[1], o, j
    cdef long long terminated = 0
    if margins.shape[0] != N:
        raise ValueError("spet_decide: one margin per column")
    with nogil:
        for o in range(O):
            for j in range(N):
                if active[o, j]:
                    if partial[o, j] < -margins[j]:
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
    """insignificant[o, by, bx] = all four grid corners of cell (by, bx) of map o are < threshold
    (dv_sdss_cells). Returns the number of insignificant cells."""
    cdef int ny = gy.shape[0], nx = gx.shape[0]
    if (ny < 2 or nx < 2 or insignificant.shape[0] != out.shape[0] or insignificant.shape[1] != ny - 1
            or insignificant.shape[2] != nx - 1):
        raise ValueError("sdss_cells: shape mismatch")
    if out.shape[0] == 0:
        return 0
    cdef long long n
    with nogil:
        n = dv_sdss_cells(&out[0, 0, 0], out.shape[0], out.shape[1], out.shape[2], &gy[0], ny, &gx[0], nx,
                          threshold, &insignificant[0, 0, 0])
    return n


def sdss_union(const uint8[:, :, ::1] insignificant, const int[::1] off_positions, const int[::1] cell_y,
               const int[::1] cell_x):
    """The off-grid positions (increasing) that some map needs (their cell is significant in
    it), and per map which of them it needs (maps x positions) (dv_sdss_union). Returns
    (positions, needed, total needed)."""
    cdef int O = insignificant.shape[0], P = off_positions.shape[0]
    if cell_y.shape[0] != P or cell_x.shape[0] != P:
        raise ValueError("sdss_union: shape mismatch")
    positions_arr = np.empty(P, np.int32)
    needed_arr = np.empty(O * P, np.uint8)
    if O == 0 or P == 0:
        return positions_arr[:0], needed_arr[:0].reshape(O, 0), 0
    cdef int[::1] positions = positions_arr
    cdef uint8[::1] needed = needed_arr
    cdef int n = 0
    cdef long long total
    with nogil:
        total = dv_sdss_union(&insignificant[0, 0, 0], O, insignificant.shape[1], insignificant.shape[2],
                              &off_positions[0], &cell_y[0], &cell_x[0], P, &positions[0], &n, &needed[0])
    if total < 0:
        raise MemoryError()
    return positions_arr[:n].copy(), needed_arr[:O * n].reshape(O, n), total


def sdss_fill(float[:, :, ::1] out, const int[::1] gy, const int[::1] gx, const int[::1] pos_y,
              const int[::1] pos_x, const int[::1] cell_y, const int[::1] cell_x,
              const uint8[:, :, ::1] insignificant, bint bilinear):
    """Fill every off-grid position (pos_y[j], pos_x[j]) whose cell (cell_y[j], cell_x[j]) is
    insignificant in its map: bilinear from the cell's corners, or 0 (dv_sdss_fill). Returns the
    number filled."""
    cdef int ny = gy.shape[0], nx = gx.shape[0], P = pos_y.shape[0]
    if (ny < 2 or nx < 2 or pos_x.shape[0] != P or cell_y.shape[0] != P or cell_x.shape[0] != P
            or insignificant.shape[0] != out.shape[0] or insignificant.shape[1] != ny - 1
            or insignificant.shape[2] != nx - 1):
        raise ValueError("sdss_fill: shape mismatch")
    if out.shape[0] == 0 or P == 0:
        return 0
    cdef long long n
    with nogil:
        n = dv_sdss_fill(&out[0, 0, 0], out.shape[0], out.shape[1], out.shape[2], &gy[0], ny, &gx[0], nx,
                         &pos_y[0], &pos_x[0], &cell_y[0], &cell_x[0], P, &insignificant[0, 0, 0], bilinear)
    if n < 0:
        raise MemoryError()
    return n


cdef void _mean_rows_f64(const float* x, Py_ssize_t C, Py_ssize_t P, double* out) noexcept nogil:
    """out[c] = the mean of row c of x (C x P, C-contiguous), summed in float64 (exact for most
    maps: a float32 has 24 bits, a float64 53), eight sums side by side (one chain of dependent
    adds would take 4 cycles per element)."""
    cdef Py_ssize_t c, p, j
    cdef double s
    cdef double acc[8]
    cdef const float* row
    for c in range(C):
        row = x + c * P
        for j in range(8):
            acc[j] = 0.0
        p = 0
        while p + 8 <= P:
            for j in range(8):
                acc[j] = acc[j] + row[p + j]
            p = p + 8
        s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
        while p < P:
            s = s + row[p]
            p = p + 1
        out[c] = s / P


def gate_pool(const float[:, ::1] x, double[::1] out):
    """A decision gate's global average pooling of a (C, HW) map into ``out`` (C,), float64: the
    features GateKernel.decide computes (the gates' calibration records them)."""
    if out.shape[0] != x.shape[0] or x.shape[1] == 0:
        raise ValueError("gate_pool: shape mismatch")
    if x.shape[0] == 0:
        return
    with nogil:
        _mean_rows_f64(&x[0, 0], x.shape[0], x.shape[1], &out[0])


cdef class GateKernel:
    """A decision gate's decision (dyvedeep.gates.Gate): global average pooling of a (C, HW) map
    in float64, logits = weight @ pooled + bias, softmax, and the confidence (the largest
    probability, or with ``margin`` the difference of the two largest), on buffers allocated
    once: one call per image instead of a dozen numpy calls (each ~1 us on these sizes)."""
    cdef double[:, ::1] weight
    cdef double[::1] bias
    cdef readonly cnp.ndarray pooled, probs  # the last decision's features and probabilities
    cdef double[::1] pooled_v, probs_v
    cdef bint margin

    def __cinit__(self, const double[:, ::1] weight, const double[::1] bias, bint margin):
        if bias.shape[0] != weight.shape[0] or weight.shape[0] < 2:
            raise ValueError("GateKernel: weight (K, C) and bias (K,) with K >= 2 classes")
        self.weight = np.array(weight, dtype=np.float64, order="C")
        self.bias = np.array(bias, dtype=np.float64)
        self.pooled = np.zeros(weight.shape[1], np.float64)
        self.probs = np.zeros(weight.shape[0], np.float64)
        self.pooled_v = self.pooled
        self.probs_v = self.probs
        self.margin = margin

    def decide(self, cnp.ndarray fmap):
        """The confidence on a C-contiguous float32 map of C channels (any shape, channels
        first); ``pooled`` and ``probs`` hold its features and probabilities. An array, not a
        memoryview: taking a memoryview costs about as much as the decision on a small map."""
        cdef Py_ssize_t C = self.pooled_v.shape[0], size
        if (cnp.PyArray_TYPE(fmap) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(fmap)
                or cnp.PyArray_NDIM(fmap) < 1 or cnp.PyArray_DIMS(fmap)[0] != C):
            raise ValueError(f"GateKernel.decide: a C-contiguous float32 map of {C} channels")
        size = cnp.PyArray_SIZE(fmap)
        if size == 0:
            raise ValueError("GateKernel.decide: an empty map")
        with nogil:
            _mean_rows_f64(<const float*>cnp.PyArray_DATA(fmap), C, size // C, &self.pooled_v[0])
        return self._confidence()

    def decide_pooled(self, const double[::1] pooled):
        """The confidence on features already pooled (C,), as :meth:`decide` on their map."""
        if pooled.shape[0] != self.pooled_v.shape[0]:
            raise ValueError("GateKernel.decide_pooled: the features' count is not the gate's channels")
        self.pooled_v[:] = pooled
        return self._confidence()

    cdef double _confidence(self) noexcept:
        cdef Py_ssize_t K = self.weight.shape[0], C = self.weight.shape[1], k, c
        cdef double s, top = -1e308, second = -1e308, total = 0.0
        for k in range(K):
            s = 0.0
            for c in range(C):
                s = s + self.weight[k, c] * self.pooled_v[c]
            s = s + self.bias[k]
            self.probs_v[k] = s
            if s > top:
                top = s
        for k in range(K):
            s = exp(self.probs_v[k] - top)
            self.probs_v[k] = s
            total = total + s
        top = -1.0
        for k in range(K):
            s = self.probs_v[k] / total
            self.probs_v[k] = s
            if s > top:
                second = top
                top = s
            elif s > second:
                second = s
        return top - second if self.margin else top
