// CPU kernels of the AIA primitives.
//
// The unit of work is a "plane": the (H, W) slice of v at fixed (n, t, c), walked in
// chunks, a piece of one row of up to one vector (16 floats, 8 doubles; half that
// when a whole row fits in a half vector, see Vec). Every gate is
// constant, a row or a column over a plane, so a chunk's weight, upstream gradient,
// product with v and contributions to the reductions are computed in registers and
// each full-size tensor is read or written once per chunk. (Building whole weight and
// gradient planes in buffers first was slow at 7x7 and 14x14: rows shorter than a
// vector run scalar, and loading a plane that was just stored row by row stalls.)
// Reductions are parallelised over slices that own their outputs, so results are
// bitwise deterministic (no atomics, fixed summation order):
//   - pooling / gradient along C: parallel over (n, t), loop over c inside;
//   - pooling / gradient along T, H, W: parallel over (n, c), loop over t inside.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "aia_host.h"

#define AIA_INLINE inline __attribute__((always_inline))
#define AIA_LAMBDA_INLINE __attribute__((always_inline))

namespace aia {
namespace cpu {
namespace {

#if defined(__AVX512F__) && defined(__AVX512VL__)
#define AIA_MASKED_CHUNKS 1
#elif defined(__AVX2__)
#define AIA_AVX2_CHUNKS 1
#endif

// The widest vector worth using: 64 bytes with AVX-512. Elsewhere 32: a 64-byte vector
// would be split in two registers, and GCC lowers the vector extensions' compares and
// selects on split vectors through the stack, and the convs' register blocks spill
// (measured on an AVX2 machine: docs/native.md).
#if defined(AIA_MASKED_CHUNKS)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

// One vector of B bytes (GCC/Clang vector extensions). Full-size passes pick B per call
// (with_chunk_bytes): kVectorBytes, or 32 when a row fits in half a vector (7-wide rows
// of floats), where the same work in 256-bit registers was measured 17-26% faster per
// pass on AVX-512. The convs use kVectorBytes.
template <typename acc_t, int B = kVectorBytes>
struct Vec {
  static_assert(B == 32 || B == 64, "vectors of 32 or 64 bytes");
  static constexpr int kLanes = B / sizeof(acc_t);
  typedef acc_t type __attribute__((vector_size(B), aligned(sizeof(acc_t))));  // unaligned loads/stores
  // Same-width integers: lane masks of comparisons, lane indices.
  using int_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef int_t itype __attribute__((vector_size(B)));
  static type load(const acc_t* p) { return *reinterpret_cast<const type*>(p); }
  static void store(acc_t* p, const type& v) { *reinterpret_cast<type*>(p) = v; }
  static itype iota() {
    itype v;
    for (int l = 0; l < kLanes; ++l) v[l] = l;
    return v;
  }
};

#if defined(__AVX2__)
// Horizontal sum and max of a 256-bit vector, in a fixed tree order.
AIA_INLINE float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
AIA_INLINE double reduce_add(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
AIA_INLINE float reduce_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
AIA_INLINE double reduce_max(__m256d v) {
  const __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}
#endif

// A chunk: W <= Vec::kLanes consecutive entries of a row, held in one vector. With
// AVX-512 it is one masked load/store, elsewhere an element loop fills the vector.
template <typename acc_t, int B = kVectorBytes>
struct Row {
  using V = Vec<acc_t, B>;
  using vec = typename V::type;
  using ivec = typename V::itype;
  static constexpr bool kFloat = sizeof(acc_t) == 4, kWide = B == 64;
  int64_t W;
#if defined(AIA_MASKED_CHUNKS)
  unsigned mask() const { return (1u << W) - 1u; }
  // Whole vectors use plain loads/stores (masked ones that miss L1 are slower).
  AIA_INLINE vec load(const acc_t* p) const {
    if (W == V::kLanes) return V::load(p);
    if constexpr (kWide && kFloat) return (vec)_mm512_maskz_loadu_ps(static_cast<__mmask16>(mask()), p);
    else if constexpr (kWide) return (vec)_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask()), p);
    else if constexpr (kFloat) return (vec)_mm256_maskz_loadu_ps(static_cast<__mmask8>(mask()), p);
    else return (vec)_mm256_maskz_loadu_pd(static_cast<__mmask8>(mask()), p);
  }
  AIA_INLINE void store(acc_t* p, const vec& v) const {
    if (W == V::kLanes) return V::store(p, v);
    if constexpr (kWide && kFloat) _mm512_mask_storeu_ps(p, static_cast<__mmask16>(mask()), (__m512)v);
    else if constexpr (kWide) _mm512_mask_storeu_pd(p, static_cast<__mmask8>(mask()), (__m512d)v);
    else if constexpr (kFloat) _mm256_mask_storeu_ps(p, static_cast<__mmask8>(mask()), (__m256)v);
    else _mm256_mask_storeu_pd(p, static_cast<__mmask8>(mask()), (__m256d)v);
  }
  AIA_INLINE ivec load_index(const int32_t* p) const {
    if constexpr (kWide && kFloat) return (ivec)_mm512_maskz_loadu_epi32(static_cast<__mmask16>(mask()), p);
    else if constexpr (kFloat) return (ivec)_mm256_maskz_loadu_epi32(static_cast<__mmask8>(mask()), p);
    else return load_lanes<ivec>(p);
  }
  AIA_INLINE void store_index(int32_t* p, const ivec& v) const {
    if constexpr (kWide && kFloat) _mm512_mask_storeu_epi32(p, static_cast<__mmask16>(mask()), (__m512i)v);
    else if constexpr (kFloat) _mm256_mask_storeu_epi32(p, static_cast<__mmask8>(mask()), (__m256i)v);
    else store_lanes(p, v);
  }
  // Sum of the W lanes, in a fixed tree order.
  AIA_INLINE acc_t sum(const vec& v) const {
    if constexpr (kWide && kFloat) return _mm512_mask_reduce_add_ps(static_cast<__mmask16>(mask()), (__m512)v);
    else if constexpr (kWide) return _mm512_mask_reduce_add_pd(static_cast<__mmask8>(mask()), (__m512d)v);
    else if constexpr (kFloat) return reduce_add(_mm256_maskz_mov_ps(static_cast<__mmask8>(mask()), (__m256)v));
    else return reduce_add(_mm256_maskz_mov_pd(static_cast<__mmask8>(mask()), (__m256d)v));
  }
  // Max of the W lanes; false if a lane is NaN (the caller then walks the row in order).
  AIA_INLINE bool max(const vec& v, acc_t& m) const {
    if constexpr (kWide && kFloat) {
      const __mmask16 k = static_cast<__mmask16>(mask());
      if (_mm512_mask_cmp_ps_mask(k, (__m512)v, (__m512)v, _CMP_UNORD_Q)) return false;
      m = _mm512_mask_reduce_max_ps(k, (__m512)v);
    } else if constexpr (kWide) {
      const __mmask8 k = static_cast<__mmask8>(mask());
      if (_mm512_mask_cmp_pd_mask(k, (__m512d)v, (__m512d)v, _CMP_UNORD_Q)) return false;
      m = _mm512_mask_reduce_max_pd(k, (__m512d)v);
    } else if constexpr (kFloat) {
      const __mmask8 k = static_cast<__mmask8>(mask());
      if (_mm256_mask_cmp_ps_mask(k, (__m256)v, (__m256)v, _CMP_UNORD_Q)) return false;
      m = reduce_max(_mm256_mask_mov_ps(_mm256_set1_ps(-__builtin_inff()), k, (__m256)v));
    } else {
      const __mmask8 k = static_cast<__mmask8>(mask());
      if (_mm256_mask_cmp_pd_mask(k, (__m256d)v, (__m256d)v, _CMP_UNORD_Q)) return false;
      m = reduce_max(_mm256_mask_mov_pd(_mm256_set1_pd(-__builtin_inf()), k, (__m256d)v));
    }
    return true;
  }
  // Max of the W lanes and the first lane holding it; false if a lane is NaN.
  AIA_INLINE bool max_first(const vec& v, acc_t& m, int& lane) const {
    if (!max(v, m)) return false;
    unsigned eq;
    if constexpr (kWide && kFloat) {
      eq = _mm512_mask_cmpeq_ps_mask(static_cast<__mmask16>(mask()), (__m512)v, _mm512_set1_ps(m));
    } else if constexpr (kWide) {
      eq = _mm512_mask_cmpeq_pd_mask(static_cast<__mmask8>(mask()), (__m512d)v, _mm512_set1_pd(m));
    } else if constexpr (kFloat) {
      eq = _mm256_mask_cmp_ps_mask(static_cast<__mmask8>(mask()), (__m256)v, _mm256_set1_ps(m), _CMP_EQ_OQ);
    } else {
      eq = _mm256_mask_cmp_pd_mask(static_cast<__mmask8>(mask()), (__m256d)v, _mm256_set1_pd(m), _CMP_EQ_OQ);
    }
    lane = __builtin_ctz(eq);
    return true;
  }
#elif defined(AIA_AVX2_CHUNKS)
  // AVX2 has masked loads and stores (vmaskmov) but no mask registers: a lane mask is a
  // vector of all-ones / zero lanes. Vectors are 32 bytes here (kVectorBytes), one register.
  // (The element loops below compile to `rep movs` into a stack copy, then a reload that
  // misses store forwarding: docs/native.md.)
  static_assert(B == 32, "without AVX-512, chunks are 32-byte vectors");
  using reg_t = std::conditional_t<kFloat, __m256, __m256d>;
  AIA_INLINE __m256i lane_mask() const {
    if constexpr (kFloat) return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(W)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    else return _mm256_cmpgt_epi64(_mm256_set1_epi64x(W), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  AIA_INLINE reg_t lanes_in() const {
    if constexpr (kFloat) return _mm256_castsi256_ps(lane_mask());
    else return _mm256_castsi256_pd(lane_mask());
  }
  AIA_INLINE vec load(const acc_t* p) const {
    if (W == V::kLanes) return V::load(p);
    if constexpr (kFloat) return (vec)_mm256_maskload_ps(p, lane_mask());
    else return (vec)_mm256_maskload_pd(p, lane_mask());
  }
  AIA_INLINE void store(acc_t* p, const vec& v) const {
    if (W == V::kLanes) return V::store(p, v);
    if constexpr (kFloat) _mm256_maskstore_ps(p, lane_mask(), (__m256)v);
    else _mm256_maskstore_pd(p, lane_mask(), (__m256d)v);
  }
  AIA_INLINE ivec load_index(const int32_t* p) const {
    if constexpr (kFloat) {
      if (W == V::kLanes) return (ivec)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return (ivec)_mm256_maskload_epi32(p, lane_mask());
    } else {
      return load_lanes<ivec>(p);  // int32 entries into int64 lanes
    }
  }
  AIA_INLINE void store_index(int32_t* p, const ivec& v) const {
    if constexpr (kFloat) {
      if (W == V::kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)v);
      else _mm256_maskstore_epi32(p, lane_mask(), (__m256i)v);
    } else {
      store_lanes(p, v);
    }
  }
  // Sum of the W lanes, in a fixed tree order.
  AIA_INLINE acc_t sum(const vec& v) const {
    if constexpr (kFloat) return reduce_add(_mm256_and_ps((__m256)v, lanes_in()));
    else return reduce_add(_mm256_and_pd((__m256d)v, lanes_in()));
  }
  // Max of the W lanes; false if a lane is NaN.
  AIA_INLINE bool max(const vec& v, acc_t& m) const {
    const reg_t x = (reg_t)v, in = lanes_in();
    if constexpr (kFloat) {
      if (_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), in))) return false;
      m = reduce_max(_mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), x, in));
    } else {
      if (_mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(x, x, _CMP_UNORD_Q), in))) return false;
      m = reduce_max(_mm256_blendv_pd(_mm256_set1_pd(-__builtin_inf()), x, in));
    }
    return true;
  }
  // Max of the W lanes and the first lane holding it; false if a lane is NaN.
  AIA_INLINE bool max_first(const vec& v, acc_t& m, int& lane) const {
    if (!max(v, m)) return false;
    const reg_t x = (reg_t)v, in = lanes_in();
    unsigned eq;
    if constexpr (kFloat) {
      eq = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(m), _CMP_EQ_OQ), in));
    } else {
      eq = _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(x, _mm256_set1_pd(m), _CMP_EQ_OQ), in));
    }
    lane = __builtin_ctz(eq);
    return true;
  }
