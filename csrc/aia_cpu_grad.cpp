// CPU kernels: the backward's full-size passes, the gates' gradients (weight_grad) and the
// input gradient (input_grad).
#include "aia_cpu_lanes.h"

namespace aia {
namespace cpu {
namespace {

using namespace detail;

// The gradient that each gate of factor k receives from a chunk before its reduction:
// q * (d weight / d factor_k) / size_k, where q = upstream * v and f holds the factors.
template <int B, typename acc_t>
AIA_INLINE typename Vec<acc_t, B>::type factor_grad_chunk(const WeightAt<acc_t>& a, int k, int size,
                                                       const typename Vec<acc_t, B>::type& q,
                                                       const typename Vec<acc_t, B>::type* f) {
  const acc_t inv = acc_t(1) / acc_t(size);
  if (!a.mean && a.n_factors == 2) return q * f[1 - k] * inv;
  return q * ((a.mean ? acc_t(1) / acc_t(a.n_factors) : acc_t(1)) * inv);
}

// q = upstream * v over a chunk; f receives the factors when a product needs them.
template <typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type grad_chunk(const WeightAt<acc_t>& a, const UpstreamAt<scalar_t, acc_t>& u,
                                                const PlaneAt<const scalar_t>& v, const Dims& d, int64_t h, int64_t w0,
                                                const Row<acc_t, B>& row, typename Vec<acc_t, B>::type* f) {
  const typename Vec<acc_t, B>::type q = upstream_chunk(u, d, h, w0, row) * load_chunk(v.at(h, w0), v.sw, row);
  if (!a.mean && a.n_factors == 2) {
    for (int k = 0; k < 2; ++k) f[k] = factor_chunk(a.f[k], d, h, w0, row);
  }
  return q;
}

// grad_chunk and factor_grad_chunk for a weight of structure S; factors_of and
// factor_size_of: the weight's factor count and factor k's gate count.
template <typename S, typename U, typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type grad_chunk_of(const WeightAt<acc_t>& a, const UpstreamAt<scalar_t, acc_t>& u,
                                                   const PlaneAt<const scalar_t>& v, const Dims& d, int64_t h,
                                                   int64_t w0, const Row<acc_t, B>& row,
                                                   typename Vec<acc_t, B>::type* f) {
  if constexpr (!S::kStatic) {
    return grad_chunk(a, u, v, d, h, w0, row, f);
  } else {
    const typename Vec<acc_t, B>::type q = upstream_chunk_of<U>(u, d, h, w0, row) * row.load(v.at(h, w0));
    if constexpr (S::kFactors == 2) {
      f[0] = factor_chunk_of<S::kST0>(a.f[0], d, h, w0, row);
      f[1] = factor_chunk_of<S::kST1>(a.f[1], d, h, w0, row);
    }
    return q;
  }
}

template <typename S, int B, typename acc_t>
AIA_INLINE typename Vec<acc_t, B>::type factor_grad_chunk_of(const WeightAt<acc_t>& a, int k, int size,
                                                          const typename Vec<acc_t, B>::type& q,
                                                          const typename Vec<acc_t, B>::type* f) {
  if constexpr (!S::kStatic) {
    return factor_grad_chunk<B>(a, k, size, q, f);
  } else {
    const acc_t inv = acc_t(1) / acc_t(size);
    if constexpr (S::kFactors == 2) return q * f[1 - k] * inv;
    else return q * (acc_t(1) * inv);
  }
}

template <typename S, typename acc_t>
AIA_INLINE int factors_of(const Weight<acc_t>& wt) {
  if constexpr (S::kStatic) return S::kFactors;
  else return wt.n_factors;
}

template <typename S, typename acc_t>
AIA_INLINE int factor_size_of(const Weight<acc_t>& wt, int k) {
  if constexpr (S::kStatic) return (k == 0 ? S::kST0 : S::kST1) ? 3 : 1;
  else return wt.size[k];
}

template <typename scalar_t, int B, typename S, typename U>
void weight_grad_kernel(const at::Tensor& v, const Term& term, const GateSet& gates, std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t, B>;
  const Dims d = dims_of(v);
  const Strides5 vs = strides_of(v);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const Weight<acc_t> wt = make_weight<acc_t>(gates, term.weight);
  const Upstream<scalar_t, acc_t> up = make_upstream<scalar_t, acc_t>(term.upstream);
  const UpstreamCall<scalar_t, acc_t> upc = upstream_call(up, d);
  const int64_t H = d.H, W = d.W, HW = H * W;
  // The pass's own sums have rows whole vectors apart, read and written whole (whole_vectors).
  const int64_t pitch = whole_vectors<V>(W), pitched = H * pitch;
  const Row<acc_t, B> whole{V::kLanes};
  // out_ptr[k][j]: gradient of gate j of factor k (C, or T, H, W).
  acc_t* out_ptr[kMaxFactors][kMaxFactorGates] = {};
  bool any_c = false, any_thw = false;
  {
    size_t o = 0;
    for (int k = 0; k < factors_of<S>(wt); ++k) {
      for (int j = 0; j < factor_size_of<S>(wt, k); ++j) out_ptr[k][j] = outs[o++].data_ptr<acc_t>();
      (factor_size_of<S>(wt, k) == 1 ? any_c : any_thw) = true;
    }
  }
  // A weight with C and T, H, W factors is differentiated in one pass: the (n, c) loop
  // of the T, H, W reductions also sums the C gates' gradients over fixed blocks of
  // channels (partials per block, added in block order after the pass: deterministic).
  const bool merged = any_c && any_thw;
  // (Static shapes compile only the branches they take: GCC 12 crashed compiling the C-only
  // branch for a shape without C factors.)
  constexpr bool kMayBeCOnly = S::kAnyC && (!S::kStatic || !S::kAnyTHW);
  if constexpr (kMayBeCOnly) {
  if (any_c && !merged) {
    at::parallel_for(0, d.N * d.T, grain_for(d.C * HW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(static_cast<size_t>(pitched) * kMaxFactors);
      for (int64_t nt = begin; nt < end; ++nt) {
        const int64_t n = nt / d.T, t = nt % d.T;
        std::fill(sums.begin(), sums.end(), acc_t(0));
        for (int64_t c = 0; c < d.C; ++c) {
          const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
          const UpstreamAt<scalar_t, acc_t> ua = upstream_at(upc, d, n, t, c);
          const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
          for_each_chunk<acc_t, B>(H, W, [&](int64_t h, int64_t w0, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
            typename V::type f[kMaxFactors];
            const typename V::type q = grad_chunk_of<S, U>(wa, ua, vpl, d, h, w0, row, f);
            for (int k = 0; k < factors_of<S>(wt); ++k) {
              if (factor_size_of<S>(wt, k) != 1) continue;
              acc_t* sum = sums.data() + k * pitched + h * pitch + w0;
              whole.store(sum, whole.load(sum) + factor_grad_chunk_of<S, B>(wa, k, 1, q, f));
            }
          });
        }
        for (int k = 0; k < factors_of<S>(wt); ++k) {
          if (factor_size_of<S>(wt, k) != 1) continue;
          unpitch_rows(sums.data() + k * pitched, H, W, pitch, out_ptr[k][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0));
        }
      }
    });
  }
  }
  if (!any_thw) return;
  constexpr int64_t kCBlock = 16;
  const bool prefetch = prefetch_next_frame(d, sizeof(scalar_t));
  const int64_t blocks = (d.C + kCBlock - 1) / kCBlock, THW = d.T * pitched;
  // C partials: (N, blocks, factor, T, H, pitch)
  // (each task zeroes its blocks' partials: a serial memset of them all was the pass's serial part)
  acc_t* cpart = merged ? workspace<acc_t>(0, static_cast<size_t>(d.N * blocks * kMaxFactors * THW), false) : nullptr;
  // T: summed over t in buffers; H: over h in registers per strip; W: along each row.
  at::parallel_for(0, d.N * blocks, grain_for(kCBlock * THW), [&](int64_t begin, int64_t end) {
    constexpr int64_t kGroupWidth = kGroupStrips * V::kLanes;
    std::vector<acc_t> tsums(static_cast<size_t>(pitched) * kMaxFactors), wsums(static_cast<size_t>(H) * kMaxFactors);
    for (int64_t nb = begin; nb < end; ++nb)
    for (int64_t c = nb % blocks * kCBlock; c < std::min(d.C, (nb % blocks + 1) * kCBlock); ++c) {
      const int64_t n = nb / blocks;
      acc_t* cblock = merged ? cpart + nb * kMaxFactors * THW : nullptr;
      if (merged && c == nb % blocks * kCBlock) zero_row(cblock, kMaxFactors * THW);
      std::fill(tsums.begin(), tsums.end(), acc_t(0));
      for (int64_t t = 0; t < d.T; ++t) {
        const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
        const UpstreamAt<scalar_t, acc_t> ua = upstream_at(upc, d, n, t, c);
        const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
        // The next planes of v and of a full upstream, fetched a chunk at a time (prefetch_next_frame).
        const PlaneAt<const scalar_t> v_next = next_frame(vp, vs, d, n, t, c);
        const PlaneAt<const scalar_t> dout_next =
            up.dout != nullptr ? next_frame(up.dout, up.dout_strides, d, n, t, c) : v_next;
        for (int64_t g0 = 0; g0 < W; g0 += kGroupWidth) {
          const StripGroup<acc_t, B> group(g0, W);
          // The strip count as a constant where the widths allow (with_strip_count): read at
          // run time, each chunk of a 7x7 plane re-read its row and looped over strips.
          with_strip_count<S::kStatic>(group, [&](auto strips_tag) AIA_LAMBDA_INLINE {
          constexpr int kStrips = decltype(strips_tag)::value;
          typename V::type hsums[kMaxFactors][kGroupStrips] = {};  // along h, per chunk column
          for (int64_t h = 0; h < H; ++h) {
            for_each_strip<kStrips>(group, [&](int s, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
              const int64_t w0 = g0 + s * V::kLanes;
              if (prefetch) {
                __builtin_prefetch(v_next.at(h, w0));
                __builtin_prefetch(dout_next.at(h, w0));
              }
              typename V::type f[kMaxFactors];
              const typename V::type q = grad_chunk_of<S, U>(wa, ua, vpl, d, h, w0, row, f);
              for (int k = 0; k < factors_of<S>(wt); ++k) {
                if (factor_size_of<S>(wt, k) == 1) {  // merged: a C gate, summed over this block's channels
                  acc_t* sum = cblock + (k * d.T + t) * pitched + h * pitch + w0;
                  whole.store(sum, whole.load(sum) + factor_grad_chunk_of<S, B>(wa, k, 1, q, f));
                  continue;
                }
                const typename V::type r = factor_grad_chunk_of<S, B>(wa, k, 3, q, f);
                acc_t* tsum = tsums.data() + k * pitched + h * pitch + w0;
                whole.store(tsum, whole.load(tsum) + r);
                hsums[k][s] = h == 0 ? r : hsums[k][s] + r;
                // Along w: the chunk's sum, then the row's. (Summed lane-wise across a row's
                // chunks instead, as the pool does, this pass was slower at 56x56 and 28x28 in
                // alternating benchmarks/cpu_passes.py runs.)
                acc_t& wsum = wsums[k * H + h];
                wsum = w0 == 0 ? row.sum(r) : wsum + row.sum(r);
              }
            });
          }
          for (int k = 0; k < factors_of<S>(wt); ++k) {
            if (factor_size_of<S>(wt, k) != 3) continue;
            for (int s = 0; s < group.strips; ++s)
              group.row[s].store(out_ptr[k][1] + gate_offset(kAxisH, d, n, t, c, 0, 0) + g0 + s * V::kLanes,
                                 hsums[k][s]);
          }
          });
        }
        for (int k = 0; k < factors_of<S>(wt); ++k) {
          if (factor_size_of<S>(wt, k) != 3) continue;
          acc_t* out = out_ptr[k][2] + gate_offset(kAxisW, d, n, t, c, 0, 0);
          for (int64_t h = 0; h < H; ++h) out[h * d.C] = wsums[k * H + h];  // entries of consecutive h are C apart
        }
      }
      for (int k = 0; k < factors_of<S>(wt); ++k) {
        if (factor_size_of<S>(wt, k) != 3) continue;
        unpitch_rows(tsums.data() + k * pitched, H, W, pitch, out_ptr[k][0] + gate_offset(kAxisT, d, n, 0, c, 0, 0));
      }
    }
  });
  if (!merged) return;
  at::parallel_for(0, d.N * d.T, grain_for(blocks * HW), [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      const int64_t n = nt / d.T, t = nt % d.T;
      for (int k = 0; k < factors_of<S>(wt); ++k) {
        if (factor_size_of<S>(wt, k) != 1) continue;
        acc_t* out = out_ptr[k][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0);
        const acc_t* part = cpart + (n * blocks * kMaxFactors + k) * THW + t * pitched;
        unpitch_rows(part, H, W, pitch, out);
        for (int64_t b = 1; b < blocks; ++b)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) out[h * W + w] += part[b * kMaxFactors * THW + h * pitch + w];
      }
    }
  });
}

// input_grad's terms as the kernels read them: each term's weight and upstream, and the
// upstream's per-call constants (built after every upstream, since they point into `ups`).
template <typename scalar_t, typename acc_t>
struct TermSet {
  std::vector<Weight<acc_t>> weights;
  std::vector<Upstream<scalar_t, acc_t>> ups;
  std::vector<UpstreamCall<scalar_t, acc_t>> calls;

