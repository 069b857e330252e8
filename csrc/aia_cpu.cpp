// CPU kernels of the AIA primitives.
//
// The unit of work is a "plane": the (H, W) slice of v at fixed (n, t, c). Every
// gate is constant or a row/column along a plane, so the weight of a plane is built
// in a small buffer with contiguous (vectorisable) loops, then used by the full-size
// pass. Reductions are parallelised over slices that own their outputs, so results
// are bitwise deterministic (no atomics, fixed summation order):
//   - pooling / gradient along C: parallel over (n, t), loop over c inside;
//   - pooling / gradient along T, H, W: parallel over (n, c), loop over t inside.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "aia_host.h"

namespace aia {
namespace cpu {
namespace {

template <typename acc_t>
struct Vec {
  static constexpr int kLanes = 64 / sizeof(acc_t);
  typedef acc_t type __attribute__((vector_size(64), aligned(sizeof(acc_t))));  // unaligned loads/stores
  // Same-width integers: lane masks of comparisons, lane indices.
  using int_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef int_t itype __attribute__((vector_size(64)));
  static itype iota() {
    itype v;
    for (int l = 0; l < kLanes; ++l) v[l] = l;
    return v;
  }
  static type load(const acc_t* p) { return *reinterpret_cast<const type*>(p); }
  static void store(acc_t* p, const type& v) { *reinterpret_cast<type*>(p) = v; }
};

// A plane row of W <= Vec::kLanes entries held in one vector. Rows of 7x7 and 14x14
// planes are shorter than the vector width, so plain loops over them run scalar; with
// AVX-512 a row is one masked load/store, elsewhere an element loop fills the vector.
template <typename acc_t>
struct Row {
  using V = Vec<acc_t>;
  using vec = typename V::type;
  int64_t W;
  static bool fits(int64_t W) { return W <= V::kLanes; }
#if defined(__AVX512F__)
  vec load(const acc_t* p) const {
    if constexpr (sizeof(acc_t) == 4) return (vec)_mm512_maskz_loadu_ps(mask(), p);
    else return (vec)_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask()), p);
  }
  void store(acc_t* p, const vec& v) const {
    if constexpr (sizeof(acc_t) == 4) _mm512_mask_storeu_ps(p, mask(), (__m512)v);
    else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(mask()), (__m512d)v);
  }
  __mmask16 mask() const { return static_cast<__mmask16>((1u << W) - 1u); }
  typename V::itype load_index(const int32_t* p) const {
    if constexpr (sizeof(acc_t) == 4) return (typename V::itype)_mm512_maskz_loadu_epi32(mask(), p);
    else return load_index_loop(p);
  }
#else
  typename V::itype load_index(const int32_t* p) const { return load_index_loop(p); }
  vec load(const acc_t* p) const {
    vec v{};
    for (int64_t w = 0; w < W; ++w) v[w] = p[w];
    return v;
  }
  void store(acc_t* p, const vec& v) const {
    for (int64_t w = 0; w < W; ++w) p[w] = v[w];
  }
#endif
  typename V::itype load_index_loop(const int32_t* p) const {
    typename V::itype v{};
    for (int64_t w = 0; w < W; ++w) v[w] = p[w];
    return v;
  }
};

// Work items below this many elements are not worth a thread.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// A plane's location in a strided (N, T, C, H, W) tensor.
template <typename scalar_t>
struct StridedPlane {
  scalar_t* base;
  int64_t sh, sw;
};

template <typename scalar_t>
StridedPlane<scalar_t> plane_of(scalar_t* data, const Strides5& s, int64_t n, int64_t t, int64_t c) {
  return {data + n * s.n + t * s.t + c * s.c, s.h, s.w};
}