#else
  AIA_INLINE vec load(const acc_t* p) const { return load_lanes<vec>(p); }
  AIA_INLINE void store(acc_t* p, const vec& v) const { store_lanes(p, v); }
  AIA_INLINE ivec load_index(const int32_t* p) const { return load_lanes<ivec>(p); }
  AIA_INLINE void store_index(int32_t* p, const ivec& v) const { store_lanes(p, v); }
  AIA_INLINE acc_t sum(const vec& v) const {
    acc_t s = v[0];
    for (int64_t w = 1; w < W; ++w) s += v[w];
    return s;
  }
  AIA_INLINE bool max(const vec& v, acc_t& m) const {
    int lane;
    return max_first(v, m, lane);
  }
  AIA_INLINE bool max_first(const vec& v, acc_t& m, int& lane) const {
    m = v[0];
    lane = 0;
    for (int64_t w = 1; w < W; ++w) {
      if (!(v[w] == v[w])) return false;
      if (v[w] > m) m = v[w], lane = static_cast<int>(w);
    }
    return m == m;
  }
#endif
  // Element loops: without AVX2, and for the int64 lanes of double chunks. Unrolled to the
  // vector's lanes, so that GCC does not turn them into a memcpy (`rep movs`) of W entries.
  template <typename VecT, typename T>
  AIA_INLINE VecT load_lanes(const T* p) const {
    VecT v{};
#pragma GCC unroll 16
    for (int l = 0; l < V::kLanes; ++l) {
      if (l < W) v[l] = p[l];
    }
    return v;
  }
  template <typename VecT, typename T>
  AIA_INLINE void store_lanes(T* p, const VecT& v) const {
#pragma GCC unroll 16
    for (int l = 0; l < V::kLanes; ++l) {
      if (l < W) p[l] = static_cast<T>(v[l]);
    }
  }
};

// Work items below this many elements are not worth a thread.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// Scratch memory of the calling thread, kept between calls: the conv's padded volumes
// and the C partials of weight_grad are 0.1-2 MB, and allocating and freeing them on
// every call made glibc grow and trim its heap in cycles (7x7 step times rose and fell
// with it). Grows to the largest request; `slot` separates buffers
// that are live together. Returns `count` entries, zeroed unless `zeroed` is false (the
// caller then writes every entry it reads).
template <typename T>
T* workspace(int slot, size_t count, bool zeroed = true) {
  constexpr int kSlots = 2;
  thread_local std::vector<char> buffers[kSlots];
  std::vector<char>& b = buffers[slot % kSlots];
  if (b.size() < count * sizeof(T)) b.resize(count * sizeof(T));
  T* p = reinterpret_cast<T*>(b.data());
  if (zeroed) std::fill(p, p + count, T(0));
  return p;
}

