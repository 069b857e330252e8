// CPU kernels: the pooling pass (max, mean and argmax of weight * v along C, or along T, H
// and W in one read of v) and apply (out = weight * v).
#include "aia_cpu_lanes.h"
#include "aia_cpu_padded.h"

namespace aia {
namespace cpu {
namespace {

using namespace detail;

// The C pass pools this many channels at a time (see its loop); one in a portable build
// (element-loop chunks, not the speed target: each block size is another copy to compile).
constexpr int kChannelBlock = kVectorChunks ? 4 : 1;

// ---- reductions ----

// Running max (the first maximum wins: strict >, so ties and NaNs keep the earlier
// entry, as in the reference's order) and sum of chunks along a pooled axis, kept in
// buffers at `mx`, `sum`, `arg` (the max's position only if kArgmax): y[0..kPlanes) at
// positions pos, pos + 1, ..., in that order, with one read and write of the buffers.
template <bool kArgmax, int kPlanes, typename acc_t, int B>
AIA_INLINE void running_max_sum(const Row<acc_t, B>& row, const typename Vec<acc_t, B>::type* y, int32_t pos,
                                bool first, acc_t* mx, acc_t* sum, int32_t* arg) {
  using V = Vec<acc_t, B>;
  typename V::type m, s;
  typename V::itype at{};
  int p = 0;
  if (first) {
    m = s = y[0];
    if constexpr (kArgmax) at = typename V::itype{} + typename V::int_t(pos);
    p = 1;
  } else {
    m = row.load(mx);
    s = row.load(sum);
    if constexpr (kArgmax) at = row.load_index(arg);
  }
  for (; p < kPlanes; ++p) {
    const typename V::itype greater = y[p] > m;
    m = greater ? y[p] : m;
    if constexpr (kArgmax) at = greater ? typename V::itype{} + typename V::int_t(pos + p) : at;
    s = s + y[p];
  }
  row.store(mx, m);
  row.store(sum, s);
  if constexpr (kArgmax) row.store_index(arg, at);
}

// The same for one value at a time (reductions along a row, in increasing w).
template <typename acc_t>
AIA_INLINE void running_max_sum(acc_t y, int32_t pos, bool first, acc_t& mx, acc_t& sum, int32_t& arg) {
  if (first) {
    mx = sum = y;
    arg = pos;
    return;
  }
  const int32_t greater = -static_cast<int32_t>(y > mx);  // branch-free: short rows mispredict a branch
  mx = y > mx ? y : mx;
  arg += (pos - arg) & greater;
  sum += y;
}

// Max (the first position wins), its position and sum of one row's chunks, lane by lane:
// the W reduction of a row of several chunks pays one horizontal reduction per row, not
// one per chunk. Lanes past a partial chunk's end hold -inf in the max and 0 in the sum.
template <typename acc_t, int B, bool kArgmax = true>
struct LaneMaxSum {
  using V = Vec<acc_t, B>;
  typename V::type mx, sum;
  typename V::itype pos, nan;  // nan: lanes that met a NaN (the caller then redoes the row in order)

  AIA_INLINE void add(const Row<acc_t, B>& row, const typename V::type& y, int64_t w0, bool first) {
    const typename V::itype at = kArgmax ? V::iota() + typename V::int_t(w0) : typename V::itype{};
    typename V::type ym = y, ys = y;
    if (row.W < V::kLanes) {
      const typename V::itype in = V::iota() < typename V::int_t(row.W);
      ym = in ? y : typename V::type{} - std::numeric_limits<acc_t>::infinity();
      ys = in ? y : typename V::type{};
    }
    if (first) {
      mx = ym, sum = ys, pos = at, nan = ym != ym;
      return;
    }
    const typename V::itype greater = ym > mx;  // strict: an earlier chunk keeps a tie
    mx = greater ? ym : mx;
    if constexpr (kArgmax) pos = greater ? at : pos;
    sum += ys;
    nan |= ym != ym;
  }

