// The small-plane walks' building blocks (aia_cpu_pool.cpp, aia_cpu_grad.cpp): channels as
// the lanes of a vector.
//
// A plane of 7x7 or 14x14 is a few chunks, and the row walks pay per row what they save per
// element: masks, horizontal reductions along w, running values in memory. The lanes walks
// take 8 channels at a time instead: 8x8 blocks of their planes are transposed in registers
// so that one vector holds the 8 channels' values at one (h, w), gates are read lane-wise
// (a T gate's planes transposed once per 8 channels, an H gate's 8 rows, one (8, W) block,
// transposed per frame, a W gate's 8 channels one load), and every reduction along t, h or w is lane-wise, in order.
// docs/native.md has the measurements.
#pragma once

#include "aia_cpu_chunks.h"

namespace aia {
namespace cpu {
namespace detail {

#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
constexpr int kLaneChannels = 8;
using LaneVec = float __attribute__((vector_size(32)));
using LaneIdx = int32_t __attribute__((vector_size(32)));

// Planes up to 20x20 take the lanes walks (float accumulation, vector builds). The T/H/W pool
// alone, in-process A/B on the AVX2 EPYC (native_ab.py --passes): 0.59x-0.78x the row walk's
// time at 5x5, 7x7 and 10x10, 0.96x-1.05x at 14x14, 0.66x-0.69x at 20x20; at 28x28 it was
// 1.1x-1.3x slower (a scratch run): the T running values, 64 bytes a position, leave L1.
inline bool lanes_walk(const Dims& d) { return d.W <= 20 && d.H * d.W <= 400; }

// Lanes [0, n) all ones, the rest zero: the mask of a masked load.
AIA_INLINE __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

AIA_INLINE void transpose8(LaneVec r[8]) {
  __m256 x[8];
  for (int k = 0; k < 8; ++k) x[k] = (__m256)r[k];
  const __m256 t0 = _mm256_unpacklo_ps(x[0], x[1]), t1 = _mm256_unpackhi_ps(x[0], x[1]);
  const __m256 t2 = _mm256_unpacklo_ps(x[2], x[3]), t3 = _mm256_unpackhi_ps(x[2], x[3]);
  const __m256 t4 = _mm256_unpacklo_ps(x[4], x[5]), t5 = _mm256_unpackhi_ps(x[4], x[5]);
  const __m256 t6 = _mm256_unpacklo_ps(x[6], x[7]), t7 = _mm256_unpackhi_ps(x[6], x[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = (LaneVec)_mm256_permute2f128_ps(s0, s4, 0x20), r[1] = (LaneVec)_mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = (LaneVec)_mm256_permute2f128_ps(s2, s6, 0x20), r[3] = (LaneVec)_mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = (LaneVec)_mm256_permute2f128_ps(s0, s4, 0x31), r[5] = (LaneVec)_mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = (LaneVec)_mm256_permute2f128_ps(s2, s6, 0x31), r[7] = (LaneVec)_mm256_permute2f128_ps(s3, s7, 0x31);
}

// `count` contiguous planes of `len` 32-bit entries (floats, or int32 argmax positions moved
// as bits), `stride` apart, into out[p]: their entries p as the lanes of one vector (lanes
// past `count` repeat the last plane). The last 8 entries are read with a masked load, never
// past a plane's end.
template <typename T>
AIA_INLINE void transpose_planes(const T* base, int64_t stride, int count, int64_t len, LaneVec* out) {
  static_assert(sizeof(T) == 4, "32-bit entries");
  for (int64_t p0 = 0; p0 < len; p0 += 8) {
    LaneVec r[8];
    const __m256i in = lanes_below(len - p0);
    for (int k = 0; k < 8; ++k) {
      const float* x = reinterpret_cast<const float*>(base + std::min(k, count - 1) * stride + p0);
      r[k] = (LaneVec)(p0 + 8 <= len ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, in));
    }
    transpose8(r);
    for (int j = 0; j < 8 && p0 + j < len; ++j) out[p0 + j] = r[j];
  }
}

// The inverse: lanes [0, count) of at(0), ..., at(len - 1) written as `count` planes of
// `len` floats, `stride` apart (8x8 transposes, vector stores). `at` takes whole groups of
// 8 (entries past len are read, not written).
template <typename At>
AIA_INLINE void untranspose_lanes(At&& at, int64_t len, int count, float* base, int64_t stride) {
  for (int64_t p0 = 0; p0 < len; p0 += 8) {
    LaneVec r[8];
    for (int j = 0; j < 8; ++j) r[j] = at(p0 + j);
    transpose8(r);
    const Row<float, 32> row{std::min<int64_t>(8, len - p0)};
    for (int k = 0; k < count; ++k) row.store(base + k * stride + p0, (Vec<float, 32>::type)r[k]);
  }
}

// The same from in[0..len) (whole groups of 8).
AIA_INLINE void untranspose_planes(const LaneVec* in, int64_t len, int count, float* base, int64_t stride) {
  untranspose_lanes([in](int64_t j) AIA_LAMBDA_INLINE { return in[j]; }, len, count, base, stride);
}

// Entries x[0..count) as lanes, the rest zero: a W gate's 8 channels at one (t, h).
template <typename T>
AIA_INLINE LaneVec load_lanes_below(const T* x, int count, const __m256i& in) {
  static_assert(sizeof(T) == 4, "32-bit entries");
  const float* f = reinterpret_cast<const float*>(x);
  return (LaneVec)(count == kLaneChannels ? _mm256_loadu_ps(f) : _mm256_maskload_ps(f, in));
}

AIA_INLINE LaneIdx as_index(const LaneVec& v) { return (LaneIdx)v; }

inline bool contiguous_planes(const Strides5& s, const Dims& d) { return s.w == 1 && s.h == d.W; }

// The planes (n, t, c0 + k), k < count, of a float tensor with strides s, as lanes: transposed
// straight from memory when each plane is contiguous, else copied to `buffer` (8 * H * W
// floats) first. The same values either way, so a layout changes no result.
AIA_INLINE void load_frame_lanes(const float* base, const Strides5& s, const Dims& d, int64_t n, int64_t t, int64_t c0,
                                 int count, float* buffer, LaneVec* out) {
  const int64_t HW = d.H * d.W;
  const float* first = base + offset5(s, n, t, c0, 0, 0);
  if (contiguous_planes(s, d)) return transpose_planes(first, s.c, count, HW, out);
  for (int k = 0; k < count; ++k)
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t w = 0; w < d.W; ++w) buffer[k * HW + h * d.W + w] = first[k * s.c + h * s.h + w * s.w];
  transpose_planes(buffer, HW, count, HW, out);
}

// Asks for the contiguous planes (n, t, c0 + k), k < count, ahead of their use (nothing for
// t == T or strided planes): a walk steps through frames C planes apart, a pattern the
// hardware prefetcher does not follow.
AIA_INLINE void prefetch_frame(const float* base, const Strides5& s, const Dims& d, int64_t n, int64_t t, int64_t c0,
                               int count) {
  if (t >= d.T || !contiguous_planes(s, d)) return;
  const char* first = reinterpret_cast<const char*>(base + offset5(s, n, t, c0, 0, 0));
  const int64_t bytes = d.H * d.W * static_cast<int64_t>(sizeof(float));
  for (int k = 0; k < count; ++k)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(first + k * s.c * static_cast<int64_t>(sizeof(float)) + b);
}

// The inverse of load_frame_lanes: lanes [0, count) of in[0..H * W) written to the planes.
AIA_INLINE void store_frame_lanes(const LaneVec* in, const Dims& d, int64_t n, int64_t t, int64_t c0, int count,
                                  float* base, const Strides5& s, float* buffer) {
  const int64_t HW = d.H * d.W;
  float* first = base + offset5(s, n, t, c0, 0, 0);
  if (contiguous_planes(s, d)) return untranspose_planes(in, HW, count, first, s.c);
  untranspose_planes(in, HW, count, buffer, HW);
  for (int k = 0; k < count; ++k)
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t w = 0; w < d.W; ++w) first[k * s.c + h * s.h + w * s.w] = buffer[k * HW + h * d.W + w];
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace aia
