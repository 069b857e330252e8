// Shared by the CPU kernels (aia_cpu_pool.cpp, aia_cpu_grad.cpp, aia_cpu_gate.cpp): vectors
// and chunks, a plane's weights and upstream gradients, the structure types the passes are
// compiled for, per-thread workspaces.
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
#pragma once

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
namespace detail {


#if defined(__AVX512F__) && defined(__AVX512VL__)
#define AIA_MASKED_CHUNKS 1
#elif defined(__AVX2__)
#define AIA_AVX2_CHUNKS 1
#endif

// Chunks with a vector ISA's masked loads and stores (AVX-512 or AVX2); a portable build's
// chunks are element loops.
#if defined(AIA_MASKED_CHUNKS) || defined(AIA_AVX2_CHUNKS)
constexpr bool kVectorChunks = true;
#else
constexpr bool kVectorChunks = false;
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

// a * b + c per lane, rounded once where the ISA has FMA (explicit: the build keeps
// -ffp-contract=off, so what is fused does not depend on the compiler), else twice.
template <typename VT>
AIA_INLINE VT multiply_add(VT a, VT b, VT c) {
  constexpr bool kFloat = sizeof(a[0]) == 4;
#if defined(__AVX512F__)
  if constexpr (sizeof(VT) == 64 && kFloat) return (VT)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  if constexpr (sizeof(VT) == 64 && !kFloat) return (VT)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#endif
#if defined(__FMA__)
  if constexpr (sizeof(VT) == 32 && kFloat) return (VT)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  if constexpr (sizeof(VT) == 32 && !kFloat) return (VT)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#endif
  return a * b + c;
}

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
  // A part of a vector is stored in pieces of 4, 2 and 1 lanes (a 7-wide row: 3 stores), not
  // with vmaskmov: on an AMD EPYC (Zen 3) a masked store took about 3x as long per 7-wide row
  // as the three plain ones, and was the hot spot of the 7x7 passes (docs/native.md).
  AIA_INLINE void store(acc_t* p, const vec& v) const {
    if (W == V::kLanes) return V::store(p, v);
    if constexpr (kFloat) {
      __m128 x = _mm256_castps256_ps128((__m256)v);
      if (W & 4) _mm_storeu_ps(p, x), x = _mm256_extractf128_ps((__m256)v, 1), p += 4;
      if (W & 2) _mm_storel_pi(reinterpret_cast<__m64*>(p), x), x = _mm_movehl_ps(x, x), p += 2;
      if (W & 1) _mm_store_ss(p, x);
    } else {
      __m128d x = _mm256_castpd256_pd128((__m256d)v);
      if (W & 2) _mm_storeu_pd(p, x), x = _mm256_extractf128_pd((__m256d)v, 1), p += 2;
      if (W & 1) _mm_store_sd(p, x);
    }
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
      if (W == V::kLanes) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)v);
      __m128i x = _mm256_castsi256_si128((__m256i)v);  // in pieces, as store()
      if (W & 4) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), x), x = _mm256_extracti128_si256((__m256i)v, 1), p += 4;
      if (W & 2) _mm_storel_epi64(reinterpret_cast<__m128i*>(p), x), x = _mm_unpackhi_epi64(x, x), p += 2;
      if (W & 1) _mm_storeu_si32(p, x);
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

