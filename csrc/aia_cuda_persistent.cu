// The whole forward of an AIA plan in ONE cooperative, persistent CUDA kernel, and the
// whole backward in another (its own section below).
//
// STATUS: COMPILED (nvcc, sm_90, tests/test_native_cuda_compile.py) and RUN ON THE CPU
// EMULATOR (csrc/emulation/, tests/test_native_cuda_emulated.py), NOT YET RUN ON A GPU:
// none was available when it was written. Like every native CUDA kernel it is only
// reachable with AIA_NATIVE_CUDA=1 (aia_kernels/native/__init__.py refuses CUDA devices
// otherwise); tests/test_native_cuda.py compares both with the multi-launch path.
//
// Why: at small shapes the multi-launch walk of aia_plan.cpp costs ~10-20 launches per
// gate (pool, conv, the BN fold as ATen ops, the gate values) and each costs more than
// its work. Triton cannot synchronise a whole grid; a cooperative launch can
// (cooperative_groups::this_grid().sync()), so one launch runs every phase.
//
// What: aia_native::plan_forward (aia_plan.cpp) calls plan_forward_persistent when
// persistent_forward_applies (aia_plan.h), plan_backward plan_backward_persistent when
// persistent_backward_applies (the same rule, at most kMaxBwdStages stages):
//   AIA_NATIVE_CUDA_PERSISTENT=0 never, =1 whenever possible, unset: when x has at most
//   AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS elements (default kDefaultMaxElements =
//   2^21 = 2,097,152: the spec's (64, 512, 7, 7) = 1.6M is in, (64, 256, 14, 14) = 3.2M
//   is out; a first guess, to be set from GPU timings);
//   possible = float32/float64/float16/bfloat16 x on a device with cooperative launch, a
//   plan of at most kMaxGates gates and kMaxStages stages (every variant has <= 8 and <= 4)
//   that recomputes no stage with a C gate (a C gate's split pool, below, depends on the
//   grid, which differs between the two kernels: the backward could not repeat it bit for bit);
//   for a plan that recomputes stages, possible for both kernels, so that forward and backward
//   take the same path: the backward recomputes with its own path's gate values (this file's
//   sigmoid or ATen's), bitwise the forward's only on the forward's path. A change of
//   AIA_NATIVE_CUDA_PERSISTENT between a forward and its backward breaks that: the gradients
//   then differ from those of the forward's path by rounding (as the two paths' results do).
// The outputs are those of the multi-launch walk: out; per gate P (N, 2, D1, D2, D3),
// argmax (int32), z, scale_shift (2) in the accumulation dtype (float64 for float64 x,
// else float32), P, argmax and z empty for a stage the backward recomputes (Stage.recompute
// of aia_kernels/plan.py: the backward kernel pools it again with this kernel's code); the
// stacked (G, 2) BN statistics (batch: mean and biased variance;
// running: the running values; none: zeros), so plan_backward and the running-stat
// updates in aia_kernels/running_stats.py are unchanged.
//
// Phases, separated by grid.sync(), all grid-stride loops over a fixed thread numbering:
//   0. (block 0, overlapped with stage 0's pool) conv weights and BN values of every gate
//      to the accumulation dtype, in a scratch buffer, read after the first sync.
//   per stage:
//   A. pool weight * v along C or T, H, W (pool_entry of aia_common.h: one thread per gate
//      entry, the axis walked in order, as the multi-launch pool_kernel): P, argmax. A C
//      gate with fewer entries than half the grid's threads is pooled in axis segments
//      (pool_range), then merged in order after a grid sync (Split, split_for).
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
// A C gate has few entries (N * T * H * W: 3,136 at the spec's 7x7) and a long axis (C:
// 512 there), fewer entries than the grid has threads: its reductions are split into
// segments of at least kMinSegment positions, one thread each, merged in order after a
// grid sync (see Split).
constexpr int64_t kMinSegment = 16;

// How a C gate's axis is split: `parts` segments of `len` positions (1: not split).
struct Split {
  int parts;
  int64_t len;
};

// A parameter tensor read in its own dtype (the kernel converts, as the walk's .to()).
enum ParamType : int { kParamF32 = 0, kParamF64 = 1, kParamF16 = 2, kParamBF16 = 3 };
struct ParamRef {
  const void* ptr;  // nullptr: not given, the default applies
  int type;
};
// A gate's parameters as the kernels read them (BN ones null without BN).
struct GateParamRefs {
  ParamRef conv, bn_weight, bn_bias, running_mean, running_var;
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
  GateParamRefs refs;
};

