// vstore._C: the pybind11 bindings of the native core (csrc/vstore/*). The only file that includes
// pybind11. Private: vstore.kernels wraps it, validates input and documents the API.
//
// Every function checks its arrays (dtype, C order, shape, group range) so that a direct caller can
// not make a kernel read or write out of bounds, then releases the GIL around the kernel loop.
// Arrays are taken without conversion: a wrong dtype or layout is an error, never a silent copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "vstore/kernels.hpp"
#include "vstore/topk.hpp"
#include "vstore/welch.hpp"

#ifndef VSTORE_VERSION
#define VSTORE_VERSION "0+unknown"
#endif

namespace py = pybind11;

namespace {

template <class T>
using carray = py::array_t<T, py::array::c_style>;

std::string shape_of(const py::array& a) {
    std::ostringstream out;
    out << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) out << (i ? ", " : "") << a.shape(i);
    out << (a.ndim() == 1 ? ",)" : ")");
    return out.str();
}

vstore::RawDtype parse_dtype(const std::string& name) {
    if (name == "float16") return vstore::RawDtype::float16;
    if (name == "bfloat16") return vstore::RawDtype::bfloat16;
    if (name == "float32") return vstore::RawDtype::float32;
    throw std::invalid_argument("dtype must be 'float16', 'bfloat16' or 'float32', got '" + name + "'");
}

// Checks that `a` is a C-contiguous native-endian array of the raw type of `dtype`.
void check_raw(const py::array& a, vstore::RawDtype dtype, const char* what) {
    char kind = 'f';
    py::ssize_t size = 2;
    const char* raw = "float16";
    if (dtype == vstore::RawDtype::bfloat16) {
        kind = 'u';
        raw = "uint16 (bfloat16 bits)";
    } else if (dtype == vstore::RawDtype::float32) {
        size = 4;
        raw = "float32";
    }
    const py::dtype dt = a.dtype();
    if (dt.kind() != kind || dt.itemsize() != size || dt.byteorder() == '>')
        throw std::invalid_argument(std::string(what) + ": expected raw dtype " + raw + ", got " +
                                    std::string(py::str(dt)));
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(what) + ": expected a C-contiguous array");
}

vstore::BlockRef block_ref(const py::array& block, const std::string& dtype_name,
                           const carray<std::int32_t>& groups, std::int64_t n_groups) {
    const vstore::RawDtype dtype = parse_dtype(dtype_name);
    if (block.ndim() != 2)
        throw std::invalid_argument("block: expected a 2-D (rows, neurons) array, got shape " + shape_of(block));
    check_raw(block, dtype, "block");
    if (groups.ndim() != 1 || groups.shape(0) != block.shape(0))
        throw std::invalid_argument("groups: expected shape (" + std::to_string(block.shape(0)) + ",), got " +
                                    shape_of(groups));
    const std::int32_t* g = groups.data();
    for (py::ssize_t r = 0; r < groups.shape(0); ++r)
        if (g[r] < -1 || g[r] >= n_groups)
            throw std::invalid_argument("groups: expected values in [-1, " + std::to_string(n_groups) + "), got " +
                                        std::to_string(g[r]) + " at row " + std::to_string(r));
    return vstore::BlockRef{block.data(), dtype, static_cast<std::int64_t>(block.shape(0)),
                            static_cast<std::int64_t>(block.shape(1)), g};
}

template <class T>
void check_shape(const carray<T>& a, std::initializer_list<py::ssize_t> expected, const char* what) {
    bool ok = a.ndim() == static_cast<py::ssize_t>(expected.size());
    std::ostringstream want;
    want << "(";
    py::ssize_t i = 0;
    for (py::ssize_t e : expected) {
        want << (i ? ", " : "") << e;
        if (ok && a.shape(i) != e) ok = false;
        ++i;
    }
    want << (expected.size() == 1 ? ",)" : ")");
    if (!ok)
        throw std::invalid_argument(std::string(what) + ": expected shape " + want.str() + ", got " + shape_of(a));
}

void accumulate_moments(const py::array& block, const std::string& dtype, const carray<std::int32_t>& groups,
                        carray<std::int64_t> count, carray<double> sum, carray<double> sumsq,
                        carray<std::int64_t> npos, carray<std::int64_t> nonfinite, int threads) {
    if (count.ndim() != 1) throw std::invalid_argument("count: expected a 1-D array, got shape " + shape_of(count));
    const py::ssize_t G = count.shape(0);
    const vstore::BlockRef b = block_ref(block, dtype, groups, G);
    const py::ssize_t N = block.shape(1);
    check_shape(sum, {G, N}, "sum");
    check_shape(sumsq, {G, N}, "sumsq");
    check_shape(npos, {G, N}, "npos");
    check_shape(nonfinite, {G}, "nonfinite");
    const vstore::MomentsRef acc{G, N, count.mutable_data(), sum.mutable_data(), sumsq.mutable_data(),
                                 npos.mutable_data(), nonfinite.mutable_data()};
    py::gil_scoped_release nogil;
    vstore::accumulate_moments(b, acc, threads);
}