inline int64_t grain_for(int64_t elements_per_item) {
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

// A row of W entries rounded up to whole vectors: the row pitch of a pass's own buffers,
// so that they are read and written with whole-vector loads and stores. A masked store
// does not forward to a later load of the same entries, which then waits until the store
// has reached the cache; with rows of one chunk (7x7, 14x14) the next read of a running
// value comes a few rows later and stalled there (perf annotate, 2026-12-02).
template <typename V>
constexpr int64_t whole_vectors(int64_t W) {
  return (W + V::kLanes - 1) / V::kLanes * V::kLanes;
}

// Rows `pitch` apart -> H contiguous rows of W at `out`.
template <typename acc_t>
void unpitch_rows(const acc_t* src, int64_t H, int64_t W, int64_t pitch, acc_t* out) {
  for (int64_t h = 0; h < H; ++h) copy_row(src + h * pitch, W, out + h * W);
}

// The T/H/W passes walk v plane by plane in (n, c)-major, t-minor order: consecutive
// planes are C planes apart in memory, where the hardware prefetcher does not look. They
// fetch the next one a chunk at a time while pooling this one: at 56x56 the T/H/W pool took
// 0.77-0.79x the time (AVX-512 EPYC, quick in-process A/Bs). There, planes under 2 KB
// (14x14 floats and down) were not faster that way and are not prefetched; on the AVX2
// EPYC (Zen 3) a 7x7 train step took 0.81x the time with them prefetched too
// (docs/native.md). Which machine, not which ISA, decides this; the ISA is what a build knows.
inline bool prefetch_next_frame(const Dims& d, int64_t element_bytes) {
#if defined(AIA_MASKED_CHUNKS)
  return d.H * d.W * element_bytes >= 2048;
#else
  (void)d, (void)element_bytes;
  return true;
#endif
}

// The plane after (n, t, c) in that order (itself at the clip's end).
template <typename scalar_t>
PlaneAt<scalar_t> next_frame(scalar_t* data, const Strides5& s, const Dims& d, int64_t n, int64_t t, int64_t c) {
  if (t + 1 < d.T) return plane_at(data, s, n, t + 1, c);
  return plane_at(data, s, n, 0, c + 1 < d.C ? c + 1 : c);
}

// Calls f(n, t, c) for planes [begin, end) of v in (n, t, c) order. The coordinates are
// counted along, not divided out of the index: three divisions per plane were a visible
// share of a 7x7 plane's time.
template <typename F>
AIA_INLINE void for_each_plane(const Dims& d, int64_t begin, int64_t end, F&& f) {
  int64_t c = begin % d.C, t = begin / d.C % d.T, n = begin / (d.C * d.T);
  for (int64_t i = begin; i < end; ++i, ++c) {
    if (c == d.C) c = 0, ++t;
    if (t == d.T) t = 0, ++n;
    f(n, t, c);
  }
}

// Calls f(h, w0, row) for every chunk of an (H, W) plane, row by row.
template <typename acc_t, int B, typename F>
AIA_INLINE void for_each_chunk(int64_t H, int64_t W, F&& f) {
  constexpr int64_t L = Vec<acc_t, B>::kLanes;
  // Half-width vectors (AVX-512, rows of at most 8 floats: with_chunk_bytes): a row is one
  // chunk, its mask made once per plane, not per row (apply's kernel time at 7x7 fell by more
  // than half in quick perf runs).
  // Only there: each copy of the loop is another copy of the pass to compile.
  if constexpr (B < kVectorBytes) {
    if (W <= L) {
      const Row<acc_t, B> row{W};
      for (int64_t h = 0; h < H; ++h) f(h, 0, row);
      return;
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w0 = 0; w0 < W; w0 += L) f(h, w0, Row<acc_t, B>{std::min(L, W - w0)});
  }
}

// Reductions along h walk a plane in column groups of up to kGroupStrips chunks (64
// floats with AVX-512), rows inside a group, so a group's running values along h stay in
// registers and each group is still read row by row.
constexpr int kGroupStrips = 4;

// The pool's groups: 256 bytes of a row whatever the vector width, so that every ResNet
// plane width up to 64 is one group. Its W reduction pays a horizontal reduction and a
// merge per group and row: with 32-byte vectors in groups of 4, a 56-wide row was two
// groups and the T/H/W pool at 56x56 took 1.4x the time of one group of 7 (AVX2, 2026-12-03).
template <int B>
constexpr int kPoolGroupStrips = kVectorChunks ? 256 / B : kGroupStrips;

template <typename acc_t, int B, int kMaxStrips = kGroupStrips>
struct StripGroup {
  static constexpr int kMax = kMaxStrips;
  int64_t w0;  // first column
  int strips;  // chunks per row (1 to kMax)
  Row<acc_t, B> row[kMax];

  StripGroup(int64_t first, int64_t W) : w0(first), strips(0), row{} {
    constexpr int64_t L = Vec<acc_t, B>::kLanes;
    for (int s = 0; s < kMax && first + s * L < W; ++s, ++strips) row[s] = Row<acc_t, B>{std::min(L, W - first - s * L)};
  }
};

// Calls f(integral_constant<int, S>) with a group's strip count S as a constant where the
// ResNet widths give it (the counts below), else with S = 0 (the count read at run time).
// With a constant count the loops over strips unroll and each strip's running values stay
// in registers; read at run time, the loop stayed rolled and they lived on the stack
// (perf annotate of the T/H/W pool, 2026-12-02). Each count is another copy of the loop to
// compile, so only the compiled weight structures (kConstant) get them, half-width float
// vectors on AVX-512 (rows of at most 8 floats: with_chunk_bytes) only one strip, and a
// portable build none (element-loop chunks, not the speed target, whose compile time is
// the CI's: see for_each_strip).
template <bool kConstant, typename acc_t, int B, int kMax, typename F>
AIA_INLINE void with_strip_count(const StripGroup<acc_t, B, kMax>& group, F&& f) {
  if constexpr (!kConstant || !kVectorChunks) {
    f(std::integral_constant<int, 0>{});
  } else if constexpr (B < kVectorBytes && sizeof(acc_t) == 4) {
    TORCH_CHECK(group.strips == 1, "aia_native: a half-width float vector holds a whole row");
    f(std::integral_constant<int, 1>{});
  } else {
    switch (group.strips) {
      case 1: return f(std::integral_constant<int, 1>{});
      case 2: return f(std::integral_constant<int, 2>{});
      case 4: return f(std::integral_constant<int, 4>{});
      case 5: if constexpr (kMax == 8) return f(std::integral_constant<int, 5>{});  // 40 floats of 8
              break;
      case 7: if constexpr (kMax == 8) return f(std::integral_constant<int, 7>{});  // 56 floats of 8
              break;
      default: break;
    }
    return f(std::integral_constant<int, 0>{});
  }
}

// Strip s of a group whose count is kStrips (0: read at run time): every strip but the
// last is a whole vector, known as one when kStrips is a constant.
template <int kStrips, typename acc_t, int B, int kMax>
AIA_INLINE Row<acc_t, B> strip_row(const StripGroup<acc_t, B, kMax>& group, int s) {
  if (kStrips > 0 && s < kStrips - 1) return Row<acc_t, B>{Vec<acc_t, B>::kLanes};
  return group.row[s];
}

// Calls f(s, row) for the strips of a group whose count is kStrips (0: read at run time),
// unrolled when the count is a constant (and only then: unrolled up to a group's 8 strips, a
// run-time count's loop was a four-minute compile in a portable build).
template <int kStrips, typename acc_t, int B, int kMax, typename F>
AIA_INLINE void for_each_strip(const StripGroup<acc_t, B, kMax>& group, F&& f) {
  if constexpr (kStrips > 0) {
#pragma GCC unroll 8
    for (int s = 0; s < kStrips; ++s) f(s, strip_row<kStrips>(group, s));
  } else {
    for (int s = 0; s < group.strips; ++s) f(s, group.row[s]);
  }
}

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
AIA_INLINE WeightAt<acc_t> weight_at(const Weight<acc_t>& wt, const Dims& d, int64_t n, int64_t t, int64_t c) {
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
// whose rows have unit stride (`WeightShape`: the factor count and each factor's kind as
// constants, two factors multiplying, so a chunk tests nothing and keeps its values in
// registers; tested per chunk, the loop spilled to the stack: apply took 5.7x a plain
// multiply of the tensor at 56x56). Other dtypes and strides, and the mean of two factors,
// take `AnyWeight`, the structure read at run time.
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

// Which structures a pass is compiled for: those the ten variants' plans give it
// (plan.py); any other structure takes AnyWeight, so a new variant runs, if slower. Each
// compiled structure is a copy of the pass's loops, and the build time grows with them.
//   - a stage's weight: none, one factor, or two of one kind (a C stage weighted by two
//     T, H, W means: CinST->STinC; a T, H, W stage by two C gates: STinC->CinST);
//   - an output weight: one factor, or a C gate and a T, H, W mean (sequential variants).
struct CStageWeights {
  template <typename S>
  static constexpr bool keep() { return S::kFactors < 2 || (S::kST0 && S::kST1); }
};
struct THWStageWeights {
  template <typename S>
  static constexpr bool keep() { return S::kFactors < 2 || (!S::kST0 && !S::kST1); }
};
struct OutputWeights {
  template <typename S>
  static constexpr bool keep() { return S::kFactors == 1 || (S::kFactors == 2 && S::kST0 != S::kST1); }
};
struct AllWeights {
  template <typename S>
  static constexpr bool keep() { return true; }
};

// Calls f(shape) with the structure type of `spec` (see above) if Keep compiles it, else with
// AnyWeight; `unit_stride`: every full-size tensor the pass reads or writes has unit stride along w.
template <typename scalar_t, typename Keep, typename F>
void with_weight_shape(const WeightSpec& spec, bool unit_stride, F&& f) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    (void)spec, (void)unit_stride;
    f(AnyWeight{});
  } else {
    const auto call = [&](auto shape) {
      if constexpr (Keep::template keep<decltype(shape)>()) f(shape);
      else f(AnyWeight{});
    };
    const size_t nf = spec.factors.size();
    const bool s0 = nf > 0 && spec.factors[0].size() == 3, s1 = nf > 1 && spec.factors[1].size() == 3;
    if (!unit_stride || (nf == 2 && spec.mean)) return f(AnyWeight{});  // means: the parallel variants' output only
    if (nf == 0) return call(WeightShape<0, false, false>{});
    if (nf == 1) return s0 ? call(WeightShape<1, true, false>{}) : call(WeightShape<1, false, false>{});
    if (s0 && s1) return call(WeightShape<2, true, true>{});
    if (s0) return call(WeightShape<2, true, false>{});
    if (s1) return call(WeightShape<2, false, true>{});
    return call(WeightShape<2, false, false>{});
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

// A chunk stored to a full-size tensor; with a static S its rows have unit stride and its type is acc_t.
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
AIA_INLINE UpstreamAt<scalar_t, acc_t> upstream_at(const UpstreamCall<scalar_t, acc_t>& call, const Dims& d, int64_t n,
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

// Calls f(shape, upstream) with the structure types of a term (weight and upstream), static
// for both where the plans give that pair (a full tensor: the output's weight; C items: a C
// stage's; T, H, W items: a T, H, W stage's), else AnyWeight and AnyUpstream.
template <typename S, typename U>
constexpr bool plan_term() {
  if constexpr (U::kKind == 0) return OutputWeights::keep<S>();
  else if constexpr (S::kFactors < 2) return true;
  else if constexpr (U::kKind == 1) return CStageWeights::keep<S>();
  else return THWStageWeights::keep<S>();
}

// `unit_stride`: every full-size tensor the pass reads or writes has unit stride along w.
template <typename scalar_t, typename F>
void with_term_structure_if(const Term& term, bool unit_stride, F&& f) {
  const UpstreamSpec& up = term.upstream;
  const bool c_item = !up.dout.defined() && up.axis.size() == 1 && up.axis[0] == kAxisC;
  const bool thw_items = !up.dout.defined() && up.axis.size() == 3 && up.axis[0] == kAxisT &&
                         up.axis[1] == kAxisH && up.axis[2] == kAxisW;
  with_weight_shape<scalar_t, AllWeights>(term.weight, unit_stride && (up.dout.defined() || c_item || thw_items),
                                          [&](auto shape) {
    using S = decltype(shape);
    const auto call = [&](auto upstream) {
      if constexpr (plan_term<S, decltype(upstream)>()) f(shape, upstream);
      else f(AnyWeight{}, AnyUpstream{});
    };
    if constexpr (!S::kStatic) f(shape, AnyUpstream{});
    else if (up.dout.defined()) call(UpstreamKind<0>{});
    else if (c_item) call(UpstreamKind<1>{});
    else call(UpstreamKind<3>{});
  });
}

// `v_unit_stride`: v's rows have unit stride.
template <typename scalar_t, typename F>
void with_term_shape(const Term& term, bool v_unit_stride, F&& f) {
  const UpstreamSpec& up = term.upstream;
  with_term_structure_if<scalar_t>(term, v_unit_stride && (!up.dout.defined() || up.dout.stride(4) == 1), f);
}

// The term's structure whatever the strides (the lanes walks read planes through a buffer).
template <typename scalar_t, typename F>
void with_term_structure(const Term& term, F&& f) {
  with_term_structure_if<scalar_t>(term, true, f);
}

// Calls f(integral_constant<int, B>) with the vector bytes of a call's full-size
// passes: 32 without AVX-512 or when a row of floats fits in half a vector, else 64. The
// other dtypes (not the speed target) take one width: each width is another copy of every
// pass to compile.
template <typename scalar_t, typename F>
void with_chunk_bytes(int64_t W, F&& f) {
  constexpr int64_t kAccBytes = sizeof(at::opmath_type<scalar_t>);
  if constexpr (kVectorBytes == 32 || !std::is_same_v<scalar_t, float>) {
    (void)W;
    f(std::integral_constant<int, 32>{});
  } else {
    if (W * kAccBytes <= 32) f(std::integral_constant<int, 32>{});
    else f(std::integral_constant<int, 64>{});
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace aia