template <typename acc_t>
struct StageArgs {
  int n_gates;
  int gates[kMaxStageGates];
  Weight<acc_t> weight;  // gate pointers into the value scratch
  Split split;           // of its one C gate's axis (parts 1 for T, H, W stages)
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
  acc_t* split_partials;  // scratch: [parts][entries][max, sum, argmax] of a split pool
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

// Phase 0 of both kernels (block 0): every gate's conv weights and BN values in acc_t,
// kParamsPerGate per gate.
template <typename acc_t, typename GateT>
__device__ void load_params(const GateT* gates, int n_gates, acc_t* params) {
  if (blockIdx.x != 0) return;
  for (int i = threadIdx.x; i < n_gates * kParamsPerGate; i += kThreads) {
    const GateParamRefs& r = gates[i / kParamsPerGate].refs;
    const int k = i % kParamsPerGate;
    acc_t value;
    switch (k) {
      case kGamma: value = load_param(r.bn_weight, 0, acc_t(1)); break;
      case kBeta: value = load_param(r.bn_bias, 0, acc_t(0)); break;
      case kRunMean: value = load_param(r.running_mean, 0, acc_t(0)); break;
      case kRunVar: value = load_param(r.running_var, 0, acc_t(1)); break;
      default: value = load_param(r.conv, k, acc_t(0));
    }
    params[i] = value;
  }
}

// Phase A of a stage without a split: pool_entry for every entry of the stage's gates, their
// entries numbered one after the other. Both kernels pool with it (the backward recomputes
// stages), so a recomputed stage is bitwise the forward's. GateT: GateArgs or BwdGateArgs.
template <typename scalar_t, typename acc_t, typename GateT>
__device__ void pool_entries(const scalar_t* v, const Strides5& vs, const Dims& d, const Weight<acc_t>& weight,
                             const GateT* gates, const int* ids, int n_ids, int64_t first, int64_t step) {
  int64_t total = 0;
  for (int j = 0; j < n_ids; ++j) total += gates[ids[j]].entries;
  for (int64_t i = first; i < total; i += step) {
    int j = 0;
    int64_t e = i;
    while (e >= gates[ids[j]].entries) e -= gates[ids[j++]].entries;
    const GateT& ga = gates[ids[j]];
    pool_entry(v, vs, d, weight, ga.axis, e, ga.P, ga.argmax);
  }
}

// ---- the kernel ----

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) plan_forward_kernel(const __grid_constant__ Args<scalar_t, acc_t> args) {
  cg::grid_group grid = cg::this_grid();
  __shared__ Moments<acc_t> sh[kThreads];
  const int64_t first = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * kThreads;

  // Phase 0 (block 0): parameters in acc_t; first read after the first grid sync.
  load_params(args.gate, args.n_gates, args.params);

  for (int s = 0; s < args.n_stages; ++s) {
    const StageArgs<acc_t>& st = args.stage[s];

    // A: pool the stage's axes (their entries numbered one after the other).
    if (st.split.parts > 1) {  // one C gate: its axis in segments, then merged in order
      const GateArgs<acc_t>& ga = args.gate[st.gates[0]];
      const int64_t len = axis_length(ga.axis, args.d);
      for (int64_t i = first; i < ga.entries * st.split.parts; i += step) {
        const int64_t e = i % ga.entries, p0 = i / ga.entries * st.split.len;
        const PoolPartial<acc_t> r = pool_range(args.v, args.vs, args.d, st.weight, ga.axis, e, p0,
                                                p0 + st.split.len < len ? p0 + st.split.len : len);
        acc_t* out = args.split_partials + 3 * i;
        out[0] = r.mx;
        out[1] = r.sum;
        out[2] = static_cast<acc_t>(r.arg);  // a position < 2^24: exact
      }
      grid.sync();
      for (int64_t e = first; e < ga.entries; e += step) {
        PoolPartial<acc_t> r{acc_t(0), acc_t(0), 0};
        for (int part = 0; part < st.split.parts; ++part) {
          const acc_t* q = args.split_partials + 3 * (part * ga.entries + e);
          if (part == 0 || q[0] > r.mx) {  // strict: the first position keeps a tie
            r.mx = q[0];
            r.arg = static_cast<int32_t>(q[2]);
          }
          r.sum += q[1];
        }
        write_pooled(r, ga.axis, args.d, e, ga.P, ga.argmax);
      }
    } else {
      pool_entries(args.v, args.vs, args.d, st.weight, args.gate, st.gates, st.n_gates, first, step);
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
        const acc_t z = conv_output_flat<acc_t>(ga.P, prm, cd, i);
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

// ---- the one-launch backward ----
//
// plan_backward of aia_plan.cpp (the multi-launch walk) in one cooperative launch, the
// same formulas in the same order of terms; its BN and conv-weight sums are per-block
// partials (fixed trees) merged in block order, so results match the walk to rounding.
// Phases, separated by grid.sync():
//   0. conv weights and BN gamma to acc_t (block 0); the kept gates' values sigmoid(a z + b).
//   R. the recomputed stages, in plan order: pool (pool_entries), then z = conv (as the
//      forward kernel's phase B) and the values from the kept (a, b): no BN statistic.
//   W. d loss / d gate from the output term (weight_grad_entry), stored or added per gate
//      in term order, as the walk accumulates them; a C gate with few entries in axis
//      segments (weight_grad_range), summed in order after a grid sync.
//   per stage, last first:
//   B1. dy = d gate * g (1 - g), zhat; per-block sums of dy, dy zhat, dzhat, dzhat zhat.
//   B2. every block merges the sums in block order; dz (BN backward); BN grads (block 0).
//   B3. d pooled = conv input grad of dz; per-block partial sums of the 54 conv taps.
//   B4. block 0 merges the taps (d conv); all: the stage term's gate gradients.
//   then: d loss / d v = the sum over the terms (input_grad_at).

constexpr int kMaxBwdStages = 4;            // every variant has at most 4 stages
constexpr int kBnSums = 4;                  // sum dy, dy * zhat, dzhat, dzhat * zhat
constexpr int kPartialFields = kBnSums + kConvTaps;
constexpr int kSumsPerPass = 6;             // block_sums: values reduced per shared-memory pass
static_assert(kConvTaps % kSumsPerPass == 0, "the conv weight gradient sums whole groups of taps");

template <typename acc_t>
struct BwdGateArgs {
  int axis, bn_mode;
  bool has_grad;         // some weight uses the gate (else its gradient is zero)
  bool active;           // something of it is needed: d pooled, d conv or a BN gradient
  double eps;
  int64_t entries;       // N * D1 * D2 * D3
  ConvDims cd;
  bool recompute;        // its stage is pooled again (phase R), into P, argmax and z below
  acc_t* P;              // saved by the forward, or scratch (recompute: written in phase R)
  int32_t* argmax;
  acc_t* z;
  const acc_t* scale_shift;
  const acc_t* stats;    // (mean, var) the forward normalised with
  GateParamRefs refs;
  acc_t* value;          // scratch: gate values
  acc_t* grad;           // scratch: d loss / d gate
  acc_t* dz;             // scratch
  acc_t* d_pooled;       // scratch (N, 2, D1, D2, D3), or nullptr: not needed
  acc_t* d_conv;         // output (54), or nullptr
  acc_t* d_bn_weight;    // output (1), or nullptr
  acc_t* d_bn_bias;      // output (1), or nullptr
  Split split;           // of its axis in the weight-gradient sums (C gates only)
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const scalar_t* v;
  Strides5 vs;
  scalar_t* grad_x;  // nullptr: not needed
  Strides5 gs;
  Dims d;
  int n_gates, n_stages, n_terms;
  BwdGateArgs<acc_t> gate[kMaxGates];
  int stage_n_gates[kMaxBwdStages];
  int stage_gates[kMaxBwdStages][kMaxStageGates];
  bool stage_recompute[kMaxBwdStages];
  Weight<acc_t> stage_weight[kMaxBwdStages];  // of a recomputed stage (gate pointers into the value scratch)
  int stage_term[kMaxBwdStages];  // its term (weight, pooled gradients), or -1: d pooled not needed
  // Terms in the walk's order (output, then stages last first); per factor gate: its id,
  // and whether this term is its first gradient (store) or not (add).
  WeightedUpstream<scalar_t, acc_t> term[1 + kMaxBwdStages];
  int term_gate[1 + kMaxBwdStages][kMaxFactors][kMaxFactorGates];
  bool term_first[1 + kMaxBwdStages][kMaxFactors][kMaxFactorGates];
  acc_t* params;     // scratch: kParamsPerGate per gate
  double* partials;  // scratch: [kMaxStageGates][gridDim.x][kPartialFields]
  acc_t* split_partials;  // scratch: [parts][entries] of a split gate gradient
};

// Block sums of vals[0..n) of every thread, in a fixed tree; thread 0 gets them in out.
__device__ void block_sums(const double* vals, int n, double* out, double (*sh)[kThreads]) {
  for (int base = 0; base < n; base += kSumsPerPass) {
    const int m = n - base < kSumsPerPass ? n - base : kSumsPerPass;  // no std::min: it would odr-use the constant
    for (int q = 0; q < m; ++q) sh[q][threadIdx.x] = vals[base + q];
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s /= 2) {
      if (threadIdx.x < s)
        for (int q = 0; q < m; ++q) sh[q][threadIdx.x] += sh[q][threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0)
      for (int q = 0; q < m; ++q) out[base + q] = sh[q][0];
    __syncthreads();  // sh is reused by the next pass
  }
}

template <typename scalar_t, typename acc_t>
__device__ void term_gate_grads(const BwdArgs<scalar_t, acc_t>& args, int t, int64_t first, int64_t step) {
  const WeightedUpstream<scalar_t, acc_t>& term = args.term[t];
  for (int k = 0; k < term.weight.n_factors; ++k) {
    for (int j = 0; j < term.weight.size[k]; ++j) {
      const BwdGateArgs<acc_t>& ga = args.gate[args.term_gate[t][k][j]];
      const bool store = args.term_first[t][k][j];
      if (ga.split.parts > 1) {  // a C gate: its axis in segments, then summed in order
        const int64_t len = axis_length(ga.axis, args.d);
        for (int64_t i = first; i < ga.entries * ga.split.parts; i += step) {
          const int64_t e = i % ga.entries, p0 = i / ga.entries * ga.split.len;
          args.split_partials[i] = weight_grad_range(args.v, args.vs, args.d, term.weight, term.upstream, k, j, e,
                                                     p0, p0 + ga.split.len < len ? p0 + ga.split.len : len);
        }
        cg::this_grid().sync();
        for (int64_t e = first; e < ga.entries; e += step) {
          acc_t g = 0;
          for (int part = 0; part < ga.split.parts; ++part) g += args.split_partials[part * ga.entries + e];
          ga.grad[e] = store ? g : ga.grad[e] + g;
        }
        cg::this_grid().sync();  // the partials serve the next split gate
        continue;
      }
      for (int64_t e = first; e < ga.entries; e += step) {
        const acc_t g = weight_grad_entry(args.v, args.vs, args.d, term.weight, term.upstream, k, j, e);
        ga.grad[e] = store ? g : ga.grad[e] + g;
      }
    }
  }
}

// BN backward pieces of one gate entry (the walk's ATen formulas in aia_ops.cpp).
template <typename acc_t>
struct GateGradAt {
  acc_t dy, zhat, rstd;
};

template <typename acc_t>
__device__ GateGradAt<acc_t> gate_grad_at(const BwdGateArgs<acc_t>& ga, int64_t i) {
  const acc_t g = ga.value[i];
  const acc_t up = ga.has_grad ? ga.grad[i] : acc_t(0);
  const acc_t dy = up * g * (acc_t(1) - g);
  if (ga.bn_mode == kBnNone) return GateGradAt<acc_t>{dy, acc_t(0), acc_t(1)};
  const acc_t rstd = rsqrt(ga.stats[1] + static_cast<acc_t>(ga.eps));
  return GateGradAt<acc_t>{dy, (ga.z[i] - ga.stats[0]) * rstd, rstd};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) plan_backward_kernel(const __grid_constant__ BwdArgs<scalar_t, acc_t> args) {
  cg::grid_group grid = cg::this_grid();
  __shared__ double sh[kSumsPerPass][kThreads];
  const int64_t first = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * kThreads;

  // 0: parameters (block 0) and the kept gates' values.
  load_params(args.gate, args.n_gates, args.params);
  for (int g = 0; g < args.n_gates; ++g) {
    const BwdGateArgs<acc_t>& ga = args.gate[g];
    if (ga.recompute) continue;
    for (int64_t i = first; i < ga.entries; i += step)
      ga.value[i] = gate_value_at(ga.z[i], ga.scale_shift[0], ga.scale_shift[1]);
  }
  grid.sync();

  // R: the recomputed stages in plan order (their weights' gates are kept or recomputed before).
  for (int s = 0; s < args.n_stages; ++s) {
    if (!args.stage_recompute[s]) continue;
    pool_entries(args.v, args.vs, args.d, args.stage_weight[s], args.gate, args.stage_gates[s], args.stage_n_gates[s],
                 first, step);
    grid.sync();
    for (int j = 0; j < args.stage_n_gates[s]; ++j) {
      const int g = args.stage_gates[s][j];
      const BwdGateArgs<acc_t>& ga = args.gate[g];
      const acc_t* prm = args.params + g * kParamsPerGate;
      for (int64_t i = first; i < ga.entries; i += step) {
        const acc_t z = conv_output_flat<acc_t>(ga.P, prm, ga.cd, i);
        ga.z[i] = z;
        ga.value[i] = gate_value_at(z, ga.scale_shift[0], ga.scale_shift[1]);
      }
    }
    grid.sync();
  }

  // W: the output term.
  term_gate_grads(args, 0, first, step);
  grid.sync();

  for (int s = args.n_stages - 1; s >= 0; --s) {
    const int n_stage = args.stage_n_gates[s];
    // B1: per-block BN sums.
    for (int j = 0; j < n_stage; ++j) {
      const BwdGateArgs<acc_t>& ga = args.gate[args.stage_gates[s][j]];
      if (!ga.active || ga.bn_mode == kBnNone) continue;
      const acc_t gamma = args.params[args.stage_gates[s][j] * kParamsPerGate + kGamma];
      double sums[kBnSums] = {0, 0, 0, 0};
      for (int64_t i = first; i < ga.entries; i += step) {
        const GateGradAt<acc_t> q = gate_grad_at(ga, i);
        const acc_t dzhat = q.dy * gamma;
        sums[0] += q.dy;
        sums[1] += q.dy * q.zhat;
        sums[2] += dzhat;
        sums[3] += dzhat * q.zhat;
      }
      block_sums(sums, kBnSums, args.partials + (int64_t(j) * gridDim.x + blockIdx.x) * kPartialFields, sh);
    }
    grid.sync();

    // B2: merged sums (every block, block order), dz, BN parameter gradients.
    for (int j = 0; j < n_stage; ++j) {
      const int g = args.stage_gates[s][j];
      const BwdGateArgs<acc_t>& ga = args.gate[g];
      if (!ga.active) continue;
      const acc_t gamma = args.params[g * kParamsPerGate + kGamma];
      double sums[kBnSums] = {0, 0, 0, 0};
      if (ga.bn_mode != kBnNone) {
        for (unsigned b = 0; b < gridDim.x; ++b) {
          const double* p = args.partials + (int64_t(j) * gridDim.x + b) * kPartialFields;
          for (int q = 0; q < kBnSums; ++q) sums[q] += p[q];
        }
      }
      const acc_t n = static_cast<acc_t>(ga.entries);
      const acc_t mean_dzhat = static_cast<acc_t>(sums[2]) / n, mean_dzhat_zhat = static_cast<acc_t>(sums[3]) / n;
      for (int64_t i = first; i < ga.entries; i += step) {
        const GateGradAt<acc_t> q = gate_grad_at(ga, i);
        acc_t dz = q.dy;
        if (ga.bn_mode == kBnBatch) {
          dz = q.rstd * (q.dy * gamma - mean_dzhat - q.zhat * mean_dzhat_zhat);
        } else if (ga.bn_mode == kBnRunning) {
          dz = q.dy * gamma * q.rstd;
        }
        ga.dz[i] = dz;
      }
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        if (ga.d_bn_weight != nullptr) ga.d_bn_weight[0] = static_cast<acc_t>(sums[1]);
        if (ga.d_bn_bias != nullptr) ga.d_bn_bias[0] = static_cast<acc_t>(sums[0]);
      }
    }
    grid.sync();

    // B3: d pooled; per-block partial sums of the conv weight gradient.
    for (int j = 0; j < n_stage; ++j) {
      const int g = args.stage_gates[s][j];
      const BwdGateArgs<acc_t>& ga = args.gate[g];
      const acc_t* wt = args.params + g * kParamsPerGate;
      if (ga.d_pooled != nullptr) {
        for (int64_t i = first; i < 2 * ga.entries; i += step) ga.d_pooled[i] = conv_input_grad_flat(ga.dz, wt, ga.cd, i);
      }
      if (ga.d_conv != nullptr) {
        // The taps a group at a time, the group's sums in registers: one array of all 54,
        // updated per entry, would sit in local memory (a 432-byte stack frame per thread).
        double* block_taps = args.partials + (int64_t(j) * gridDim.x + blockIdx.x) * kPartialFields + kBnSums;
        for (int base = 0; base < kConvTaps; base += kSumsPerPass) {
          double taps[kSumsPerPass] = {};
          for (int64_t i = first; i < ga.entries; i += step) {
            AIA_UNROLL for (int q = 0; q < kSumsPerPass; ++q)
              taps[q] += conv_weight_grad_term(ga.P, ga.dz, ga.cd, base + q, i);
          }
          block_sums(taps, kSumsPerPass, block_taps + base, sh);
        }
      }
    }
    grid.sync();

    // B4: d conv (block 0, tap per thread, block order); the stage term's gate gradients.
    if (blockIdx.x == 0 && threadIdx.x < kConvTaps) {
      for (int j = 0; j < n_stage; ++j) {
        const BwdGateArgs<acc_t>& ga = args.gate[args.stage_gates[s][j]];
        if (ga.d_conv == nullptr) continue;
        double sum = 0;
        for (unsigned b = 0; b < gridDim.x; ++b)
          sum += args.partials[(int64_t(j) * gridDim.x + b) * kPartialFields + kBnSums + threadIdx.x];
        ga.d_conv[threadIdx.x] = static_cast<acc_t>(sum);
      }
    }
    if (args.stage_term[s] >= 0) term_gate_grads(args, args.stage_term[s], first, step);
    grid.sync();
  }

  // d loss / d v.
  if (args.grad_x != nullptr) {
    const Dims d = args.d;
    const int64_t elements = d.N * d.T * d.C * d.H * d.W;
    for (int64_t i = first; i < elements; i += step) {
      const Coords x = element_coords(d, i);
      args.grad_x[offset5(args.gs, x.n, x.t, x.c, x.h, x.w)] =
          static_cast<scalar_t>(input_grad_at(args.term, args.n_terms, d, x));
    }
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

// Co-resident blocks of the forward or backward kernel for x's dtype on `device`
// (occupancy x SMs), cached.
int coresident_blocks(int device, at::ScalarType type, bool backward) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, bool>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, static_cast<int>(type), backward);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // occupancy is asked of the current device
  int cooperative = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (cooperative) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "aia_native_persistent_occupancy", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (backward) {
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plan_backward_kernel<scalar_t, acc_t>,
                                                                     kThreads, 0));
      } else {
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plan_forward_kernel<scalar_t, acc_t>,
                                                                     kThreads, 0));
      }
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

