// Statistics kernels of vstore (see kernels.hpp for the conventions shared with the other backends).
//
// Parallel layout: OpenMP over column tiles. Each thread owns the columns of its tile, accumulates
// them over all rows into thread-local per-group partials, then adds the partials to the output;
// no two threads ever write the same element, so there are no atomics. Whether a row is valid
// (group >= 0 and all values finite) is decided once per row, before the tiles run.
//
// float16 moments run in csrc/vstore/moments_f16.cpp (float32 partials over runs of rows).
// float16 decoding picks an F16C/AVX2(/FMA) path at run time (__builtin_cpu_supports); every other CPU takes
// the portable path (a 65,536-entry table), as does any CPU when the environment variable
// VSTORE_NO_F16C is set to a non-zero value. The build never uses -march=native.
#include "vstore/kernels.hpp"

#include "vstore/moments_f16.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VSTORE_X86 1
#else
#define VSTORE_X86 0
#endif

#ifdef _OPENMP
#include <omp.h>
#define VSTORE_OMP(directive) _Pragma(#directive)
#else
#define VSTORE_OMP(directive)
#endif

#if defined(__GNUC__)
#define VSTORE_INLINE inline __attribute__((always_inline))
#else
#define VSTORE_INLINE inline
#endif

namespace vstore {
namespace {

constexpr std::uint8_t kSkip = 0;       // group -1
constexpr std::uint8_t kValid = 1;      // counted
constexpr std::uint8_t kNonfinite = 2;  // has NaN/Inf: counted in nonfinite only

// Below this many values a block is processed by one thread (a parallel region costs more).
constexpr std::int64_t kParallelMinValues = std::int64_t{1} << 16;

VSTORE_INLINE float bits_to_float(std::uint32_t u) noexcept {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

VSTORE_INLINE std::uint32_t float_to_bits(float f) noexcept {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

const std::array<float, 65536>& half_table() noexcept {
    static const std::array<float, 65536> table = [] {
        std::array<float, 65536> t{};
        for (std::uint32_t b = 0; b < 65536; ++b) t[b] = half_to_float(static_cast<std::uint16_t>(b));
        return t;
    }();
    return table;
}

bool detect_f16c() noexcept {
    // VSTORE_NO_F16C=1 forces the portable path (to test it on CPUs that have F16C).
    const char* off = std::getenv("VSTORE_NO_F16C");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
#if VSTORE_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

int resolve_threads(int threads) noexcept {
    if (threads > 0) return threads;
    return openmp_threads();
}

// ---------------------------------------------------------------------------------------------
// Row validity: one pass per row, done once per block.

template <class Raw, class Signed>
VSTORE_INLINE bool row_is_finite(const Raw* __restrict p, std::int64_t n, Raw abs_mask, Raw exp_bits) noexcept {
    // max over (bits & abs_mask) as a signed integer (non-negative after the mask) vectorises well.
    Signed m = 0;
    for (std::int64_t j = 0; j < n; ++j) {
        const Signed v = static_cast<Signed>(p[j] & abs_mask);
        m = v > m ? v : m;
    }
    return m < static_cast<Signed>(exp_bits);
}

bool row_finite(const BlockRef& b, std::int64_t r) noexcept {
    switch (b.dtype) {
        case RawDtype::float16:
            return row_is_finite<std::uint16_t, std::int16_t>(
                static_cast<const std::uint16_t*>(b.data) + r * b.cols, b.cols, 0x7FFF, 0x7C00);
        case RawDtype::bfloat16:
            return row_is_finite<std::uint16_t, std::int16_t>(
                static_cast<const std::uint16_t*>(b.data) + r * b.cols, b.cols, 0x7FFF, 0x7F80);
        case RawDtype::float32:
            return row_is_finite<std::uint32_t, std::int32_t>(
                static_cast<const std::uint32_t*>(b.data) + r * b.cols, b.cols, 0x7FFFFFFFu, 0x7F800000u);
    }
    return false;
}

void row_status(const BlockRef& b, std::uint8_t* status, int nt) noexcept {
    const std::int64_t rows = b.rows;
    const bool parallel = nt > 1 && rows > 1 && rows * b.cols >= kParallelMinValues;
    (void)parallel;
VSTORE_OMP(omp parallel for schedule(dynamic, 64) num_threads(nt) if (parallel))
    for (std::int64_t r = 0; r < rows; ++r) {
        if (b.groups[r] < 0)
            status[r] = kSkip;
        else
            status[r] = row_finite(b, r) ? kValid : kNonfinite;
    }
}

// ---------------------------------------------------------------------------------------------
// Moments: rows of one column tile into per-group partials ls/lq/lp (stride T per group).

struct DecodeHalfTable {
    using raw_type = std::uint16_t;
    const float* table;
    VSTORE_INLINE float operator()(std::uint16_t b) const noexcept { return table[b]; }
};

struct DecodeBf16 {
    using raw_type = std::uint16_t;
    VSTORE_INLINE float operator()(std::uint16_t b) const noexcept {
        return bits_to_float(static_cast<std::uint32_t>(b) << 16);
    }
};

struct DecodeF32 {
    using raw_type = float;
    VSTORE_INLINE float operator()(float v) const noexcept { return v; }
};

// Rows are read in short segments (one tile wide) a whole row apart, which hardware prefetchers
// follow poorly; the loops prefetch the segment kPrefetchRows rows ahead.
constexpr std::int64_t kPrefetchRows = 4;

VSTORE_INLINE void prefetch_span(const void* p, std::int64_t bytes) noexcept {
#if defined(__GNUC__)
    const char* c = static_cast<const char*>(p);
    for (std::int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
#else
    (void)p;
    (void)bytes;
#endif
}

// Positive counts of a tile are kept as int32 (half the memory traffic of int64) and added to the
// int64 output after at most kRowChunk rows, so they never overflow.
constexpr std::int64_t kRowChunk = std::int64_t{1} << 30;

struct TileArgs {
    const std::int32_t* groups;
    const std::uint8_t* status;
    std::int64_t r0;  // rows [r0, r1) of the block
    std::int64_t r1;
    std::int64_t ld;  // row length of the block, in values
    std::int64_t c0;  // first column of the tile
    std::int64_t w;   // tile width
    std::int64_t T;   // partial stride per group (>= w)
    double* ls;
    double* lq;
    std::int32_t* lp;
};

template <class Decode>
VSTORE_INLINE void moments_tile_generic(const typename Decode::raw_type* __restrict data, const TileArgs& a,
                                        Decode decode) noexcept {
    const std::int64_t w = a.w;
    for (std::int64_t r = a.r0; r < a.r1; ++r) {
        if (a.status[r] != kValid) continue;
        const typename Decode::raw_type* __restrict src = data + r * a.ld + a.c0;
        if (r + kPrefetchRows < a.r1) prefetch_span(src + kPrefetchRows * a.ld, w * sizeof(*src));
        const std::int64_t off = static_cast<std::int64_t>(a.groups[r]) * a.T;
        double* __restrict s = a.ls + off;
        double* __restrict q = a.lq + off;
        std::int32_t* __restrict p = a.lp + off;
        for (std::int64_t j = 0; j < w; ++j) {
            const double x = static_cast<double>(decode(src[j]));
            s[j] += x;
            q[j] += x * x;
            p[j] += x > 0.0 ? 1 : 0;
        }
    }
}

void moments_tile_portable(const BlockRef& b, const TileArgs& a) noexcept {
    switch (b.dtype) {
        case RawDtype::float16:
            moments_tile_generic(static_cast<const std::uint16_t*>(b.data), a,
                                 DecodeHalfTable{half_table().data()});
            break;
        case RawDtype::bfloat16:
            moments_tile_generic(static_cast<const std::uint16_t*>(b.data), a, DecodeBf16{});
            break;
        case RawDtype::float32:
            moments_tile_generic(static_cast<const float*>(b.data), a, DecodeF32{});
            break;
    }
}

#if VSTORE_X86 && defined(__GNUC__)
#define VSTORE_HAVE_AVX2_PATH 1

__attribute__((target("avx2,f16c"))) void moments_tile_f16_avx2(const std::uint16_t* __restrict data,
                                                                const TileArgs& a) noexcept {
    const std::int64_t w = a.w;
    const std::int64_t w8 = w & ~std::int64_t{7};
    const __m256 zero = _mm256_setzero_ps();
    for (std::int64_t r = a.r0; r < a.r1; ++r) {
        if (a.status[r] != kValid) continue;
        const std::uint16_t* __restrict src = data + r * a.ld + a.c0;
        if (r + kPrefetchRows < a.r1) prefetch_span(src + kPrefetchRows * a.ld, w * 2);
        const std::int64_t off = static_cast<std::int64_t>(a.groups[r]) * a.T;
        double* __restrict s = a.ls + off;
        double* __restrict q = a.lq + off;
        std::int32_t* __restrict p = a.lp + off;
        std::int64_t j = 0;
        for (; j < w8; j += 8) {
            const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
            const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
            const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
            _mm256_storeu_pd(s + j, _mm256_add_pd(_mm256_loadu_pd(s + j), lo));
            _mm256_storeu_pd(s + j + 4, _mm256_add_pd(_mm256_loadu_pd(s + j + 4), hi));
            _mm256_storeu_pd(q + j, _mm256_add_pd(_mm256_loadu_pd(q + j), _mm256_mul_pd(lo, lo)));
            _mm256_storeu_pd(q + j + 4, _mm256_add_pd(_mm256_loadu_pd(q + j + 4), _mm256_mul_pd(hi, hi)));
            // (f > 0) as 8 x int32 masks of all ones (-1), subtracted from the counts.
            const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(f, zero, _CMP_GT_OQ));
            __m256i* pv = reinterpret_cast<__m256i*>(p + j);
            _mm256_storeu_si256(pv, _mm256_sub_epi32(_mm256_loadu_si256(pv), gt));
        }
        for (; j < w; ++j) {
            const double x = static_cast<double>(_cvtsh_ss(src[j]));
            s[j] += x;
            q[j] += x * x;
            p[j] += x > 0.0 ? 1 : 0;
        }
    }
}

// bfloat16 and float32 need no special instructions: the generic loop, compiled for AVX2.
__attribute__((target("avx2"))) void moments_tile_bf16_avx2(const std::uint16_t* __restrict data,
                                                           const TileArgs& a) noexcept {
    moments_tile_generic(data, a, DecodeBf16{});
}

__attribute__((target("avx2"))) void moments_tile_f32_avx2(const float* __restrict data,
                                                          const TileArgs& a) noexcept {
    moments_tile_generic(data, a, DecodeF32{});
}

__attribute__((target("avx2,f16c"))) void decode_f16_f16c(const std::uint16_t* __restrict src, std::int64_t n,
                                                          float* __restrict out) noexcept {
    std::int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
    for (; j < n; ++j) out[j] = _cvtsh_ss(src[j]);
}

__attribute__((target("avx2,f16c"))) void keys_f32_f16c(const float* __restrict src, std::int64_t n,
                                                        std::uint16_t* __restrict out) noexcept {
    alignas(16) std::uint16_t h[8];
    std::int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m128i v = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_store_si128(reinterpret_cast<__m128i*>(h), v);
        for (int i = 0; i < 8; ++i) out[j + i] = order_key16(h[i]);
    }
    for (; j < n; ++j) out[j] = order_key16(float_to_half(src[j]));
}
#else
#define VSTORE_HAVE_AVX2_PATH 0
#endif

void moments_tile(const BlockRef& b, const TileArgs& a, bool simd) noexcept {
#if VSTORE_HAVE_AVX2_PATH
    if (simd) {
        switch (b.dtype) {
            case RawDtype::float16:
                moments_tile_f16_avx2(static_cast<const std::uint16_t*>(b.data), a);
                return;
            case RawDtype::bfloat16:
                moments_tile_bf16_avx2(static_cast<const std::uint16_t*>(b.data), a);
                return;
            case RawDtype::float32:
                moments_tile_f32_avx2(static_cast<const float*>(b.data), a);
                return;
        }
    }
#else
    (void)simd;
#endif
    moments_tile_portable(b, a);
}

void keys_of(const void* data, RawDtype dtype, std::int64_t n, std::uint16_t* out, bool simd) noexcept {
    if (dtype == RawDtype::float32) {
        const float* src = static_cast<const float*>(data);
#if VSTORE_HAVE_AVX2_PATH
        if (simd) {
            keys_f32_f16c(src, n, out);
            return;
        }
#else
        (void)simd;
#endif
        for (std::int64_t j = 0; j < n; ++j) out[j] = order_key16(float_to_half(src[j]));
        return;
    }
    const std::uint16_t* src = static_cast<const std::uint16_t*>(data);
    for (std::int64_t j = 0; j < n; ++j) out[j] = order_key16(src[j]);
}

std::int64_t value_size(RawDtype dtype) noexcept { return dtype == RawDtype::float32 ? 4 : 2; }

// Tile width: wide enough for long contiguous row segments, narrow enough to give every thread
// a few tiles. A multiple of 16 so SIMD loops have no tail except at the block's last column.
std::int64_t tile_width(std::int64_t cols, int nt, std::int64_t widest, std::int64_t narrowest) noexcept {
    std::int64_t T = widest;
    while (T > narrowest && (cols + T - 1) / T < 2 * static_cast<std::int64_t>(nt)) T /= 2;
    return std::max<std::int64_t>(1, std::min(T, cols));
}

}  // namespace

// -------------------------------------------------------------------------------------------------
// Public functions.

bool has_f16c() noexcept {
    static const bool value = detect_f16c();
    return value;
}

int openmp_threads() noexcept {
#ifdef _OPENMP
    return std::max(1, omp_get_max_threads());
#else
    return 1;
#endif
}

float half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1Fu;
    std::uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0) {
        if (mantissa == 0) return bits_to_float(sign);
        // Subnormal: normalise the mantissa.
        std::uint32_t e = 113;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            --e;
        }
        return bits_to_float(sign | (e << 23) | ((mantissa & 0x3FFu) << 13));
    }
    if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

std::uint16_t float_to_half(float value) noexcept {
    const std::uint32_t x = float_to_bits(value);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) {  // Inf or NaN
        if (ax == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
        return static_cast<std::uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    }
    if (ax >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: rounds to Inf
    if (ax < 0x38800000u) {                                                     // below 2^-14: subnormal half
        if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);        // <= 2^-25: rounds to 0
        const std::uint32_t e = ax >> 23;
        const std::uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
        const std::uint32_t shift = 126 - e;  // in [14, 24]
        std::uint32_t h = m >> shift;
        const std::uint32_t rem = m & ((1u << shift) - 1u);
        const std::uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) ++h;
        return static_cast<std::uint16_t>(sign | h);
    }
    std::uint32_t h = (ax - 0x38000000u) >> 13;  // rebias the exponent (127 -> 15)
    const std::uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
    return static_cast<std::uint16_t>(sign | h);
}