// Copies n entries; rows of a few entries (7x7 gates) as one chunk, not a memmove call.
template <typename T>
AIA_INLINE void copy_row(const T* src, int64_t n, T* dst) {
  if (n <= Vec<T>::kLanes) {
    const Row<T> row{n};
    row.store(dst, row.load(src));
  } else {
    std::copy(src, src + n, dst);
  }
}

// Zeroes n entries; one or two (the pads between the rows of a pitched slice) as plain
// stores, not a memset call. (A masked vector store here made the conv weight gradients of
// an AVX2 build differ in the last bits from run to run on an AMD EPYC; plain stores do not.)
template <typename T>
AIA_INLINE void zero_row(T* dst, int64_t n) {
  if (n > 2) {
    std::fill(dst, dst + n, T(0));
  } else if (n > 0) {
    dst[0] = T(0);
    if (n == 2) dst[1] = T(0);
  }
}

// A chunk of a strided full-size tensor, converted to / from the accumulation type.
// The general case (other strides, half types) is kept out of line: inlined, its
// per-lane code crowds the registers of the contiguous float path.
template <typename scalar_t, typename acc_t, int B>
__attribute__((noinline)) typename Vec<acc_t, B>::type load_chunk_strided(const scalar_t* p, int64_t stride, int64_t W) {
  typename Vec<acc_t, B>::type v{};
  for (int64_t w = 0; w < W; ++w) v[w] = static_cast<acc_t>(p[w * stride]);
  return v;
}

template <typename scalar_t, typename acc_t, int B>
__attribute__((noinline)) void store_chunk_strided(scalar_t* p, int64_t stride, int64_t W,
                                                   const typename Vec<acc_t, B>::type& v) {
  for (int64_t w = 0; w < W; ++w) p[w * stride] = static_cast<scalar_t>(v[w]);
}

template <typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type load_chunk(const scalar_t* p, int64_t stride, const Row<acc_t, B>& row) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return row.load(p);
  }
  return load_chunk_strided<scalar_t, acc_t, B>(p, stride, row.W);
}

template <typename scalar_t, typename acc_t, int B>
AIA_INLINE void store_chunk(scalar_t* p, int64_t stride, const Row<acc_t, B>& row, const typename Vec<acc_t, B>::type& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return row.store(p, v);
  }
  store_chunk_strided<scalar_t, acc_t, B>(p, stride, row.W, v);
}

// A plane of a strided (N, T, C, H, W) tensor; chunk (h, w0) starts at at(h, w0).
template <typename scalar_t>
struct PlaneAt {
  scalar_t* base;
  int64_t sh, sw;
  scalar_t* at(int64_t h, int64_t w0) const { return base + h * sh + w0 * sw; }
};

template <typename scalar_t>
PlaneAt<scalar_t> plane_at(scalar_t* data, const Strides5& s, int64_t n, int64_t t, int64_t c) {
  return {data + n * s.n + t * s.t + c * s.c, s.h, s.w};
}

// Calls f(h, w0, row) for every chunk of an (H, W) plane, row by row.
template <typename acc_t, int B, typename F>
AIA_INLINE void for_each_chunk(int64_t H, int64_t W, F&& f) {
  constexpr int64_t L = Vec<acc_t, B>::kLanes;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w0 = 0; w0 < W; w0 += L) f(h, w0, Row<acc_t, B>{std::min(L, W - w0)});
  }
}

// Reductions along h walk a plane in column groups of up to kGroupStrips chunks (64
// floats: every ResNet plane width is one group), rows inside a group, so a group's
// running values along h stay in registers and each group is still read row by row.
constexpr int kGroupStrips = 4;

template <typename acc_t, int B>
struct StripGroup {
  int64_t w0;  // first column
  int strips;  // chunks per row (1 to kGroupStrips)
  Row<acc_t, B> row[kGroupStrips];

  StripGroup(int64_t first, int64_t W) : w0(first), strips(0), row{} {
    constexpr int64_t L = Vec<acc_t, B>::kLanes;
    for (int s = 0; s < kGroupStrips && first + s * L < W; ++s, ++strips) row[s] = Row<acc_t, B>{std::min(L, W - first - s * L)};
  }
};

// ---- weights over a plane ----

// A factor's gates at one plane: a C gate's (H, W) plane, or for (T + H + W) / 3 the T
// gate's plane, the H gate's row and the W gate's column (entries C apart).
template <typename acc_t>
struct FactorAt {
  const acc_t* plane;
  const acc_t* hrow;  // nullptr for a C factor
  const acc_t* wcol;
};

template <typename acc_t>
struct WeightAt {
  int n_factors;
  bool mean;
  FactorAt<acc_t> f[kMaxFactors];
};

// The parser guarantees a factor is one C gate or the T, H, W gates in that order.
template <typename acc_t>
WeightAt<acc_t> weight_at(const Weight<acc_t>& wt, const Dims& d, int64_t n, int64_t t, int64_t c) {
  WeightAt<acc_t> a{wt.n_factors, wt.mean, {}};
  for (int k = 0; k < wt.n_factors; ++k) {
    if (wt.size[k] == 1) {
      a.f[k] = {wt.gate[k][0] + gate_offset(kAxisC, d, n, t, c, 0, 0), nullptr, nullptr};
    } else {
      a.f[k] = {wt.gate[k][0] + gate_offset(kAxisT, d, n, t, c, 0, 0),
                wt.gate[k][1] + gate_offset(kAxisH, d, n, t, c, 0, 0),
                wt.gate[k][2] + gate_offset(kAxisW, d, n, t, c, 0, 0)};
    }
  }
  return a;
}

// A factor over a chunk: a C gate's plane, or (T + H + W) / 3 when kST.
template <bool kST, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type factor_chunk_of(const FactorAt<acc_t>& f, const Dims& d, int64_t h, int64_t w0,
                                                     const Row<acc_t, B>& row) {
  const int64_t off = h * d.W + w0;
  if constexpr (!kST) return row.load(f.plane + off);
  else return (row.load(f.plane + off) + row.load(f.hrow + w0) + f.wcol[h * d.C]) * (acc_t(1) / acc_t(3));
}

template <typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type factor_chunk(const FactorAt<acc_t>& f, const Dims& d, int64_t h, int64_t w0,
                                                  const Row<acc_t, B>& row) {
  return f.hrow == nullptr ? factor_chunk_of<false>(f, d, h, w0, row) : factor_chunk_of<true>(f, d, h, w0, row);
}

// The weight over a chunk (n_factors > 0); f[] receives the factor values.
template <typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type weight_chunk(const WeightAt<acc_t>& a, const Dims& d, int64_t h, int64_t w0,
                                                  const Row<acc_t, B>& row, typename Vec<acc_t, B>::type* f) {
  for (int k = 0; k < a.n_factors; ++k) f[k] = factor_chunk(a.f[k], d, h, w0, row);
  if (a.n_factors == 1) return f[0];
  return a.mean ? (f[0] + f[1]) * acc_t(0.5) : f[0] * f[1];
}

// weight * v over a chunk.
template <typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type weighted_chunk(const WeightAt<acc_t>& a, const PlaneAt<const scalar_t>& v,
                                                    const Dims& d, int64_t h, int64_t w0, const Row<acc_t, B>& row) {
  const typename Vec<acc_t, B>::type x = load_chunk(v.at(h, w0), v.sw, row);
  if (a.n_factors == 0) return x;
  typename Vec<acc_t, B>::type f[kMaxFactors];
  return x * weight_chunk(a, d, h, w0, row, f);
}

// ---- weights compiled per structure ----