  // False if a lane met a NaN; else the row's max, the first position holding it, the sum.
  AIA_INLINE bool reduce(acc_t& m, int32_t& first, acc_t& s) const {
#if defined(AIA_MASKED_CHUNKS)
    if constexpr (B == 64 && sizeof(acc_t) == 4) {
      if (_mm512_test_epi32_mask((__m512i)nan, (__m512i)nan)) return false;
      m = _mm512_reduce_max_ps((__m512)mx);
      if constexpr (kArgmax) {
        const __mmask16 eq = _mm512_cmpeq_ps_mask((__m512)mx, _mm512_set1_ps(m));
        first = _mm512_mask_reduce_min_epi32(eq, (__m512i)pos);
      }
      s = _mm512_reduce_add_ps((__m512)sum);
      return true;
    }
#elif defined(AIA_AVX2_CHUNKS)
    if constexpr (B == 32 && sizeof(acc_t) == 4) {
      if (!_mm256_testz_si256((__m256i)nan, (__m256i)nan)) return false;
      m = reduce_max((__m256)mx);
      if constexpr (kArgmax) {
        const __m256i eq = _mm256_castps_si256(_mm256_cmp_ps((__m256)mx, _mm256_set1_ps(m), _CMP_EQ_OQ));
        const __m256i cand = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), (__m256i)pos, eq);
        __m128i lo = _mm_min_epi32(_mm256_castsi256_si128(cand), _mm256_extracti128_si256(cand, 1));
        lo = _mm_min_epi32(lo, _mm_shuffle_epi32(lo, _MM_SHUFFLE(1, 0, 3, 2)));
        lo = _mm_min_epi32(lo, _mm_shuffle_epi32(lo, _MM_SHUFFLE(2, 3, 0, 1)));
        first = _mm_cvtsi128_si32(lo);
      }
      s = reduce_add((__m256)sum);
      return true;
    }
#endif
    for (int l = 0; l < V::kLanes; ++l) {  // other widths and double: lane by lane, same result
      if (nan[l]) return false;
    }
    m = mx[0], s = sum[0];
    for (int l = 1; l < V::kLanes; ++l) m = mx[l] > m ? mx[l] : m, s += sum[l];
    first = INT32_MAX;
    for (int l = 0; l < V::kLanes; ++l) {
      if (mx[l] == m && pos[l] < first) first = static_cast<int32_t>(pos[l]);
    }
    return true;
  }
};

// Where a T, H or W gate's pooled entry (a, b, c) of sample n goes (max: ci 0, mean: 1): a
// contiguous (N, 2, D1, D2, D3) tensor, or the interior of the gate conv's padded volumes
// (pool_for_conv; aia_cpu_padded.h).
template <typename acc_t>
struct PooledAt {
  acc_t* base = nullptr;  // null: the axis is not pooled
  int64_t R = 0, slice = 0, volume = 0, first = 0;
  AIA_INLINE acc_t* at(int64_t n, int ci, int64_t a, int64_t b, int64_t c) const {
    return base + (2 * n + ci) * volume + first + a * slice + b * R + c;
  }
};

template <typename acc_t>
PooledAt<acc_t> pooled_at(const at::Tensor& P, int axis, const Dims& d) {
  const std::vector<int64_t> shape = gate_shape(axis, d);  // (N, D1, D2, D3)
  const ConvDims cd{shape[0], shape[1], shape[2], shape[3]};
  if (const acc_t* base = padded_base<acc_t>(P)) {
    const Padded p = padded(cd);
    return {const_cast<acc_t*>(base), p.R, p.slice, p.volume, p.first};
  }
  return {P.data_ptr<acc_t>(), cd.D3, cd.D2 * cd.D3, cd.D1 * cd.D2 * cd.D3, 0};
}

// Writes max and mean at pm and pa (`len` entries), and the max's positions at `argmax` unless null.
template <typename acc_t>
void write_pooled(const acc_t* mx, const acc_t* sum, const int32_t* arg, int64_t len, acc_t axis_len, acc_t* pm,
                  acc_t* pa, int32_t* argmax) {
  for (int64_t i = 0; i < len; ++i) {
    pm[i] = mx[i];
    pa[i] = sum[i] / axis_len;
  }
  if (argmax != nullptr) std::copy(arg, arg + len, argmax);
}

struct PoolOut {
  at::Tensor P, argmax;
};

#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
// ---- the T/H/W pass of small planes, channels as lanes (aia_cpu_lanes.h) ----
// Reductions in order, as the row walk's running values and its in-order path for rows with
// a NaN (strict >: the first maximum wins, a NaN only if first). Only the W sums differ from
// the row walk's bits, which adds a row's chunks as a tree.

// Running max (first wins), its position if kArg, and sum, lane-wise.
template <bool kArg>
struct LaneRun {
  LaneVec mx, sum;
  LaneIdx arg;
  AIA_INLINE void add(const LaneVec& y, int32_t pos) {
    if (pos == 0) {
      mx = sum = y;
      if constexpr (kArg) arg = LaneIdx{};
      return;
    }
    const LaneIdx greater = y > mx;
    mx = greater ? y : mx;
    if constexpr (kArg) arg = greater ? LaneIdx{} + pos : arg;
    sum += y;
  }
};

// A run's results for channels [0, count), contiguous at pm, pa and a (a W gate's 8 channels):
// max, mean (sum / len) and, if kArg, the max's position.
template <bool kArg>
AIA_INLINE void write_lanes(const LaneRun<kArg>& r, float len, float* pm, float* pa, int32_t* a, int count) {
  const Row<float, 32> row{count};
  row.store(pm, (Vec<float, 32>::type)r.mx);
  row.store(pa, (Vec<float, 32>::type)(r.sum / len));
  if constexpr (kArg) row.store_index(a, (Vec<float, 32>::itype)r.arg);
}

// The results of runs[0..positions) the same way, channel k's at pm + k * stride + p (and pa,
// and a + k * a_stride + p): a T gate's planes or rows, an H gate's rows. Transposed back,
// not one lane at a time (those scalar stores were a fifth of the pass's instructions at
// 10x10). `runs` holds whole groups of 8.
template <bool kArg>
AIA_INLINE void write_runs(const LaneRun<kArg>* runs, int64_t positions, float len, float* pm, float* pa,
                           int64_t stride, int32_t* a, int64_t a_stride, int count) {
  untranspose_lanes([runs](int64_t j) AIA_LAMBDA_INLINE { return runs[j].mx; }, positions, count, pm, stride);
  untranspose_lanes([runs, len](int64_t j) AIA_LAMBDA_INLINE { return runs[j].sum / len; }, positions, count, pa,
                    stride);
  if constexpr (kArg)
    untranspose_lanes([runs](int64_t j) AIA_LAMBDA_INLINE { return (LaneVec)runs[j].arg; }, positions, count,
                      reinterpret_cast<float*>(a), a_stride);
}

// The weights the lanes walk evaluates lane-wise: a T/H/W stage's compiled structures (none,
// one C gate, one T, H, W mean, two C gates).
template <typename S>
constexpr bool lanes_weight() {
  if constexpr (!S::kStatic) return false;
  else return S::kFactors < 2 || (!S::kST0 && !S::kST1);
}
template <typename S>
constexpr bool lanes_st_weight() {  // of those, one T, H, W mean
  if constexpr (!lanes_weight<S>()) return false;
  else return S::kFactors == 1 && S::kST0;
}

// The T/H/W pass over planes (n, t, c0..c0+8) in items (n, channel block); P: where each
// axis's results go (base null: not pooled), A as in pool_kernel (null: not pooled, or its
// max positions not kept).
template <typename scalar_t, int B, typename S, bool kArg>
void pool_thw_lanes(const Dims& d, const scalar_t* vp, const Strides5& vs, const Weight<float>& wt,
                    const PooledAt<float> (&P)[4], int32_t* const* A) {
  using V = Vec<float, B>;
  const int64_t H = d.H, W = d.W, HW = H * W, positions = (HW + 7) / 8 * 8;
  const int64_t blocks = (d.C + kLaneChannels - 1) / kLaneChannels;
  const int64_t pitch = positions + V::kLanes;  // a channel's weighted plane, with a vector of slack
  const bool contiguous = contiguous_planes(vs, d);  // v's planes
  at::parallel_for(0, d.N * blocks, grain_for(kLaneChannels * d.T * HW), [&](int64_t begin, int64_t end) {
    std::vector<float> planes(kLaneChannels * pitch, 0.f);  // channels past C stay zero
    std::vector<LaneVec> y(positions);                       // the 8 channels' values at each (h, w)
    // Whole groups of 8 (write_runs), the T runs 8 more: written row by row into padded volumes.
    std::vector<LaneRun<kArg>> trun(positions + 8), hrun((W + 7) / 8 * 8);
    std::vector<LaneVec> tl(lanes_st_weight<S>() ? positions : 0), hl(W);  // T and H gates, lane-wise
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = item % blocks * kLaneChannels;
      const int count = static_cast<int>(std::min<int64_t>(kLaneChannels, d.C - c0));
      if (count < kLaneChannels) std::fill(planes.begin() + count * pitch, planes.end(), 0.f);
      const __m256i channels_in = lanes_below(count);
      if constexpr (lanes_st_weight<S>()) {  // the T gate: the same for every t
        if (contiguous)
          transpose_planes(wt.gate[0][0] + gate_offset(kAxisT, d, n, 0, c0, 0, 0), HW, count, HW, tl.data());
      }
      // The reductions along t, h and w of frame t, the H and W results written. row(h)
      // returns row h's weighted values as a function of w (evaluated as they are reduced:
      // not stored back into y first).
      const auto reduce_and_write = [&](int64_t t, auto&& row) AIA_LAMBDA_INLINE {
        const int64_t gw = gate_offset(kAxisW, d, n, t, c0, 0, 0);  // (n, t, h, c): 8 channels contiguous
        for (int64_t h = 0; h < H; ++h) {
          LaneRun<kArg> wrun;
          const auto x_at = row(h);
          for (int64_t w = 0; w < W; ++w) {
            const LaneVec x = x_at(w);
            trun[h * W + w].add(x, static_cast<int32_t>(t));
            hrun[w].add(x, static_cast<int32_t>(h));
            wrun.add(x, static_cast<int32_t>(w));
          }
          if (P[kAxisW].base != nullptr)  // (a, b, c) = (t, h, c)
            write_lanes(wrun, float(W), P[kAxisW].at(n, 0, t, h, c0), P[kAxisW].at(n, 1, t, h, c0),
                        kArg ? A[kAxisW] + gw + h * d.C : nullptr, count);
        }
        if (P[kAxisH].base != nullptr) {  // (a, b, c) = (t, c, w)
          const int64_t g = gate_offset(kAxisH, d, n, t, c0, 0, 0);  // (n, t, c, w)
          write_runs(hrun.data(), W, float(H), P[kAxisH].at(n, 0, t, c0, 0), P[kAxisH].at(n, 1, t, c0, 0), P[kAxisH].R,
                     kArg ? A[kAxisH] + g : nullptr, W, count);
        }
      };
      const auto unweighted = [&](int64_t h) AIA_LAMBDA_INLINE {
        return [&y, h, W](int64_t w) AIA_LAMBDA_INLINE { return y[h * W + w]; };
      };
      for (int64_t t = 0; t < d.T; ++t) {
        // Contiguous float planes with a weight compiled per structure: the 8 channels' planes
        // are transposed straight from v and the weight evaluated lane-wise, in the row walk's
        // order of operations (its values bitwise); other cases take the weighted rows below.
        if constexpr (lanes_weight<S>() && std::is_same_v<scalar_t, float>) {
          if (contiguous) {
            transpose_planes(vp + offset5(vs, n, t, c0, 0, 0), vs.c, count, HW, y.data());
            prefetch_frame(vp, vs, d, n, t + 1, c0, count);
            if constexpr (S::kFactors == 1 && S::kST0) {  // (T + H + W) / 3
              const float* gh = wt.gate[0][1] + gate_offset(kAxisH, d, n, t, c0, 0, 0);  // (n, t, c, w)
              const float* gw = wt.gate[0][2] + gate_offset(kAxisW, d, n, t, c0, 0, 0);  // (n, t, h, c)
              transpose_planes(gh, W, count, W, hl.data());  // the 8 channels' rows: one (8, W) block
              reduce_and_write(t, [&](int64_t h) AIA_LAMBDA_INLINE {
                const LaneVec wl = load_lanes_below(gw + h * d.C, count, channels_in);
                return [&, h, wl](int64_t w) AIA_LAMBDA_INLINE {
                  return y[h * W + w] * (((tl[h * W + w] + hl[w]) + wl) * (1.f / 3.f));
                };
              });
            } else if constexpr (S::kFactors > 0) {  // one or two C gates: one value per (h, w)
              const float* g0 = wt.gate[0][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0);
              const float* g1 = S::kFactors == 2 ? wt.gate[1][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0) : nullptr;
              reduce_and_write(t, [&](int64_t h) AIA_LAMBDA_INLINE {
                return [&, h](int64_t w) AIA_LAMBDA_INLINE {
                  const int64_t p = h * W + w;
                  return y[p] * (S::kFactors == 2 ? g0[p] * g1[p] : g0[p]);
                };
              });
            } else {
              reduce_and_write(t, unweighted);
            }
            continue;
          }
        }
        for (int k = 0; k < count; ++k) {
          const WeightAt<float> wa = weight_at(wt, d, n, t, c0 + k);
          const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c0 + k);
          float* out = planes.data() + k * pitch;
          // Whole vectors, rows in order: a partial row's extra lanes land on the next row
          // (written after it) or in the slack.
          for_each_chunk<float, B>(H, W, [&](int64_t h, int64_t w0, const Row<float, B>& row) AIA_LAMBDA_INLINE {
            V::store(out + h * W + w0, weighted_chunk_of<S>(wa, vpl, d, h, w0, row));
          });
        }
        transpose_planes(planes.data(), pitch, kLaneChannels, HW, y.data());
        reduce_and_write(t, unweighted);
      }
      if (P[kAxisT].base != nullptr) {  // (a, b, c) = (c, h, w)
        const PooledAt<float>& pt = P[kAxisT];
        int32_t* a = kArg ? A[kAxisT] + gate_offset(kAxisT, d, n, 0, c0, 0, 0) : nullptr;  // (n, c, h, w)
        if (pt.first == 0) {  // contiguous planes
          write_runs(trun.data(), HW, float(d.T), pt.at(n, 0, c0, 0, 0), pt.at(n, 1, c0, 0, 0), pt.slice, a, HW, count);
        } else {  // padded rows
          for (int64_t h = 0; h < H; ++h)
            write_runs(trun.data() + h * W, W, float(d.T), pt.at(n, 0, c0, h, 0), pt.at(n, 1, c0, h, 0), pt.slice,
                       kArg ? a + h * W : nullptr, HW, count);
        }
      }
    }
  });
}
#endif