void decode(const void* data, RawDtype dtype, std::int64_t count, float* out) noexcept {
    if (count <= 0) return;
    switch (dtype) {
        case RawDtype::float16: {
            const std::uint16_t* src = static_cast<const std::uint16_t*>(data);
#if VSTORE_HAVE_AVX2_PATH
            if (has_f16c()) {
                decode_f16_f16c(src, count, out);
                return;
            }
#endif
            const float* table = half_table().data();
            for (std::int64_t j = 0; j < count; ++j) out[j] = table[src[j]];
            return;
        }
        case RawDtype::bfloat16: {
            const std::uint16_t* src = static_cast<const std::uint16_t*>(data);
            for (std::int64_t j = 0; j < count; ++j) out[j] = bits_to_float(static_cast<std::uint32_t>(src[j]) << 16);
            return;
        }
        case RawDtype::float32:
            std::memcpy(out, data, static_cast<std::size_t>(count) * sizeof(float));
            return;
    }
}

void histogram_keys(const void* data, RawDtype dtype, std::int64_t count, std::uint16_t* out) noexcept {
    if (count <= 0) return;
    keys_of(data, dtype, count, out, has_f16c());
}

void accumulate_moments(const BlockRef& b, const MomentsRef& acc, int threads) noexcept {
    const std::int64_t rows = b.rows;
    const std::int64_t cols = b.cols;
    const std::int64_t G = acc.n_groups;
    if (rows <= 0 || G <= 0) return;
    int nt = resolve_threads(threads);
    if (rows * cols < kParallelMinValues) nt = 1;
    if (b.dtype == RawDtype::float16) {
        detail::accumulate_moments_f16(b, acc, nt, has_f16c());
        return;
    }

    std::vector<std::uint8_t> status(static_cast<std::size_t>(rows));
    row_status(b, status.data(), nt);

    std::vector<std::uint8_t> present(static_cast<std::size_t>(G), 0);
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int32_t g = b.groups[r];
        if (status[r] == kValid) {
            ++acc.count[g];
            present[g] = 1;
        } else if (status[r] == kNonfinite) {
            ++acc.nonfinite[g];
        }
    }
    if (cols <= 0) return;

    // Partials of all groups for one tile stay near 1.5 MiB or less: narrower tiles for many groups.
    std::int64_t widest = 512;
    while (widest > 16 && G * widest * 20 > (std::int64_t{3} << 19)) widest /= 2;
    const std::int64_t T = tile_width(cols, nt, widest, std::min<std::int64_t>(64, widest));
    const std::int64_t n_tiles = (cols + T - 1) / T;
    nt = static_cast<int>(std::min<std::int64_t>(nt, n_tiles));
    const bool simd = has_f16c();
    const std::uint8_t* st = status.data();
    const std::uint8_t* pres = present.data();

