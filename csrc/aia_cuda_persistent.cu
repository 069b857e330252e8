// The whole forward of an AIA plan in ONE cooperative, persistent CUDA kernel.
//
// STATUS: COMPILED (nvcc, sm_90, tests/test_native_cuda_compile.py) but NOT YET RUN ON A
// GPU: none was available when it was written. Like every native CUDA kernel it is
// only reachable with AIA_NATIVE_CUDA=1 (aia_kernels/native/__init__.py refuses CUDA
// devices otherwise); tests/test_native_cuda.py compares it with the multi-launch path.
//
// Why: at small shapes the multi-launch walk of aia_plan.cpp costs ~10-20 launches per
// gate (pool, conv, the BN fold as ATen ops, the gate values) and each costs more than
// its work. Triton cannot synchronise a whole grid; a cooperative launch can
// (cooperative_groups::this_grid().sync()), so one launch runs every phase.
//
// What: aia_native::plan_forward (aia_plan.cpp) calls plan_forward_persistent when
// persistent_forward_applies (aia_plan.h):
//   AIA_NATIVE_CUDA_PERSISTENT=0 never, =1 whenever possible, unset: when x has at most
//   AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS elements (default kDefaultMaxElements =
//   2^21 = 2,097,152: the spec's (64, 512, 7, 7) = 1.6M is in, (64, 256, 14, 14) = 3.2M
//   is out; a first guess, to be set from GPU timings);
//   possible = float32/float64/float16/bfloat16 x on a device with cooperative launch, a
//   plan of at most kMaxGates gates and kMaxStages stages (every variant has <= 8 and <= 4).
// The outputs are those of the multi-launch walk: out; per gate P (N, 2, D1, D2, D3),
// argmax (int32), z, scale_shift (2) in the accumulation dtype (float64 for float64 x,
// else float32); the stacked (G, 2) BN statistics (batch: mean and biased variance;
// running: the running values; none: zeros), so plan_backward and the running-stat
// updates in aia_kernels/fused.py are unchanged.
//
// Phases, separated by grid.sync(), all grid-stride loops over a fixed thread numbering:
//   0. (block 0, overlapped with stage 0's pool) conv weights and BN values of every gate
//      to the accumulation dtype, in a scratch buffer, read after the first sync.
//   per stage:
//   A. pool weight * v along C or T, H, W (pool_entry of aia_common.h: one thread per gate
//      entry, the axis walked in order, as the multi-launch pool_kernel): P, argmax.
//   B. conv (conv_output_at) -> z. BN none/running: fold (scale, shift) and write the gate
//      values sigmoid(scale * z + shift). BN batch: per-thread Welford moments of z, merged
//      per block in a fixed shared-memory tree, one partial per block to scratch.
//   C. (only if a gate of the stage uses batch statistics) every block merges all the
//      block partials in the same fixed order (Chan's formula), so all blocks hold the same
//      mean and variance; fold; gate values.
//   then: apply, out = weight * v (weight_at), no sync after it.
// Deterministic: no atomics; every reduction has an order fixed by the grid size, which is
// fixed by the device and the shape. Grid: min(co-resident maximum
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs), enough blocks for one element of
// x per thread); blocks of kThreads. Gate values live in scratch (one value per gate entry,
// computed once, read by later pools and apply through Weight<acc_t>, as in the walk).
// The plan reaches the kernel as a POD struct by value (__grid_constant__: indexed in
// place, no per-thread copy; __grid_constant__ needs sm_70 or newer, as does this design).
// Scratch comes from at::empty (caching allocator).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "aia_cuda_runtime.h"
#include "aia_plan.h"