// `outs[i].argmax` undefined: that axis's max positions are not tracked (the forward of a
// stage the backward pools again keeps none).
template <typename scalar_t, int B, typename S>
void pool_kernel(const at::Tensor& v, const GateSet& gates, const WeightSpec& spec, const std::vector<int>& axes,
                 std::vector<PoolOut>& outs, bool c_part) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t, B>;
  const Dims d = dims_of(v);
  const Strides5 vs = strides_of(v);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const Weight<acc_t> wt = make_weight<acc_t>(gates, spec);
  const int64_t H = d.H, W = d.W, HW = H * W;
  acc_t* P[4] = {nullptr, nullptr, nullptr, nullptr};
  int32_t* A[4] = {nullptr, nullptr, nullptr, nullptr};
  bool argmax = true;
  for (size_t i = 0; i < axes.size(); ++i) {
    P[axes[i]] = outs[i].P.data_ptr<acc_t>();  // (T, H, W: written through `dest` below, padded views too)
    A[axes[i]] = outs[i].argmax.defined() ? outs[i].argmax.data_ptr<int32_t>() : nullptr;
    argmax = argmax && A[axes[i]] != nullptr;
  }
  TORCH_CHECK(argmax || std::all_of(A, A + 4, [](const int32_t* a) { return a == nullptr; }),
              "aia_native: pool tracks the argmax of every axis of a call or of none");
  // Compiled with and without the argmax, so the usual case tests nothing per chunk.
  const auto with_argmax = [&](auto body) {
    if (argmax) body(std::true_type{});
    else body(std::false_type{});
  };
  // One call pools the C part (c_part) or the T, H, W part of `axes`, each compiled for the
  // weights its stages have (pool() below).
  if (c_part) {
  if (P[kAxisC] != nullptr) with_argmax([&](auto arg_tag) {
    constexpr bool kArg = decltype(arg_tag)::value;
    const int64_t sample = gate_sample_size(kAxisC, d);
    const int64_t pitch = whole_vectors<V>(W);  // rows of the running values (see the T/H/W pass)
    const Row<acc_t, B> whole{V::kLanes};
    at::parallel_for(0, d.N * d.T, grain_for(d.C * HW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mx(H * pitch), sum(H * pitch);
      std::vector<int32_t> arg(H * pitch);
      for (int64_t nt = begin; nt < end; ++nt) {
        const int64_t n = nt / d.T, t = nt % d.T;
        // kCount channels from c at a time: their running values read and written once.
        int64_t c = 0;
        const auto channels = [&](auto count_tag) AIA_LAMBDA_INLINE {
          constexpr int kCount = decltype(count_tag)::value;
          WeightAt<acc_t> wa[kCount];
          PlaneAt<const scalar_t> vpl[kCount];
          for (int k = 0; k < kCount; ++k) {
            wa[k] = weight_at(wt, d, n, t, c + k);
            vpl[k] = plane_at(vp, vs, n, t, c + k);
          }
          for_each_chunk<acc_t, B>(H, W, [&](int64_t h, int64_t w0, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
            typename V::type y[kCount];
            for (int k = 0; k < kCount; ++k) y[k] = weighted_chunk_of<S>(wa[k], vpl[k], d, h, w0, row);
            const int64_t off = h * pitch + w0;
            running_max_sum<kArg, kCount>(whole, y, static_cast<int32_t>(c), c == 0, mx.data() + off,
                                          sum.data() + off, arg.data() + off);
          });
        };
        for (; c + kChannelBlock <= d.C; c += kChannelBlock) channels(std::integral_constant<int, kChannelBlock>{});
        for (; c < d.C; ++c) channels(std::integral_constant<int, 1>{});
        for (int64_t h = 0; h < H; ++h) {
          const int64_t g = gate_offset(kAxisC, d, n, t, 0, h, 0);
          write_pooled(mx.data() + h * pitch, sum.data() + h * pitch, arg.data() + h * pitch, W, acc_t(d.C),
                       P[kAxisC] + pooled_max_offset(g, n, sample), P[kAxisC] + pooled_mean_offset(g, n, sample),
                       A[kAxisC] != nullptr ? A[kAxisC] + g : nullptr);
        }
      }
    });
  });
  return;
  }
  if (P[kAxisT] == nullptr && P[kAxisH] == nullptr && P[kAxisW] == nullptr) return;
  PooledAt<acc_t> dest[4];  // where the T, H, W results go
  for (size_t i = 0; i < axes.size(); ++i)
    if (axes[i] != kAxisC) dest[axes[i]] = pooled_at<acc_t>(outs[i].P, axes[i], d);
