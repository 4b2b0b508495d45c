// The fused CUDA moments kernel (see moments.hpp for the semantics).
//
// Layout of the work: thread t of block (bx, by) owns VEC adjacent columns (one 16-byte load of eight
// 16-bit or four 32-bit values where alignment allows) and walks the rows of row chunk `by` in order,
// keeping float64/uint32 partials in registers for the group of the current run of rows. When the
// group changes (rows of one example share a group, so runs are long) or the chunk ends, the partials
// are added to the accumulators with atomics. A warp reads 32 consecutive vectors of one row:
// coalesced. The thread of column vector 0 also counts the rows of each run, so the block is read once.
//
// The per-thread body is a __host__ __device__ function: emulate_moments runs the same grid, thread by
// thread, on the host (plain adds for atomics), so the indexing, chunking, run and NaN logic is
// tested on machines without a GPU (tests/test_cuda.py).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moments.hpp"

namespace vstore::cuda {
namespace {

constexpr int kThreads = 128;                  // threads per block, along the columns
constexpr int kRowUnroll = 4;                  // rows whose loads are issued together
constexpr std::int64_t kMinRowsPerChunk = 64;  // keeps atomics to <= 1 per 64 values per field
constexpr std::int64_t kMaxRowChunks = 65535;  // gridDim.y limit
constexpr unsigned kMaxRun = 1u << 30;         // flush before the uint32 partial counters overflow
constexpr int kMaxDevices = 64;

using u64 = unsigned long long;

// The raw bits of a dtype: 16-bit for float16/bfloat16, 32-bit for float32.
template <Dtype D>
using Raw = std::conditional_t<D == Dtype::float32, std::uint32_t, std::uint16_t>;

template <Dtype D, int VEC>
struct alignas(sizeof(Raw<D>) * VEC) Pack {
    Raw<D> v[VEC];
};

__host__ __device__ __forceinline__ float float_of_bits(std::uint32_t bits) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

template <Dtype D>
__host__ __device__ __forceinline__ float to_float(Raw<D> bits) {
    if constexpr (D == Dtype::float32) {
        return float_of_bits(bits);
    } else if constexpr (D == Dtype::bfloat16) {
        return float_of_bits(static_cast<std::uint32_t>(bits) << 16);
    } else {
        return __half2float(__ushort_as_half(bits));
    }
}

template <Dtype D>
__host__ __device__ __forceinline__ bool finite_bits(Raw<D> bits) {
    // an all-ones exponent is +-Inf or NaN
    if constexpr (D == Dtype::float32) return (bits & 0x7F800000u) != 0x7F800000u;
    if constexpr (D == Dtype::bfloat16) return (bits & 0x7F80u) != 0x7F80u;
    return (bits & 0x7C00u) != 0x7C00u;
}

template <class T>
__host__ __device__ __forceinline__ void add_to(T* target, T value) {
#ifdef __CUDA_ARCH__
    atomicAdd(target, value);
#else
    *target += value;  // the host emulation runs one thread at a time
#endif
}

__host__ __device__ __forceinline__ std::int32_t load_group(const std::int32_t* groups, std::int64_t row) {
#ifdef __CUDA_ARCH__
    return __ldg(groups + row);
#else
    return groups[row];
#endif
}

// What every thread of one launch reads and writes.
struct Params {
    const void* acts;
    const std::int32_t* groups;
    std::int64_t rows, cols, rows_per_chunk, n_groups;
    u64* count;
    double* sum;
    double* sumsq;
    u64* npos;
    u64* nonfinite;
};

// Per-thread partial statistics of one run of rows of one group.
template <int VEC>
struct Partial {
    double s[VEC];
    double q[VEC];
    unsigned p[VEC];
    unsigned nf[VEC];
    unsigned rows;

    __host__ __device__ __forceinline__ void clear() {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            s[j] = 0.0;
            q[j] = 0.0;
            p[j] = 0;
            nf[j] = 0;
        }
        rows = 0;
    }

