/* The vector primitives every kernel family builds on: the instruction set's machine vector and
 * register budget, a 16-float vector type (GCC/Clang vector extensions: one AVX-512 register, or
 * two AVX2 or four NEON registers), whole and partial loads and stores, lane masks, strided
 * copies, gathers, lane-wise max. No Python API here. */
#ifndef DYVEDEEP_DV_VECTOR_H
#define DYVEDEEP_DV_VECTOR_H

#include <string.h>

/* The instruction set the kernels are built for, decided at build time by the compiler flags
 * (setup.py): DV_VW floats per machine vector and DV_ACCS accumulators in a register tile, so
 * that the accumulators, one row of source vectors and a broadcast weight fit the register file
 * (AVX-512: 32 registers of 16 floats; AVX2 with FMA: 16 of 8, where GCC spilled some of 12
 * accumulators, none of 8; NEON: 32 of 4, where it spilled some of 24, none of 16).
 * `make fma-spills` checks a build (tools/fma_spills.py). */
#if defined(__AVX512F__)
#define DV_ISA "avx512"
#define DV_VW 16
#define DV_ACCS 24
#elif defined(__AVX2__) && defined(__FMA__)
#define DV_ISA "avx2"
#define DV_VW 8
#define DV_ACCS 8
#elif defined(__ARM_NEON) || defined(__aarch64__)
#define DV_ISA "neon"
#define DV_VW 4
#define DV_ACCS 16
#else
#define DV_ISA "generic"
#define DV_VW 4
#define DV_ACCS 12
#endif

/* A machine vector (DV_VW floats) and its lane mask. */
typedef float dv_vn __attribute__((vector_size(4 * DV_VW)));
typedef int dv_in __attribute__((vector_size(4 * DV_VW)));

typedef float dv_v16 __attribute__((vector_size(64)));
typedef int dv_i16 __attribute__((vector_size(64)));

/* Every lane = x (a plain broadcast: adding x to a zero vector would also flip -0.0 to +0.0). */
#define DV_SPLAT(x) ((dv_v16){(x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x)})

static inline dv_v16 dv_load16(const float *p) { dv_v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void dv_store16(float *p, dv_v16 v) { memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
/* AVX2: the lanes l < n (any n) of an 8-float masked load. */
static inline __m256i dv_mask8(int n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* AVX2: the first n (any n; none if n <= 0) lanes of v stored at p, nothing past p + n. Plain
 * stores of 4, 2 and 1 floats: a masked store (vmaskmovps) takes ~12 cycles on AMD Zen 2. */
static inline void dv_store8_part(float *p, __m256 v, int n)
{
    if (n >= 8) { _mm256_storeu_ps(p, v); return; }
    __m128 q = _mm256_castps256_ps128(v);
    if (n >= 4) { _mm_storeu_ps(p, q); q = _mm256_extractf128_ps(v, 1); p += 4; n -= 4; }
    if (n >= 2) { _mm_storel_pi((__m64 *)p, q); q = _mm_movehl_ps(q, q); p += 2; n -= 2; }
    if (n >= 1) _mm_store_ss(p, q);
}
#endif

/* The first n (1..16) floats at p, zeros in the other lanes (no read past p + n). */
static inline dv_v16 dv_load16_part(const float *p, int n)
{
#if defined(__AVX512F__)
    __m512 m = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
    dv_v16 v;
    memcpy(&v, &m, sizeof v);
    return v;
#elif defined(__AVX2__)
    __m256 half[2] = {_mm256_maskload_ps(p, dv_mask8(n)), _mm256_maskload_ps(p + 8, dv_mask8(n - 8))};
    dv_v16 v;
    memcpy(&v, half, sizeof v);
    return v;
#else
    dv_v16 v = {0};
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
#endif
}

/* Store the first n (1..16) lanes of v at p (nothing written past p + n). */
static inline void dv_store16_part(float *p, dv_v16 v, int n)
{
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof m);
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), m);
#elif defined(__AVX2__)
    __m256 half[2];
    memcpy(half, &v, sizeof half);
    dv_store8_part(p, half[0], n);
    dv_store8_part(p + 8, half[1], n - 8);
#else
    memcpy(p, &v, sizeof(float) * (size_t)n);
#endif
}

/* Copy n floats (short runs: whole vectors, then one partial vector). */
static inline void dv_copy_run(float *d, const float *s, int n)
{
    for (; n >= 16; n -= 16, d += 16, s += 16) dv_store16(d, dv_load16(s));
    if (n > 0) dv_store16_part(d, dv_load16_part(s, n), n);
}

/* Zero n floats (short runs: whole vectors, then one partial vector). */
static inline void dv_zero_run(float *d, int n)
{
    dv_v16 zero = {0};
    for (; n >= 16; n -= 16, d += 16) dv_store16(d, zero);
    if (n > 0) dv_store16_part(d, zero, n);
}

/* d[i] = s[i * stride] for i < n (a constant stride 2 lets the compiler vectorise it). */
static inline void dv_copy_strided(float *restrict d, const float *restrict s, int n, int stride)
{
    if (stride == 1) dv_copy_run(d, s, n);
    else if (stride == 2) for (int i = 0; i < n; ++i) d[i] = s[2 * i];
    else for (int i = 0; i < n; ++i) d[i] = s[(long)i * stride];
}

/* The lanes of a load of n (1..16) floats: a mask (AVX-512; computed once outside a loop) or
 * the count itself (elsewhere, where a partial load copies n floats). */