VSTORE_OMP(omp parallel num_threads(nt) if (nt > 1))
    {
        std::vector<double> ls(static_cast<std::size_t>(G * T));
        std::vector<double> lq(static_cast<std::size_t>(G * T));
        std::vector<std::int32_t> lp(static_cast<std::size_t>(G * T));
VSTORE_OMP(omp for schedule(dynamic, 1))
        for (std::int64_t t = 0; t < n_tiles; ++t) {
            const std::int64_t c0 = t * T;
            const std::int64_t w = std::min(T, cols - c0);
            std::fill(ls.begin(), ls.end(), 0.0);
            std::fill(lq.begin(), lq.end(), 0.0);
            for (std::int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
                std::fill(lp.begin(), lp.end(), 0);
                const TileArgs args{b.groups, st, r0, std::min(rows, r0 + kRowChunk), cols, c0, w, T,
                                    ls.data(), lq.data(), lp.data()};
                moments_tile(b, args, simd);
                for (std::int64_t g = 0; g < G; ++g) {
                    if (!pres[g]) continue;
                    std::int64_t* npos = acc.npos + g * cols + c0;
                    const std::int32_t* p = lp.data() + g * T;
                    for (std::int64_t j = 0; j < w; ++j) npos[j] += p[j];
                }
            }
            // The sums' partials go to the output once, after all rows: the order every backend uses.
            for (std::int64_t g = 0; g < G; ++g) {
                if (!pres[g]) continue;
                double* sum = acc.sum + g * cols + c0;
                double* sumsq = acc.sumsq + g * cols + c0;
                const double* s = ls.data() + g * T;
                const double* q = lq.data() + g * T;
                for (std::int64_t j = 0; j < w; ++j) {
                    sum[j] += s[j];
                    sumsq[j] += q[j];
                }
            }
        }
    }
}