// A pass's chunk loop is compiled per weight structure where it counts: float tensors
// whose rows have unit stride (`WeightShape`: the factor count, each factor's kind, the
// combine as constants, so a chunk tests nothing and keeps its values in registers;
// tested per chunk, the loop spilled to the stack and made apply 2x slower at 56x56).
// Other dtypes and strides take `AnyWeight`, the structure read at run time.
struct AnyWeight {
  static constexpr bool kStatic = false;
  static constexpr bool kAnyC = true, kAnyTHW = true;  // may have either kind of factor
};

template <int NF, bool ST0, bool ST1>
struct WeightShape {
  static constexpr bool kStatic = true;
  static constexpr int kFactors = NF;
  static constexpr bool kST0 = ST0, kST1 = ST1;  // a T, H, W mean (else a C gate); factors multiply
  static constexpr bool kAnyC = (NF > 0 && !ST0) || (NF > 1 && !ST1), kAnyTHW = (NF > 0 && ST0) || (NF > 1 && ST1);
};

// Calls f(shape) with the structure type of `spec` (see above); `unit_stride`: every
// full-size tensor the pass reads or writes has unit stride along w.
template <typename scalar_t, typename F>
void with_weight_shape(const WeightSpec& spec, bool unit_stride, F&& f) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    (void)spec, (void)unit_stride;
    f(AnyWeight{});
  } else {
    const size_t nf = spec.factors.size();
    const bool s0 = nf > 0 && spec.factors[0].size() == 3, s1 = nf > 1 && spec.factors[1].size() == 3;
    if (!unit_stride || (nf == 2 && spec.mean)) return f(AnyWeight{});  // means: the parallel variants' output only
    if (nf == 0) return f(WeightShape<0, false, false>{});
    if (nf == 1) return s0 ? f(WeightShape<1, true, false>{}) : f(WeightShape<1, false, false>{});
    if (s0 && s1) return f(WeightShape<2, true, true>{});
    if (s0) return f(WeightShape<2, true, false>{});
    if (s1) return f(WeightShape<2, false, true>{});
    return f(WeightShape<2, false, false>{});
  }
}

// weight_chunk for a weight of structure S.
template <typename S, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type weight_chunk_of(const WeightAt<acc_t>& a, const Dims& d, int64_t h, int64_t w0,
                                                     const Row<acc_t, B>& row, typename Vec<acc_t, B>::type* f) {
  if constexpr (!S::kStatic) {
    return weight_chunk(a, d, h, w0, row, f);
  } else {
    f[0] = factor_chunk_of<S::kST0>(a.f[0], d, h, w0, row);
    if constexpr (S::kFactors == 1) return f[0];
    f[1] = factor_chunk_of<S::kST1>(a.f[1], d, h, w0, row);
    return f[0] * f[1];
  }
}

// A chunk of a full-size tensor; with a static S its rows have unit stride and its type is acc_t.
template <typename S, typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type load_chunk_of(const scalar_t* p, int64_t stride, const Row<acc_t, B>& row) {
  if constexpr (S::kStatic) return row.load(p);
  else return load_chunk(p, stride, row);
}

template <typename S, typename scalar_t, typename acc_t, int B>
AIA_INLINE void store_chunk_of(scalar_t* p, int64_t stride, const Row<acc_t, B>& row,
                               const typename Vec<acc_t, B>::type& v) {
  if constexpr (S::kStatic) row.store(p, v);
  else store_chunk(p, stride, row, v);
}

// weighted_chunk for a weight of structure S.
template <typename S, typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type weighted_chunk_of(const WeightAt<acc_t>& a, const PlaneAt<const scalar_t>& v,
                                                       const Dims& d, int64_t h, int64_t w0,
                                                       const Row<acc_t, B>& row) {
  if constexpr (!S::kStatic) {
    return weighted_chunk(a, v, d, h, w0, row);
  } else {
    const typename Vec<acc_t, B>::type x = row.load(v.at(h, w0));
    if constexpr (S::kFactors == 0) return x;
    typename Vec<acc_t, B>::type f[kMaxFactors];
    return x * weight_chunk_of<S>(a, d, h, w0, row, f);
  }
}

// ---- upstream gradients over a plane ----

// A full tensor `dout`, or pooled-gradient items expanded on the fly: the mean part
// spread evenly over the pooled axis, the max part to the argmax.
template <typename scalar_t, typename acc_t>
struct UpstreamAt {
  PlaneAt<const scalar_t> dout;  // base == nullptr when the items are used
  int n_items;
  int axis[kMaxItems];
  const acc_t* gmax[kMaxItems];
  const acc_t* gmean[kMaxItems];
  const int32_t* arg[kMaxItems];
  acc_t inv_len[kMaxItems];
  int32_t pos[kMaxItems];  // c (C item) or t (T item): where this plane lies on the pooled axis
};

// An upstream gradient's per-call constants, so that a plane's setup is pointer arithmetic.
template <typename scalar_t, typename acc_t>
struct UpstreamCall {
  const Upstream<scalar_t, acc_t>* up;
  int64_t sample[kMaxItems];  // entries of one sample of each item's gate
  acc_t inv_len[kMaxItems];   // 1 / length of each item's pooled axis
};

template <typename scalar_t, typename acc_t>
UpstreamCall<scalar_t, acc_t> upstream_call(const Upstream<scalar_t, acc_t>& up, const Dims& d) {
  UpstreamCall<scalar_t, acc_t> call{&up, {}, {}};
  for (int i = 0; i < up.n_items; ++i) {
    call.sample[i] = gate_sample_size(up.axis[i], d);
    call.inv_len[i] = acc_t(1) / acc_t(axis_length(up.axis[i], d));
  }
  return call;
}

template <typename scalar_t, typename acc_t>
UpstreamAt<scalar_t, acc_t> upstream_at(const UpstreamCall<scalar_t, acc_t>& call, const Dims& d, int64_t n,
                                        int64_t t, int64_t c) {
  const Upstream<scalar_t, acc_t>& up = *call.up;
  UpstreamAt<scalar_t, acc_t> u{};
  if (up.dout != nullptr) {
    u.dout = plane_at(up.dout, up.dout_strides, n, t, c);
    return u;
  }
  u.n_items = up.n_items;
  for (int i = 0; i < up.n_items; ++i) {
    const int axis = up.axis[i];
    const int64_t g = gate_offset(axis, d, n, t, c, 0, 0);
    u.axis[i] = axis;
    u.gmax[i] = up.grad[i] + pooled_max_offset(g, n, call.sample[i]);
    u.gmean[i] = up.grad[i] + pooled_mean_offset(g, n, call.sample[i]);
    u.arg[i] = up.argmax[i] + g;
    u.inv_len[i] = call.inv_len[i];
    u.pos[i] = static_cast<int32_t>(axis == kAxisC ? c : t);
  }
  return u;
}

// One pooled-gradient item over a chunk: the mean part spread over the pooled axis, the max
// part where the argmax is this element. A C or T item is a full (H, W) plane of its gate,
// an H item one row (the same for every h), a W item one value per h (entries C apart).
template <int kAxis, typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type item_chunk(const UpstreamAt<scalar_t, acc_t>& u, int i, const Dims& d, int64_t h,
                                                int64_t w0, const Row<acc_t, B>& row) {
  using V = Vec<acc_t, B>;
  const typename V::type zero{};
  if constexpr (kAxis == kAxisC || kAxis == kAxisT) {
    const int64_t off = h * d.W + w0;
    return row.load(u.gmean[i] + off) * u.inv_len[i] +
           (row.load_index(u.arg[i] + off) == u.pos[i] ? row.load(u.gmax[i] + off) : zero);
  } else if constexpr (kAxis == kAxisH) {
    return row.load(u.gmean[i] + w0) * u.inv_len[i] +
           (row.load_index(u.arg[i] + w0) == typename V::int_t(h) ? row.load(u.gmax[i] + w0) : zero);
  } else {
    const int64_t e = h * d.C;
    return (zero + u.gmean[i][e] * u.inv_len[i]) +
           (V::iota() + typename V::int_t(w0) == typename V::int_t(u.arg[i][e]) ? zero + u.gmax[i][e] : zero);
  }
}