#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (lanes_walk(d)) {
      with_argmax([&](auto arg_tag) {
        pool_thw_lanes<scalar_t, B, S, decltype(arg_tag)::value>(d, vp, vs, wt, dest, A);
      });
      return;
    }
  }
#endif
  const bool prefetch = prefetch_next_frame(d, sizeof(scalar_t));
  with_argmax([&](auto arg_tag) {
  constexpr bool kArg = decltype(arg_tag)::value;
  at::parallel_for(0, d.N * d.C, grain_for(d.T * HW), [&](int64_t begin, int64_t end) {
    // The T running values' rows, whole vectors apart (whole_vectors; at 7x7 the masked
    // load of this buffer held a third of the pass's samples).
    const int64_t pitch = whole_vectors<V>(W);
    const Row<acc_t, B> whole{V::kLanes};
    std::vector<acc_t> tmx(H * pitch), tsum(H * pitch), wmx(H), wsum(H);
    std::vector<int32_t> targ(H * pitch), warg(H);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / d.C, c = nc % d.C;
      for (int64_t t = 0; t < d.T; ++t) {
        const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
        const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
        const PlaneAt<const scalar_t> v_next = next_frame(vp, vs, d, n, t, c);
        for (int64_t g0 = 0; g0 < W; g0 += kPoolGroupStrips<B> * V::kLanes) {
          const StripGroup<acc_t, B, kPoolGroupStrips<B>> group(g0, W);
          // Along w: a piece of row h (from its start if `first`) with max m, first at `pos`,
          // sum `sum`, merged into the row's running values.
          const auto merge_w = [&](int64_t h, bool first, acc_t m, int32_t pos, acc_t sum) AIA_LAMBDA_INLINE {
            const bool greater = first || m > wmx[h];
            wmx[h] = greater ? m : wmx[h];
            warg[h] = greater ? pos : warg[h];
            wsum[h] = first ? sum : wsum[h] + sum;
          };
          // One chunk at a time (its max, first lane on ties, and sum; in order), or lane-wise
          // across the group's chunks (LaneMaxSum), then the row's; rows with a NaN in order.
          const auto w_chunk = [&](int64_t h, int64_t w0, const Row<acc_t, B>& row, const typename V::type& y)
              AIA_LAMBDA_INLINE {
            acc_t m;
            int lane = 0;
            if (kArg ? row.max_first(y, m, lane) : row.max(y, m)) {
              merge_w(h, w0 == 0, m, static_cast<int32_t>(w0 + lane), row.sum(y));
            } else {  // NaNs: lane by lane, in order
              for (int64_t l = 0; l < row.W; ++l)
                running_max_sum(y[l], static_cast<int32_t>(w0 + l), w0 + l == 0, wmx[h], wsum[h], warg[h]);
            }
          };
          // The rows, compiled for each case: rows of one chunk keep the per-chunk W code, and
          // the usual stage (all three axes) has no per-chunk axis checks.
          const auto rows = [&](auto lanes_tag, auto all_tag, auto strips_tag) AIA_LAMBDA_INLINE {
            constexpr bool w_lanes = decltype(lanes_tag)::value, all = decltype(all_tag)::value;
            constexpr int kStrips = decltype(strips_tag)::value;
            typename V::type hmx[kPoolGroupStrips<B>] = {}, hsum[kPoolGroupStrips<B>] = {};  // along h, per chunk column
            typename V::itype harg[kPoolGroupStrips<B>] = {};
            for (int64_t h = 0; h < H; ++h) {
              [[maybe_unused]] LaneMaxSum<acc_t, B, kArg> wl;
              for_each_strip<kStrips>(group, [&](int s, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
                const int64_t w0 = g0 + s * V::kLanes;
                if (prefetch) __builtin_prefetch(v_next.at(h, w0));  // prefetch_next_frame
                const typename V::type y = weighted_chunk_of<S>(wa, vpl, d, h, w0, row);
                if (all || P[kAxisT] != nullptr) {
                  const int64_t off = h * pitch + w0;
                  running_max_sum<kArg, 1>(whole, &y, static_cast<int32_t>(t), t == 0, tmx.data() + off,
                                           tsum.data() + off, targ.data() + off);
                }
                if (all || P[kAxisH] != nullptr) {
                  const typename V::itype greater = h == 0 ? ~typename V::itype{} : (y > hmx[s]);
                  hmx[s] = greater ? y : hmx[s];
                  if constexpr (kArg) harg[s] = greater ? typename V::itype{} + typename V::int_t(h) : harg[s];
                  hsum[s] = h == 0 ? y : hsum[s] + y;
                }
                if constexpr (w_lanes) {
                  wl.add(row, y, w0, s == 0);
                } else if (all || P[kAxisW] != nullptr) {
                  w_chunk(h, w0, row, y);
                }
              });
              if constexpr (w_lanes) {
                acc_t m, sum;
                int32_t first_pos;
                if (wl.reduce(m, first_pos, sum)) {
                  merge_w(h, g0 == 0, m, first_pos, sum);
                } else {  // a NaN in the row: its chunks again, in order (rare: not unrolled)
                  for_each_strip<0>(group, [&](int s, const Row<acc_t, B>& row) {
                    const int64_t w0 = g0 + s * V::kLanes;
                    w_chunk(h, w0, row, weighted_chunk_of<S>(wa, vpl, d, h, w0, row));
                  });
                }
              }
            }
            if (all || P[kAxisH] != nullptr) {
              for_each_strip<kStrips>(group, [&](int s, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
                const int64_t w0 = g0 + s * V::kLanes, g = gate_offset(kAxisH, d, n, t, c, 0, 0) + w0;
                row.store(dest[kAxisH].at(n, 0, t, c, w0), hmx[s]);  // (a, b, c) = (t, c, w)
                row.store(dest[kAxisH].at(n, 1, t, c, w0), hsum[s] / acc_t(H));
                if constexpr (kArg) row.store_index(A[kAxisH] + g, harg[s]);
              });
            }
          };
          const bool all = P[kAxisT] != nullptr && P[kAxisH] != nullptr && P[kAxisW] != nullptr;
          const std::integral_constant<int, 0> any_strips;
          if (all) {
            with_strip_count<S::kStatic>(group, [&](auto strips_tag) AIA_LAMBDA_INLINE {
              constexpr int kStrips = decltype(strips_tag)::value;  // 0: read at run time
              if constexpr (kStrips == 1) rows(std::false_type{}, std::true_type{}, strips_tag);
              else if constexpr (kStrips > 1) rows(std::true_type{}, std::true_type{}, strips_tag);
              else if (group.strips == 1) rows(std::false_type{}, std::true_type{}, strips_tag);
              else rows(std::true_type{}, std::true_type{}, strips_tag);
            });
          } else if constexpr (!S::kStatic) {  // some of T, H, W (tests, benchmarks): compiled for AnyWeight only
            if (P[kAxisW] != nullptr && group.strips > 1) rows(std::true_type{}, std::false_type{}, any_strips);
            else rows(std::false_type{}, std::false_type{}, any_strips);
          }
        }
        if (P[kAxisW] != nullptr) {
          const int64_t g0 = gate_offset(kAxisW, d, n, t, c, 0, 0);
          for (int64_t h = 0; h < H; ++h) {  // (a, b, c) = (t, h, c)
            *dest[kAxisW].at(n, 0, t, h, c) = wmx[h];
            *dest[kAxisW].at(n, 1, t, h, c) = wsum[h] / acc_t(W);
            if constexpr (kArg) A[kAxisW][g0 + h * d.C] = warg[h];  // entries of consecutive h are C apart
          }
        }
      }
      if (P[kAxisT] != nullptr) {
        for (int64_t h = 0; h < H; ++h)  // (a, b, c) = (c, h, w)
          write_pooled(tmx.data() + h * pitch, tsum.data() + h * pitch, targ.data() + h * pitch, W, acc_t(d.T),
                       dest[kAxisT].at(n, 0, c, h, 0), dest[kAxisT].at(n, 1, c, h, 0),
                       A[kAxisT] != nullptr ? A[kAxisT] + gate_offset(kAxisT, d, n, 0, c, h, 0) : nullptr);
      }
    }
  });
  });
}