    template <Dtype D>
    __host__ __device__ __forceinline__ void add(const Pack<D, VEC>& x) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const Raw<D> b = x.v[j];
            if (finite_bits<D>(b)) {
                const double v = static_cast<double>(to_float<D>(b));  // exact
                s[j] += v;
                q[j] = fma(v, v, q[j]);  // v*v is exact in float64, so fma == mul + add
                p[j] += v > 0.0 ? 1u : 0u;
            } else {
                nf[j] += 1u;
            }
        }
        rows += 1;
    }

    __host__ __device__ __forceinline__ void flush(std::int32_t group, bool active, bool counts_rows,
                                                   std::int64_t col0, const Params& p_) {
        if (group < 0 || rows == 0) return;
        if (active) {
            const std::int64_t base = static_cast<std::int64_t>(group) * p_.cols + col0;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (q[j] != 0.0) {  // q == 0: every value was +-0 (s == 0 too), nothing to add
                    add_to(p_.sum + base + j, s[j]);
                    add_to(p_.sumsq + base + j, q[j]);
                }
                if (p[j]) add_to(p_.npos + base + j, static_cast<u64>(p[j]));
                if (nf[j]) add_to(p_.nonfinite + base + j, static_cast<u64>(nf[j]));
            }
        }
        if (counts_rows) add_to(p_.count + group, static_cast<u64>(rows));
        clear();
    }
};

// The work of thread `tx` of block (bx, by).
template <int VEC, Dtype D>
__host__ __device__ __forceinline__ void moments_thread(const Params& p, std::int64_t bx, std::int64_t by, int tx) {
    const Raw<D>* __restrict__ acts = static_cast<const Raw<D>*>(p.acts);
    const std::int64_t vec_cols = p.cols / VEC;
    const std::int64_t vc = bx * kThreads + tx;
    const bool active = vc < vec_cols;
    const bool counts_rows = vc == 0;  // with cols == 0 this thread only counts
    if (!active && !counts_rows) return;
    const std::int64_t col0 = vc * VEC;
    const std::int64_t r0 = by * p.rows_per_chunk;
    const std::int64_t r1 = r0 + p.rows_per_chunk < p.rows ? r0 + p.rows_per_chunk : p.rows;

    Partial<VEC> part;
    part.clear();
    std::int32_t current = -1;
    for (std::int64_t r = r0; r < r1; r += kRowUnroll) {
        Pack<D, VEC> x[kRowUnroll];
        std::int32_t g[kRowUnroll];
#pragma unroll
        for (int k = 0; k < kRowUnroll; ++k) {  // issue the loads of several rows before using any
            const std::int64_t row = r + k;
            g[k] = row < r1 ? load_group(p.groups, row) : -1;
            if (g[k] >= p.n_groups) g[k] = -1;  // never write outside the accumulators
            if (g[k] >= 0 && active) x[k] = *reinterpret_cast<const Pack<D, VEC>*>(acts + row * p.cols + col0);
        }
#pragma unroll
        for (int k = 0; k < kRowUnroll; ++k) {
            if (g[k] < 0) continue;
            if (g[k] != current || part.rows == kMaxRun) {
                part.flush(current, active, counts_rows, col0, p);
                current = g[k];
            }
            if (active) {
                part.template add<D>(x[k]);
            } else {
                part.rows += 1;
            }
        }
    }
    part.flush(current, active, counts_rows, col0, p);
}

template <int VEC, Dtype D>
__global__ void __launch_bounds__(kThreads) moments_kernel(const Params p) {
    moments_thread<VEC, D>(p, blockIdx.x, blockIdx.y, static_cast<int>(threadIdx.x));
}

int multiprocessors(int device) {
    static int cache[kMaxDevices] = {0};  // a benign race: every writer stores the same value
    if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
        (void)cudaGetLastError();
        sms = 108;
    }
    if (device >= 0 && device < kMaxDevices) cache[device] = sms;
    return sms;
}

// The grid of one call: column blocks x row chunks, about 8 blocks per multiprocessor.
struct Plan {
    std::int64_t col_blocks, chunks, rows_per_chunk;
};