namespace aia {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kMaxGates = 8;   // two units of four gates
constexpr int kMaxStages = 8;  // a combined variant has at most 4
constexpr int kMaxStageGates = 3;
constexpr int kConvTaps = 54;
// Per gate in the params scratch: 54 conv weights, BN weight, bias, running mean, running var.
constexpr int kGamma = kConvTaps, kBeta = kConvTaps + 1, kRunMean = kConvTaps + 2, kRunVar = kConvTaps + 3;
constexpr int kParamsPerGate = kConvTaps + 4;
constexpr int kMomentFields = 3;  // count, mean, M2
constexpr int64_t kBnNone = 0, kBnBatch = 1, kBnRunning = 2;
constexpr int64_t kDefaultMaxElements = int64_t(1) << 21;

// A parameter tensor read in its own dtype (the kernel converts, as the walk's .to()).
enum ParamType : int { kParamF32 = 0, kParamF64 = 1, kParamF16 = 2, kParamBF16 = 3 };
struct ParamRef {
  const void* ptr;  // nullptr: not given, the default applies
  int type;
};

template <typename acc_t>
struct GateArgs {
  int axis;
  int bn_mode;
  double eps;
  int64_t entries;  // N * D1 * D2 * D3
  ConvDims cd;
  acc_t* P;
  int32_t* argmax;
  acc_t* z;
  acc_t* scale_shift;
  acc_t* value;  // scratch: sigmoid(scale * z + shift)
  ParamRef conv, bn_weight, bn_bias, running_mean, running_var;
};

template <typename acc_t>
struct StageArgs {
  int n_gates;
  int gates[kMaxStageGates];
  Weight<acc_t> weight;  // gate pointers into the value scratch
};

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* v;
  Strides5 vs;
  scalar_t* out;
  Strides5 os;
  Dims d;
  int n_gates, n_stages;
  GateArgs<acc_t> gate[kMaxGates];
  StageArgs<acc_t> stage[kMaxStages];
  Weight<acc_t> output;
  acc_t* params;    // scratch: kParamsPerGate per gate
  acc_t* partials;  // scratch: [kMaxStageGates][gridDim.x][kMomentFields]
  acc_t* stats;     // output (G, 2)
};

// ---- device helpers ----

// Explicit roundings, so a * b + c is two roundings (as the walk's ATen ops), never an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename acc_t>
__device__ acc_t load_param(const ParamRef& r, int64_t i, acc_t fallback) {
  if (r.ptr == nullptr) return fallback;
  switch (r.type) {
    case kParamF64: return static_cast<acc_t>(static_cast<const double*>(r.ptr)[i]);
    case kParamF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(r.ptr)[i]));
    case kParamBF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(r.ptr)[i]));
    default: return static_cast<acc_t>(static_cast<const float*>(r.ptr)[i]);
  }
}

// Gate value: ATen's sigmoid (1 / (1 + exp(-y))) of y = z * scale + shift.
template <typename acc_t>
__device__ __forceinline__ acc_t gate_value_at(acc_t z, acc_t scale, acc_t shift) {
  const acc_t y = add_rn(mul_rn(z, scale), shift);
  return acc_t(1) / (acc_t(1) + std::exp(-y));
}

template <typename acc_t>
struct Fold {
  acc_t scale, shift, mean, var;
};

// BN folded into (scale, shift) given the statistics that normalise z (gate_forward_op).
template <typename acc_t>
__device__ Fold<acc_t> fold_bn(const acc_t* prm, int bn_mode, acc_t mean, acc_t var, double eps) {
  if (bn_mode == kBnNone) return Fold<acc_t>{acc_t(1), acc_t(0), acc_t(0), acc_t(0)};
  const acc_t scale = mul_rn(prm[kGamma], rsqrt(add_rn(var, static_cast<acc_t>(eps))));
  return Fold<acc_t>{scale, sub_rn(prm[kBeta], mul_rn(mean, scale)), mean, var};
}

template <typename acc_t>
__device__ void write_fold(const GateArgs<acc_t>& ga, acc_t* stats_row, const Fold<acc_t>& f) {
  ga.scale_shift[0] = f.scale;
  ga.scale_shift[1] = f.shift;
  stats_row[0] = f.mean;
  stats_row[1] = f.var;
}

template <typename acc_t>
struct Moments {
  acc_t n, mean, m2;
};

template <typename acc_t>
__device__ __forceinline__ void push(Moments<acc_t>& m, acc_t x) {
  m.n += acc_t(1);
  const acc_t delta = x - m.mean;
  m.mean += delta / m.n;
  m.m2 += delta * (x - m.mean);
}