  TermSet(const std::vector<Term>& terms, const GateSet& gates, const Dims& d) {
    for (const Term& term : terms) {
      weights.push_back(make_weight<acc_t>(gates, term.weight));
      ups.push_back(make_upstream<scalar_t, acc_t>(term.upstream));
    }
    for (const auto& up : ups) calls.push_back(upstream_call(up, d));
  }
  TermSet(const TermSet&) = delete;  // `calls` point into `ups`
};

// One term of input_grad over planes [i0, i1) in (n, t, c) order (float, `out` rows of unit
// stride), added to the planes' running sums `acc` (per plane, H rows of whole_vectors(W)
// entries): the first term starts them from zero and the last writes `out`, in the order of
// the all-in-registers kernel below (which other dtypes and strides take). A block of planes
// at a time per term, each term compiled for its structure: with the terms' structures
// tested per chunk, that kernel's loop spilled to the stack; one call per plane and term was
// a visible share of the pass at 7x7 and smaller.
template <typename S, typename U, int B>
void add_term_planes(const Weight<float>& wt, const UpstreamCall<float, float>& upc, const Dims& d,
                     const Strides5& os, float* op, int64_t i0, int64_t i1, bool first, bool last, float* acc) {
  using vec = typename Vec<float, B>::type;
  const int64_t pitch = whole_vectors<Vec<float, B>>(d.W);  // acc's rows (see whole_vectors)
  const Row<float, B> whole{Vec<float, B>::kLanes};
  for_each_plane(d, i0, i1, [&](int64_t n, int64_t t, int64_t c) AIA_LAMBDA_INLINE {
    const WeightAt<float> wa = weight_at(wt, d, n, t, c);
    const UpstreamAt<float, float> ua = upstream_at(upc, d, n, t, c);
    const PlaneAt<float> out = plane_at(op, os, n, t, c);
    for_each_chunk<float, B>(d.H, d.W, [&](int64_t h, int64_t w0, const Row<float, B>& row) AIA_LAMBDA_INLINE {
      const vec u = upstream_chunk_of<U>(ua, d, h, w0, row);
      vec x = u;
      if constexpr (!S::kStatic) {
        vec f[kMaxFactors];
        if (wa.n_factors != 0) x = weight_chunk(wa, d, h, w0, row, f) * u;
      } else if constexpr (S::kFactors != 0) {
        vec f[kMaxFactors];
        x = weight_chunk_of<S>(wa, d, h, w0, row, f) * u;
      }
      float* a = acc + h * pitch + w0;
      const vec sum = (first ? vec{} : whole.load(a)) + x;
      if (last) row.store(out.at(h, w0), sum);
      else whole.store(a, sum);
    });
    acc += d.H * pitch;
  });
}

template <int B>
using AddTermPlanes = void (*)(const Weight<float>&, const UpstreamCall<float, float>&, const Dims&, const Strides5&,
                               float*, int64_t, int64_t, bool, bool, float*);

template <int B>
void input_grad_by_term(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  const Dims d = dims_of(out);
  const Strides5 os = strides_of(out);
  float* op = out.data_ptr<float>();
  const int n_terms = static_cast<int>(terms.size());
  const TermSet<float, float> set(terms, gates, d);
  std::vector<AddTermPlanes<B>> add;
  for (const Term& term : terms) {
    with_term_shape<float>(term, true, [&](auto shape, auto upstream) {
      add.push_back(&add_term_planes<decltype(shape), decltype(upstream), B>);
    });
  }
  // Planes per block: their running sums stay near 8 KB (in L1 between the terms).
  const int64_t plane = d.H * whole_vectors<Vec<float, B>>(d.W);
  const int64_t block = std::max<int64_t>(1, 2048 / plane);
  at::parallel_for(0, d.N * d.T * d.C, grain_for(d.H * d.W), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(std::min(block, end - begin) * plane));
    for (int64_t i0 = begin; i0 < end; i0 += block) {
      const int64_t i1 = std::min(end, i0 + block);
      for (int k = 0; k < n_terms; ++k)
        add[k](set.weights[k], set.calls[k], d, os, op, i0, i1, k == 0, k == n_terms - 1, acc.data());
    }
  });
}