Plan plan(const MomentsArgs& a, int vec, int sms) {
    const std::int64_t vec_cols = std::max<std::int64_t>(a.cols / vec, 1);
    const std::int64_t col_blocks = (vec_cols + kThreads - 1) / kThreads;
    const std::int64_t target = static_cast<std::int64_t>(std::max(sms, 1)) * 8;
    const std::int64_t most = std::clamp<std::int64_t>((a.rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk, 1,
                                                       kMaxRowChunks);
    std::int64_t chunks = std::clamp<std::int64_t>((target + col_blocks - 1) / col_blocks, 1, most);
    const std::int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
    chunks = (a.rows + rows_per_chunk - 1) / rows_per_chunk;
    return {col_blocks, chunks, rows_per_chunk};
}

Params params(const MomentsArgs& a, const Plan& pl) {
    return {a.acts, a.groups, a.rows, a.cols, pl.rows_per_chunk, a.n_groups, reinterpret_cast<u64*>(a.count),
            a.sum, a.sumsq, reinterpret_cast<u64*>(a.npos), reinterpret_cast<u64*>(a.nonfinite)};
}

template <int VEC, Dtype D>
int run(const MomentsArgs& a, cudaStream_t stream, int emulate_sms) {
    const Plan pl = plan(a, VEC, emulate_sms > 0 ? emulate_sms : multiprocessors(a.device));
    const Params p = params(a, pl);
    if (emulate_sms > 0) {  // the same grid on the host, one thread at a time
        for (std::int64_t by = 0; by < pl.chunks; ++by)
            for (std::int64_t bx = 0; bx < pl.col_blocks; ++bx)
                for (int tx = 0; tx < kThreads; ++tx) moments_thread<VEC, D>(p, bx, by, tx);
        return 0;
    }
    if (pl.col_blocks > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidConfiguration);
    const dim3 grid(static_cast<unsigned>(pl.col_blocks), static_cast<unsigned>(pl.chunks));
    moments_kernel<VEC, D><<<grid, kThreads, 0, stream>>>(p);
    return static_cast<int>(cudaGetLastError());
}

template <Dtype D>
int dispatch_width(const MomentsArgs& a, cudaStream_t stream, int emulate_sms) {
    switch (vector_width(a)) {
        case 8:
            if constexpr (D != Dtype::float32) return run<8, D>(a, stream, emulate_sms);
            break;
        case 4: return run<4, D>(a, stream, emulate_sms);
        case 2: return run<2, D>(a, stream, emulate_sms);
        default: break;
    }
    return run<1, D>(a, stream, emulate_sms);
}

int dispatch(const MomentsArgs& a, cudaStream_t stream, int emulate_sms) {
    switch (a.dtype) {
        case Dtype::float16: return dispatch_width<Dtype::float16>(a, stream, emulate_sms);
        case Dtype::bfloat16: return dispatch_width<Dtype::bfloat16>(a, stream, emulate_sms);
        case Dtype::float32: return dispatch_width<Dtype::float32>(a, stream, emulate_sms);
    }
    return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int vector_width(const MomentsArgs& a) noexcept {  // at most one 16-byte load per row and thread
    const auto address = reinterpret_cast<std::uintptr_t>(a.acts);
    const unsigned item = a.dtype == Dtype::float32 ? 4u : 2u;
    for (int w : {8, 4, 2})
        if (item * w <= 16 && a.cols % w == 0 && address % (item * static_cast<unsigned>(w)) == 0) return w;
    return 1;
}

int accumulate_moments(const MomentsArgs& a) noexcept {
    if (a.rows <= 0 || a.n_groups <= 0) return 0;  // nothing to add (ids must then all be -1)
    int previous = -1;
    cudaError_t err = cudaGetDevice(&previous);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (previous != a.device && (err = cudaSetDevice(a.device)) != cudaSuccess) return static_cast<int>(err);
    int code = dispatch(a, static_cast<cudaStream_t>(a.stream), 0);
    if (previous != a.device) {
        const cudaError_t restore = cudaSetDevice(previous);
        if (code == 0) code = static_cast<int>(restore);
    }
    return code;
}

int emulate_moments(const MomentsArgs& a, int multiprocessors) noexcept {
    if (a.rows <= 0 || a.n_groups <= 0) return 0;
    return dispatch(a, nullptr, std::max(multiprocessors, 1));
}

const char* error_string(int code) noexcept { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int runtime_version() noexcept {
    int v = 0;
    return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int driver_version() noexcept {
    int v = 0;
    return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int device_count() noexcept {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();  // clear the error of a machine without a driver or device
        return 0;
    }
    return n;
}

}  // namespace vstore::cuda