// Chan et al.: the moments of the union of two sets.
template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n, delta = b.mean - a.mean, wb = b.n / n;
  return Moments<acc_t>{n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Every thread of the block calls it; all get the merge of all threads' moments, merged
// in a fixed tree order.
template <typename acc_t>
__device__ Moments<acc_t> block_merge(Moments<acc_t> m, Moments<acc_t>* sh) {
  sh[threadIdx.x] = m;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sh[threadIdx.x] = merge(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const Moments<acc_t> r = sh[0];
  __syncthreads();  // sh is reused by the next call
  return r;
}

// ---- the kernel ----

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) plan_forward_kernel(const __grid_constant__ Args<scalar_t, acc_t> args) {
  cg::grid_group grid = cg::this_grid();
  __shared__ Moments<acc_t> sh[kThreads];
  const int64_t first = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * kThreads;

  // Phase 0 (block 0): parameters in acc_t; first read after the first grid sync.
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < args.n_gates * kParamsPerGate; i += kThreads) {
      const GateArgs<acc_t>& ga = args.gate[i / kParamsPerGate];
      const int k = i % kParamsPerGate;
      acc_t value;
      switch (k) {
        case kGamma: value = load_param(ga.bn_weight, 0, acc_t(1)); break;
        case kBeta: value = load_param(ga.bn_bias, 0, acc_t(0)); break;
        case kRunMean: value = load_param(ga.running_mean, 0, acc_t(0)); break;
        case kRunVar: value = load_param(ga.running_var, 0, acc_t(1)); break;
        default: value = load_param(ga.conv, k, acc_t(0));
      }
      args.params[i] = value;
    }
  }

  for (int s = 0; s < args.n_stages; ++s) {
    const StageArgs<acc_t>& st = args.stage[s];

    // A: pool the stage's axes (their entries numbered one after the other).
    int64_t total = 0;
    for (int j = 0; j < st.n_gates; ++j) total += args.gate[st.gates[j]].entries;
    for (int64_t i = first; i < total; i += step) {
      int j = 0;
      int64_t e = i;
      while (e >= args.gate[st.gates[j]].entries) e -= args.gate[st.gates[j++]].entries;
      const GateArgs<acc_t>& ga = args.gate[st.gates[j]];
      pool_entry(args.v, args.vs, args.d, st.weight, ga.axis, e, ga.P, ga.argmax);
    }
    grid.sync();

    // B: conv; fold and gate values where the statistics are known, else block moments.
    bool batch_stage = false;  // the same in every thread: it depends on the plan only
    for (int j = 0; j < st.n_gates; ++j) {
      const int g = st.gates[j];
      const GateArgs<acc_t>& ga = args.gate[g];
      const acc_t* prm = args.params + g * kParamsPerGate;
      const bool batch = ga.bn_mode == kBnBatch;
      const Fold<acc_t> f = fold_bn(prm, ga.bn_mode, prm[kRunMean], prm[kRunVar], ga.eps);  // unused when batch
      const ConvDims cd = ga.cd;
      Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t i = first; i < ga.entries; i += step) {
        const int64_t c = i % cd.D3, b = i / cd.D3 % cd.D2, a = i / (cd.D3 * cd.D2) % cd.D1;
        const int64_t n = i / (cd.D3 * cd.D2 * cd.D1);
        const acc_t z = conv_output_at<acc_t>(ga.P, prm, cd, n, a, b, c);
        ga.z[i] = z;
        if (batch) {
          push(m, z);
        } else {
          ga.value[i] = gate_value_at(z, f.scale, f.shift);
        }
      }
      if (batch) {
        batch_stage = true;
        m = block_merge(m, sh);
        if (threadIdx.x == 0) {
          acc_t* out = args.partials + (int64_t(j) * gridDim.x + blockIdx.x) * kMomentFields;
          out[0] = m.n;
          out[1] = m.mean;
          out[2] = m.m2;
        }
      } else if (blockIdx.x == 0 && threadIdx.x == 0) {
        write_fold(ga, args.stats + 2 * g, f);
      }
    }
    grid.sync();
    if (!batch_stage) continue;

    // C: batch statistics from the block partials (every block, same order), fold, values.
    for (int j = 0; j < st.n_gates; ++j) {
      const int g = st.gates[j];
      const GateArgs<acc_t>& ga = args.gate[g];
      if (ga.bn_mode != kBnBatch) continue;
      Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
      for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += kThreads) {
        const acc_t* p = args.partials + (int64_t(j) * gridDim.x + b) * kMomentFields;
        m = merge(m, Moments<acc_t>{p[0], p[1], p[2]});
      }
      m = block_merge(m, sh);
      const acc_t* prm = args.params + g * kParamsPerGate;
      const Fold<acc_t> f = fold_bn(prm, kBnBatch, m.mean, m.m2 / m.n, ga.eps);  // biased variance
      if (blockIdx.x == 0 && threadIdx.x == 0) write_fold(ga, args.stats + 2 * g, f);
      for (int64_t i = first; i < ga.entries; i += step) ga.value[i] = gate_value_at(ga.z[i], f.scale, f.shift);
    }
    grid.sync();
  }

  // Apply: out = weight * v.
  const Dims d = args.d;
  const int64_t elements = d.N * d.T * d.C * d.H * d.W;
  for (int64_t i = first; i < elements; i += step) {
    const Coords x = element_coords(d, i);
    const acc_t y = weight_at(args.output, d, x.n, x.t, x.c, x.h, x.w) *
                    static_cast<acc_t>(args.v[offset5(args.vs, x.n, x.t, x.c, x.h, x.w)]);
    args.out[offset5(args.os, x.n, x.t, x.c, x.h, x.w)] = static_cast<scalar_t>(y);
  }
}