template <typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type upstream_chunk(const UpstreamAt<scalar_t, acc_t>& u, const Dims& d, int64_t h,
                                                    int64_t w0, const Row<acc_t, B>& row) {
  if (u.dout.base != nullptr) return load_chunk(u.dout.at(h, w0), u.dout.sw, row);
  typename Vec<acc_t, B>::type acc{};
  for (int i = 0; i < u.n_items; ++i) {
    switch (u.axis[i]) {
      case kAxisC: acc += item_chunk<kAxisC>(u, i, d, h, w0, row); break;
      case kAxisT: acc += item_chunk<kAxisT>(u, i, d, h, w0, row); break;
      case kAxisH: acc += item_chunk<kAxisH>(u, i, d, h, w0, row); break;
      default: acc += item_chunk<kAxisW>(u, i, d, h, w0, row);
    }
  }
  return acc;
}

// An upstream gradient's structure as a type, as WeightShape for weights: a full tensor
// (kKind 0, unit stride), one C item (1), or T, H, W items in that order (3); AnyUpstream:
// read at run time.
struct AnyUpstream {
  static constexpr int kKind = -1;
};

template <int K>
struct UpstreamKind {
  static constexpr int kKind = K;
};

template <typename U, typename scalar_t, typename acc_t, int B>
AIA_INLINE typename Vec<acc_t, B>::type upstream_chunk_of(const UpstreamAt<scalar_t, acc_t>& u, const Dims& d,
                                                       int64_t h, int64_t w0, const Row<acc_t, B>& row) {
  using V = Vec<acc_t, B>;
  if constexpr (U::kKind < 0) {
    return upstream_chunk(u, d, h, w0, row);
  } else if constexpr (U::kKind == 0) {
    return row.load(u.dout.at(h, w0));
  } else {  // the same sums as upstream_chunk, in the same order
    typename V::type acc{};
    if constexpr (U::kKind == 1) {
      acc += item_chunk<kAxisC>(u, 0, d, h, w0, row);
    } else {
      acc += item_chunk<kAxisT>(u, 0, d, h, w0, row);
      acc += item_chunk<kAxisH>(u, 1, d, h, w0, row);
      acc += item_chunk<kAxisW>(u, 2, d, h, w0, row);
    }
    return acc;
  }
}

// Calls f(shape, upstream) with the structure types of a term (weight and upstream): static
// for both or for neither. `v_unit_stride`: v's rows have unit stride.
template <typename scalar_t, typename F>
void with_term_shape(const Term& term, bool v_unit_stride, F&& f) {
  const UpstreamSpec& up = term.upstream;
  const bool unit_stride = v_unit_stride && (!up.dout.defined() || up.dout.stride(4) == 1);
  const bool c_item = !up.dout.defined() && up.axis.size() == 1 && up.axis[0] == kAxisC;
  const bool thw_items = !up.dout.defined() && up.axis.size() == 3 && up.axis[0] == kAxisT &&
                         up.axis[1] == kAxisH && up.axis[2] == kAxisW;
  with_weight_shape<scalar_t>(term.weight, unit_stride && (up.dout.defined() || c_item || thw_items),
                              [&](auto shape) {
    if constexpr (!decltype(shape)::kStatic) f(shape, AnyUpstream{});
    else if (up.dout.defined()) f(shape, UpstreamKind<0>{});
    else if (c_item) f(shape, UpstreamKind<1>{});
    else f(shape, UpstreamKind<3>{});
  });
}

// ---- reductions ----

