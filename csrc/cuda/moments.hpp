// The CUDA statistics kernel of vstore: per-group moments of a float16/bfloat16 (or float32) activation
// block that lives on the GPU, read once. Plain C++17 declarations in namespace vstore::cuda: no CUDA, no Python
// header here, so csrc/cuda/bindings.cpp (pybind11, host compiler) can include it.
//
// Semantics are those of vstore.stats.Moments after vstore.kernels.accumulate_moments (the CPU
// kernels plus the wrapper's per-neuron NaN/Inf pass), produced directly:
//   * a row whose group id is -1 is skipped (and so is any id outside [0, n_groups): nothing outside
//     the accumulators is ever written; the Python wrapper rejects such ids before calling in);
//   * every other row adds 1 to count[g];
//   * per neuron, a finite value x adds x to sum[g, n], x*x to sumsq[g, n] (float64, exact square)
//     and 1 to npos[g, n] if x > 0; a NaN or +-Inf adds 1 to nonfinite[g, n] and nothing else.
// Summation order differs from the CPU kernels (rows are split over thread blocks and partials are
// added with float64 atomics), so sums agree to float64 rounding and counts exactly.
#pragma once

#include <cstdint>

namespace vstore::cuda {

/// Storage type of the activations (the codes of vstore::RawDtype of the CPU kernels).
enum class Dtype : int { float16 = 0, bfloat16 = 1, float32 = 2 };

/// Raw device pointers and sizes of one call. All arrays C order, on `device`:
/// acts (rows, cols) of `dtype`, groups (rows,) int32, count (n_groups,) int64,
/// sum/sumsq (n_groups, cols) float64, npos/nonfinite (n_groups, cols) int64.
struct MomentsArgs {
    const void* acts;
    Dtype dtype;
    std::int64_t rows;
    std::int64_t cols;
    const std::int32_t* groups;
    std::int64_t n_groups;
    std::int64_t* count;
    double* sum;
    double* sumsq;
    std::int64_t* npos;
    std::int64_t* nonfinite;
    int device;    ///< CUDA device ordinal the pointers belong to
    void* stream;  ///< cudaStream_t to launch on (nullptr: the legacy default stream)
};

/// Enqueues the update of the accumulators on `args.stream` (asynchronous; no synchronisation).
/// Returns 0 on success, else the cudaError_t code of the failed launch (see error_string).
int accumulate_moments(const MomentsArgs& args) noexcept;

/// Runs the kernel's exact grid on the HOST, thread by thread (plain adds for the atomics), on host
/// pointers, as a device with `multiprocessors` SMs would split it: the test of the kernel's logic
/// on machines without a GPU. `args.device` and `args.stream` are ignored. Returns 0.
int emulate_moments(const MomentsArgs& args, int multiprocessors) noexcept;

/// The vector width (values per thread and load) the kernel uses for these pointers and sizes.
int vector_width(const MomentsArgs& args) noexcept;

/// Human-readable message of a cudaError_t code.
const char* error_string(int code) noexcept;

/// CUDA runtime version this module was built against (e.g. 13000), and the driver's (0: none).
int runtime_version() noexcept;
int driver_version() noexcept;

/// Number of CUDA devices visible (0 when there is no driver or no device).
int device_count() noexcept;

}  // namespace vstore::cuda