void accumulate_histogram(const BlockRef& b, std::int64_t n_groups, std::int64_t neuron_start,
                          std::int64_t n_hist_neurons, std::uint32_t* hist, int threads) noexcept {
    const std::int64_t rows = b.rows;
    const std::int64_t M = n_hist_neurons;
    if (rows <= 0 || n_groups <= 0) return;
    int nt = resolve_threads(threads);
    if (rows * b.cols < kParallelMinValues) nt = 1;

    std::vector<std::uint8_t> status(static_cast<std::size_t>(rows));
    row_status(b, status.data(), nt);
    if (M <= 0) return;

    const std::int64_t T = tile_width(M, nt, 64, 8);
    const std::int64_t n_tiles = (M + T - 1) / T;
    nt = static_cast<int>(std::min<std::int64_t>(nt, n_tiles));
    const bool simd = has_f16c();
    const std::uint8_t* st = status.data();
    const std::int64_t vsize = value_size(b.dtype);
    const char* base = static_cast<const char*>(b.data);

VSTORE_OMP(omp parallel num_threads(nt) if (nt > 1))
    {
        std::vector<std::uint16_t> keys(static_cast<std::size_t>(T));
VSTORE_OMP(omp for schedule(dynamic, 1))
        for (std::int64_t t = 0; t < n_tiles; ++t) {
            const std::int64_t j0 = t * T;
            const std::int64_t w = std::min(T, M - j0);
            for (std::int64_t r = 0; r < rows; ++r) {
                if (st[r] != kValid) continue;
                const char* src = base + (r * b.cols + neuron_start + j0) * vsize;
                keys_of(src, b.dtype, w, keys.data(), simd);
                std::uint32_t* h = hist + (static_cast<std::int64_t>(b.groups[r]) * M + j0) * kHistogramBins;
                for (std::int64_t j = 0; j < w; ++j) ++h[j * kHistogramBins + keys[static_cast<std::size_t>(j)]];
            }
        }
    }
}