// Running max (the first maximum wins: strict >, so ties and NaNs keep the earlier
// entry, as in the reference's order) and sum of chunks along a pooled axis, kept in
// buffers at `mx`, `sum`, `arg` (the max's position only if kArgmax).
template <bool kArgmax, typename acc_t, int B>
AIA_INLINE void running_max_sum(const Row<acc_t, B>& row, const typename Vec<acc_t, B>::type& y, int32_t pos, bool first,
                                acc_t* mx, acc_t* sum, int32_t* arg) {
  using V = Vec<acc_t, B>;
  const typename V::itype at = typename V::itype{} + typename V::int_t(pos);
  if (first) {
    row.store(mx, y);
    row.store(sum, y);
    if constexpr (kArgmax) row.store_index(arg, at);
    return;
  }
  const typename V::type m = row.load(mx);
  const typename V::itype greater = y > m;
  row.store(mx, greater ? y : m);
  if constexpr (kArgmax) row.store_index(arg, greater ? at : row.load_index(arg));
  row.store(sum, row.load(sum) + y);
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

// Writes max and mean at gate offset g (a contiguous run of `len` entries), and the
// max's positions unless `argmax` is null.
template <typename acc_t>
void write_pooled(const acc_t* mx, const acc_t* sum, const int32_t* arg, int64_t len, acc_t axis_len, acc_t* P,
                  int32_t* argmax, int64_t g, int64_t n, int64_t sample) {
  acc_t* pm = P + pooled_max_offset(g, n, sample);
  acc_t* pa = P + pooled_mean_offset(g, n, sample);
  for (int64_t i = 0; i < len; ++i) {
    pm[i] = mx[i];
    pa[i] = sum[i] / axis_len;
  }
  if (argmax != nullptr) std::copy(arg, arg + len, argmax + g);
}

struct PoolOut {
  at::Tensor P, argmax;
};

// `outs[i].argmax` undefined: that axis's max positions are not tracked (the forward of a
// stage the backward pools again keeps none).
template <typename scalar_t, int B, typename S>
void pool_kernel(const at::Tensor& v, const GateSet& gates, const WeightSpec& spec, const std::vector<int>& axes,
                 std::vector<PoolOut>& outs) {
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
    P[axes[i]] = outs[i].P.data_ptr<acc_t>();
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
  if (P[kAxisC] != nullptr) with_argmax([&](auto arg_tag) {
    constexpr bool kArg = decltype(arg_tag)::value;
    const int64_t sample = gate_sample_size(kAxisC, d);
    at::parallel_for(0, d.N * d.T, grain_for(d.C * HW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mx(HW), sum(HW);
      std::vector<int32_t> arg(HW);
      for (int64_t nt = begin; nt < end; ++nt) {
        const int64_t n = nt / d.T, t = nt % d.T;
        for (int64_t c = 0; c < d.C; ++c) {
          const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
          const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
          for_each_chunk<acc_t, B>(H, W, [&](int64_t h, int64_t w0, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
            const int64_t off = h * W + w0;
            running_max_sum<kArg>(row, weighted_chunk_of<S>(wa, vpl, d, h, w0, row), static_cast<int32_t>(c), c == 0,
                                  mx.data() + off, sum.data() + off, arg.data() + off);
          });
        }
        write_pooled(mx.data(), sum.data(), arg.data(), HW, acc_t(d.C), P[kAxisC], A[kAxisC],
                     gate_offset(kAxisC, d, n, t, 0, 0, 0), n, sample);
      }
    });
  });
  if (P[kAxisT] == nullptr && P[kAxisH] == nullptr && P[kAxisW] == nullptr) return;
  const int64_t sT = gate_sample_size(kAxisT, d), sH = gate_sample_size(kAxisH, d), sW = gate_sample_size(kAxisW, d);
  with_argmax([&](auto arg_tag) {
  constexpr bool kArg = decltype(arg_tag)::value;
  at::parallel_for(0, d.N * d.C, grain_for(d.T * HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmx(HW), tsum(HW), wmx(H), wsum(H);
    std::vector<int32_t> targ(HW), warg(H);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / d.C, c = nc % d.C;
      for (int64_t t = 0; t < d.T; ++t) {
        const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
        const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
        for (int64_t g0 = 0; g0 < W; g0 += kGroupStrips * V::kLanes) {
          const StripGroup<acc_t, B> group(g0, W);
          typename V::type hmx[kGroupStrips] = {}, hsum[kGroupStrips] = {};  // along h, per chunk column
          typename V::itype harg[kGroupStrips] = {};
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
          const auto rows = [&](auto lanes_tag, auto all_tag) AIA_LAMBDA_INLINE {
            constexpr bool w_lanes = decltype(lanes_tag)::value, all = decltype(all_tag)::value;
            for (int64_t h = 0; h < H; ++h) {
              [[maybe_unused]] LaneMaxSum<acc_t, B, kArg> wl;
              for (int s = 0; s < kGroupStrips; ++s) {
                if (s == group.strips) break;
                const int64_t w0 = g0 + s * V::kLanes;
                const Row<acc_t, B>& row = group.row[s];
                const typename V::type y = weighted_chunk_of<S>(wa, vpl, d, h, w0, row);
                if (all || P[kAxisT] != nullptr) {
                  const int64_t off = h * W + w0;
                  running_max_sum<kArg>(row, y, static_cast<int32_t>(t), t == 0, tmx.data() + off,
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
              }
              if constexpr (w_lanes) {
                acc_t m, sum;
                int32_t first_pos;
                if (wl.reduce(m, first_pos, sum)) {
                  merge_w(h, g0 == 0, m, first_pos, sum);
                } else {  // a NaN in the row: its chunks again, in order
                  for (int s = 0; s < group.strips; ++s) {
                    const int64_t w0 = g0 + s * V::kLanes;
                    w_chunk(h, w0, group.row[s], weighted_chunk_of<S>(wa, vpl, d, h, w0, group.row[s]));
                  }
                }
              }
            }
          };
          const bool all = P[kAxisT] != nullptr && P[kAxisH] != nullptr && P[kAxisW] != nullptr;
          if (all && group.strips > 1) rows(std::true_type{}, std::true_type{});
          else if (all) rows(std::false_type{}, std::true_type{});
          else if (P[kAxisW] != nullptr && group.strips > 1) rows(std::true_type{}, std::false_type{});
          else rows(std::false_type{}, std::false_type{});
          if (P[kAxisH] != nullptr) {
            for (int s = 0; s < group.strips; ++s) {
              const int64_t g = gate_offset(kAxisH, d, n, t, c, 0, 0) + g0 + s * V::kLanes;
              group.row[s].store(P[kAxisH] + pooled_max_offset(g, n, sH), hmx[s]);
              group.row[s].store(P[kAxisH] + pooled_mean_offset(g, n, sH), hsum[s] / acc_t(H));
              if constexpr (kArg) group.row[s].store_index(A[kAxisH] + g, harg[s]);
            }
          }
        }
        if (P[kAxisW] != nullptr) {
          acc_t* pm = P[kAxisW];
          const int64_t g0 = gate_offset(kAxisW, d, n, t, c, 0, 0);
          for (int64_t h = 0; h < H; ++h) {  // entries of consecutive h are C apart
            const int64_t g = g0 + h * d.C;
            pm[pooled_max_offset(g, n, sW)] = wmx[h];
            pm[pooled_mean_offset(g, n, sW)] = wsum[h] / acc_t(W);
            if constexpr (kArg) A[kAxisW][g] = warg[h];
          }
        }
      }
      if (P[kAxisT] != nullptr) {
        write_pooled(tmx.data(), tsum.data(), targ.data(), HW, acc_t(d.T), P[kAxisT], A[kAxisT],
                     gate_offset(kAxisT, d, n, 0, c, 0, 0), n, sT);
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
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % d.C, t = i / d.C % d.T, n = i / (d.C * d.T);
      const WeightAt<acc_t> wa = weight_at(wt, d, n, t, c);
      const PlaneAt<const scalar_t> vpl = plane_at(vp, vs, n, t, c);
      const PlaneAt<scalar_t> opl = plane_at(op, os, n, t, c);
      for_each_chunk<acc_t, B>(d.H, d.W, [&](int64_t h, int64_t w0, const Row<acc_t, B>& row) AIA_LAMBDA_INLINE {
        store_chunk_of<S>(opl.at(h, w0), opl.sw, row, weighted_chunk_of<S>(wa, vpl, d, h, w0, row));
      });
    }
  });
}

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
      std::vector<acc_t> sums(static_cast<size_t>(HW) * kMaxFactors);
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
              acc_t* sum = sums.data() + k * HW + h * W + w0;
              row.store(sum, row.load(sum) + factor_grad_chunk_of<S, B>(wa, k, 1, q, f));
            }
          });
        }
        for (int k = 0; k < factors_of<S>(wt); ++k) {
          if (factor_size_of<S>(wt, k) != 1) continue;
          std::copy(sums.begin() + k * HW, sums.begin() + (k + 1) * HW,
                    out_ptr[k][0] + gate_offset(kAxisC, d, n, t, 0, 0, 0));
        }
      }
    });
  }
  }
  if (!any_thw) return;
  constexpr int64_t kCBlock = 16;
  const int64_t blocks = (d.C + kCBlock - 1) / kCBlock, THW = d.T * HW;
  // C partials: (N, blocks, factor, T, H, W)
  // (each task zeroes its blocks' partials: a serial memset of them all was the pass's serial part)
  acc_t* cpart = merged ? workspace<acc_t>(0, static_cast<size_t>(d.N * blocks * kMaxFactors * THW), false) : nullptr;
  // T: summed over t in buffers; H: over h in registers per strip; W: along each row.
  at::parallel_for(0, d.N * blocks, grain_for(kCBlock * THW), [&](int64_t begin, int64_t end) {
    constexpr int64_t kGroupWidth = kGroupStrips * V::kLanes;
    std::vector<acc_t> tsums(static_cast<size_t>(HW) * kMaxFactors), wsums(static_cast<size_t>(H) * kMaxFactors);
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
        for (int64_t g0 = 0; g0 < W; g0 += kGroupWidth) {
          const StripGroup<acc_t, B> group(g0, W);
          typename V::type hsums[kMaxFactors][kGroupStrips] = {};  // along h, per chunk column
          for (int64_t h = 0; h < H; ++h) {
            for (int s = 0; s < kGroupStrips; ++s) {
              if (s == group.strips) break;
              const int64_t w0 = g0 + s * V::kLanes;
              const Row<acc_t, B>& row = group.row[s];
              typename V::type f[kMaxFactors];
              const typename V::type q = grad_chunk_of<S, U>(wa, ua, vpl, d, h, w0, row, f);
              for (int k = 0; k < factors_of<S>(wt); ++k) {
                if (factor_size_of<S>(wt, k) == 1) {  // merged: a C gate, summed over this block's channels
                  acc_t* sum = cblock + (k * d.T + t) * HW + h * W + w0;
                  row.store(sum, row.load(sum) + factor_grad_chunk_of<S, B>(wa, k, 1, q, f));
                  continue;
                }
                const typename V::type r = factor_grad_chunk_of<S, B>(wa, k, 3, q, f);
                acc_t* tsum = tsums.data() + k * HW + h * W + w0;
                row.store(tsum, row.load(tsum) + r);
                hsums[k][s] = h == 0 ? r : hsums[k][s] + r;
                // Along w: the chunk's sum, then the row's. (Summed lane-wise across a row's
                // chunks instead, as the pool does, this pass was slower at 56x56 and 28x28 in
                // alternating benchmarks/cpu_passes.py runs.)
                acc_t& wsum = wsums[k * H + h];
                wsum = w0 == 0 ? row.sum(r) : wsum + row.sum(r);
              }
            }
          }
          for (int k = 0; k < factors_of<S>(wt); ++k) {
            if (factor_size_of<S>(wt, k) != 3) continue;
            for (int s = 0; s < group.strips; ++s)
              group.row[s].store(out_ptr[k][1] + gate_offset(kAxisH, d, n, t, c, 0, 0) + g0 + s * V::kLanes,
                                 hsums[k][s]);
          }
        }
        for (int k = 0; k < factors_of<S>(wt); ++k) {
          if (factor_size_of<S>(wt, k) != 3) continue;
          acc_t* out = out_ptr[k][2] + gate_offset(kAxisW, d, n, t, c, 0, 0);
          for (int64_t h = 0; h < H; ++h) out[h * d.C] = wsums[k * H + h];  // entries of consecutive h are C apart
        }
      }
      for (int k = 0; k < factors_of<S>(wt); ++k) {
        if (factor_size_of<S>(wt, k) != 3) continue;
        std::copy(tsums.begin() + k * HW, tsums.begin() + (k + 1) * HW,
                  out_ptr[k][0] + gate_offset(kAxisT, d, n, 0, c, 0, 0));
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
        const acc_t* part = cpart + (n * blocks * kMaxFactors + k) * THW + t * HW;
        std::copy(part, part + HW, out);
        for (int64_t b = 1; b < blocks; ++b)
          for (int64_t i = 0; i < HW; ++i) out[i] += part[b * kMaxFactors * THW + i];
      }
    }
  });
}