// ---- host ----

// -1 unset (size threshold), 0 never, 1 whenever possible.
int env_mode() {
  const char* s = std::getenv("AIA_NATIVE_CUDA_PERSISTENT");
  if (s == nullptr || *s == '\0') return -1;
  const std::string value(s);
  TORCH_CHECK(value == "0" || value == "1",
              "aia_native: AIA_NATIVE_CUDA_PERSISTENT must be 0 (never), 1 (whenever possible) or unset (problems "
              "of at most AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS elements), got '", value, "'");
  return value == "1" ? 1 : 0;
}

int64_t max_elements() {
  const char* s = std::getenv("AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS");
  if (s == nullptr || *s == '\0') return kDefaultMaxElements;
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && errno == 0 && n >= 0,
              "aia_native: AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS must be a non-negative integer, got '", s, "'");
  return n;
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Co-resident blocks of the kernel for x's dtype on `device` (occupancy x SMs), cached.
int coresident_blocks(int device, at::ScalarType type) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, static_cast<int>(type));
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // occupancy is asked of the current device
  int cooperative = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (cooperative) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "aia_native_persistent_occupancy", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plan_forward_kernel<scalar_t, acc_t>,
                                                                   kThreads, 0));
    });
  }
  const int blocks = cooperative ? per_sm * sms : 0;  // 0: no cooperative launch here
  cache[key] = blocks;
  return blocks;
}

ParamRef param_ref(const at::Tensor& t, const at::Tensor& x, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "aia_native: ", name, " must hold ", numel, " values, got ", t.numel());
  TORCH_CHECK(t.device() == x.device(), "aia_native: ", name, " is on ", t.device(), ", expected ", x.device());
  TORCH_CHECK(t.is_contiguous(), "aia_native: ", name, " must be contiguous here");
  switch (t.scalar_type()) {
    case at::kFloat: return ParamRef{t.data_ptr(), kParamF32};
    case at::kDouble: return ParamRef{t.data_ptr(), kParamF64};
    case at::kHalf: return ParamRef{t.data_ptr(), kParamF16};
    case at::kBFloat16: return ParamRef{t.data_ptr(), kParamBF16};
    default: break;
  }
  TORCH_CHECK(false, "aia_native: ", name, " has unsupported dtype ", t.scalar_type());
}

ParamRef optional_ref(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return ParamRef{nullptr, kParamF32};
  return param_ref(*t, x, 1, name);
}

}  // namespace