#if VSTORE_HAVE_AVX2_PATH
namespace {
__attribute__((target("avx2"))) std::uint64_t read_probe_avx2(const unsigned char* p, std::int64_t n32) noexcept {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    std::int64_t i = 0;
    for (; i + 4 <= n32; i += 4) {
        a = _mm256_xor_si256(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i)));
        b = _mm256_xor_si256(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i + 32)));
        c = _mm256_xor_si256(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i + 64)));
        d = _mm256_xor_si256(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i + 96)));
    }
    for (; i < n32; ++i) a = _mm256_xor_si256(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i)));
    alignas(32) std::uint64_t w[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d)));
    return w[0] ^ w[1] ^ w[2] ^ w[3];
}
}  // namespace
#endif

std::uint64_t read_probe(const void* data, std::int64_t bytes) noexcept {
    const auto* p = static_cast<const unsigned char*>(data);
    std::uint64_t x = 0;
    std::int64_t done = 0;
#if VSTORE_HAVE_AVX2_PATH
    if (has_f16c()) {
        x = read_probe_avx2(p, bytes / 32);
        done = bytes / 32 * 32;
    }
#endif
    for (; done + 8 <= bytes; done += 8) {
        std::uint64_t w;
        std::memcpy(&w, p + done, 8);
        x ^= w;
    }
    if (done < bytes) {
        std::uint64_t w = 0;
        std::memcpy(&w, p + done, static_cast<std::size_t>(bytes - done));
        x ^= w;
    }
    return x;
}