// One term of input_grad over a plane (float, `out` rows of unit stride), added to the
// plane's running sum `acc` (H * W entries): the first term starts it from zero and the
// last writes `out`, in the order of the all-in-registers kernel below (which other dtypes
// and strides take). A plane at a time per term, each term compiled for its structure: with
// the terms' structures tested per chunk, that kernel's loop spilled to the stack.
template <typename S, typename U, int B>
void add_term_plane(const WeightAt<float>& wa, const UpstreamAt<float, float>& ua, const Dims& d, bool first, bool last,
                    float* acc, const PlaneAt<float>& out) {
  using vec = typename Vec<float, B>::type;
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
    float* a = acc + h * d.W + w0;
    const vec sum = (first ? vec{} : row.load(a)) + x;
    if (last) row.store(out.at(h, w0), sum);
    else row.store(a, sum);
  });
}

template <int B>
using AddTermPlane = void (*)(const WeightAt<float>&, const UpstreamAt<float, float>&, const Dims&, bool, bool, float*,
                              const PlaneAt<float>&);

template <int B>
void input_grad_by_term(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  const Dims d = dims_of(out);
  const Strides5 os = strides_of(out);
  float* op = out.data_ptr<float>();
  const int n_terms = static_cast<int>(terms.size());
  std::vector<Weight<float>> weights;
  std::vector<Upstream<float, float>> ups;
  std::vector<AddTermPlane<B>> add;
  for (const Term& term : terms) {
    weights.push_back(make_weight<float>(gates, term.weight));
    ups.push_back(make_upstream<float, float>(term.upstream));
    with_term_shape<float>(term, true, [&](auto shape, auto upstream) {
      add.push_back(&add_term_plane<decltype(shape), decltype(upstream), B>);
    });
  }
  std::vector<UpstreamCall<float, float>> calls;  // after `ups` is complete: they point into it
  for (const auto& up : ups) calls.push_back(upstream_call(up, d));
  at::parallel_for(0, d.N * d.T * d.C, grain_for(d.H * d.W), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(d.H * d.W));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % d.C, t = i / d.C % d.T, n = i / (d.C * d.T);
      const PlaneAt<float> opl = plane_at(op, os, n, t, c);
      for (int k = 0; k < n_terms; ++k) {
        add[k](weight_at(weights[k], d, n, t, c), upstream_at(calls[k], d, n, t, c), d, k == 0, k == n_terms - 1,
               acc.data(), opl);
      }
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
  std::vector<Weight<acc_t>> weights;
  std::vector<Upstream<scalar_t, acc_t>> ups;
  for (const Term& term : terms) {
    weights.push_back(make_weight<acc_t>(gates, term.weight));
    ups.push_back(make_upstream<scalar_t, acc_t>(term.upstream));
  }
  std::vector<UpstreamCall<scalar_t, acc_t>> calls;  // after `ups` is complete: they point into it
  for (const auto& up : ups) calls.push_back(upstream_call(up, d));
  at::parallel_for(0, d.N * d.T * d.C, grain_for(d.H * d.W), [&](int64_t begin, int64_t end) {
    WeightAt<acc_t> wa[kMaxTerms];
    UpstreamAt<scalar_t, acc_t> ua[kMaxTerms];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % d.C, t = i / d.C % d.T, n = i / (d.C * d.T);
      for (int k = 0; k < n_terms; ++k) {
        wa[k] = weight_at(weights[k], d, n, t, c);
        ua[k] = upstream_at(calls[k], d, n, t, c);
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

// ---- Conv3d(2 -> 1, 3x3x3, padding 1) ----
// Inputs are copied into zero-padded volumes (D1 + 2, D2 + 2, D3 + 2), and a (D2, D3)
// slice is handled as one flat run with row pitch R = D3 + 2: each tap is then a
// constant offset into one long contiguous run (no bounds checks, vectorisable even
// for 7x7 slices); the two pitch columns past D3 hold garbage (forward) or zeros
// (weight gradient).
//
// The runs are computed in registers with GCC/Clang vector types (Vec: 16 floats or 8
// doubles with AVX-512, else half that): each output block is loaded and stored once for
// all taps, and in the weight gradient each dz vector is loaded once for 9 taps. Summation orders are fixed
// by the shape alone, so results are deterministic whatever the thread count.

constexpr int kTapBlock = 2 * kVectorBytes;  // outputs per register block in tap_sums (8 vectors of floats)

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

// One (D2, D3) slice into a pitched one at `out` (rows R apart, from row `first_row`,
// column 1 if `left`, else 0): every entry of `rows` rows of R is written, the slice or
// zero, so the buffer needs no zeroing first (a whole-buffer memset was a serial share of
// the gate steps at 7x7 and 14x14, where gate tensors are near the input's size).
template <typename acc_t>
AIA_INLINE void pitch_slice(const acc_t* src, const ConvDims& d, int64_t R, int64_t first_row, bool left, int64_t rows,
                            acc_t* out) {
  const int64_t col = left ? 1 : 0;
  zero_row(out, first_row * R + col);
  for (int64_t b = 0; b < d.D2; ++b) {
    acc_t* row = out + (first_row + b) * R;
    copy_row(src + b * d.D3, d.D3, row + col);
    zero_row(row + col + d.D3, R - col - d.D3 + (b + 1 < d.D2 ? col : 0));  // right pad, next row's left
  }
  zero_row(out + (first_row + d.D2) * R, (rows - first_row - d.D2) * R);
}

// `count` volumes (D1, D2, D3) -> zero-padded volumes in workspace `slot`, plus `slack`
// zeros at the end (tap_sums reads up to a block past a run's end). Slices in parallel.
template <typename acc_t>
const acc_t* pad_volumes(const acc_t* src, int64_t count, const ConvDims& d, int slot, int64_t slack = 0) {
  const Padded p = padded(d);
  acc_t* dst = workspace<acc_t>(slot, static_cast<size_t>(count * p.volume + slack), /*zeroed=*/false);
  const int64_t per_volume = d.D1 + 2;
  at::parallel_for(0, count * per_volume, grain_for(p.slice), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t v = s / per_volume, a = s % per_volume;
      acc_t* out = dst + s * p.slice;
      if (a == 0 || a == per_volume - 1) std::fill(out, out + p.slice, acc_t(0));
      else pitch_slice(src + (v * d.D1 + a - 1) * d.D2 * d.D3, d, p.R, 1, true, d.D2 + 2, out);
    }
  });
  std::fill(dst + count * p.volume, dst + count * p.volume + slack, acc_t(0));
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
  for (int64_t b = 0; b < d.D2; ++b) copy_row(out + b * R, d.D3, dst + b * d.D3);
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
  const acc_t* Ppad = pad_volumes(P, d.N * 2, d, 0, kTapBlock);
  at::parallel_for(0, d.N * sb.blocks_per_volume, grain_for(54 * sb.per_block * p.slice),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> out(static_cast<size_t>(sb.per_block * p.slice + kTapBlock));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / sb.blocks_per_volume, a0 = item % sb.blocks_per_volume * sb.per_block;
      const int64_t count = std::min(sb.per_block, d.D1 - a0);
      const acc_t* src[54];
      for (int tap = 0; tap < 54; ++tap) {
        const int ci = tap / 27, k1 = tap / 9 % 3, k2 = tap / 3 % 3, k3 = tap % 3;
        src[tap] = Ppad + (n * 2 + ci) * p.volume + (a0 + k1) * p.slice + k2 * p.R + k3;
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
  const acc_t* dzpad = pad_volumes(dz, d.N, d, 0, kTapBlock);
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
        src[k] = dzpad + n * p.volume + (a0 + 2 - k1) * p.slice + (2 - k2) * p.R + (2 - k3);
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
  const acc_t* Ppad = pad_volumes(P, d.N * 2, d, 0);
  // dz with row pitch R and zero pitch columns, one (D2, D3) slice per (n, a).
  acc_t* dzp = workspace<acc_t>(1, static_cast<size_t>(d.N * d.D1 * p.slice), /*zeroed=*/false);
  at::parallel_for(0, d.N * d.D1, grain_for(p.slice), [&](int64_t begin, int64_t end) {
    for (int64_t na = begin; na < end; ++na)
      pitch_slice(dz + na * d.D2 * d.D3, d, p.R, 0, false, d.D2 + 2, dzp + na * p.slice);
  });
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
          const acc_t* src = Ppad + (n * 2 + ci) * p.volume + (a + k1) * p.slice;
          const acc_t* g = dzp + na * p.slice;
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

// Calls f(integral_constant<int, B>) with the vector bytes of a call's full-size
// passes: 32 without AVX-512 or when a row of the accumulation type fits in half a
// vector, else 64.
template <typename scalar_t, typename F>
void with_chunk_bytes(int64_t W, F&& f) {
  constexpr int64_t kAccBytes = sizeof(at::opmath_type<scalar_t>);
  if constexpr (kVectorBytes == 32) {
    (void)W;
    f(std::integral_constant<int, 32>{});
  } else {
    if (W * kAccBytes <= 32) f(std::integral_constant<int, 32>{});
    else f(std::integral_constant<int, 64>{});
  }
}

ConvDims conv_dims(const at::Tensor& t) {  // t: (N, ., D1, D2, D3) or (N, D1, D2, D3)
  const int64_t r = t.dim();
  return ConvDims{t.size(0), t.size(r - 3), t.size(r - 2), t.size(r - 1)};
}

}  // namespace

std::vector<at::Tensor> pool(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                             const std::vector<int>& axes, bool with_argmax) {
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<PoolOut> outs;
  for (int axis : axes) {
    std::vector<int64_t> shape = gate_shape(axis, d);
    at::Tensor argmax = with_argmax ? at::empty(shape, v.options().dtype(at::kInt)) : at::Tensor();
    shape.insert(shape.begin() + 1, 2);
    outs.push_back({at::empty(shape, acc), argmax});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_pool_cpu", [&] {
    with_chunk_bytes<scalar_t>(d.W, [&](auto b) {
      with_weight_shape<scalar_t>(weight, v.stride(4) == 1, [&](auto shape) {
        pool_kernel<scalar_t, decltype(b)::value, decltype(shape)>(v, gates, weight, axes, outs);
      });
    });
  });
  std::vector<at::Tensor> result;
  for (auto& o : outs) {
    result.push_back(o.P);
    result.push_back(o.argmax.defined() ? o.argmax : at::empty({0}, v.options().dtype(at::kInt)));
  }
  return result;
}

void apply(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "aia_native_apply_cpu", [&] {
    with_chunk_bytes<scalar_t>(v.size(4), [&](auto b) {
      with_weight_shape<scalar_t>(weight, v.stride(4) == 1 && out.stride(4) == 1, [&](auto shape) {
        apply_kernel<scalar_t, decltype(b)::value, decltype(shape)>(v, gates, weight, out);
      });
    });
  });
}

std::vector<at::Tensor> weight_grad(const at::Tensor& v, const Term& term, const GateSet& gates) {
  const Dims d = dims_of(v);
  const auto acc = v.options().dtype(acc_type(v.scalar_type()));
  std::vector<at::Tensor> outs;
  for (const auto& factor : term.weight.factors)
    for (int id : factor) outs.push_back(at::empty(gate_shape(gates.axis[id], d), acc));
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
        if (out.stride(4) == 1 && !terms.empty()) return input_grad_by_term<decltype(b)::value>(terms, gates, out);
      }
      input_grad_kernel<scalar_t, decltype(b)::value>(terms, gates, out);
    });
  });
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