template <typename scalar_t, int B>
void input_grad_kernel(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t, B>;
  const Dims d = dims_of(out);
  const Strides5 os = strides_of(out);
  scalar_t* op = out.data_ptr<scalar_t>();
  const int n_terms = static_cast<int>(terms.size());
  const TermSet<scalar_t, acc_t> set(terms, gates, d);
  at::parallel_for(0, d.N * d.T * d.C, grain_for(d.H * d.W), [&](int64_t begin, int64_t end) {
    WeightAt<acc_t> wa[kMaxTerms];
    UpstreamAt<scalar_t, acc_t> ua[kMaxTerms];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % d.C, t = i / d.C % d.T, n = i / (d.C * d.T);
      for (int k = 0; k < n_terms; ++k) {
        wa[k] = weight_at(set.weights[k], d, n, t, c);
        ua[k] = upstream_at(set.calls[k], d, n, t, c);
      }
      const PlaneAt<scalar_t> opl = plane_at(op, os, n, t, c);
      for_each_chunk<acc_t, B>(d.H, d.W, [&](int64_t h, int64_t w0, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
        typename V::type acc{};
        for (int k = 0; k < n_terms; ++k) {
          const typename V::type u = upstream_chunk(ua[k], d, h, w0, row);
          if (wa[k].n_factors == 0) {
            acc += u;
          } else {
            typename V::type f[kMaxFactors];
            acc += weight_chunk(wa[k], d, h, w0, row, f) * u;
          }
        }
        store_chunk(opl.at(h, w0), opl.sw, row, acc);
      });
    }
  });
}