void accumulate_histogram(const py::array& block, const std::string& dtype, const carray<std::int32_t>& groups,
                          carray<std::uint32_t> hist, std::int64_t neuron_start, int threads) {
    if (hist.ndim() != 3 || hist.shape(2) != vstore::kHistogramBins)
        throw std::invalid_argument("hist: expected shape (groups, neurons, 65536), got " + shape_of(hist));
    const vstore::BlockRef b = block_ref(block, dtype, groups, hist.shape(0));
    const std::int64_t M = hist.shape(1);
    if (neuron_start < 0 || neuron_start + M > b.cols)
        throw std::invalid_argument("neurons [" + std::to_string(neuron_start) + ", " +
                                    std::to_string(neuron_start + M) + ") of the histogram: expected within [0, " +
                                    std::to_string(b.cols) + ")");
    std::uint32_t* h = hist.mutable_data();
    py::gil_scoped_release nogil;
    vstore::accumulate_histogram(b, hist.shape(0), neuron_start, M, h, threads);
}

py::array_t<std::uint16_t> histogram_keys(const py::array& values, const std::string& dtype_name) {
    const vstore::RawDtype dtype = parse_dtype(dtype_name);
    check_raw(values, dtype, "values");
    py::array_t<std::uint16_t> out(std::vector<py::ssize_t>(values.shape(), values.shape() + values.ndim()));
    const std::int64_t n = values.size();
    const void* src = values.data();
    std::uint16_t* dst = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        vstore::histogram_keys(src, dtype, n, dst);
    }
    return out;
}

py::array_t<float> decode(const py::array& values, const std::string& dtype_name) {
    const vstore::RawDtype dtype = parse_dtype(dtype_name);
    check_raw(values, dtype, "values");
    py::array_t<float> out(std::vector<py::ssize_t>(values.shape(), values.shape() + values.ndim()));
    const std::int64_t n = values.size();
    const void* src = values.data();
    float* dst = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        vstore::decode(src, dtype, n, dst);
    }
    return out;
}

py::array_t<std::int64_t> select_top_k(const carray<double>& scores, std::int64_t k) {
    if (scores.ndim() != 1) throw std::invalid_argument("scores: expected a 1-D array, got shape " + shape_of(scores));
    if (k < 0) throw std::invalid_argument("k: expected >= 0, got " + std::to_string(k));
    const std::int64_t n = scores.shape(0);
    std::vector<std::int64_t> picked(static_cast<std::size_t>(std::min(k, n)));
    std::int64_t m = 0;
    {
        py::gil_scoped_release nogil;
        m = vstore::select_top_k(scores.data(), n, k, picked.data());
    }
    py::array_t<std::int64_t> out(m);
    std::copy(picked.begin(), picked.begin() + m, out.mutable_data());
    return out;
}

// --- per-column streaming top-k (vstore.topk) ---
void top_k_per_column(const py::array& block, const std::string& dtype_name, const carray<std::int32_t>& mask,
                      const carray<std::int64_t>& columns, std::int64_t row_start, carray<double> best_values,
                      carray<std::int64_t> best_rows, int threads) {
    const vstore::RawDtype dtype = parse_dtype(dtype_name);
    if (block.ndim() != 2)
        throw std::invalid_argument("block: expected a 2-D (rows, neurons) array, got shape " + shape_of(block));
    check_raw(block, dtype, "block");
    const std::int64_t R = block.shape(0), N = block.shape(1);
    if (mask.ndim() != 1 || mask.shape(0) != R)
        throw std::invalid_argument("mask: expected shape (" + std::to_string(R) + ",), got " + shape_of(mask));
    if (columns.ndim() != 1) throw std::invalid_argument("columns: expected a 1-D array, got " + shape_of(columns));
    const std::int64_t C = columns.shape(0);
    const std::int64_t* cols = columns.data();
    for (std::int64_t c = 0; c < C; ++c)
        if (cols[c] < 0 || cols[c] >= N)
            throw std::invalid_argument("columns: expected values in [0, " + std::to_string(N) + "), got " +
                                        std::to_string(cols[c]));
    if (best_values.ndim() != 2 || best_values.shape(0) != C)
        throw std::invalid_argument("best_values: expected shape (" + std::to_string(C) + ", k), got " +
                                    shape_of(best_values));
    const std::int64_t k = best_values.shape(1);
    check_shape(best_rows, {C, k}, "best_rows");
    if (row_start < 0) throw std::invalid_argument("row_start: expected >= 0, got " + std::to_string(row_start));
    const void* src = block.data();
    const std::int32_t* m = mask.data();
    double* bv = best_values.mutable_data();
    std::int64_t* br = best_rows.mutable_data();
    py::gil_scoped_release nogil;
    vstore::top_k_per_column(src, dtype, R, N, m, cols, C, row_start, k, bv, br, threads);
}