// Blocks of a one-launch kernel's grid on x's device: one element of v per thread, at most
// what can be co-resident (a cooperative launch needs every block resident at once).
int grid_blocks(const at::Tensor& x, const at::Tensor& v, bool backward) {
  const int blocks_max = coresident_blocks(x.get_device(), x.scalar_type(), backward);
  TORCH_CHECK(blocks_max > 0, "aia_native: this device cannot run the one-launch ", backward ? "backward" : "forward",
              " (no cooperative launch)");
  return static_cast<int>(std::min<int64_t>(blocks_max, std::max<int64_t>(1, (v.numel() + kThreads - 1) / kThreads)));
}

// The split of a gate's pooled axis: none unless it is C and the gate has fewer entries
// than half the grid's threads; then segments of at least kMinSegment positions.
Split split_for(int axis, const Dims& d, int64_t entries, int blocks) {
  const int64_t len = axis_length(axis, d), threads = int64_t(blocks) * kThreads;
  if (axis != kAxisC || entries * 2 > threads) return Split{1, len};
  const int64_t want = threads / entries;
  const int64_t seg = std::max<int64_t>(kMinSegment, (len + want - 1) / want);
  const int parts = static_cast<int>((len + seg - 1) / seg);
  return parts > 1 ? Split{parts, seg} : Split{1, len};
}