#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
// ---- small planes: channels as lanes (aia_cpu_lanes.h) ----
// weight_grad and input_grad for planes up to 20x20 (lanes_walk), float tensors of any layout
// (strided planes copied first: the same bits), terms of a compiled structure (static S and
// U): 8 channels at a time, their values at one (h, w) as the lanes of a vector. The expressions are the row walk's,
// lane-wise; the sums along t and h are in the same order, those along w and c in order
// (the row walk adds a row's chunks as a tree, and channels in blocks of 16).

// A term's weight factors and upstream gradient, lane-wise, over the planes of channels
// [c0, c0 + count) of one sample: what is the same for every frame is read per item
// (begin_item: T gates, T items), then per frame (H gates and items; a full upstream's
// planes), then per row (W gates and items). Buffers: one per thread, shared by the terms.
struct LaneScratch {
  std::vector<LaneVec> t_gate[kMaxFactors], h_gate[kMaxFactors];
  std::vector<LaneVec> t_item[3], h_item[3];  // mean, max, argmax (bits) of the T and H items
  std::vector<LaneVec> dout;                  // a full upstream's frame
  std::vector<float> planes;                  // load_frame_lanes' buffer
  explicit LaneScratch(const Dims& d) : planes(kLaneChannels * d.H * d.W) {
    const int64_t positions = (d.H * d.W + 7) / 8 * 8;
    for (auto& b : t_gate) b.resize(positions);
    for (auto& b : h_gate) b.resize(d.W);
    for (auto& b : t_item) b.resize(positions);
    for (auto& b : h_item) b.resize(d.W);
    dout.resize(positions);
  }
};