template <typename scalar_t, typename acc_t>
void load_plane(const StridedPlane<const scalar_t>& p, int64_t H, int64_t W, acc_t* out) {
  if (p.sw == 1 && p.sh == W) {  // contiguous plane: one flat loop (small planes vectorise too)
    for (int64_t i = 0; i < H * W; ++i) out[i] = static_cast<acc_t>(p.base[i]);
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* row = p.base + h * p.sh;
    acc_t* o = out + h * W;
    if (p.sw == 1) {
      for (int64_t w = 0; w < W; ++w) o[w] = static_cast<acc_t>(row[w]);
    } else {
      for (int64_t w = 0; w < W; ++w) o[w] = static_cast<acc_t>(row[w * p.sw]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void store_plane(const acc_t* in, int64_t H, int64_t W, const StridedPlane<scalar_t>& p) {
  if (p.sw == 1 && p.sh == W) {
    for (int64_t i = 0; i < H * W; ++i) p.base[i] = static_cast<scalar_t>(in[i]);
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    scalar_t* row = p.base + h * p.sh;
    const acc_t* x = in + h * W;
    if (p.sw == 1) {
      for (int64_t w = 0; w < W; ++w) row[w] = static_cast<scalar_t>(x[w]);
    } else {
      for (int64_t w = 0; w < W; ++w) row[w * p.sw] = static_cast<scalar_t>(x[w]);
    }
  }
}

// out (=|+=) the values of one gate over plane (n, t, c).
template <typename acc_t>
void gate_plane(int axis, const acc_t* gate, const Dims& d, int64_t n, int64_t t, int64_t c, acc_t* out,
                bool accumulate) {
  const int64_t H = d.H, W = d.W;
  const acc_t* g = gate + gate_offset(axis, d, n, t, c, 0, 0);
  if (axis == kAxisC || axis == kAxisT) {  // a full, contiguous (H, W) plane of the gate
    if (accumulate) for (int64_t i = 0; i < H * W; ++i) out[i] += g[i];
    else            for (int64_t i = 0; i < H * W; ++i) out[i] = g[i];
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    acc_t* o = out + h * W;
    if (axis == kAxisH) {  // one value per w, the same in every row
      if (accumulate) for (int64_t w = 0; w < W; ++w) o[w] += g[w];
      else            for (int64_t w = 0; w < W; ++w) o[w] = g[w];
    } else {  // W gate: one value per h (stride C in its layout)
      const acc_t x = g[h * d.C];
      if (accumulate) for (int64_t w = 0; w < W; ++w) o[w] += x;
      else            for (int64_t w = 0; w < W; ++w) o[w] = x;
    }
  }
}

// Per-thread buffers of HW elements, and the weight of the current plane.
template <typename acc_t>
struct PlaneScratch {
  int64_t HW;
  std::vector<acc_t> storage;
  acc_t* factor[kMaxFactors];
  acc_t* weight;   // combined weight (== factor[0] when there is one factor)
  acc_t* x;        // v (later y = weight * v)
  acc_t* up;       // upstream gradient
  acc_t* tmp;

  explicit PlaneScratch(int64_t hw) : HW(hw), storage(static_cast<size_t>(hw) * 6) {
    factor[0] = storage.data();
    factor[1] = factor[0] + hw;
    weight = factor[1] + hw;
    x = weight + hw;
    up = x + hw;
    tmp = up + hw;
  }
};

template <typename acc_t>
void factor_plane(const Weight<acc_t>& wt, int k, const Dims& d, int64_t n, int64_t t, int64_t c, acc_t* out) {
  if (wt.size[k] == 1) {
    gate_plane(wt.axis[k][0], wt.gate[k][0], d, n, t, c, out, false);
    return;
  }
  // (T + H + W) / 3 in one pass over the plane (the parser guarantees the T, H, W order):
  // the T gate is a plane, the H gate a row repeated over h, the W gate a value per h.
  const acc_t* gt = wt.gate[k][0] + gate_offset(kAxisT, d, n, t, c, 0, 0);
  const acc_t* gh = wt.gate[k][1] + gate_offset(kAxisH, d, n, t, c, 0, 0);
  const acc_t* gw = wt.gate[k][2] + gate_offset(kAxisW, d, n, t, c, 0, 0);
  const acc_t inv = acc_t(1) / acc_t(3);
  if (Row<acc_t>::fits(d.W)) {
    const Row<acc_t> row{d.W};
    const typename Row<acc_t>::vec hv = row.load(gh);
    for (int64_t h = 0; h < d.H; ++h) row.store(out + h * d.W, (row.load(gt + h * d.W) + hv + gw[h * d.C]) * inv);
    return;
  }
  for (int64_t h = 0; h < d.H; ++h) {
    const acc_t x = gw[h * d.C];
    const acc_t* row = gt + h * d.W;
    acc_t* o = out + h * d.W;
    for (int64_t w = 0; w < d.W; ++w) o[w] = (row[w] + gh[w] + x) * inv;
  }
}

// Fills s.factor[*] and s.weight for plane (n, t, c); returns false when the weight is 1.
template <typename acc_t>
bool weight_plane(const Weight<acc_t>& wt, const Dims& d, int64_t n, int64_t t, int64_t c, PlaneScratch<acc_t>& s) {
  const int64_t HW = s.HW;
  for (int k = 0; k < wt.n_factors; ++k) factor_plane(wt, k, d, n, t, c, s.factor[k]);
  if (wt.n_factors == 0) return false;
  if (wt.n_factors == 1) {
    s.weight = s.factor[0];
    return true;
  }
  s.weight = s.tmp;
  const acc_t* f0 = s.factor[0];
  const acc_t* f1 = s.factor[1];
  if (wt.mean) for (int64_t i = 0; i < HW; ++i) s.weight[i] = (f0[i] + f1[i]) * acc_t(0.5);
  else         for (int64_t i = 0; i < HW; ++i) s.weight[i] = f0[i] * f1[i];
  return true;
}

// s.x = weight * v over plane (n, t, c).
template <typename scalar_t, typename acc_t>
void weighted_plane(const Weight<acc_t>& wt, const scalar_t* v, const Strides5& vs, const Dims& d, int64_t n,
                    int64_t t, int64_t c, PlaneScratch<acc_t>& s) {
  load_plane(plane_of(v, vs, n, t, c), d.H, d.W, s.x);
  if (weight_plane(wt, d, n, t, c, s)) {
    for (int64_t i = 0; i < s.HW; ++i) s.x[i] *= s.weight[i];
  }
}

// out = the upstream gradient over plane (n, t, c).
template <typename scalar_t, typename acc_t>
void upstream_plane(const Upstream<scalar_t, acc_t>& up, const Dims& d, int64_t n, int64_t t, int64_t c, acc_t* out) {
  const int64_t H = d.H, W = d.W, HW = H * W;
  if (up.dout != nullptr) {
    load_plane(plane_of(up.dout, up.dout_strides, n, t, c), H, W, out);
    return;
  }
  std::fill(out, out + HW, acc_t(0));
  for (int i = 0; i < up.n_items; ++i) {
    const int axis = up.axis[i];
    const int64_t g = gate_offset(axis, d, n, t, c, 0, 0);
    const int64_t sample = gate_sample_size(axis, d);
    const acc_t* gmax = up.grad[i] + pooled_max_offset(g, n, sample);
    const acc_t* gmean = up.grad[i] + pooled_mean_offset(g, n, sample);
    const int32_t* arg = up.argmax[i] + g;
    const acc_t inv_len = acc_t(1) / acc_t(axis_length(axis, d));
    if (axis == kAxisC || axis == kAxisT) {
      const int32_t pos = static_cast<int32_t>(axis == kAxisC ? c : t);
      for (int64_t j = 0; j < HW; ++j) out[j] += gmean[j] * inv_len + (arg[j] == pos ? gmax[j] : acc_t(0));
    } else if (axis == kAxisH) {  // the mean part is one row repeated; the max part one entry per column
      if (Row<acc_t>::fits(W)) {  // the max part as a lane select: no scalar write after a vector store
        using V = Vec<acc_t>;
        const Row<acc_t> row{W};
        const typename V::type mean = row.load(gmean) * inv_len, mx = row.load(gmax), zero{};
        const typename V::itype rows = row.load_index(arg);
        for (int64_t h = 0; h < H; ++h)
          row.store(out + h * W, row.load(out + h * W) + mean + (rows == typename V::int_t(h) ? mx : zero));
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        acc_t* o = out + h * W;
        for (int64_t w = 0; w < W; ++w) o[w] += gmean[w] * inv_len;
      }
      for (int64_t w = 0; w < W; ++w) out[arg[w] * W + w] += gmax[w];
    } else {
      if (Row<acc_t>::fits(W)) {
        using V = Vec<acc_t>;
        const Row<acc_t> row{W};
        const typename V::itype lanes = V::iota();
        const typename V::type zero{};
        for (int64_t h = 0; h < H; ++h) {
          const acc_t spread = gmean[h * d.C] * inv_len;
          const typename V::type mx = zero + gmax[h * d.C];
          const typename V::int_t at = arg[h * d.C];
          row.store(out + h * W, row.load(out + h * W) + spread + (lanes == at ? mx : zero));
        }
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        acc_t* o = out + h * W;
        const acc_t spread = gmean[h * d.C] * inv_len;
        for (int64_t w = 0; w < W; ++w) o[w] += spread;
        o[arg[h * d.C]] += gmax[h * d.C];
      }
    }
  }
}

// Running max (first maximum wins) and sum along a pooled axis.
template <typename acc_t>
void reduce_step(const acc_t* y, int64_t len, int32_t pos, bool first, acc_t* mx, acc_t* sum, int32_t* arg) {
  if (first) {
    for (int64_t i = 0; i < len; ++i) {
      mx[i] = y[i];
      sum[i] = y[i];
      arg[i] = pos;
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {  // branch-free: short rows (7x7 planes) mispredict a branch
    const int32_t greater = -static_cast<int32_t>(y[i] > mx[i]);
    mx[i] = std::max(mx[i], y[i]);  // == (y > mx ? y : mx), NaNs included
    arg[i] += (pos - arg[i]) & greater;
    sum[i] += y[i];
  }
}

// Max (first index on ties), argmax and sum of every row of an (H, W) plane. Rows are
// the inner loop, so it is branch-free and the sums keep their sequential order.
template <typename acc_t>
void pool_rows(const acc_t* y, int64_t H, int64_t W, acc_t* mx, acc_t* sum, int32_t* arg) {
  for (int64_t h = 0; h < H; ++h) {
    mx[h] = y[h * W];
    sum[h] = y[h * W];
    arg[h] = 0;
  }
  for (int64_t w = 1; w < W; ++w) {
    for (int64_t h = 0; h < H; ++h) {  // branch-free, as in reduce_step
      const acc_t x = y[h * W + w];
      const int32_t greater = -static_cast<int32_t>(x > mx[h]);
      mx[h] = std::max(mx[h], x);
      arg[h] += (static_cast<int32_t>(w) - arg[h]) & greater;
      sum[h] += x;
    }
  }
}

// Sum of every row of an (H, W) plane, rows innermost (no per-row setup; sequential order).
template <typename acc_t>
void row_sums(const acc_t* y, int64_t H, int64_t W, acc_t* sum) {
  for (int64_t h = 0; h < H; ++h) sum[h] = y[h * W];
  for (int64_t w = 1; w < W; ++w)
    for (int64_t h = 0; h < H; ++h) sum[h] += y[h * W + w];
}

// Writes max and mean at gate offset g (a contiguous run of `len` entries).
template <typename acc_t>
void write_pooled(const acc_t* mx, const acc_t* sum, const int32_t* arg, int64_t len, acc_t axis_len, acc_t* P,
                  int32_t* argmax, int64_t g, int64_t n, int64_t sample) {
  acc_t* pm = P + pooled_max_offset(g, n, sample);
  acc_t* pa = P + pooled_mean_offset(g, n, sample);
  for (int64_t i = 0; i < len; ++i) {
    pm[i] = mx[i];
    pa[i] = sum[i] / axis_len;
    argmax[g + i] = arg[i];
  }
}

struct PoolOut {
  at::Tensor P, argmax;
};

template <typename scalar_t>
void pool_kernel(const at::Tensor& v, const GateSet& gates, const WeightSpec& spec, const std::vector<int>& axes,
                 std::vector<PoolOut>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(v);
  const Strides5 vs = strides_of(v);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const Weight<acc_t> wt = make_weight<acc_t>(gates, spec);
  const int64_t H = d.H, W = d.W, HW = H * W;
  acc_t* P[4] = {nullptr, nullptr, nullptr, nullptr};
  int32_t* A[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < axes.size(); ++i) {
    P[axes[i]] = outs[i].P.data_ptr<acc_t>();
    A[axes[i]] = outs[i].argmax.data_ptr<int32_t>();
  }
  if (P[kAxisC] != nullptr) {
    const int64_t sample = gate_sample_size(kAxisC, d);
    at::parallel_for(0, d.N * d.T, grain_for(d.C * HW), [&](int64_t begin, int64_t end) {
      PlaneScratch<acc_t> s(HW);
      std::vector<acc_t> mx(HW), sum(HW);
      std::vector<int32_t> arg(HW);
      for (int64_t nt = begin; nt < end; ++nt) {
        const int64_t n = nt / d.T, t = nt % d.T;
        for (int64_t c = 0; c < d.C; ++c) {
          weighted_plane(wt, vp, vs, d, n, t, c, s);
          reduce_step(s.x, HW, static_cast<int32_t>(c), c == 0, mx.data(), sum.data(), arg.data());
        }
        write_pooled(mx.data(), sum.data(), arg.data(), HW, acc_t(d.C), P[kAxisC], A[kAxisC],
                     gate_offset(kAxisC, d, n, t, 0, 0, 0), n, sample);
      }
    });
  }
  if (P[kAxisT] == nullptr && P[kAxisH] == nullptr && P[kAxisW] == nullptr) return;
  const int64_t sT = gate_sample_size(kAxisT, d), sH = gate_sample_size(kAxisH, d), sW = gate_sample_size(kAxisW, d);
  at::parallel_for(0, d.N * d.C, grain_for(d.T * HW), [&](int64_t begin, int64_t end) {
    PlaneScratch<acc_t> s(HW);
    std::vector<acc_t> tmx(HW), tsum(HW), hmx(W), hsum(W), wmx(H), wsum(H);
    std::vector<int32_t> targ(HW), harg(W), warg(H);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / d.C, c = nc % d.C;
      for (int64_t t = 0; t < d.T; ++t) {
        weighted_plane(wt, vp, vs, d, n, t, c, s);
        const acc_t* y = s.x;
        if (P[kAxisT] != nullptr) reduce_step(y, HW, static_cast<int32_t>(t), t == 0, tmx.data(), tsum.data(), targ.data());
        if (P[kAxisH] != nullptr) {
          for (int64_t h = 0; h < H; ++h) reduce_step(y + h * W, W, static_cast<int32_t>(h), h == 0, hmx.data(), hsum.data(), harg.data());
          write_pooled(hmx.data(), hsum.data(), harg.data(), W, acc_t(H), P[kAxisH], A[kAxisH],
                       gate_offset(kAxisH, d, n, t, c, 0, 0), n, sH);
        }
        if (P[kAxisW] != nullptr) {
          pool_rows(y, H, W, wmx.data(), wsum.data(), warg.data());
          acc_t* pm = P[kAxisW];
          const int64_t g0 = gate_offset(kAxisW, d, n, t, c, 0, 0);
          for (int64_t h = 0; h < H; ++h) {  // entries of consecutive h are C apart
            const int64_t g = g0 + h * d.C;
            pm[pooled_max_offset(g, n, sW)] = wmx[h];
            pm[pooled_mean_offset(g, n, sW)] = wsum[h] / acc_t(W);
            A[kAxisW][g] = warg[h];
          }
        }
      }
      if (P[kAxisT] != nullptr) {
        write_pooled(tmx.data(), tsum.data(), targ.data(), HW, acc_t(d.T), P[kAxisT], A[kAxisT],
                     gate_offset(kAxisT, d, n, 0, c, 0, 0), n, sT);
      }
    }
  });
}

template <typename scalar_t>
void apply_kernel(const at::Tensor& v, const GateSet& gates, const WeightSpec& spec, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(v);
  const Strides5 vs = strides_of(v), os = strides_of(out);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const Weight<acc_t> wt = make_weight<acc_t>(gates, spec);
  const int64_t HW = d.H * d.W;
  at::parallel_for(0, d.N * d.T * d.C, grain_for(HW), [&](int64_t begin, int64_t end) {
    PlaneScratch<acc_t> s(HW);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % d.C, t = i / d.C % d.T, n = i / (d.C * d.T);
      weighted_plane(wt, vp, vs, d, n, t, c, s);
      store_plane(s.x, d.H, d.W, plane_of(op, os, n, t, c));
    }
  });
}

// q * (d weight / d factor_k) / size_k over a plane: the gradient that each gate of
// factor k receives from this plane before its reduction.
template <typename acc_t>
void factor_grad_plane(const Weight<acc_t>& wt, int k, const acc_t* q, PlaneScratch<acc_t>& s, acc_t* out) {
  const acc_t inv = acc_t(1) / acc_t(wt.size[k]);
  if (!wt.mean && wt.n_factors == 2) {
    const acc_t* other = s.factor[1 - k];
    for (int64_t i = 0; i < s.HW; ++i) out[i] = q[i] * other[i] * inv;
  } else {
    const acc_t scale = (wt.mean ? acc_t(1) / acc_t(wt.n_factors) : acc_t(1)) * inv;
    for (int64_t i = 0; i < s.HW; ++i) out[i] = q[i] * scale;
  }
}

// s.up = upstream * v over plane (n, t, c); factor planes filled when a product needs them.
template <typename scalar_t, typename acc_t>
void grad_plane(const Weight<acc_t>& wt, const Upstream<scalar_t, acc_t>& up, const scalar_t* v, const Strides5& vs,
                const Dims& d, int64_t n, int64_t t, int64_t c, PlaneScratch<acc_t>& s) {
  upstream_plane(up, d, n, t, c, s.up);
  load_plane(plane_of(v, vs, n, t, c), d.H, d.W, s.x);
  for (int64_t i = 0; i < s.HW; ++i) s.up[i] *= s.x[i];
  if (!wt.mean && wt.n_factors == 2) {
    for (int k = 0; k < 2; ++k) factor_plane(wt, k, d, n, t, c, s.factor[k]);
  }
}

template <typename scalar_t>
void weight_grad_kernel(const at::Tensor& v, const Term& term, const GateSet& gates, std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(v);
  const Strides5 vs = strides_of(v);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const Weight<acc_t> wt = make_weight<acc_t>(gates, term.weight);
  const Upstream<scalar_t, acc_t> up = make_upstream<scalar_t, acc_t>(term.upstream);
  const int64_t H = d.H, W = d.W, HW = H * W;
  // out_ptr[k][j]: gradient of gate j of factor k.
  acc_t* out_ptr[kMaxFactors][kMaxFactorGates] = {};
  bool any_c = false, any_thw = false;
  {
    size_t o = 0;
    for (int k = 0; k < wt.n_factors; ++k) {
      for (int j = 0; j < wt.size[k]; ++j) {
        out_ptr[k][j] = outs[o++].data_ptr<acc_t>();
        (wt.axis[k][j] == kAxisC ? any_c : any_thw) = true;
      }
    }
  }
  if (any_c) {
    at::parallel_for(0, d.N * d.T, grain_for(d.C * HW), [&](int64_t begin, int64_t end) {
      PlaneScratch<acc_t> s(HW);
      std::vector<acc_t> sums(static_cast<size_t>(HW) * kMaxFactors);
      for (int64_t nt = begin; nt < end; ++nt) {
        const int64_t n = nt / d.T, t = nt % d.T;
        std::fill(sums.begin(), sums.end(), acc_t(0));
        for (int64_t c = 0; c < d.C; ++c) {
          grad_plane(wt, up, vp, vs, d, n, t, c, s);
          for (int k = 0; k < wt.n_factors; ++k) {
            if (wt.axis[k][0] != kAxisC) continue;
            factor_grad_plane(wt, k, s.up, s, s.tmp);
            acc_t* sum = sums.data() + k * HW;
            for (int64_t i = 0; i < HW; ++i) sum[i] += s.tmp[i];
          }
        }
        for (int k = 0; k < wt.n_factors; ++k) {
          if (wt.axis[k][0] != kAxisC) continue;
          std::copy(sums.begin() + k * HW, sums.begin() + (k + 1) * HW,
                    out_ptr[k][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0));
        }
      }
    });
  }
  if (!any_thw) return;
  at::parallel_for(0, d.N * d.C, grain_for(d.T * HW), [&](int64_t begin, int64_t end) {
    PlaneScratch<acc_t> s(HW);
    std::vector<acc_t> tsums(static_cast<size_t>(HW) * kMaxFactors), wsums(H);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / d.C, c = nc % d.C;
      std::fill(tsums.begin(), tsums.end(), acc_t(0));
      for (int64_t t = 0; t < d.T; ++t) {
        grad_plane(wt, up, vp, vs, d, n, t, c, s);
        for (int k = 0; k < wt.n_factors; ++k) {
          if (wt.axis[k][0] == kAxisC) continue;
          factor_grad_plane(wt, k, s.up, s, s.tmp);
          const acc_t* r = s.tmp;
          for (int j = 0; j < wt.size[k]; ++j) {
            acc_t* out = out_ptr[k][j];
            switch (wt.axis[k][j]) {
              case kAxisT: {
                acc_t* sum = tsums.data() + k * HW;
                for (int64_t i = 0; i < HW; ++i) sum[i] += r[i];
                break;
              }
              case kAxisH: {
                acc_t* o = out + gate_offset(kAxisH, d, n, t, c, 0, 0);
                if (Row<acc_t>::fits(W)) {
                  const Row<acc_t> row{W};
                  typename Row<acc_t>::vec sum = row.load(r);
                  for (int64_t h = 1; h < H; ++h) sum += row.load(r + h * W);
                  row.store(o, sum);
                  break;
                }
                for (int64_t w = 0; w < W; ++w) o[w] = r[w];
                for (int64_t h = 1; h < H; ++h)
                  for (int64_t w = 0; w < W; ++w) o[w] += r[h * W + w];
                break;
              }
              default: {
                row_sums(r, H, W, wsums.data());
                const int64_t g0 = gate_offset(kAxisW, d, n, t, c, 0, 0);
                for (int64_t h = 0; h < H; ++h) out[g0 + h * d.C] = wsums[h];
              }
            }
          }
        }
      }
      for (int k = 0; k < wt.n_factors; ++k) {
        for (int j = 0; j < wt.size[k]; ++j) {
          if (wt.axis[k][j] != kAxisT) continue;
          std::copy(tsums.begin() + k * HW, tsums.begin() + (k + 1) * HW,
                    out_ptr[k][j] + gate_offset(kAxisT, d, n, 0, c, 0, 0));
        }
      }
    }
  });
}

template <typename scalar_t>
void input_grad_kernel(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(out);
  const Strides5 os = strides_of(out);
  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<Weight<acc_t>> weights;
  std::vector<Upstream<scalar_t, acc_t>> ups;
  for (const Term& term : terms) {
    weights.push_back(make_weight<acc_t>(gates, term.weight));
    ups.push_back(make_upstream<scalar_t, acc_t>(term.upstream));
  }
  const int64_t HW = d.H * d.W;
  at::parallel_for(0, d.N * d.T * d.C, grain_for(HW), [&](int64_t begin, int64_t end) {
    PlaneScratch<acc_t> s(HW);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % d.C, t = i / d.C % d.T, n = i / (d.C * d.T);
      std::fill(s.x, s.x + HW, acc_t(0));
      for (size_t k = 0; k < terms.size(); ++k) {
        upstream_plane(ups[k], d, n, t, c, s.up);
        if (weight_plane(weights[k], d, n, t, c, s)) {
          for (int64_t j = 0; j < HW; ++j) s.x[j] += s.weight[j] * s.up[j];
        } else {
          for (int64_t j = 0; j < HW; ++j) s.x[j] += s.up[j];
        }
      }
      store_plane(s.x, d.H, d.W, plane_of(op, os, n, t, c));
    }
  });
}

// ---- Conv3d(2 -> 1, 3x3x3, padding 1) ----
// Inputs are copied into zero-padded volumes (D1 + 2, D2 + 2, D3 + 2), and a (D2, D3)
// slice is handled as one flat run with row pitch R = D3 + 2: each tap is then a
// constant offset into one long contiguous run (no bounds checks, vectorisable even
// for 7x7 slices); the two pitch columns past D3 hold garbage (forward) or zeros
// (weight gradient).
//
// The runs are computed in registers with GCC/Clang vector types (one 64-byte vector
// = 16 floats or 8 doubles; the compiler splits it where the CPU's vectors are
// narrower): each output block is loaded and stored once for all taps, and in the
// weight gradient each dz vector is loaded once for 9 taps. Summation orders are fixed
// by the shape alone, so results are deterministic whatever the thread count.

constexpr int kTapBlock = 128;  // outputs per register block in tap_sums (8 vectors of floats)

struct Padded {
  int64_t R, slice, volume;  // row pitch, padded (D2, D3) slice, padded volume
  int64_t run;               // flat length covering every valid (b, c): (D2 - 1) * R + D3
};

Padded padded(const ConvDims& d) {
  Padded p;
  p.R = d.D3 + 2;
  p.slice = (d.D2 + 2) * p.R;
  p.volume = (d.D1 + 2) * p.slice;
  p.run = (d.D2 - 1) * p.R + d.D3;
  return p;
}

// `count` volumes (D1, D2, D3) -> zero-padded volumes, plus `slack` zeros at the end
// (tap_sums reads up to a block past a run's end).
template <typename acc_t>
std::vector<acc_t> pad_volumes(const acc_t* src, int64_t count, const ConvDims& d, int64_t slack = 0) {
  const Padded p = padded(d);
  std::vector<acc_t> dst(static_cast<size_t>(count * p.volume + slack), acc_t(0));
  for (int64_t v = 0; v < count; ++v)
    for (int64_t a = 0; a < d.D1; ++a)
      for (int64_t b = 0; b < d.D2; ++b)
        std::copy(src + ((v * d.D1 + a) * d.D2 + b) * d.D3, src + ((v * d.D1 + a) * d.D2 + b + 1) * d.D3,
                  dst.data() + v * p.volume + (a + 1) * p.slice + (b + 1) * p.R + 1);
  return dst;
}

// out[i] = sum over taps k (in order) of w[k] * src[k][i], for i in [0, run) rounded up
// to whole blocks: `out` and every src[k] must have kTapBlock - 1 entries of slack.
template <typename acc_t>
void tap_sums(const acc_t* const* src, const acc_t* w, int taps, int64_t run, acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int kVecs = kTapBlock / V::kLanes;  // 8 vectors of floats, 16 of doubles
  for (int64_t i0 = 0; i0 < run; i0 += kTapBlock) {
    typename V::type acc[kVecs];
    for (int j = 0; j < kVecs; ++j) acc[j] = typename V::type{};
    for (int k = 0; k < taps; ++k) {
      const acc_t wk = w[k];
      const acc_t* s = src[k] + i0;
      for (int j = 0; j < kVecs; ++j) acc[j] += wk * V::load(s + j * V::kLanes);
    }
    for (int j = 0; j < kVecs; ++j) V::store(out + i0 + j * V::kLanes, acc[j]);
  }
}

// out[b * R + c] (pitched) -> dst[b * D3 + c]
template <typename acc_t>
void unpitch(const acc_t* out, const ConvDims& d, int64_t R, acc_t* dst) {
  for (int64_t b = 0; b < d.D2; ++b) std::copy(out + b * R, out + b * R + d.D3, dst + b * d.D3);
}

// Consecutive slices a of one volume are `slice` apart in the padded input and in the
// pitched output, so a block of them is one flat run: each tap is a single long loop
// even when a slice is tiny (7x7 gates); the padding rows between slices are garbage
// and dropped by unpitch.
struct SliceBlocks {
  int64_t per_block, blocks_per_volume;
  int64_t run(const Padded& p, int64_t count) const { return (count - 1) * p.slice + p.run; }
};

SliceBlocks slice_blocks(const ConvDims& d, const Padded& p) {
  const int64_t per_block = std::max<int64_t>(1, std::min<int64_t>(d.D1, 4096 / p.slice));
  return {per_block, (d.D1 + per_block - 1) / per_block};
}

// z[n, a] = sum_{ci, k} w[ci, k] * Ppad[n, ci, a + k1, k2 + b, k3 + c]
template <typename acc_t>
void conv_forward_kernel(const acc_t* P, const acc_t* wt, const ConvDims& d, acc_t* z) {
  const Padded p = padded(d);
  const SliceBlocks sb = slice_blocks(d, p);
  const std::vector<acc_t> Ppad = pad_volumes(P, d.N * 2, d, kTapBlock);
  at::parallel_for(0, d.N * sb.blocks_per_volume, grain_for(54 * sb.per_block * p.slice),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> out(static_cast<size_t>(sb.per_block * p.slice + kTapBlock));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / sb.blocks_per_volume, a0 = item % sb.blocks_per_volume * sb.per_block;
      const int64_t count = std::min(sb.per_block, d.D1 - a0);
      const acc_t* src[54];
      for (int tap = 0; tap < 54; ++tap) {
        const int ci = tap / 27, k1 = tap / 9 % 3, k2 = tap / 3 % 3, k3 = tap % 3;
        src[tap] = Ppad.data() + (n * 2 + ci) * p.volume + (a0 + k1) * p.slice + k2 * p.R + k3;
      }
      tap_sums(src, wt, 54, sb.run(p, count), out.data());
      for (int64_t a = 0; a < count; ++a)
        unpitch(out.data() + a * p.slice, d, p.R, z + (n * d.D1 + a0 + a) * d.D2 * d.D3);
    }
  });
}

