// Index math and per-element formulas shared by the CPU (aia_cpu_*.cpp) and CUDA
// (aia_cuda.cu) kernels. Everything here is plain data + AIA_HD functions, so both
// compilers see the same definitions of the gate layouts, the weight expression and
// the upstream-gradient expansion (see aia_kernels/primitives/__init__.py).
#pragma once
#include <cstdint>

// Loops over the small fixed-size arrays (factors, a factor's gates, pooled-gradient
// items) run to the array's size, skipping entries past the count, and are unrolled:
// with constant indices the arrays stay in registers. A runtime index into a register
// array puts it in local memory, a per-thread stack frame in DRAM behind L1 (ptxas
// --resource-usage shows it; tests/test_native_cuda_compile.py checks it).
#if defined(__CUDACC__)
#define AIA_HD __host__ __device__ __forceinline__
#define AIA_UNROLL _Pragma("unroll")
#else
#define AIA_HD inline
#define AIA_UNROLL
#endif

namespace aia {

// Pooled axis of a gate. Gate layouts (N, D1, D2, D3): C -> (T, H, W), T -> (C, H, W),
// H -> (T, C, W), W -> (T, H, C) (the spec's conv axes).
enum Axis : int { kAxisC = 0, kAxisT = 1, kAxisH = 2, kAxisW = 3 };

constexpr int kMaxFactors = 2;      // a weight is a product/mean of at most two factors
constexpr int kMaxFactorGates = 3;  // a factor is one C gate or the mean of T, H, W gates
constexpr int kMaxItems = 3;        // pooled-gradient items in one upstream (T, H, W)
constexpr int kMaxTerms = 8;        // (weight, upstream) terms summed by input_grad

struct Dims {
  int64_t N, T, C, H, W;
};

// Element strides of a (N, T, C, H, W) view.
struct Strides5 {
  int64_t n, t, c, h, w;
};

AIA_HD int64_t offset5(const Strides5& s, int64_t n, int64_t t, int64_t c, int64_t h, int64_t w) {
  return n * s.n + t * s.t + c * s.c + h * s.h + w * s.w;
}

AIA_HD int64_t axis_length(int axis, const Dims& d) {
  return axis == kAxisC ? d.C : axis == kAxisT ? d.T : axis == kAxisH ? d.H : d.W;
}

// Position of element (t, c, h, w) along the pooled axis.
AIA_HD int64_t axis_position(int axis, int64_t t, int64_t c, int64_t h, int64_t w) {
  return axis == kAxisC ? c : axis == kAxisT ? t : axis == kAxisH ? h : w;
}

// Elements of one sample of a gate tensor: D1 * D2 * D3.
AIA_HD int64_t gate_sample_size(int axis, const Dims& d) {
  return d.T * d.C * d.H * d.W / axis_length(axis, d);
}

// Offset of the gate entry that element (n, t, c, h, w) of v reads, in a contiguous
// (N, D1, D2, D3) gate tensor.
AIA_HD int64_t gate_offset(int axis, const Dims& d, int64_t n, int64_t t, int64_t c, int64_t h, int64_t w) {
  switch (axis) {
    case kAxisC: return ((n * d.T + t) * d.H + h) * d.W + w;
    case kAxisT: return ((n * d.C + c) * d.H + h) * d.W + w;
    case kAxisH: return ((n * d.T + t) * d.C + c) * d.W + w;
    default:     return ((n * d.T + t) * d.H + h) * d.C + c;
  }
}

struct Coords {
  int64_t n, t, c, h, w;
};

// Inverse of gate_offset: element `pos` along the pooled axis of gate entry `g`.
AIA_HD Coords gate_coords(int axis, const Dims& d, int64_t g, int64_t pos) {
  Coords x;
  switch (axis) {
    case kAxisC: x.w = g % d.W; x.h = g / d.W % d.H; x.t = g / (d.W * d.H) % d.T; x.n = g / (d.W * d.H * d.T); x.c = pos; break;
    case kAxisT: x.w = g % d.W; x.h = g / d.W % d.H; x.c = g / (d.W * d.H) % d.C; x.n = g / (d.W * d.H * d.C); x.t = pos; break;
    case kAxisH: x.w = g % d.W; x.c = g / d.W % d.C; x.t = g / (d.W * d.C) % d.T; x.n = g / (d.W * d.C * d.T); x.h = pos; break;
    default:     x.c = g % d.C; x.h = g / d.C % d.H; x.t = g / (d.C * d.H) % d.T; x.n = g / (d.C * d.H * d.T); x.w = pos;
  }
  return x;
}

// Logical (n, t, c, h, w) of a flat index into the (N, T, C, H, W) shape.
AIA_HD Coords element_coords(const Dims& d, int64_t i) {
  Coords x;
  x.w = i % d.W; x.h = i / d.W % d.H; x.c = i / (d.W * d.H) % d.C; x.t = i / (d.W * d.H * d.C) % d.T;
  x.n = i / (d.W * d.H * d.C * d.T);
  return x;
}

// Offsets of the max and mean channels of a pooled tensor (N, 2, D1, D2, D3) for
// gate offset `g` of sample n.
AIA_HD int64_t pooled_max_offset(int64_t g, int64_t n, int64_t sample) { return g + n * sample; }
AIA_HD int64_t pooled_mean_offset(int64_t g, int64_t n, int64_t sample) { return g + (n + 1) * sample; }

// A weight expression: gate values are sigmoid(a * z + b), precomputed per gate.
template <typename acc_t>
struct Weight {
  int n_factors;  // 0 (weight 1), 1 or 2
  bool mean;      // combine: mean of the factors (else product)
  int size[kMaxFactors];  // gates in each factor: 1 (C) or 3 (T, H, W averaged)
  int axis[kMaxFactors][kMaxFactorGates];
  const acc_t* gate[kMaxFactors][kMaxFactorGates];
};

template <typename acc_t>
AIA_HD acc_t factor_at(const Weight<acc_t>& wt, int k, const Dims& d, int64_t n, int64_t t, int64_t c,
                       int64_t h, int64_t w) {
  acc_t s = 0;
  AIA_UNROLL for (int j = 0; j < kMaxFactorGates; ++j) {
    if (j < wt.size[k]) s += wt.gate[k][j][gate_offset(wt.axis[k][j], d, n, t, c, h, w)];
  }
  return wt.size[k] == 1 ? s : s / acc_t(wt.size[k]);
}

// Combine factor values f[0..n_factors) into the weight.
template <typename acc_t>
AIA_HD acc_t combine_factors(const Weight<acc_t>& wt, const acc_t* f) {
  if (wt.n_factors == 0) return acc_t(1);
  if (wt.n_factors == 1) return f[0];
  return wt.mean ? (f[0] + f[1]) * acc_t(0.5) : f[0] * f[1];
}

// d weight / d factor_k, given the factor values.
template <typename acc_t>
AIA_HD acc_t factor_partial(const Weight<acc_t>& wt, int k, const acc_t* f) {
  if (wt.mean) return acc_t(1) / acc_t(wt.n_factors);
  return wt.n_factors == 2 ? (k == 0 ? f[1] : f[0]) : acc_t(1);
}

template <typename acc_t>
AIA_HD acc_t weight_at(const Weight<acc_t>& wt, const Dims& d, int64_t n, int64_t t, int64_t c, int64_t h,
                       int64_t w) {
  acc_t f[kMaxFactors] = {acc_t(1), acc_t(1)};
  AIA_UNROLL for (int k = 0; k < kMaxFactors; ++k) {
    if (k < wt.n_factors) f[k] = factor_at(wt, k, d, n, t, c, h, w);
  }
  return combine_factors(wt, f);
}

// Max (first position on ties), its position and sum of weight * v over positions
// [p0, p1) of gate entry `g`'s pooled axis, visited in order.
template <typename acc_t>
struct PoolPartial {
  acc_t mx, sum;
  int32_t arg;
};

template <typename scalar_t, typename acc_t>
AIA_HD PoolPartial<acc_t> pool_range(const scalar_t* v, const Strides5& vs, const Dims& d, const Weight<acc_t>& wt,
                                     int axis, int64_t g, int64_t p0, int64_t p1) {
  PoolPartial<acc_t> r{acc_t(0), acc_t(0), static_cast<int32_t>(p0)};
  for (int64_t p = p0; p < p1; ++p) {
    const Coords x = gate_coords(axis, d, g, p);
    const acc_t y = weight_at(wt, d, x.n, x.t, x.c, x.h, x.w) * static_cast<acc_t>(v[offset5(vs, x.n, x.t, x.c, x.h, x.w)]);
    if (p == p0 || y > r.mx) {
      r.mx = y;
      r.arg = static_cast<int32_t>(p);
    }
    r.sum += y;
  }
  return r;
}

// Writes gate entry `g`'s pooled max and mean into P (N, 2, D1, D2, D3) and argmax (N, D1, D2, D3).
template <typename acc_t>
AIA_HD void write_pooled(const PoolPartial<acc_t>& r, int axis, const Dims& d, int64_t g, acc_t* P, int32_t* argmax) {
  const int64_t n = gate_coords(axis, d, g, 0).n;
  const int64_t sample = gate_sample_size(axis, d);
  P[pooled_max_offset(g, n, sample)] = r.mx;
  P[pooled_mean_offset(g, n, sample)] = r.sum / acc_t(axis_length(axis, d));
  if (argmax != nullptr) argmax[g] = r.arg;  // null: positions not kept
}

// Pooling of one gate entry `g` along `axis`: max (first index on ties), argmax and mean
// of weight * v, the positions visited in order, so the result does not depend on who calls it.
template <typename scalar_t, typename acc_t>
AIA_HD void pool_entry(const scalar_t* v, const Strides5& vs, const Dims& d, const Weight<acc_t>& wt, int axis,
                       int64_t g, acc_t* P, int32_t* argmax) {
  write_pooled(pool_range(v, vs, d, wt, axis, g, 0, axis_length(axis, d)), axis, d, g, P, argmax);
}

// Upstream gradient of a full-size tensor: a full tensor `dout` (v's dtype, any
// strides) or pooled-gradient items expanded on the fly: the mean part spread evenly
// over the pooled axis, the max part to the argmax.
template <typename scalar_t, typename acc_t>
struct Upstream {
  const scalar_t* dout;  // nullptr when the items are used
  Strides5 dout_strides;
  int n_items;
  int axis[kMaxItems];
  const acc_t* grad[kMaxItems];       // (N, 2, D1, D2, D3)
  const int32_t* argmax[kMaxItems];   // (N, D1, D2, D3)
};

// One item's contribution at element (n, t, c, h, w).
template <typename acc_t>
AIA_HD acc_t pooled_grad_at(int axis, const acc_t* grad, const int32_t* argmax, const Dims& d, int64_t n,
                            int64_t t, int64_t c, int64_t h, int64_t w) {
  const int64_t g = gate_offset(axis, d, n, t, c, h, w);
  const int64_t sample = gate_sample_size(axis, d);
  acc_t u = grad[pooled_mean_offset(g, n, sample)] / acc_t(axis_length(axis, d));
  if (argmax[g] == axis_position(axis, t, c, h, w)) u += grad[pooled_max_offset(g, n, sample)];
  return u;
}

template <typename scalar_t, typename acc_t>
AIA_HD acc_t upstream_at(const Upstream<scalar_t, acc_t>& up, const Dims& d, int64_t n, int64_t t, int64_t c,
                         int64_t h, int64_t w) {
  if (up.dout != nullptr) return static_cast<acc_t>(up.dout[offset5(up.dout_strides, n, t, c, h, w)]);
  acc_t u = 0;
  AIA_UNROLL for (int i = 0; i < kMaxItems; ++i) {
    if (i < up.n_items) u += pooled_grad_at(up.axis[i], up.grad[i], up.argmax[i], d, n, t, c, h, w);
  }
  return u;
}

// d loss / d (gate j of factor k) at gate entry `g`, over positions [p0, p1) of its
// pooled axis in order: the sum of upstream * v * (d weight / d factor_k) / size_k.
template <typename scalar_t, typename acc_t>
AIA_HD acc_t weight_grad_range(const scalar_t* v, const Strides5& vs, const Dims& d, const Weight<acc_t>& wt,
                               const Upstream<scalar_t, acc_t>& up, int k, int j, int64_t g, int64_t p0, int64_t p1) {
  const int axis = wt.axis[k][j];
  const acc_t inv_size = acc_t(1) / acc_t(wt.size[k]);
  acc_t sum = 0;
  for (int64_t p = p0; p < p1; ++p) {
    const Coords x = gate_coords(axis, d, g, p);
    acc_t f[kMaxFactors] = {acc_t(1), acc_t(1)};
    AIA_UNROLL for (int q = 0; q < kMaxFactors; ++q) {
      if (q < wt.n_factors) f[q] = factor_at(wt, q, d, x.n, x.t, x.c, x.h, x.w);
    }
    sum += upstream_at(up, d, x.n, x.t, x.c, x.h, x.w) * static_cast<acc_t>(v[offset5(vs, x.n, x.t, x.c, x.h, x.w)]) *
           factor_partial(wt, k, f) * inv_size;
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
AIA_HD acc_t weight_grad_entry(const scalar_t* v, const Strides5& vs, const Dims& d, const Weight<acc_t>& wt,
                               const Upstream<scalar_t, acc_t>& up, int k, int j, int64_t g) {
  return weight_grad_range(v, vs, d, wt, up, k, j, g, 0, axis_length(wt.axis[k][j], d));
}

// A weight and the upstream gradient of the tensor it produced: one term of d loss / d v.
template <typename scalar_t, typename acc_t>
struct WeightedUpstream {
  Weight<acc_t> weight;
  Upstream<scalar_t, acc_t> upstream;
};

// d loss / d v at element x: the sum over the terms, in order.
template <typename scalar_t, typename acc_t>
AIA_HD acc_t input_grad_at(const WeightedUpstream<scalar_t, acc_t>* terms, int count, const Dims& d, const Coords& x) {
  acc_t sum = 0;
  for (int k = 0; k < count; ++k) {
    sum += weight_at(terms[k].weight, d, x.n, x.t, x.c, x.h, x.w) *
           upstream_at(terms[k].upstream, d, x.n, x.t, x.c, x.h, x.w);
  }
  return sum;
}

// ---- Conv3d(2 -> 1, 3x3x3, padding 1) on a pooled tensor (N, 2, D1, D2, D3) ----

struct ConvDims {
  int64_t N, D1, D2, D3;
};

AIA_HD bool in_range(int64_t i, int64_t n) { return i >= 0 && i < n; }

// z[n, a, b, c] = sum_{ci, k} w[ci, k] * P[n, ci, a + k1 - 1, b + k2 - 1, c + k3 - 1]
template <typename acc_t>
AIA_HD acc_t conv_output_at(const acc_t* P, const acc_t* wt, const ConvDims& d, int64_t n, int64_t a, int64_t b,
                            int64_t c) {
  const int64_t plane = d.D1 * d.D2 * d.D3;
  acc_t s = 0;
  for (int ci = 0; ci < 2; ++ci) {
    const acc_t* p = P + (n * 2 + ci) * plane;
    for (int k1 = 0; k1 < 3; ++k1) {
      const int64_t i1 = a + k1 - 1;
      if (!in_range(i1, d.D1)) continue;
      for (int k2 = 0; k2 < 3; ++k2) {
        const int64_t i2 = b + k2 - 1;
        if (!in_range(i2, d.D2)) continue;
        for (int k3 = 0; k3 < 3; ++k3) {
          const int64_t i3 = c + k3 - 1;
          if (!in_range(i3, d.D3)) continue;
          s += wt[((ci * 3 + k1) * 3 + k2) * 3 + k3] * p[(i1 * d.D2 + i2) * d.D3 + i3];
        }
      }
    }
  }
  return s;
}

// d loss / d P[n, ci, a, b, c] = sum_k w[ci, k] * dz[n, a - k1 + 1, b - k2 + 1, c - k3 + 1]
template <typename acc_t>
AIA_HD acc_t conv_input_grad_at(const acc_t* dz, const acc_t* wt, const ConvDims& d, int64_t n, int ci, int64_t a,
                                int64_t b, int64_t c) {
  const acc_t* g = dz + n * d.D1 * d.D2 * d.D3;
  acc_t s = 0;
  for (int k1 = 0; k1 < 3; ++k1) {
    const int64_t i1 = a - k1 + 1;
    if (!in_range(i1, d.D1)) continue;
    for (int k2 = 0; k2 < 3; ++k2) {
      const int64_t i2 = b - k2 + 1;
      if (!in_range(i2, d.D2)) continue;
      for (int k3 = 0; k3 < 3; ++k3) {
        const int64_t i3 = c - k3 + 1;
        if (!in_range(i3, d.D3)) continue;
        s += wt[((ci * 3 + k1) * 3 + k2) * 3 + k3] * g[(i1 * d.D2 + i2) * d.D3 + i3];
      }
    }
  }
  return s;
}

// The two above at a flat index: z (N, D1, D2, D3) and d loss / d P (N, 2, D1, D2, D3).
template <typename acc_t>
AIA_HD acc_t conv_output_flat(const acc_t* P, const acc_t* wt, const ConvDims& d, int64_t i) {
  const int64_t c = i % d.D3, b = i / d.D3 % d.D2, a = i / (d.D3 * d.D2) % d.D1, n = i / (d.D3 * d.D2 * d.D1);
  return conv_output_at(P, wt, d, n, a, b, c);
}

template <typename acc_t>
AIA_HD acc_t conv_input_grad_flat(const acc_t* dz, const acc_t* wt, const ConvDims& d, int64_t i) {
  const int64_t c = i % d.D3, b = i / d.D3 % d.D2, a = i / (d.D3 * d.D2) % d.D1;
  const int ci = static_cast<int>(i / (d.D3 * d.D2 * d.D1) % 2);
  const int64_t n = i / (d.D3 * d.D2 * d.D1 * 2);
  return conv_input_grad_at(dz, wt, d, n, ci, a, b, c);
}

// One output position's term of d loss / d w[ci, k1, k2, k3]: P[n, ci, pos + k - 1] * dz[n, pos].
// `flat` runs over N * D1 * D2 * D3.
template <typename acc_t>
AIA_HD acc_t conv_weight_grad_term(const acc_t* P, const acc_t* dz, const ConvDims& d, int tap, int64_t flat) {
  const int ci = tap / 27, k1 = tap / 9 % 3, k2 = tap / 3 % 3, k3 = tap % 3;
  const int64_t c = flat % d.D3, b = flat / d.D3 % d.D2, a = flat / (d.D3 * d.D2) % d.D1;
  const int64_t n = flat / (d.D3 * d.D2 * d.D1);
  const int64_t i1 = a + k1 - 1, i2 = b + k2 - 1, i3 = c + k3 - 1;
  if (!in_range(i1, d.D1) || !in_range(i2, d.D2) || !in_range(i3, d.D3)) return acc_t(0);
  return P[((n * 2 + ci) * d.D1 + i1) * d.D2 * d.D3 + i2 * d.D3 + i3] * dz[flat];
}

}  // namespace aia