template <typename S, typename U>
struct LaneTerm {
  static constexpr int kFactors = S::kFactors;
  template <int k>
  static constexpr bool kST = k == 0 ? S::kST0 : S::kST1;
  const Dims& d;
  const Weight<float>& wt;
  const Upstream<float, float>& up;
  const UpstreamCall<float, float>& upc;
  LaneScratch& s;
  int64_t n = 0, t = 0, c0 = 0;
  int count = 0;
  __m256i in{};
  LaneIdx channel{};                           // c0 + lane (a C item's argmax is a channel)
  const float* c_gate[kMaxFactors] = {};       // C factors: the frame's (H, W) plane
  LaneVec w_gate[kMaxFactors] = {};            // T, H, W factors: the row's W gate
  const float *c_mean = nullptr, *c_max = nullptr;  // a C item: the frame's planes
  const int32_t* c_arg = nullptr;
  LaneVec w_mean{}, w_max{};                   // a W item: the row's
  LaneIdx w_arg{};

  LaneTerm(const Dims& d_, const Weight<float>& wt_, const Upstream<float, float>& up_,
           const UpstreamCall<float, float>& upc_, LaneScratch& s_)
      : d(d_), wt(wt_), up(up_), upc(upc_), s(s_) {}

  AIA_INLINE int64_t mean_at(int i, int64_t g) const { return pooled_mean_offset(g, n, upc.sample[i]); }
  AIA_INLINE int64_t max_at(int i, int64_t g) const { return pooled_max_offset(g, n, upc.sample[i]); }

  void begin_item(int64_t n_, int64_t c0_, int count_) {
    n = n_, c0 = c0_, count = count_;
    in = lanes_below(count);
    for (int k = 0; k < 8; ++k) channel[k] = static_cast<int32_t>(c0 + k);
    const int64_t HW = d.H * d.W, g = gate_offset(kAxisT, d, n, 0, c0, 0, 0);
    for_each_factor([&](auto k) {
      if constexpr (kST<decltype(k)::value>) transpose_planes(wt.gate[k][0] + g, HW, count, HW, s.t_gate[k].data());
    });
    if constexpr (U::kKind == 3) {
      transpose_planes(up.grad[0] + mean_at(0, g), HW, count, HW, s.t_item[0].data());
      transpose_planes(up.grad[0] + max_at(0, g), HW, count, HW, s.t_item[1].data());
      transpose_planes(up.argmax[0] + g, HW, count, HW, s.t_item[2].data());
    }
  }

  void begin_frame(int64_t t_) {
    t = t_;
    const int64_t W = d.W, gh = gate_offset(kAxisH, d, n, t, c0, 0, 0);
    for_each_factor([&](auto k) {
      if constexpr (kST<decltype(k)::value>) {  // the 8 channels' rows are one (8, W) block
        transpose_planes(wt.gate[k][1] + gh, W, count, W, s.h_gate[k].data());
      } else {
        c_gate[k] = wt.gate[k][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0);
      }
    });
    if constexpr (U::kKind == 0) {
      load_frame_lanes(up.dout, up.dout_strides, d, n, t, c0, count, s.planes.data(), s.dout.data());
      prefetch_frame(up.dout, up.dout_strides, d, n, t + 1, c0, count);
    } else if constexpr (U::kKind == 1) {
      const int64_t g = gate_offset(kAxisC, d, n, t, 0, 0, 0);
      c_mean = up.grad[0] + mean_at(0, g), c_max = up.grad[0] + max_at(0, g), c_arg = up.argmax[0] + g;
    } else {
      transpose_planes(up.grad[1] + mean_at(1, gh), W, count, W, s.h_item[0].data());
      transpose_planes(up.grad[1] + max_at(1, gh), W, count, W, s.h_item[1].data());
      transpose_planes(up.argmax[1] + gh, W, count, W, s.h_item[2].data());
    }
  }