// dP[n, ci, a] = sum_k w[ci, k] * dzpad[n, a + 2 - k1, 2 - k2 + b, 2 - k3 + c]
template <typename acc_t>
void conv_input_grad_kernel(const acc_t* dz, const acc_t* wt, const ConvDims& d, acc_t* dP) {
  const Padded p = padded(d);
  const SliceBlocks sb = slice_blocks(d, p);
  const std::vector<acc_t> dzpad = pad_volumes(dz, d.N, d, kTapBlock);
  at::parallel_for(0, d.N * 2 * sb.blocks_per_volume, grain_for(27 * sb.per_block * p.slice),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> out(static_cast<size_t>(sb.per_block * p.slice + kTapBlock));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t a0 = item % sb.blocks_per_volume * sb.per_block, ci = item / sb.blocks_per_volume % 2,
                    n = item / (2 * sb.blocks_per_volume);
      const int64_t count = std::min(sb.per_block, d.D1 - a0);
      const acc_t* src[27];
      for (int k = 0; k < 27; ++k) {
        const int k1 = k / 9, k2 = k / 3 % 3, k3 = k % 3;
        src[k] = dzpad.data() + n * p.volume + (a0 + 2 - k1) * p.slice + (2 - k2) * p.R + (2 - k3);
      }
      tap_sums(src, wt + ci * 27, 27, sb.run(p, count), out.data());
      for (int64_t a = 0; a < count; ++a)
        unpitch(out.data() + a * p.slice, d, p.R, dP + ((n * 2 + ci) * d.D1 + a0 + a) * d.D2 * d.D3);
    }
  });
}