// The kernels' view of a gate's parameters; a strided conv weight is copied into `keep`,
// which must outlive the launch's queueing.
GateParamRefs gate_param_refs(const GateParams& p, const at::Tensor& x, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(p.bn_mode == kBnNone || p.bn_mode == kBnBatch || p.bn_mode == kBnRunning,
              "aia_native: unknown bn_mode ", p.bn_mode);
  at::Tensor conv = p.conv_weight;
  if (!conv.is_contiguous()) keep.push_back(conv = conv.contiguous());
  const ParamRef none{nullptr, kParamF32};
  GateParamRefs r{param_ref(conv, x, kConvTaps, "conv_weight"), none, none, none, none};
  if (p.bn_mode != kBnNone) {
    r.bn_weight = optional_ref(p.bn_weight, x, "bn_weight");
    r.bn_bias = optional_ref(p.bn_bias, x, "bn_bias");
    r.running_mean = optional_ref(p.running_mean, x, "running_mean");
    r.running_var = optional_ref(p.running_var, x, "running_var");
  }
  return r;
}

}  // namespace

namespace {
bool one_launch_applies(const at::Tensor& v, const Plan& plan, size_t max_stages, bool backward) {
  if (!runs_on_cuda(v)) return false;
  const int mode = env_mode();
  if (mode == 0 || !supported_dtype(v.scalar_type()) || v.numel() == 0) return false;
  if (plan.gate_axis.size() > static_cast<size_t>(kMaxGates) || plan.stages.size() > max_stages) return false;
  bool recomputes = false;
  for (const PlanStage& stage : plan.stages) {  // see the top: a recomputed C gate's split pool
    recomputes = recomputes || stage.recompute;
    for (int axis : stage.axes)
      if (stage.recompute && axis == kAxisC) return false;
  }
  if (mode < 0 && v.numel() > max_elements()) return false;
  if (recomputes) {
    // The backward recomputes stages with the gate values of its own path (this kernel's
    // sigmoid, or ATen's in the walk): the forward must have taken the same path for the
    // recomputed stages to be bitwise the forward's. So both passes take one launch only
    // where both kernels can.
    return plan.stages.size() <= static_cast<size_t>(std::min(kMaxStages, kMaxBwdStages)) &&
           coresident_blocks(v.get_device(), v.scalar_type(), false) > 0 &&
           coresident_blocks(v.get_device(), v.scalar_type(), true) > 0;
  }
  return coresident_blocks(v.get_device(), v.scalar_type(), backward) > 0;
}
}  // namespace

