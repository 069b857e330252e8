// CUDA kernels of the AIA primitives. COMPILED IN CI, NEVER RUN ON A GPU (see docs/native.md):
// the Python loader refuses CUDA devices unless AIA_NATIVE_CUDA=1.
//
// Straightforward, deterministic kernels built on the per-element formulas of
// aia_common.h (shared with the CPU code): one thread per output entry, each
// reducing its pooled axis in a fixed order; no atomics. The conv weight gradient
// (54 sums over the whole pooled tensor) uses one block per tap with a fixed tree.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "aia_cuda_runtime.h"
#include "aia_host.h"

namespace aia {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

// The Weight/Upstream/Terms parameters are `const __grid_constant__`: code that indexes
// their arrays with a runtime value (a gate j of factor k) reads the parameter space
// directly instead of copying the struct into local memory first (a stack frame per
// thread; ptxas --resource-usage shows it, tests/test_native_cuda_compile.py checks it).
#define AIA_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// One thread per gate entry: max (first index), argmax and mean of weight * v along `axis`.
template <typename scalar_t, typename acc_t>
__global__ void pool_kernel(const scalar_t* __restrict__ v, Strides5 vs, Dims d,
                            const __grid_constant__ Weight<acc_t> wt, int axis, acc_t* __restrict__ P,
                            int32_t* __restrict__ argmax, int64_t entries) {
  AIA_GRID_STRIDE(g, entries) pool_entry(v, vs, d, wt, axis, g, P, argmax);
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ v, Strides5 vs, Dims d,
                             const __grid_constant__ Weight<acc_t> wt, scalar_t* __restrict__ out, Strides5 os,
                             int64_t elements) {
  AIA_GRID_STRIDE(i, elements) {
    const Coords x = element_coords(d, i);
    const acc_t y = weight_at(wt, d, x.n, x.t, x.c, x.h, x.w) *
                    static_cast<acc_t>(v[offset5(vs, x.n, x.t, x.c, x.h, x.w)]);
    out[offset5(os, x.n, x.t, x.c, x.h, x.w)] = static_cast<scalar_t>(y);
  }
}

// One thread per entry of gate j of factor k (weight_grad_entry of aia_common.h).
template <typename scalar_t, typename acc_t>
__global__ void weight_grad_kernel(const scalar_t* __restrict__ v, Strides5 vs, Dims d,
                                   const __grid_constant__ Weight<acc_t> wt,
                                   const __grid_constant__ Upstream<scalar_t, acc_t> up, int k, int j,
                                   acc_t* __restrict__ out, int64_t entries) {
  AIA_GRID_STRIDE(g, entries) out[g] = weight_grad_entry(v, vs, d, wt, up, k, j, g);
}

template <typename scalar_t, typename acc_t>
struct Terms {
  int count;
  WeightedUpstream<scalar_t, acc_t> term[kMaxTerms];
};

template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(const __grid_constant__ Terms<scalar_t, acc_t> terms, Dims d,
                                  scalar_t* __restrict__ out, Strides5 os, int64_t elements) {
  AIA_GRID_STRIDE(i, elements) {
    const Coords x = element_coords(d, i);
    out[offset5(os, x.n, x.t, x.c, x.h, x.w)] =
        static_cast<scalar_t>(input_grad_at(terms.term, terms.count, d, x));
  }
}

template <typename acc_t>
__global__ void conv_forward_kernel(const acc_t* __restrict__ P, const acc_t* __restrict__ wt, ConvDims d,
                                    acc_t* __restrict__ z, int64_t entries) {
  AIA_GRID_STRIDE(i, entries) z[i] = conv_output_flat(P, wt, d, i);
}

template <typename acc_t>
__global__ void conv_input_grad_kernel(const acc_t* __restrict__ dz, const acc_t* __restrict__ wt, ConvDims d,
                                       acc_t* __restrict__ dP, int64_t entries) {
  AIA_GRID_STRIDE(i, entries) dP[i] = conv_input_grad_flat(dz, wt, d, i);
}

// Block `tap` sums its terms: each thread a strided range, then a fixed shared-memory tree.
template <typename acc_t>
__global__ void conv_weight_grad_kernel(const acc_t* __restrict__ P, const acc_t* __restrict__ dz, ConvDims d,
                                        acc_t* __restrict__ dw) {
  __shared__ double partial[kThreads];
  const int tap = blockIdx.x;
  const int64_t total = d.N * d.D1 * d.D2 * d.D3;
  double s = 0;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) s += conv_weight_grad_term(P, dz, d, tap, i);
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[tap] = static_cast<acc_t>(partial[0]);
}