// dw[ci, k] = sum_{n, a} sum_run Ppad[n, ci, a + k1, k2 + ., k3 + .] * dz_pitched[n, a, .]
template <typename acc_t>
void conv_weight_grad_kernel(const acc_t* P, const acc_t* dz, const ConvDims& d, acc_t* dw) {
  using V = Vec<acc_t>;
  const Padded p = padded(d);
  const std::vector<acc_t> Ppad = pad_volumes(P, d.N * 2, d);
  // dz with row pitch R and zero pitch columns, one (D2, D3) slice per (n, a).
  std::vector<acc_t> dzp(static_cast<size_t>(d.N * d.D1 * p.slice), acc_t(0));
  for (int64_t na = 0; na < d.N * d.D1; ++na)
    for (int64_t b = 0; b < d.D2; ++b)
      std::copy(dz + (na * d.D2 + b) * d.D3, dz + (na * d.D2 + b + 1) * d.D3, dzp.data() + na * p.slice + b * p.R);
  // Slices (n, a) in fixed chunks of about 4K elements (set by the shape, not by the
  // thread count). Per chunk, the 9 taps of one (ci, k1) share each dz vector: one
  // vector accumulator per tap, a scalar one for the tail of each run. The chunks'
  // sums are then added in order, in double.
  const int64_t slices = d.N * d.D1;
  const int64_t per_chunk = std::max<int64_t>(1, 4096 / p.run);
  const int64_t chunks = (slices + per_chunk - 1) / per_chunk;
  std::vector<double> partial(static_cast<size_t>(chunks * 54));
  at::parallel_for(0, chunks, grain_for(54 * per_chunk * p.slice), [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * per_chunk, last = std::min(slices, first + per_chunk);
      for (int group = 0; group < 6; ++group) {  // taps (ci, k1, 0..2, 0..2)
        const int ci = group / 3, k1 = group % 3;
        int64_t offset[9];
        for (int k = 0; k < 9; ++k) offset[k] = (k / 3) * p.R + k % 3;
        typename V::type acc[9];
        acc_t tail[9] = {};
        for (int k = 0; k < 9; ++k) acc[k] = typename V::type{};
        // Consecutive slices of one volume are one flat run (dz's pitch rows are zero).
        for (int64_t na = first; na < last;) {
          const int64_t n = na / d.D1, a = na % d.D1;
          const int64_t count = std::min(last - na, d.D1 - a), len = (count - 1) * p.slice + p.run;
          const acc_t* src = Ppad.data() + (n * 2 + ci) * p.volume + (a + k1) * p.slice;
          const acc_t* g = dzp.data() + na * p.slice;
          int64_t i = 0;
          for (; i + V::kLanes <= len; i += V::kLanes) {
            const typename V::type gv = V::load(g + i);
            for (int k = 0; k < 9; ++k) acc[k] += gv * V::load(src + offset[k] + i);
          }
          for (; i < len; ++i)
            for (int k = 0; k < 9; ++k) tail[k] += g[i] * src[offset[k] + i];
          na += count;
        }
        for (int k = 0; k < 9; ++k) {
          acc_t s = tail[k];
          for (int l = 0; l < V::kLanes; ++l) s += acc[k][l];
          partial[chunk * 54 + group * 9 + k] = static_cast<double>(s);
        }
      }
    }
  });
  for (int tap = 0; tap < 54; ++tap) {
    double total = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[chunk * 54 + tap];
    dw[tap] = static_cast<acc_t>(total);
  }
}