bool persistent_forward_applies(const at::Tensor& v, const Plan& plan) {
  return one_launch_applies(v, plan, kMaxStages, false);
}

bool persistent_backward_applies(const at::Tensor& v, const Plan& plan) {
  return one_launch_applies(v, plan, kMaxBwdStages, true);
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
  const int blocks = grid_blocks(x, v, false);

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
  // A stage of one C gate with few entries pools its axis in segments (split_for).
  std::vector<Split> splits(n_stages, Split{1, 0});
  int64_t split_size = 0;
  for (int s = 0; s < n_stages; ++s) {
    if (plan.stages[s].gates.size() != 1) continue;
    const int g = plan.stages[s].gates[0];
    const int64_t entries = saved[4 * g + 2].numel();
    splits[s] = split_for(plan.gate_axis[g], d, entries, blocks);
    if (splits[s].parts > 1) split_size = std::max<int64_t>(split_size, 3 * entries * splits[s].parts);
  }
  const int64_t split_offset = scratch_size;
  scratch_size += split_size;
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
      GateArgs<acc_t>& ga = args.gate[g];
      ga.refs = gate_param_refs(p, x, keep);
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
      TORCH_CHECK(p.bn_mode != kBnRunning || (p.running_mean.has_value() && p.running_var.has_value()),
                  "aia_native: eval BN needs running stats");
    }
    for (int s = 0; s < n_stages; ++s) {
      const PlanStage& stage = plan.stages[s];
      TORCH_CHECK(stage.gates.size() >= 1 && stage.gates.size() <= static_cast<size_t>(kMaxStageGates),
                  "aia_native: a stage has 1 or 3 gates");
      StageArgs<acc_t>& st = args.stage[s];
      st.n_gates = static_cast<int>(stage.gates.size());
      for (int j = 0; j < st.n_gates; ++j) st.gates[j] = stage.gates[j];
      st.weight = make_weight<acc_t>(gates, stage.weight);
      st.split = splits[s];
    }
    args.output = make_weight<acc_t>(gates, plan.output);
    args.params = scratch.data_ptr<acc_t>() + params_offset;
    args.partials = scratch.data_ptr<acc_t>() + partials_offset;
    args.split_partials = scratch.data_ptr<acc_t>() + split_offset;
    args.stats = stats.data_ptr<acc_t>();

    void* kernel_args[] = {&args};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(plan_forward_kernel<scalar_t, acc_t>, dim3(blocks), dim3(kThreads),
                                               kernel_args, 0, c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // A recomputed stage's P, argmax and z are not returned (the caching allocator reuses their
  // memory only for work queued after this launch on the stream).
  for (const PlanStage& stage : plan.stages) {
    if (!stage.recompute) continue;
    for (int g : stage.gates)
      for (int k = 0; k < 3; ++k) saved[kSavedPerGate * g + k] = at::empty({0}, saved[kSavedPerGate * g + k].options());
  }
  return {out, saved, stats};
}