ConvDims conv_dims(const at::Tensor& t) {
  const int64_t r = t.dim();
  return ConvDims{t.size(0), t.size(r - 3), t.size(r - 2), t.size(r - 1)};
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace

std::vector<at::Tensor> pool(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                             const std::vector<int>& axes, bool with_argmax) {
  const c10::cuda::CUDAGuard guard(v.device());
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<at::Tensor> result;
  for (int axis : axes) {
    std::vector<int64_t> shape = gate_shape(axis, d);
    int64_t entries = 1;
    for (int64_t size : shape) entries *= size;
    at::Tensor argmax = at::empty(with_argmax ? shape : std::vector<int64_t>{0}, v.options().dtype(at::kInt));
    shape.insert(shape.begin() + 1, 2);
    at::Tensor P = at::empty(shape, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_pool_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      AIA_LAUNCH(blocks_for(entries), kThreads, stream(), pool_kernel<scalar_t, acc_t>)(
          v.data_ptr<scalar_t>(), strides_of(v), d, make_weight<acc_t>(gates, weight), axis, P.data_ptr<acc_t>(),
          with_argmax ? argmax.data_ptr<int32_t>() : nullptr, entries);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    result.push_back(P);
    result.push_back(argmax);
  }
  return result;
}

void apply(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t elements = v.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AIA_LAUNCH(blocks_for(elements), kThreads, stream(), apply_kernel<scalar_t, acc_t>)(
        v.data_ptr<scalar_t>(), strides_of(v), dims_of(v), make_weight<acc_t>(gates, weight),
        out.data_ptr<scalar_t>(), strides_of(out), elements);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> weight_grad(const at::Tensor& v, const Term& term, const GateSet& gates) {
  const c10::cuda::CUDAGuard guard(v.device());
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_weight_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Weight<acc_t> wt = make_weight<acc_t>(gates, term.weight);
    const Upstream<scalar_t, acc_t> up = make_upstream<scalar_t, acc_t>(term.upstream);
    for (int k = 0; k < wt.n_factors; ++k) {
      for (int j = 0; j < wt.size[k]; ++j) {
        at::Tensor out = at::empty(gate_shape(wt.axis[k][j], d), acc);
        const int64_t entries = out.numel();
        AIA_LAUNCH(blocks_for(entries), kThreads, stream(), weight_grad_kernel<scalar_t, acc_t>)(
            v.data_ptr<scalar_t>(), strides_of(v), d, wt, up, k, j, out.data_ptr<acc_t>(), entries);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        outs.push_back(out);
      }
    }
  });
  return outs;
}

void input_grad(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t elements = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aia_native_input_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Terms<scalar_t, acc_t> packed{};
    packed.count = static_cast<int>(terms.size());
    for (size_t k = 0; k < terms.size(); ++k) {
      packed.term[k].weight = make_weight<acc_t>(gates, terms[k].weight);
      packed.term[k].upstream = make_upstream<scalar_t, acc_t>(terms[k].upstream);
    }
    AIA_LAUNCH(blocks_for(elements), kThreads, stream(), input_grad_kernel<scalar_t, acc_t>)(
        packed, dims_of(out), out.data_ptr<scalar_t>(), strides_of(out), elements);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor conv_forward(const at::Tensor& pooled, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(pooled.device());
  const ConvDims d = conv_dims(pooled);
  at::Tensor z = at::empty({d.N, d.D1, d.D2, d.D3}, pooled.options());
  const int64_t entries = z.numel();
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "aia_native_conv_cuda", [&] {
    AIA_LAUNCH(blocks_for(entries), kThreads, stream(), conv_forward_kernel<scalar_t>)(
        pooled.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), d, z.data_ptr<scalar_t>(), entries);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

at::Tensor conv_input_grad(const at::Tensor& dz, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(dz.device());
  const ConvDims d = conv_dims(dz);
  at::Tensor dP = at::empty({d.N, 2, d.D1, d.D2, d.D3}, dz.options());
  const int64_t entries = dP.numel();
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "aia_native_conv_input_grad_cuda", [&] {
    AIA_LAUNCH(blocks_for(entries), kThreads, stream(), conv_input_grad_kernel<scalar_t>)(
        dz.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), d, dP.data_ptr<scalar_t>(), entries);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dP;
}

at::Tensor conv_weight_grad(const at::Tensor& pooled, const at::Tensor& dz) {
  const c10::cuda::CUDAGuard guard(dz.device());
  const ConvDims d = conv_dims(dz);
  at::Tensor dw = at::empty({1, 2, 3, 3, 3}, dz.options());
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "aia_native_conv_weight_grad_cuda", [&] {
    AIA_LAUNCH(54, kThreads, stream(), conv_weight_grad_kernel<scalar_t>)(
        pooled.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), d, dw.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dw;
}

}  // namespace cuda
}  // namespace aia