ConvDims conv_dims(const at::Tensor& t) {  // t: (N, ., D1, D2, D3) or (N, D1, D2, D3)
  const int64_t r = t.dim();
  return ConvDims{t.size(0), t.size(r - 3), t.size(r - 2), t.size(r - 1)};
}

}  // namespace

std::vector<at::Tensor> pool(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                             const std::vector<int>& axes) {
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<PoolOut> outs;
  for (int axis : axes) {
    std::vector<int64_t> shape = gate_shape(axis, d);
    at::Tensor argmax = at::empty(shape, v.options().dtype(at::kInt));
    shape.insert(shape.begin() + 1, 2);
    outs.push_back({at::empty(shape, acc), argmax});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_pool_cpu",
                                  [&] { pool_kernel<scalar_t>(v, gates, weight, axes, outs); });
  std::vector<at::Tensor> result;
  for (auto& o : outs) {
    result.push_back(o.P);
    result.push_back(o.argmax);
  }
  return result;
}

void apply(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_apply_cpu",
                                  [&] { apply_kernel<scalar_t>(v, gates, weight, out); });
}

std::vector<at::Tensor> weight_grad(const at::Tensor& v, const Term& term, const GateSet& gates) {
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<at::Tensor> outs;
  for (const auto& factor : term.weight.factors)
    for (int id : factor) outs.push_back(at::empty(gate_shape(gates.axis[id], d), acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_weight_grad_cpu",
                                  [&] { weight_grad_kernel<scalar_t>(v, term, gates, outs); });
  return outs;
}

void input_grad(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aia_native_input_grad_cpu",
                                  [&] { input_grad_kernel<scalar_t>(terms, gates, out); });
}