std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
plan_backward_persistent(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& v, const Plan& plan,
                         const std::vector<GateParams>& params, at::TensorList saved, const at::Tensor& bn_stats,
                         at::IntArrayRef needs) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int n_gates = static_cast<int>(plan.gate_axis.size());
  const int n_stages = static_cast<int>(plan.stages.size());
  TORCH_CHECK(n_gates <= kMaxGates && n_stages <= kMaxBwdStages, "aia_native: the one-launch backward takes at most ",
              kMaxGates, " gates and ", kMaxBwdStages, " stages");
  TORCH_CHECK(params.size() == static_cast<size_t>(n_gates) && saved.size() == static_cast<size_t>(kSavedPerGate * n_gates) &&
                  needs.size() == static_cast<size_t>(1 + 3 * n_gates),
              "aia_native: the one-launch backward got inconsistent gate counts");
  TORCH_CHECK(supported_dtype(x.scalar_type()), "aia_native: the one-launch backward takes float32, float64, "
              "float16 or bfloat16, got ", x.scalar_type());
  const int blocks = grid_blocks(x, v, true);

  const Dims d = dims_of(v);
  const at::ScalarType acc_dtype = acc_type(x.scalar_type());
  const auto acc = x.options().dtype(acc_dtype);
  const bool need_x = needs[0] != 0;
  const auto need = [&](int k, int g) { return needs[1 + k * n_gates + g] != 0; };  // k: 0 conv, 1 bn w, 2 bn b

  // The saved tensors the walk would read, checked: the kernel indexes them as contiguous. A
  // recomputed stage's P, argmax and z are empty; phase R writes them into scratch.
  std::vector<int64_t> entries(n_gates);
  std::vector<bool> recomputed(n_gates, false);
  for (const PlanStage& stage : plan.stages)
    for (int g : stage.gates) recomputed[g] = stage.recompute;
  for (int g = 0; g < n_gates; ++g) {
    std::vector<int64_t> shape = gate_shape(plan.gate_axis[g], d);
    const at::Tensor &P = saved[4 * g], &argmax = saved[4 * g + 1], &z = saved[4 * g + 2], &ss = saved[4 * g + 3];
    entries[g] = c10::multiply_integers(shape);
    TORCH_CHECK(ss.numel() == 2 && ss.scalar_type() == acc_dtype && ss.is_contiguous() && ss.device() == x.device(),
                "aia_native: scale_shift of gate ", g, " must be 2 contiguous ", acc_dtype, " on ", x.device());
    if (recomputed[g]) {
      TORCH_CHECK(P.numel() == 0 && argmax.numel() == 0 && z.numel() == 0,
                  "aia_native: gate ", g, "'s stage is recomputed: its saved P, argmax and z must be empty");
      continue;
    }
    TORCH_CHECK(z.sizes() == at::IntArrayRef(shape) && argmax.sizes() == z.sizes() && P.dim() == 5 &&
                    P.size(1) == 2 && P.numel() == 2 * z.numel(),
                "aia_native: saved tensors of gate ", g, " do not match x and the plan");
    for (const at::Tensor* t : {&P, &z})
      TORCH_CHECK(t->scalar_type() == acc_dtype && t->is_contiguous() && t->device() == x.device(),
                  "aia_native: saved tensors must be contiguous ", acc_dtype, " on ", x.device());
    TORCH_CHECK(argmax.scalar_type() == at::kInt && argmax.is_contiguous(), "aia_native: argmax must be contiguous int32");
  }
  const at::Tensor stats = bn_stats.contiguous();
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({n_gates, 2}) && stats.scalar_type() == acc_dtype,
              "aia_native: bn_stats must be (gates, 2) in ", acc_dtype);

  // Scratch: per gate value, grad, dz (entries each) and d pooled (2 x entries), and a
  // recomputed gate's P (2 x entries) and z; parameters. A recomputed gate's argmax: int32 scratch.
  std::vector<int64_t> offset(n_gates), argmax_offset(n_gates, 0);
  int64_t scratch_size = 0, argmax_size = 0;
  for (int g = 0; g < n_gates; ++g) {
    offset[g] = scratch_size;
    scratch_size += (recomputed[g] ? 8 : 5) * entries[g];
    if (recomputed[g]) {
      argmax_offset[g] = argmax_size;
      argmax_size += entries[g];
    }
  }
  const int64_t params_offset = scratch_size;
  scratch_size += int64_t(n_gates) * kParamsPerGate;
  // C gates with few entries sum their weight gradients in segments (split_for).
  std::vector<Split> splits(n_gates);
  int64_t split_size = 0;
  for (int g = 0; g < n_gates; ++g) {
    splits[g] = split_for(plan.gate_axis[g], d, entries[g], blocks);
    if (splits[g].parts > 1) split_size = std::max<int64_t>(split_size, entries[g] * splits[g].parts);
  }
  const int64_t split_offset = scratch_size;
  scratch_size += split_size;
  at::Tensor scratch = at::empty({scratch_size}, acc);
  at::Tensor argmax_scratch = at::empty({argmax_size}, x.options().dtype(at::kInt));
  at::Tensor partials = at::empty({int64_t(kMaxStageGates) * blocks * kPartialFields}, x.options().dtype(at::kDouble));

  const at::Tensor empty = at::empty({0}, acc);
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  std::vector<at::Tensor> d_conv(n_gates, empty), d_bn_w(n_gates, empty), d_bn_b(n_gates, empty);
  for (int g = 0; g < n_gates; ++g) {
    if (need(0, g)) d_conv[g] = at::empty({1, 2, 3, 3, 3}, acc);
    if (params[g].bn_mode != kBnNone && need(1, g)) d_bn_w[g] = at::empty({1}, acc);
    if (params[g].bn_mode != kBnNone && need(2, g)) d_bn_b[g] = at::empty({1}, acc);
  }

  std::vector<at::Tensor> keep;  // contiguous copies of strided conv weights, alive until the launch is queued
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aia_native_plan_backward_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using KernelArgs = BwdArgs<scalar_t, acc_t>;
    static_assert(sizeof(KernelArgs) <= 4096, "kernel parameters must fit the classic 4 KB limit");
    KernelArgs args{};
    acc_t* base = scratch.data_ptr<acc_t>();
    args.v = v.data_ptr<scalar_t>();
    args.vs = strides_of(v);
    args.d = d;
    if (need_x) {
      const at::Tensor gx5 = grad_x.view(v.sizes());
      args.grad_x = gx5.data_ptr<scalar_t>();
      args.gs = strides_of(gx5);
    }
    args.n_gates = n_gates;
    args.n_stages = n_stages;
    GateSet gates;  // gate values in the scratch, for make_weight
    gates.axis = plan.gate_axis;
    for (int g = 0; g < n_gates; ++g) gates.values.push_back(scratch.narrow(0, offset[g], entries[g]));

    std::vector<int> stage_of(n_gates, 0);
    std::vector<bool> need_pooled(n_stages);
    for (int s = 0; s < n_stages; ++s) {
      need_pooled[s] = need_x || !plan.stages[s].weight.factors.empty();
      for (int g : plan.stages[s].gates) stage_of[g] = s;
    }
    for (int g = 0; g < n_gates; ++g) {
      const GateParams& p = params[g];
      BwdGateArgs<acc_t>& ga = args.gate[g];
      ga.refs = gate_param_refs(p, x, keep);
      ga.axis = plan.gate_axis[g];
      ga.bn_mode = static_cast<int>(p.bn_mode);
      ga.active = need_pooled[stage_of[g]] || need(0, g) || (p.bn_mode != kBnNone && (need(1, g) || need(2, g)));
      ga.eps = p.eps;
      ga.entries = entries[g];
      const std::vector<int64_t> zs = gate_shape(plan.gate_axis[g], d);
      ga.cd = ConvDims{zs[0], zs[1], zs[2], zs[3]};
      ga.recompute = recomputed[g];
      if (ga.recompute) {  // written by phase R
        ga.P = base + offset[g] + 5 * entries[g];
        ga.z = base + offset[g] + 7 * entries[g];
        ga.argmax = argmax_scratch.data_ptr<int32_t>() + argmax_offset[g];
      } else {  // read only
        ga.P = saved[4 * g].data_ptr<acc_t>();
        ga.z = saved[4 * g + 2].data_ptr<acc_t>();
        ga.argmax = saved[4 * g + 1].data_ptr<int32_t>();
      }
      ga.scale_shift = saved[4 * g + 3].data_ptr<acc_t>();
      ga.stats = stats.data_ptr<acc_t>() + 2 * g;
      ga.value = base + offset[g];
      ga.grad = base + offset[g] + entries[g];
      ga.dz = base + offset[g] + 2 * entries[g];
      ga.d_pooled = need_pooled[stage_of[g]] ? base + offset[g] + 3 * entries[g] : nullptr;
      ga.d_conv = need(0, g) ? d_conv[g].data_ptr<acc_t>() : nullptr;
      ga.d_bn_weight = d_bn_w[g].numel() ? d_bn_w[g].data_ptr<acc_t>() : nullptr;
      ga.d_bn_bias = d_bn_b[g].numel() ? d_bn_b[g].data_ptr<acc_t>() : nullptr;
      ga.split = splits[g];
    }

    // Terms in the walk's order; which gradient each term stores or adds to.
    std::vector<bool> written(n_gates, false);
    const auto add_term = [&](const WeightSpec& w, const Upstream<scalar_t, acc_t>& up) {
      const int t = args.n_terms++;
      args.term[t].weight = make_weight<acc_t>(gates, w);
      args.term[t].upstream = up;
      for (size_t k = 0; k < w.factors.size(); ++k) {
        for (size_t j = 0; j < w.factors[k].size(); ++j) {
          const int g = w.factors[k][j];
          args.term_gate[t][k][j] = g;
          args.term_first[t][k][j] = !written[g];
          written[g] = true;
        }
      }
      return t;
    };
    Upstream<scalar_t, acc_t> output_up{};
    const at::Tensor dout5 = dout.view(v.sizes());
    output_up.dout = dout5.data_ptr<scalar_t>();
    output_up.dout_strides = strides_of(dout5);
    add_term(plan.output, output_up);
    for (int s = n_stages - 1; s >= 0; --s) {
      const PlanStage& stage = plan.stages[s];
      TORCH_CHECK(stage.gates.size() >= 1 && stage.gates.size() <= static_cast<size_t>(kMaxStageGates),
                  "aia_native: a stage has 1 or 3 gates");
      args.stage_n_gates[s] = static_cast<int>(stage.gates.size());
      Upstream<scalar_t, acc_t> pooled{};
      pooled.n_items = args.stage_n_gates[s];
      for (int j = 0; j < args.stage_n_gates[s]; ++j) {
        const int g = stage.gates[j];
        args.stage_gates[s][j] = g;
        args.gate[g].has_grad = written[g];  // every later term has been added
        pooled.axis[j] = plan.gate_axis[g];
        pooled.grad[j] = args.gate[g].d_pooled;
        pooled.argmax[j] = args.gate[g].argmax;
      }
      args.stage_term[s] = need_pooled[s] ? add_term(stage.weight, pooled) : -1;
      args.stage_recompute[s] = stage.recompute;
      if (stage.recompute) args.stage_weight[s] = make_weight<acc_t>(gates, stage.weight);
    }
    args.params = base + params_offset;
    args.partials = partials.data_ptr<double>();
    args.split_partials = base + split_offset;

    void* kernel_args[] = {&args};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(plan_backward_kernel<scalar_t, acc_t>, dim3(blocks), dim3(kThreads),
                                               kernel_args, 0, c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, d_conv, d_bn_w, d_bn_b};
}

}  // namespace cuda
}  // namespace aia
