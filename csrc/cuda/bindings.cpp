// vstore._cuda: the pybind11 bindings of the CUDA statistics kernel (csrc/cuda/moments.*). The only
// file of this module that includes pybind11; compiled by the host compiler, it sees no CUDA header.
// Private: vstore.cuda_stats wraps it, validates the tensors (dtype, shape, device, contiguity) and
// documents the API. Pointers come in as integers (e.g. torch.Tensor.data_ptr()), so this module
// does not compile or link against PyTorch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "moments.hpp"

#ifndef VSTORE_VERSION
#define VSTORE_VERSION "0+unknown"
#endif

namespace py = pybind11;

namespace {

template <class T>
T* as_ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

vstore::cuda::MomentsArgs make_args(std::uintptr_t acts, int dtype, std::int64_t rows, std::int64_t cols,
                                    std::uintptr_t groups, std::int64_t n_groups, std::uintptr_t count,
                                    std::uintptr_t sum, std::uintptr_t sumsq, std::uintptr_t npos,
                                    std::uintptr_t nonfinite, int device, std::uintptr_t stream) {
    require(dtype >= 0 && dtype <= 2,
            "dtype: expected 0 (float16), 1 (bfloat16) or 2 (float32), got " + std::to_string(dtype));
    require(rows >= 0 && cols >= 0 && n_groups >= 0,
            "rows, cols, n_groups: expected >= 0, got " + std::to_string(rows) + ", " + std::to_string(cols) +
                ", " + std::to_string(n_groups));
    require(device >= 0, "device: expected a CUDA device ordinal >= 0, got " + std::to_string(device));
    if (rows > 0 && n_groups > 0) {
        require(groups != 0 && count != 0, "groups, count: expected device pointers, got 0");
        require(cols == 0 || (acts != 0 && sum != 0 && sumsq != 0 && npos != 0 && nonfinite != 0),
                "acts, sum, sumsq, npos, nonfinite: expected device pointers, got 0");
    }
    return vstore::cuda::MomentsArgs{as_ptr<const void>(acts),
                                     static_cast<vstore::cuda::Dtype>(dtype),
                                     rows,
                                     cols,
                                     as_ptr<const std::int32_t>(groups),
                                     n_groups,
                                     as_ptr<std::int64_t>(count),
                                     as_ptr<double>(sum),
                                     as_ptr<double>(sumsq),
                                     as_ptr<std::int64_t>(npos),
                                     as_ptr<std::int64_t>(nonfinite),
                                     device,
                                     as_ptr<void>(stream)};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "vstore's CUDA statistics kernel (private; use vstore.cuda_stats)";
    m.def(
        "accumulate_moments",
        [](std::uintptr_t acts, int dtype, std::int64_t rows, std::int64_t cols, std::uintptr_t groups,
           std::int64_t n_groups, std::uintptr_t count, std::uintptr_t sum, std::uintptr_t sumsq,
           std::uintptr_t npos, std::uintptr_t nonfinite, int device, std::uintptr_t stream) {
            const auto args = make_args(acts, dtype, rows, cols, groups, n_groups, count, sum, sumsq, npos,
                                        nonfinite, device, stream);
            int code = 0;
            {
                py::gil_scoped_release release;
                code = vstore::cuda::accumulate_moments(args);
            }
            if (code != 0)
                throw std::runtime_error("CUDA error " + std::to_string(code) + " launching the moments kernel: " +
                                         vstore::cuda::error_string(code));
        },
        py::arg("acts"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("groups"),
        py::arg("n_groups"), py::arg("count"), py::arg("sum"), py::arg("sumsq"), py::arg("npos"),
        py::arg("nonfinite"), py::arg("device"), py::arg("stream"),
        "Enqueues the per-group moments update on `stream` (device pointers as integers).");
    m.def(
        "emulate_moments",
        [](std::uintptr_t acts, int dtype, std::int64_t rows, std::int64_t cols, std::uintptr_t groups,
           std::int64_t n_groups, std::uintptr_t count, std::uintptr_t sum, std::uintptr_t sumsq,
           std::uintptr_t npos, std::uintptr_t nonfinite, int multiprocessors) {
            const auto args = make_args(acts, dtype, rows, cols, groups, n_groups, count, sum, sumsq, npos,
                                        nonfinite, 0, 0);
            require(multiprocessors >= 1, "multiprocessors: expected >= 1, got " + std::to_string(multiprocessors));
            py::gil_scoped_release release;
            vstore::cuda::emulate_moments(args, multiprocessors);
        },
        py::arg("acts"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("groups"),
        py::arg("n_groups"), py::arg("count"), py::arg("sum"), py::arg("sumsq"), py::arg("npos"),
        py::arg("nonfinite"), py::arg("multiprocessors"),
        "Runs the kernel's grid on the host, thread by thread, on HOST pointers (a test of its logic).");
    m.def(
        "vector_width",
        [](std::uintptr_t acts, int dtype, std::int64_t cols) {
            vstore::cuda::MomentsArgs a{};
            a.acts = as_ptr<const void>(acts);
            a.dtype = static_cast<vstore::cuda::Dtype>(dtype);
            a.cols = cols;
            return vstore::cuda::vector_width(a);
        },
        py::arg("acts"), py::arg("dtype"), py::arg("cols"), "Values per thread and load the kernel uses for this pointer and width.");
    m.def("runtime_version", &vstore::cuda::runtime_version, "CUDA runtime version built against (e.g. 13000).");
    m.def("driver_version", &vstore::cuda::driver_version, "CUDA driver version (0: no driver).");
    m.def("device_count", &vstore::cuda::device_count, "CUDA devices visible (0: none or no driver).");
    m.def("version", []() { return std::string(VSTORE_VERSION); }, "vstore version this module was built for.");
}