at::Tensor conv_forward(const at::Tensor& pooled, const at::Tensor& weight) {
  const ConvDims d = conv_dims(pooled);
  at::Tensor z = at::empty({d.N, d.D1, d.D2, d.D3}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "aia_native_conv_cpu", [&] {
    conv_forward_kernel(pooled.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), d, z.data_ptr<scalar_t>());
  });
  return z;
}

at::Tensor conv_input_grad(const at::Tensor& dz, const at::Tensor& weight) {
  const ConvDims d = conv_dims(dz);
  at::Tensor dP = at::empty({d.N, 2, d.D1, d.D2, d.D3}, dz.options());
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "aia_native_conv_input_grad_cpu", [&] {
    conv_input_grad_kernel(dz.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), d, dP.data_ptr<scalar_t>());
  });
  return dP;
}

at::Tensor conv_weight_grad(const at::Tensor& pooled, const at::Tensor& dz) {
  const ConvDims d = conv_dims(dz);
  at::Tensor dw = at::empty({1, 2, 3, 3, 3}, dz.options());
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "aia_native_conv_weight_grad_cpu", [&] {
    conv_weight_grad_kernel(pooled.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), d, dw.data_ptr<scalar_t>());
  });
  return dw;
}

BatchStats batch_stats(const at::Tensor& z) {
  BatchStats st{0, 0};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "aia_native_batch_stats_cpu", [&] {
    const scalar_t* p = z.data_ptr<scalar_t>();
    const int64_t m = z.numel();
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < m; ++i) sum += p[i];
    st.mean = sum / m;
    for (int64_t i = 0; i < m; ++i) sq += (p[i] - st.mean) * (p[i] - st.mean);
    st.var = sq / m;
  });
  return st;
}