template <typename scalar_t, int B, typename S>
void apply_kernel(const at::Tensor& v, const GateSet& gates, const WeightSpec& spec, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(v);
  const Strides5 vs = strides_of(v), os = strides_of(out);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const Weight<acc_t> wt = make_weight<acc_t>(gates, spec);
  at::parallel_for(0, d.N * d.T * d.C, grain_for(d.H * d.W), [&](int64_t begin, int64_t end) {
    for_each_plane(d, begin, end, [&](int64_t n, int64_t t, int64_t c) AIA_LAMBDA_INLINE {
      const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
      const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
      const PlaneAt<scalar_t> opl = plane_at(op, os, n, t, c);
      for_each_chunk<acc_t, B>(d.H, d.W, [&](int64_t h, int64_t w0, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
        store_chunk_of<S>(opl.at(h, w0), opl.sw, row, weighted_chunk_of<S>(wa, vpl, d, h, w0, row));
      });
    });
  });
}

}  // namespace

namespace {

// pool(), its pooled tensors padded views (pool_for_conv) if `in_conv_layout`.
std::vector<at::Tensor> pool_to(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                                const std::vector<int>& axes, bool with_argmax, bool in_conv_layout) {
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<PoolOut> outs;
  for (int axis : axes) {
    std::vector<int64_t> shape = gate_shape(axis, d);
    at::Tensor argmax = with_argmax ? at::empty(shape, v.options().dtype(at::kInt)) : at::Tensor();
    shape.insert(shape.begin() + 1, 2);
    outs.push_back({in_conv_layout ? empty_padded_pooled(shape, acc) : at::empty(shape, acc), argmax});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_pool_cpu", [&] {
    with_chunk_bytes<scalar_t>(d.W, [&](auto b) {
      constexpr int B = decltype(b)::value;
      const bool unit_stride = v.stride(4) == 1;
      if (std::count(axes.begin(), axes.end(), kAxisC) > 0) {
        with_weight_shape<scalar_t, CStageWeights>(weight, unit_stride, [&](auto shape) {
          pool_kernel<scalar_t, B, decltype(shape)>(v, gates, weight, axes, outs, true);
        });
      }
      if (std::count(axes.begin(), axes.end(), kAxisC) < static_cast<std::ptrdiff_t>(axes.size())) {
        const bool thw = std::count(axes.begin(), axes.end(), kAxisT) + std::count(axes.begin(), axes.end(), kAxisH) +
                             std::count(axes.begin(), axes.end(), kAxisW) == 3;
        with_weight_shape<scalar_t, THWStageWeights>(weight, unit_stride && thw, [&](auto shape) {
          pool_kernel<scalar_t, B, decltype(shape)>(v, gates, weight, axes, outs, false);
        });
      }
    });
  });
  std::vector<at::Tensor> result;
  for (auto& o : outs) {
    result.push_back(o.P);
    result.push_back(o.argmax.defined() ? o.argmax : at::empty({0}, v.options().dtype(at::kInt)));
  }
  return result;
}

}  // namespace

std::vector<at::Tensor> pool(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                             const std::vector<int>& axes, bool with_argmax) {
  return pool_to(v, gates, weight, axes, with_argmax, false);
}

std::vector<at::Tensor> pool_for_conv(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                                      const std::vector<int>& axes, bool with_argmax) {
  const bool padded = acc_type(v.scalar_type()) == at::kFloat && std::count(axes.begin(), axes.end(), kAxisC) == 0;
  return pool_to(v, gates, weight, axes, with_argmax, padded);
}

void apply(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_apply_cpu", [&] {
    with_chunk_bytes<scalar_t>(v.size(4), [&](auto b) {
      with_weight_shape<scalar_t, OutputWeights>(weight, v.stride(4) == 1 && out.stride(4) == 1, [&](auto shape) {
        apply_kernel<scalar_t, decltype(b)::value, decltype(shape)>(v, gates, weight, out);
      });
    });
  });
}

}  // namespace cpu
}  // namespace aia