namespace {

// Sum of f(i) over [0, m) in double, as 8 interleaved partial sums added in a fixed order
// at the end: deterministic (the order depends on m alone), and the adds vectorise
// instead of forming one chain of dependent adds (a T, H or W gate at 7x7 has 25-28K
// entries: the BN sums as one chain made gate_forward a third slower there).
template <typename F>
double ordered_sum(int64_t m, F&& f) {
  constexpr int kParts = 8;
  double part[kParts] = {};
  int64_t i = 0;
  for (; i + kParts <= m; i += kParts)
    for (int l = 0; l < kParts; ++l) part[l] += f(i + l);
  for (; i < m; ++i) part[i % kParts] += f(i);
  double s = 0;
  for (int l = 0; l < kParts; ++l) s += part[l];
  return s;
}

}  // namespace

BatchStats batch_stats(const at::Tensor& z) {
  BatchStats st{0, 0};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "aia_native_batch_stats_cpu", [&] {
    const scalar_t* p = z.data_ptr<scalar_t>();
    const int64_t m = z.numel();
    st.mean = ordered_sum(m, [&](int64_t i) { return static_cast<double>(p[i]); }) / m;
    const double mean = st.mean;
    st.var = ordered_sum(m, [&](int64_t i) {
      const double e = p[i] - mean;
      return e * e;
    }) / m;
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
    const double sum_dy = ordered_sum(m, [&](int64_t i) { return static_cast<double>(dzp[i]); });
    const double sum_dy_zhat = ordered_sum(m, [&](int64_t i) { return dzp[i] * ((zp[i] - mean) * rstd); });
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