  void begin_row(int64_t h) {
    const int64_t gw = gate_offset(kAxisW, d, n, t, c0, h, 0);  // (n, t, h, c): 8 channels contiguous
    for_each_factor([&](auto k) {
      if constexpr (kST<decltype(k)::value>) w_gate[k] = load_lanes_below(wt.gate[k][2] + gw, count, in);
    });
    if constexpr (U::kKind == 3) {
      w_mean = load_lanes_below(up.grad[2] + mean_at(2, gw), count, in);
      w_max = load_lanes_below(up.grad[2] + max_at(2, gw), count, in);
      w_arg = as_index(load_lanes_below(up.argmax[2] + gw, count, in));
    }
  }

  // Factor k at position p = h * W + w: a C gate, or (T + H + W) / 3 (factor_chunk_of's order).
  template <int k>
  AIA_INLINE LaneVec factor(int64_t p, int64_t w) const {
    if constexpr (kST<k>) return ((s.t_gate[k][p] + s.h_gate[k][w]) + w_gate[k]) * (1.f / 3.f);
    else return LaneVec{} + c_gate[k][p];
  }

  // The upstream gradient at (h, w): upstream_chunk_of's sums in its order.
  AIA_INLINE LaneVec upstream(int64_t p, int64_t h, int64_t w) const {
    const LaneVec zero{};
    if constexpr (U::kKind == 0) {
      return s.dout[p];
    } else if constexpr (U::kKind == 1) {
      const LaneVec item = (zero + c_mean[p]) * upc.inv_len[0] +
                           ((LaneIdx{} + c_arg[p]) == channel ? zero + c_max[p] : zero);
      return zero + item;
    } else {
      const LaneVec ti = s.t_item[0][p] * upc.inv_len[0] +
                         (as_index(s.t_item[2][p]) == static_cast<int32_t>(t) ? s.t_item[1][p] : zero);
      const LaneVec hi = s.h_item[0][w] * upc.inv_len[1] +
                         (as_index(s.h_item[2][w]) == static_cast<int32_t>(h) ? s.h_item[1][w] : zero);
      const LaneVec wi = w_mean * upc.inv_len[2] + (w_arg == static_cast<int32_t>(w) ? w_max : zero);
      return ((zero + ti) + hi) + wi;
    }
  }

  template <typename F>
  static AIA_INLINE void for_each_factor(F&& f) {
    if constexpr (kFactors > 0) f(std::integral_constant<int, 0>{});
    if constexpr (kFactors > 1) f(std::integral_constant<int, 1>{});
  }
};

template <typename S, typename U>
constexpr bool lanes_term() {
  if constexpr (!S::kStatic) return false;
  else return U::kKind >= 0;
}

template <typename S, typename U>
constexpr bool lanes_weight_grad() {  // a weight with factors (else nothing to differentiate)
  if constexpr (!lanes_term<S, U>()) return false;
  else return S::kFactors > 0;
}