std::int64_t select_top_k(const double* scores, std::int64_t n, std::int64_t k, std::int64_t* out) {
    if (n <= 0 || k <= 0) return 0;
    if (k <= 64 && k * 64 <= n) {
        // Few of many: one pass keeping the best k in order; most scores fail the first comparison.
        // Scanning in index order, a later equal score never displaces an earlier one.
        std::int64_t m = 0;
        std::vector<double> best(static_cast<std::size_t>(k));
        for (std::int64_t i = 0; i < n; ++i) {
            const double v = scores[i];
            if (!std::isfinite(v) || (m == k && !(v > best[static_cast<std::size_t>(k - 1)]))) continue;
            std::int64_t j = m < k ? m++ : k - 1;
            while (j > 0 && v > best[static_cast<std::size_t>(j - 1)]) {
                best[static_cast<std::size_t>(j)] = best[static_cast<std::size_t>(j - 1)];
                out[j] = out[j - 1];
                --j;
            }
            best[static_cast<std::size_t>(j)] = v;
            out[j] = i;
        }
        return m;
    }
    std::vector<std::int64_t> idx;
    idx.reserve(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i)
        if (std::isfinite(scores[i])) idx.push_back(i);
    const std::int64_t m = static_cast<std::int64_t>(idx.size());
    const std::int64_t kk = std::min(k, m);
    if (kk == 0) return 0;
    // A strict total order: larger score first, then lower index.
    const auto better = [scores](std::int64_t a, std::int64_t b) {
        return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    };
    if (kk < m) std::nth_element(idx.begin(), idx.begin() + kk, idx.end(), better);
    std::sort(idx.begin(), idx.begin() + kk, better);
    std::copy(idx.begin(), idx.begin() + kk, out);
    return kk;
}

}  // namespace vstore