#if defined(__AVX512F__)
typedef __mmask16 dv_lanes;
static inline dv_lanes dv_lanes_of(int n) { return (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1u); }
static inline dv_v16 dv_load16_lanes(const float *p, dv_lanes m)
{
    __m512 v = _mm512_maskz_loadu_ps(m, p);
    dv_v16 r;
    memcpy(&r, &v, sizeof r);
    return r;
}
#else
typedef int dv_lanes;
static inline dv_lanes dv_lanes_of(int n) { return n; }
static inline dv_v16 dv_load16_lanes(const float *p, dv_lanes n) { return n >= 16 ? dv_load16(p) : dv_load16_part(p, n); }
#endif

/* Store the lanes of v that `mask` selects, in order, at p, p + 1, ... */
static inline void dv_store16_compress(float *p, dv_v16 v, unsigned mask)
{
#if defined(__AVX512F__)
    /* compressed in a register, then a masked store: vcompressps to memory is microcoded on
     * AMD Zen 4 (a tenth of a direct convolution's time on SqueezeNet's 56 x 56 maps) */
    __m512 m;
    memcpy(&m, &v, sizeof m);
    __m512 packed = _mm512_maskz_compress_ps((__mmask16)mask, m);
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << __builtin_popcount(mask)) - 1u), packed);
#else
    /* run by run of selected lanes (a vector across output rows has one or two): lane-by-lane
     * extraction took a sixth of the AVX2 build's time */
    float lanes[32] = {0};
    dv_store16(lanes, v);
    while (mask != 0) {
        int first = __builtin_ctz(mask);
        int len = __builtin_ctz(~(mask >> first));
        dv_store16_part(p, dv_load16(lanes + first), len);
        p += len;
        mask &= ~0u << (first + len);
    }
#endif
}

/* d[j] = s[idx[j]] for j < n. */
static inline void dv_gather(float *restrict d, const float *restrict s, const int *restrict idx, int n)
{
    for (int j = 0; j < n; ++j) d[j] = s[idx[j]];
}

/* Lane-wise operations on 16-float vectors written per machine vector: GCC lowers a comparison
 * of vectors wider than the machine's lane by lane (the AVX2 build spent a fifth of its time in
 * such ReLUs). DV_BY_PARTS(out, x, y, expr) sets out's parts to expr of the parts px, py. */
#define DV_BY_PARTS(out, x, y, expr)                                                               \
    do {                                                                                           \
        dv_vn xs_[16 / DV_VW], ys_[16 / DV_VW];                                                    \
        memcpy(xs_, &(x), sizeof xs_);                                                             \
        memcpy(ys_, &(y), sizeof ys_);                                                             \
        for (int i_ = 0; i_ < 16 / DV_VW; ++i_) {                                                  \
            dv_vn px = xs_[i_], py = ys_[i_];                                                      \
            (void)py;                                                                              \
            xs_[i_] = (expr);                                                                      \
        }                                                                                          \
        memcpy(&(out), xs_, sizeof xs_);                                                           \
    } while (0)

/* The larger of a and b as (b > a ? b : a), lane by lane (a NaN in b keeps a). */
static inline dv_v16 dv_vmax(dv_v16 a, dv_v16 b)
{
    dv_v16 r;
    DV_BY_PARTS(r, a, b, (dv_vn)(((dv_in)py & (py > px)) | ((dv_in)px & ~(py > px))));
    return r;
}

/* ReLU as (x < 0 ? +0 : x) lane by lane (-0.0 and NaN kept), of one machine vector ... */
static inline dv_vn dv_relun(dv_vn x) { return (dv_vn)((dv_in)x & ~(x < (dv_vn){0})); }

/* ... and of a 16-float vector. */
static inline dv_v16 dv_relu16(dv_v16 x)
{
    dv_v16 r;
    DV_BY_PARTS(r, x, x, dv_relun(px));
    return r;
}

/* The square root of each lane, correctly rounded (IEEE), as sqrtf of each. */
static inline dv_vn dv_sqrtn(dv_vn x)
{
#if defined(__AVX512F__)
    return (dv_vn)_mm512_sqrt_ps((__m512)x);
#elif defined(__AVX2__)
    return (dv_vn)_mm256_sqrt_ps((__m256)x);
#else
    for (int l = 0; l < DV_VW; ++l) x[l] = __builtin_sqrtf(x[l]);
    return x;
#endif
}

/* x / d where d > 0, else 0, lane by lane (one machine vector; dv_div_where_positive). */
static inline dv_vn dv_divn_where_positive(dv_vn x, dv_vn d)
{
    dv_in some = d > (dv_vn){0};
    d = (dv_vn)(((dv_in)d & some) | ((dv_in)((dv_vn){0} + 1.0f) & ~some));
    return (dv_vn)((dv_in)(x / d) & some);
}

static inline dv_v16 dv_div_where_positive(dv_v16 x, dv_v16 d)
{
    dv_v16 r;
    DV_BY_PARTS(r, x, d, dv_divn_where_positive(px, py));
    return r;
}

/* __builtin_shufflevector: GCC >= 12 and Clang (a GCC without __has_builtin has none). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define DV_HAVE_SHUFFLEVECTOR 1
#endif
#endif
#ifndef DV_HAVE_SHUFFLEVECTOR
#define DV_HAVE_SHUFFLEVECTOR 0
#endif

/* p[0], p[s], ..., p[15 s] for s = 1 or 2 (p[0 .. 16 s - 1] readable). */
static inline dv_v16 dv_load16_stride(const float *p, int s)
{
    if (s == 1) return dv_load16(p);
#if DV_HAVE_SHUFFLEVECTOR
    dv_v16 a = dv_load16(p), b = dv_load16(p + 16);
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#else
    dv_v16 v;
    for (int l = 0; l < 16; ++l) v[l] = p[2 * l];
    return v;
#endif
}

#endif