// weight_grad over items (n, 8 channels): the T, H, W gates' gradients summed lane-wise (T
// over t in buffers, H over h per w, W over w per row), a C gate's per (t, h, w) summed over
// the 8 lanes (a transpose, then the lanes in order) into partials per channel block, added
// in block order after the pass (deterministic).
template <typename S, typename U>
void weight_grad_lanes(const float* vp, const Strides5& vs, const Dims& d, const Weight<float>& wt,
                       const Upstream<float, float>& up, float* const (&out_ptr)[kMaxFactors][kMaxFactorGates]) {
  using Term = LaneTerm<S, U>;
  constexpr int NF = S::kFactors;
  const UpstreamCall<float, float> upc = upstream_call(up, d);
  const int64_t H = d.H, W = d.W, HW = H * W, positions = (HW + 7) / 8 * 8, rows = (W + 7) / 8 * 8;
  const int64_t blocks = (d.C + kLaneChannels - 1) / kLaneChannels, cpart_item = NF * d.T * positions;
  float* cpart = S::kAnyC ? workspace<float>(0, static_cast<size_t>(d.N * blocks * cpart_item), false) : nullptr;
  at::parallel_for(0, d.N * blocks, grain_for(kLaneChannels * d.T * HW), [&](int64_t begin, int64_t end) {
    LaneScratch scratch(d);
    Term term(d, wt, up, upc, scratch);
    std::vector<LaneVec> y(positions), t_sum(NF * positions), h_sum(NF * rows), c_grad(NF * positions);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = item % blocks * kLaneChannels;
      const int count = static_cast<int>(std::min<int64_t>(kLaneChannels, d.C - c0));
      term.begin_item(n, c0, count);
      for (int64_t t = 0; t < d.T; ++t) {
        load_frame_lanes(vp, vs, d, n, t, c0, count, scratch.planes.data(), y.data());
        prefetch_frame(vp, vs, d, n, t + 1, c0, count);
        term.begin_frame(t);
        for (int64_t h = 0; h < H; ++h) {
          term.begin_row(h);
          LaneVec w_sum[kMaxFactors] = {};  // from zero: a first-entry test kept the sums on the stack
          for (int64_t w = 0; w < W; ++w) {
            const int64_t p = h * W + w;
            const LaneVec q = term.upstream(p, h, w) * y[p];
            LaneVec f[kMaxFactors];
            Term::for_each_factor([&](auto k) AIA_LAMBDA_INLINE { f[k] = term.template factor<decltype(k)::value>(p, w); });
            Term::for_each_factor([&](auto k_tag) AIA_LAMBDA_INLINE {
              constexpr int k = decltype(k_tag)::value;
              constexpr float inv = Term::template kST<k> ? 1.f / 3.f : 1.f;  // factor_grad_chunk_of
              LaneVec r;
              if constexpr (NF == 2) r = q * f[1 - k] * inv;
              else r = q * (1.f * inv);
              if constexpr (Term::template kST<k>) {
                LaneVec& ts = t_sum[k * positions + p];
                ts = t == 0 ? r : ts + r;
                LaneVec& hs = h_sum[k * rows + w];
                hs = h == 0 ? r : hs + r;
                w_sum[k] += r;
              } else {
                c_grad[k * positions + p] = r;
              }
            });
          }
          Term::for_each_factor([&](auto k) {
            if constexpr (Term::template kST<decltype(k)::value>)
              Row<float, 32>{count}.store(out_ptr[k][2] + gate_offset(kAxisW, d, n, t, c0, h, 0),
                                          (Vec<float, 32>::type)w_sum[k]);
          });
        }
        Term::for_each_factor([&](auto k) {
          if constexpr (Term::template kST<decltype(k)::value>) {
            untranspose_planes(h_sum.data() + k * rows, W, count, out_ptr[k][1] + gate_offset(kAxisH, d, n, t, c0, 0, 0),
                               W);
          } else {  // this block's channels summed at each (h, w), lanes past count left out
            float* part = cpart + item * cpart_item + (k * d.T + t) * positions;
            const LaneIdx in = (LaneIdx)lanes_below(count);
            for (int64_t p0 = 0; p0 < HW; p0 += 8) {
              LaneVec r[8];
              for (int j = 0; j < 8; ++j) r[j] = in != 0 ? c_grad[k * positions + p0 + j] : LaneVec{};
              transpose8(r);
              LaneVec sum = r[0];
              for (int j = 1; j < 8; ++j) sum += r[j];
              Vec<float, 32>::store(part + p0, (Vec<float, 32>::type)sum);
            }
          }
        });
      }
      Term::for_each_factor([&](auto k) {
        if constexpr (Term::template kST<decltype(k)::value>)
          untranspose_planes(t_sum.data() + k * positions, HW, count,
                             out_ptr[k][0] + gate_offset(kAxisT, d, n, 0, c0, 0, 0), HW);
      });
    }
  });
  if constexpr (S::kAnyC) {
    at::parallel_for(0, d.N * d.T, grain_for(blocks * HW), [&](int64_t begin, int64_t end) {
      for (int64_t nt = begin; nt < end; ++nt) {
        const int64_t n = nt / d.T, t = nt % d.T;
        LaneTerm<S, U>::for_each_factor([&](auto k) {
          if constexpr (!LaneTerm<S, U>::template kST<decltype(k)::value>) {
            float* out = out_ptr[k][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0);
            const float* part = cpart + n * blocks * cpart_item + (k * d.T + t) * positions;
            for (int64_t p = 0; p < HW; ++p) {
              float sum = part[p];
              for (int64_t b = 1; b < blocks; ++b) sum += part[b * cpart_item + p];
              out[p] = sum;
            }
          }
        });
      }
    });
  }
}

// One term of input_grad over an item's frames, added to acc (T frames of `positions`
// lanes each; the first term starts them), in add_term_planes' order of operations.
template <typename S, typename U>
void add_term_lanes(const Dims& d, const Weight<float>& wt, const Upstream<float, float>& up,
                    const UpstreamCall<float, float>& upc, LaneScratch& scratch, int64_t n, int64_t c0, int count,
                    bool first, LaneVec* acc) {
  LaneTerm<S, U> term(d, wt, up, upc, scratch);
  const int64_t H = d.H, W = d.W, positions = (H * W + 7) / 8 * 8;
  term.begin_item(n, c0, count);
  for (int64_t t = 0; t < d.T; ++t) {
    term.begin_frame(t);
    LaneVec* a = acc + t * positions;
    for (int64_t h = 0; h < H; ++h) {
      term.begin_row(h);
      for (int64_t w = 0; w < W; ++w) {
        const int64_t p = h * W + w;
        const LaneVec u = term.upstream(p, h, w);
        LaneVec x = u;
        if constexpr (S::kFactors == 1) x = term.template factor<0>(p, w) * u;
        else if constexpr (S::kFactors == 2) x = (term.template factor<0>(p, w) * term.template factor<1>(p, w)) * u;
        a[p] = (first ? LaneVec{} : a[p]) + x;
      }
    }
  }
}