// --- Welch's t from moments (vstore.scoring) ---
py::tuple welch_from_moments(const carray<std::int64_t>& count, const carray<std::int64_t>& nonfinite,
                             const carray<double>& sum, const carray<double>& sumsq, const carray<std::int64_t>& pos,
                             const carray<std::int64_t>& neg, int threads) {
    if (sum.ndim() != 3) throw std::invalid_argument("sum: expected a 3-D (layers, groups, neurons) array, got " + shape_of(sum));
    const std::int64_t L = sum.shape(0), G = sum.shape(1), N = sum.shape(2);
    check_shape(sumsq, {L, G, N}, "sumsq");
    check_shape(nonfinite, {L, G, N}, "nonfinite");
    check_shape(count, {L, G}, "count");
    if (pos.ndim() != 1) throw std::invalid_argument("pos: expected a 1-D array, got " + shape_of(pos));
    const std::int64_t T = pos.shape(0);
    check_shape(neg, {T}, "neg");
    for (std::int64_t i = 0; i < T; ++i) {
        if (pos.data()[i] < 0 || pos.data()[i] >= G || neg.data()[i] >= G)
            throw std::invalid_argument("pos/neg: target " + std::to_string(i) + " names a group outside 0.." +
                                        std::to_string(G - 1));
    }
    py::array_t<double> t({L, T, N}), t_raw({L, T, N}), df({L, T, N});
    const vstore::GroupMomentsRef m{L, G, N, count.data(), nonfinite.data(), sum.data(), sumsq.data()};
    double *pt = t.mutable_data(), *pr = t_raw.mutable_data(), *pd = df.mutable_data();
    {
        py::gil_scoped_release nogil;
        vstore::welch_from_moments(m, pos.data(), neg.data(), T, pt, pr, pd, threads);
    }
    return py::make_tuple(t, t_raw, df);
}

std::uint64_t read_probe(const py::buffer& buffer) {
    const py::buffer_info info = buffer.request();
    bool contiguous = true;
    py::ssize_t expect = info.itemsize;
    for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
        if (info.shape[i] != 1 && info.strides[i] != expect) contiguous = false;
        expect *= info.shape[i];
    }
    if (!contiguous) throw std::invalid_argument("buffer: expected a C-contiguous buffer");
    const void* p = info.ptr;
    const std::int64_t n = static_cast<std::int64_t>(info.size * info.itemsize);
    py::gil_scoped_release nogil;
    return vstore::read_probe(p, n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "vstore native core (private: use vstore.kernels)";
    m.attr("__version__") = VSTORE_VERSION;
    m.def("version", [] { return std::string(VSTORE_VERSION); }, "Version the extension was built as.");
    m.def("openmp_threads", &vstore::openmp_threads, "Threads an OpenMP region uses by default (1 without OpenMP).");
    m.def("has_f16c", &vstore::has_f16c, "True when the CPU has F16C, AVX2 and FMA (the fast float16 path).");
    m.def("accumulate_moments", &accumulate_moments, py::arg("block").noconvert(), py::arg("dtype"),
          py::arg("groups").noconvert(), py::arg("count").noconvert(), py::arg("sum").noconvert(),
          py::arg("sumsq").noconvert(), py::arg("npos").noconvert(), py::arg("nonfinite").noconvert(),
          py::arg("threads") = 0, "Adds the per-group moments of a raw block to the accumulator arrays.");
    m.def("accumulate_histogram", &accumulate_histogram, py::arg("block").noconvert(), py::arg("dtype"),
          py::arg("groups").noconvert(), py::arg("hist").noconvert(), py::arg("neuron_start"),
          py::arg("threads") = 0, "Adds the 16-bit keys of a raw block's neurons to per-group histograms.");
    m.def("histogram_keys", &histogram_keys, py::arg("values").noconvert(), py::arg("dtype"),
          "Order-preserving 16-bit keys of raw values.");
    m.def("decode", &decode, py::arg("values").noconvert(), py::arg("dtype"), "Raw values as float32.");
    m.def("select_top_k", &select_top_k, py::arg("scores").noconvert(), py::arg("k"),
          "Indices of the k largest finite scores, best first, ties by lower index.");
    m.def("top_k_per_column", &top_k_per_column, py::arg("block").noconvert(), py::arg("dtype"),
          py::arg("mask").noconvert(), py::arg("columns").noconvert(), py::arg("row_start"),
          py::arg("best_values").noconvert(), py::arg("best_rows").noconvert(), py::arg("threads") = 0,
          "Merges a raw block's columns into per-column top-k state (value desc, row asc).");
    m.def("welch_from_moments", &welch_from_moments, py::arg("count").noconvert(), py::arg("nonfinite").noconvert(),
          py::arg("sum").noconvert(), py::arg("sumsq").noconvert(), py::arg("pos").noconvert(),
          py::arg("neg").noconvert(), py::arg("threads") = 0,
          "Welch's (t, t before nan_to_num, df), each (L, T, N), from per-group moments.");
    m.def("read_probe", &read_probe, py::arg("buffer"), "XOR of a buffer's 64-bit words (a read-bandwidth probe).");
}