bool persistent_forward_applies(const at::Tensor& v, const Plan& plan) {
  if (!runs_on_cuda(v)) return false;
  const int mode = env_mode();
  if (mode == 0 || !supported_dtype(v.scalar_type()) || v.numel() == 0) return false;
  if (plan.gate_axis.size() > static_cast<size_t>(kMaxGates) || plan.stages.size() > static_cast<size_t>(kMaxStages))
    return false;
  if (mode < 0 && v.numel() > max_elements()) return false;
  return coresident_blocks(v.get_device(), v.scalar_type()) > 0;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> plan_forward_persistent(
    const at::Tensor& x, const at::Tensor& v, const Plan& plan, const std::vector<GateParams>& params) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int n_gates = static_cast<int>(plan.gate_axis.size());
  const int n_stages = static_cast<int>(plan.stages.size());
  TORCH_CHECK(n_gates <= kMaxGates && n_stages <= kMaxStages, "aia_native: the one-launch forward takes at most ",
              kMaxGates, " gates and ", kMaxStages, " stages");
  TORCH_CHECK(params.size() == static_cast<size_t>(n_gates), "aia_native: ", n_gates, " gates but ", params.size(),
              " gate parameter sets");
  TORCH_CHECK(v.dim() == 5 && v.numel() > 0, "aia_native: x must be a non-empty (N*T, C, H, W) tensor");
  TORCH_CHECK(supported_dtype(v.scalar_type()), "aia_native: the one-launch forward takes float32, float64, "
              "float16 or bfloat16, got ", v.scalar_type());
  const int blocks_max = coresident_blocks(x.get_device(), x.scalar_type());
  TORCH_CHECK(blocks_max > 0, "aia_native: this device cannot run the one-launch forward (no cooperative launch)");

  // Every gate is computed by one stage before a weight uses it (the walk would fail on an
  // undefined gate; here its value scratch would be read uninitialised).
  std::vector<int> computed(n_gates, 0);
  const auto check_computed = [&](const WeightSpec& w) {
    for (const auto& factor : w.factors)
      for (int id : factor) TORCH_CHECK(computed[id], "aia_native: the plan uses gate ", id, " before computing it");
  };
  for (const PlanStage& stage : plan.stages) {
    check_computed(stage.weight);
    for (int g : stage.gates) TORCH_CHECK(!computed[g]++, "aia_native: the plan computes gate ", g, " twice");
  }
  check_computed(plan.output);
  for (int g = 0; g < n_gates; ++g) TORCH_CHECK(computed[g], "aia_native: the plan never computes gate ", g);

  const Dims d = dims_of(v);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_max, std::max<int64_t>(1, (v.numel() + kThreads - 1) / kThreads)));

  // Outputs, as the walk returns them (separate tensors: the op's outputs must not alias).
  std::vector<at::Tensor> saved;
  std::vector<int64_t> value_offset(n_gates);
  int64_t scratch_size = 0;
  for (int g = 0; g < n_gates; ++g) {
    std::vector<int64_t> shape = gate_shape(plan.gate_axis[g], d);
    at::Tensor argmax = at::empty(shape, x.options().dtype(at::kInt));
    at::Tensor z = at::empty(shape, acc);
    shape.insert(shape.begin() + 1, 2);
    saved.push_back(at::empty(shape, acc));
    saved.push_back(argmax);
    saved.push_back(z);
    saved.push_back(at::empty({2}, acc));
    value_offset[g] = scratch_size;
    scratch_size += z.numel();
  }
  at::Tensor stats = at::empty({n_gates, 2}, acc);
  at::Tensor out = at::empty_like(x);
  const at::Tensor out5 = out.view(v.sizes());
  const int64_t params_offset = scratch_size;
  scratch_size += int64_t(n_gates) * kParamsPerGate;
  const int64_t partials_offset = scratch_size;
  scratch_size += int64_t(kMaxStageGates) * blocks * kMomentFields;
  at::Tensor scratch = at::empty({scratch_size}, acc);

  // Gate values in the scratch, as a GateSet for make_weight (aia_host.h).
  GateSet gates;
  gates.axis = plan.gate_axis;
  for (int g = 0; g < n_gates; ++g) gates.values.push_back(scratch.narrow(0, value_offset[g], saved[4 * g + 2].numel()));

  std::vector<at::Tensor> keep;  // contiguous copies of strided conv weights, alive until the launch is queued
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aia_native_plan_forward_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using KernelArgs = Args<scalar_t, acc_t>;
    static_assert(sizeof(KernelArgs) <= 4096, "kernel parameters must fit the classic 4 KB limit");
    KernelArgs args{};
    args.v = v.data_ptr<scalar_t>();
    args.vs = strides_of(v);
    args.out = out5.data_ptr<scalar_t>();
    args.os = strides_of(out5);
    args.d = d;
    args.n_gates = n_gates;
    args.n_stages = n_stages;
    for (int g = 0; g < n_gates; ++g) {
      const GateParams& p = params[g];
      TORCH_CHECK(p.bn_mode == kBnNone || p.bn_mode == kBnBatch || p.bn_mode == kBnRunning,
                  "aia_native: unknown bn_mode ", p.bn_mode);
      GateArgs<acc_t>& ga = args.gate[g];
      ga.axis = plan.gate_axis[g];
      ga.bn_mode = static_cast<int>(p.bn_mode);
      ga.eps = p.eps;
      ga.P = saved[4 * g].data_ptr<acc_t>();
      ga.argmax = saved[4 * g + 1].data_ptr<int32_t>();
      ga.z = saved[4 * g + 2].data_ptr<acc_t>();
      ga.scale_shift = saved[4 * g + 3].data_ptr<acc_t>();
      ga.value = gates.values[g].data_ptr<acc_t>();
      ga.entries = saved[4 * g + 2].numel();
      const auto zs = saved[4 * g + 2].sizes();
      ga.cd = ConvDims{zs[0], zs[1], zs[2], zs[3]};
      TORCH_CHECK(p.bn_mode != kBnBatch || ga.entries > 1, "aia_native: batch statistics need more than one value");
      at::Tensor conv = p.conv_weight;
      if (!conv.is_contiguous()) keep.push_back(conv = conv.contiguous());
      ga.conv = param_ref(conv, x, kConvTaps, "conv_weight");
      if (p.bn_mode != kBnNone) {
        TORCH_CHECK(p.bn_mode == kBnBatch || (p.running_mean.has_value() && p.running_var.has_value()),
                    "aia_native: eval BN needs running stats");
        ga.bn_weight = optional_ref(p.bn_weight, x, "bn_weight");
        ga.bn_bias = optional_ref(p.bn_bias, x, "bn_bias");
        ga.running_mean = optional_ref(p.running_mean, x, "running_mean");
        ga.running_var = optional_ref(p.running_var, x, "running_var");
      } else {
        ga.bn_weight = ga.bn_bias = ga.running_mean = ga.running_var = ParamRef{nullptr, kParamF32};
      }
    }
    for (int s = 0; s < n_stages; ++s) {
      const PlanStage& stage = plan.stages[s];
      TORCH_CHECK(stage.gates.size() >= 1 && stage.gates.size() <= static_cast<size_t>(kMaxStageGates),
                  "aia_native: a stage has 1 or 3 gates");
      StageArgs<acc_t>& st = args.stage[s];
      st.n_gates = static_cast<int>(stage.gates.size());
      for (int j = 0; j < st.n_gates; ++j) st.gates[j] = stage.gates[j];
      st.weight = make_weight<acc_t>(gates, stage.weight);
    }
    args.output = make_weight<acc_t>(gates, plan.output);
    args.params = scratch.data_ptr<acc_t>() + params_offset;
    args.partials = scratch.data_ptr<acc_t>() + partials_offset;
    args.stats = stats.data_ptr<acc_t>();

    void* kernel_args[] = {&args};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(plan_forward_kernel<scalar_t, acc_t>, dim3(blocks), dim3(kThreads),
                                               kernel_args, 0, c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, saved, stats};
}

}  // namespace cuda
}  // namespace aia