using AddTermLanes = void (*)(const Dims&, const Weight<float>&, const Upstream<float, float>&,
                              const UpstreamCall<float, float>&, LaneScratch&, int64_t, int64_t, int, bool, LaneVec*);

// input_grad over items (n, 8 channels), every term added in turn to the item's sums, which
// are then written as the channels' planes. `add`: each term's add_term_lanes.
void input_grad_lanes(const std::vector<AddTermLanes>& add, const TermSet<float, float>& set, const Dims& d,
                      const Strides5& os, float* op) {
  const int64_t HW = d.H * d.W, positions = (HW + 7) / 8 * 8;
  const int64_t blocks = (d.C + kLaneChannels - 1) / kLaneChannels;
  at::parallel_for(0, d.N * blocks, grain_for(kLaneChannels * d.T * HW), [&](int64_t begin, int64_t end) {
    LaneScratch scratch(d);
    std::vector<LaneVec> acc(d.T * positions);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = item % blocks * kLaneChannels;
      const int count = static_cast<int>(std::min<int64_t>(kLaneChannels, d.C - c0));
      for (size_t k = 0; k < add.size(); ++k)
        add[k](d, set.weights[k], set.ups[k], set.calls[k], scratch, n, c0, count, k == 0, acc.data());
      for (int64_t t = 0; t < d.T; ++t)
        store_frame_lanes(acc.data() + t * positions, d, n, t, c0, count, op, os, scratch.planes.data());
    }
  });
}

// input_grad by lanes if every term and tensor allows it (see weight_grad_lanes); false if not.
bool input_grad_by_lanes(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  const Dims d = dims_of(out);
  if (terms.empty() || !lanes_walk(d)) return false;
  std::vector<AddTermLanes> add;
  for (const Term& term : terms) {
    with_term_structure<float>(term, [&](auto shape, auto upstream) {
      if constexpr (lanes_term<decltype(shape), decltype(upstream)>())
        add.push_back(&add_term_lanes<decltype(shape), decltype(upstream)>);
    });
  }
  if (add.size() != terms.size()) return false;
  const TermSet<float, float> set(terms, gates, d);
  input_grad_lanes(add, set, d, strides_of(out), out.data_ptr<float>());
  return true;
}
#endif

}  // namespace

std::vector<at::Tensor> weight_grad(const at::Tensor& v, const Term& term, const GateSet& gates) {
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<at::Tensor> outs;
  for (const auto& factor : term.weight.factors)
    for (int id : factor) outs.push_back(at::empty(gate_shape(gates.axis[id], d), acc));
#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
  if (v.scalar_type() == at::kFloat && lanes_walk(d)) {
    bool done = false;
    with_term_structure<float>(term, [&](auto shape, auto upstream) {
      using S = decltype(shape);
      using U = decltype(upstream);
      if constexpr (lanes_weight_grad<S, U>()) {
        const Upstream<float, float> up = make_upstream<float, float>(term.upstream);
        float* out_ptr[kMaxFactors][kMaxFactorGates] = {};
        size_t o = 0;
        for (int k = 0; k < S::kFactors; ++k)
          for (int j = 0; j < ((k == 0 ? S::kST0 : S::kST1) ? 3 : 1); ++j) out_ptr[k][j] = outs[o++].data_ptr<float>();
        weight_grad_lanes<S, U>(v.data_ptr<float>(), strides_of(v), d, make_weight<float>(gates, term.weight), up,
                                out_ptr);
        done = true;
      }
    });
    if (done) return outs;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_weight_grad_cpu", [&] {
    with_chunk_bytes<scalar_t>(d.W, [&](auto b) {
      with_term_shape<scalar_t>(term, v.stride(4) == 1, [&](auto shape, auto upstream) {
        weight_grad_kernel<scalar_t, decltype(b)::value, decltype(shape), decltype(upstream)>(v, term, gates, outs);
      });
    });
  });
  return outs;
}

void input_grad(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aia_native_input_grad_cpu", [&] {
    with_chunk_bytes<scalar_t>(out.size(4), [&](auto b) {
      if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
        if (input_grad_by_lanes(terms, gates, out)) return;
#endif
        if (out.stride(4) == 1 && !terms.empty()) return input_grad_by_term<decltype(b)::value>(terms, gates, out);
      }
      input_grad_kernel<scalar_t, decltype(b)::value>(terms, gates, out);
    });
  });
}

}  // namespace cpu
}  // namespace aia