GateZGrad gate_z_grad(const at::Tensor& gate_grad, const at::Tensor& z, double scale, double shift, bool has_bn,
                      bool batch, double mean, double var, double gamma, double eps) {
  const at::Tensor g = (z * scale).add_(shift).sigmoid_();  // ATen's vectorised sigmoid
  const at::Tensor gg = gate_grad.to(z.scalar_type()).contiguous();
  at::Tensor dz = at::empty_like(z);
  GateZGrad out{dz, 0, 0};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "aia_native_gate_z_grad_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* gp = g.data_ptr<acc_t>();
    const acc_t* ggp = gg.data_ptr<acc_t>();
    const acc_t* zp = z.data_ptr<acc_t>();
    acc_t* dzp = dz.data_ptr<acc_t>();
    const int64_t m = z.numel();
    for (int64_t i = 0; i < m; ++i) dzp[i] = ggp[i] * gp[i] * (acc_t(1) - gp[i]);  // dy
    if (!has_bn) return;
    const double rstd = 1.0 / std::sqrt(var + eps);
    double sum_dy = 0, sum_dy_zhat = 0;
    for (int64_t i = 0; i < m; ++i) {
      sum_dy += dzp[i];
      sum_dy_zhat += dzp[i] * ((zp[i] - mean) * rstd);
    }
    out.dbn_weight = sum_dy_zhat;
    out.dbn_bias = sum_dy;
    const acc_t k = static_cast<acc_t>(gamma * rstd);
    if (batch) {  // mean and var depend on z too
      const acc_t mean_dy = static_cast<acc_t>(sum_dy / m), mean_dy_zhat = static_cast<acc_t>(sum_dy_zhat / m);
      const acc_t mu = static_cast<acc_t>(mean), r = static_cast<acc_t>(rstd);
      for (int64_t i = 0; i < m; ++i) dzp[i] = k * (dzp[i] - mean_dy - (zp[i] - mu) * r * mean_dy_zhat);
    } else {
      for (int64_t i = 0; i < m; ++i) dzp[i] *= k;
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace aia
