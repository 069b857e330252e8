// CPU kernels of the gate steps: the 2 -> 1 channel 3x3x3 Conv3d (forward, input and weight
// gradients), the gate values, the BN batch statistics and the gate's z gradient.
#include "aia_cpu_padded.h"

#include <array>

namespace aia {
namespace cpu {
namespace {

using namespace detail;

// sigmoid(y) = 1 / (1 + exp(-y)) per lane. exp(x): x = n ln2 + r with |r| <= ln2 / 2 (n
// rounded by the 1.5 * 2^23 trick, ln2 in two parts), e^r by Cephes' degree-6 expf
// polynomial (about 1 ulp), 2^n written into the exponent bits. x is clamped to
// [-88, 88.7]: past it exp is 0 (value 1) or inf (value 0, true value below 3e-39).
// NaN stays NaN (the clamps' compares are false for it). Measured against ATen's
// sigmoid (Sleef, 1 ulp): tests/test_native_backend.py.
template <typename VT>
AIA_INLINE VT sigmoid_lanes(VT y) {
  using IT = typename Vec<float>::itype;
  const VT zero = VT{} + 0.0f;
  VT x = zero - y;
  x = x > 88.7f ? zero + 88.7f : x;
  x = x < -88.0f ? zero - 88.0f : x;
  const VT magic = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VT t = multiply_add(x, zero + 1.44269504088896341f, magic);
  const VT n = t - magic;
  const IT two_n_bits = ((IT)t - (IT)magic + 127) << 23;  // n = the low bits of t
  VT r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VT p = zero + 1.9875691500e-4f;
  p = multiply_add(p, r, zero + 1.3981999507e-3f);
  p = multiply_add(p, r, zero + 8.3334519073e-3f);
  p = multiply_add(p, r, zero + 4.1665795894e-2f);
  p = multiply_add(p, r, zero + 1.6666665459e-1f);
  p = multiply_add(p, r, zero + 5.0000001201e-1f);
  const VT e = (multiply_add(p, r * r, r) + 1.0f) * (VT)two_n_bits;
  return 1.0f / (1.0f + e);
}

// Gate values out[i] = sigmoid(a * z[i] + b) for i in [0, n) rounded up to whole vectors (both
// must have room for that; out may be z): every entry the same arithmetic, wherever it sits.
AIA_INLINE void gate_values_lanes(const float* z, float* out, int64_t n, float a, float b) {
  using V = Vec<float>;
  for (int64_t k = 0; k < n; k += V::kLanes) V::store(out + k, sigmoid_lanes(V::load(z + k) * a + b));
}

// ---- Conv3d(2 -> 1, 3x3x3, padding 1) ----
// Inputs are copied into zero-padded volumes (a recomputed stage's pool writes its pooled
// tensors there itself: cpu::pool_for_conv), and a (D2, D3) slice is handled as one flat
// run with row pitch R = D3 + 1: each tap is then a constant offset into one long contiguous
// run (no bounds checks, vectorisable even for 7x7 slices). One zero column per row serves
// as the right pad of a row and the left pad of the next, one zero row per slice as the
// bottom pad of a slice and the top pad of the next: (D1 + 2, D2 + 1, D3 + 1) per volume.
// (With two of each, (D2 + 2, D3 + 2), a 7x7 slice's run was 81 entries for 49 outputs,
// now 64.) The pitch column of an output run holds garbage (forward) or zeros (weight
// gradient).
//
// The runs are computed in registers with GCC/Clang vector types (Vec: 16 floats or 8
// doubles with AVX-512, else half that): each output block is loaded and stored once for
// all taps, each tap is one multiply_add (an FMA with AVX2 or AVX-512), and in the weight
// gradient each dz vector is loaded once for 9 taps. Summation orders are fixed
// by the shape alone, so results are deterministic whatever the thread count.

// Padded, padded(), kTapBlock and kTapSlack: aia_cpu_padded.h (the pool writes into that layout too).

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

// `count` volumes (D1, D2, D3) -> zero-padded volumes in workspace `slot`, plus `slack` + R + 1
// zeros at the end (tap_sums reads up to a block past a run's end; a tap of the last slice's
// last entry reads the bottom pad's next row, R + 1 entries past the volume). Slices in parallel.
template <typename acc_t>
const acc_t* pad_volumes(const acc_t* src, int64_t count, const ConvDims& d, int slot, int64_t slack = 0) {
  const Padded p = padded(d);
  slack += p.R + 1;
  acc_t* dst = workspace<acc_t>(slot, static_cast<size_t>(count * p.volume + slack), /*zeroed=*/false);
  const int64_t per_volume = d.D1 + 2;
#if defined(AIA_MASKED_CHUNKS)
  // Rows shorter than a vector (T and H gates of small planes): a padded slice is filled 16
  // entries at a time, each an expanding load of the next source entries into the lanes that
  // hold data (row >= 1, column >= 1), zeros elsewhere. (Row by row, the pads were ~12% of a
  // 10x10 T gate's forward and backward, this way ~5% (perf); a standalone loop of the two at
  // (2, 256, 10, 10): 7.2 against 8.2 us, at (2, 512, 5, 5) 3.9 against 8.4. The same for the
  // weight gradient's pitched dz, and compressing the conv's outputs out of their pitched
  // rows, were no faster.)
  std::vector<__mmask16> data_lanes;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (d.D3 < 16) {
      data_lanes.assign(static_cast<size_t>((p.slice + 15) / 16), 0);
      for (int64_t i = p.R; i < p.slice; ++i)
        if (i % p.R != 0) data_lanes[i / 16] = static_cast<__mmask16>(data_lanes[i / 16] | (1u << (i % 16)));
    }
  }
#endif
  at::parallel_for(0, count * per_volume, grain_for(p.slice), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t v = s / per_volume, a = s % per_volume;
      acc_t* out = dst + s * p.slice;
      if (a == 0 || a == per_volume - 1) {
        std::fill(out, out + p.slice, acc_t(0));
        continue;
      }
      const acc_t* in = src + (v * d.D1 + a - 1) * d.D2 * d.D3;
#if defined(AIA_MASKED_CHUNKS)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (!data_lanes.empty()) {
          const int64_t whole = p.slice / 16;
          for (int64_t j = 0; j < whole; ++j) {
            _mm512_storeu_ps(out + 16 * j, _mm512_maskz_expandloadu_ps(data_lanes[j], in));
            in += __builtin_popcount(data_lanes[j]);
          }
          if (whole * 16 < p.slice)  // this slice's last entries only: slices are filled in parallel
            _mm512_mask_storeu_ps(out + 16 * whole, static_cast<__mmask16>((1u << (p.slice % 16)) - 1u),
                                  _mm512_maskz_expandloadu_ps(data_lanes[whole], in));
          continue;
        }
      }
#endif
      pitch_slice(in, d, p.R, 1, true, d.D2 + 1, out);
    }
  });
  std::fill(dst + count * p.volume, dst + count * p.volume + slack, acc_t(0));
  return dst;
}

#if defined(AIA_MASKED_CHUNKS)
// Lanes k..15 of lo then 0..k-1 of hi: the 16 floats starting k entries into lo (valignd).
template <int k>
AIA_INLINE __m512 shifted(__m512 lo, __m512 hi) {
  return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), k));
}

// tap_sums for floats with AVX-512, when the taps come in threes reading one row at offsets
// 0, 1, 2 (kRising, the forward) or 2, 1, 0 (the input gradient), with no shuffles in the
// row loop: per block, three sums over the rows of (the row's weight for shift k) * row at
// the row's own positions, then out = A0 + A1 shifted by one + A2 shifted by two (one vector
// more of A1 and A2 for the shifts; valignd). Shifting each row's vectors instead (two
// valignd per row and vector) put as many shuffles as FMAs on the port they share: at a
// (1, 2, 256, 10, 10) gate's forward the taps' perf samples 0.83x this way. Unaligned loads
// at each offset were slower than both (stop 41). The sums' order differs from one
// accumulator per output (the last bits), fixed by the shape as before.
template <bool kRising>
void tap_rows_avx512(const float* const* src, const float* w, int taps, int64_t run, float* out) {
  constexpr int kVecs = kTapBlock / 16;
  const int rows = taps / 3;
  for (int64_t i0 = 0; i0 < run; i0 += kTapBlock) {
    __m512 a0[kVecs], a1[kVecs + 1], a2[kVecs + 1];
    for (int j = 0; j < kVecs; ++j) a0[j] = _mm512_setzero_ps();
    for (int j = 0; j <= kVecs; ++j) a1[j] = a2[j] = _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const float* s = src[3 * r + (kRising ? 0 : 2)] + i0;  // the row at offset 0
      const __m512 w0 = _mm512_set1_ps(w[3 * r + (kRising ? 0 : 2)]), w1 = _mm512_set1_ps(w[3 * r + 1]),
                   w2 = _mm512_set1_ps(w[3 * r + (kRising ? 2 : 0)]);
      for (int j = 0; j <= kVecs; ++j) {
        const __m512 x = _mm512_loadu_ps(s + 16 * j);
        if (j < kVecs) a0[j] = _mm512_fmadd_ps(w0, x, a0[j]);
        a1[j] = _mm512_fmadd_ps(w1, x, a1[j]);
        a2[j] = _mm512_fmadd_ps(w2, x, a2[j]);
      }
    }
    for (int j = 0; j < kVecs; ++j) {
      const __m512 sum =
          _mm512_add_ps(_mm512_add_ps(a0[j], shifted<1>(a1[j], a1[j + 1])), shifted<2>(a2[j], a2[j + 1]));
      _mm512_storeu_ps(out + i0 + 16 * j, sum);
    }
  }
}

// 1 if every three taps read one row at offsets 0, 1, 2; -1 if at 2, 1, 0; else 0.
inline int tap_rows(const float* const* src, int taps) {
  bool rising = taps % 3 == 0, falling = rising;
  for (int k = 0; k + 2 < taps && (rising || falling); k += 3) {
    rising = rising && src[k + 1] == src[k] + 1 && src[k + 2] == src[k] + 2;
    falling = falling && src[k + 1] == src[k] - 1 && src[k + 2] == src[k] - 2;
  }
  return rising ? 1 : falling ? -1 : 0;
}
#endif

// out[i] = sum over taps k (in order) of w[k] * src[k][i], for i in [0, run) rounded up
// to whole blocks: `out` and every src[k] must have kTapSlack entries of slack.
template <typename acc_t>
void tap_sums(const acc_t* const* src, const acc_t* w, int taps, int64_t run, acc_t* out) {
#if defined(AIA_MASKED_CHUNKS)
  if constexpr (std::is_same_v<acc_t, float>) {
    const int rows = tap_rows(src, taps);
    if (rows > 0) return tap_rows_avx512<true>(src, w, taps, run, out);
    if (rows < 0) return tap_rows_avx512<false>(src, w, taps, run, out);
  }
#endif
  using V = Vec<acc_t>;
  constexpr int kVecs = kTapBlock / V::kLanes;  // 8 vectors of floats, 16 of doubles
  for (int64_t i0 = 0; i0 < run; i0 += kTapBlock) {
    typename V::type acc[kVecs];
    for (int j = 0; j < kVecs; ++j) acc[j] = typename V::type{};
    for (int k = 0; k < taps; ++k) {
      const typename V::type wk = typename V::type{} + w[k];
      const acc_t* s = src[k] + i0;
      for (int j = 0; j < kVecs; ++j) acc[j] = multiply_add(wk, V::load(s + j * V::kLanes), acc[j]);
    }
    for (int j = 0; j < kVecs; ++j) V::store(out + i0 + j * V::kLanes, acc[j]);
  }
}

// out[b * R + c] (pitched) -> dst[b * D3 + c]
template <typename acc_t>
void unpitch(const acc_t* out, const ConvDims& d, int64_t R, acc_t* dst) {
  unpitch_rows(out, d.D2, d.D3, R, dst);
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

// The pooled tensor's padded volumes: its own (a view into them, empty_padded_pooled), else a
// padded copy in workspace slot 0.
template <typename acc_t>
const acc_t* padded_pooled(const at::Tensor& pooled, const ConvDims& d) {
  const acc_t* base = padded_base<acc_t>(pooled);
  return base != nullptr ? base : pad_volumes(pooled.data_ptr<acc_t>(), d.N * 2, d, 0, kTapSlack);
}

// z[n, a] = sum_{ci, k} w[ci, k] * Ppad[n, ci, a + k1, k2 + b, k3 + c]; `epilogue(block, run)`
// may rewrite each block of pitched outputs in place before it is stored (the gate values).
template <typename acc_t, typename Epilogue>
void conv_forward_kernel(const acc_t* Ppad, const acc_t* wt, const ConvDims& d, acc_t* z, Epilogue&& epilogue) {
  const Padded p = padded(d);
  const SliceBlocks sb = slice_blocks(d, p);
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
      epilogue(out.data(), sb.run(p, count));
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
  const acc_t* dzpad = pad_volumes(dz, d.N, d, 0, kTapSlack);
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
// (Ppad's rows are read a vector past a run with AVX-512: its slack.)
template <typename acc_t>
void conv_weight_grad_kernel(const acc_t* Ppad, const acc_t* dz, const ConvDims& d, acc_t* dw) {
  using V = Vec<acc_t>;
  const Padded p = padded(d);
  // dz with row pitch R and zero pitch columns, one (D2, D3) slice per (n, a).
  acc_t* dzp = workspace<acc_t>(1, static_cast<size_t>(d.N * d.D1 * p.slice), /*zeroed=*/false);
  at::parallel_for(0, d.N * d.D1, grain_for(p.slice), [&](int64_t begin, int64_t end) {
    for (int64_t na = begin; na < end; ++na)
      pitch_slice(dz + na * d.D2 * d.D3, d, p.R, 0, false, d.D2 + 1, dzp + na * p.slice);
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
        // Tap k = 3 * k2 + k3 reads row k2 at column k3. Nine named accumulators, and the
        // runs' scalar tails summed in a second walk: with an array of accumulators and the
        // tails' nine scalars live in the same loop, GCC kept three accumulators on the
        // stack, and their store-load round trips were half of this loop's samples (AVX2).
        using vec = typename V::type;
        // Consecutive slices of one volume are one flat run (dz's pitch rows are zero):
        // f(r0, g, len) per run, r0 the first of its three padded rows.
        const auto for_each_run = [&](auto f) AIA_LAMBDA_INLINE {
          for (int64_t na = first; na < last;) {
            const int64_t n = na / d.D1, a = na % d.D1;
            const int64_t count = std::min(last - na, d.D1 - a);
            f(Ppad + (n * 2 + ci) * p.volume + (a + k1) * p.slice, dzp + na * p.slice, (count - 1) * p.slice + p.run);
            na += count;
          }
        };
        vec a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{}, a8{};
        for_each_run([&](const acc_t* r0, const acc_t* g, int64_t len) AIA_LAMBDA_INLINE {
          const acc_t* r1 = r0 + p.R;
          const acc_t* r2 = r1 + p.R;
#if defined(AIA_MASKED_CHUNKS)
          // Each row's vectors loaded once and the offsets 1, 2 made by lane shifts (valignd):
          // the offset loads split cache lines. The same products and sums.
          if constexpr (std::is_same_v<acc_t, float>) {
            __m512 lo0 = _mm512_loadu_ps(r0), lo1 = _mm512_loadu_ps(r1), lo2 = _mm512_loadu_ps(r2);
            const auto row = [](__m512 lo, __m512 hi, __m512 gv, vec& x0, vec& x1, vec& x2) AIA_LAMBDA_INLINE {
              x0 = (vec)_mm512_fmadd_ps(gv, lo, (__m512)x0);
              x1 = (vec)_mm512_fmadd_ps(gv, shifted<1>(lo, hi), (__m512)x1);
              x2 = (vec)_mm512_fmadd_ps(gv, shifted<2>(lo, hi), (__m512)x2);
            };
            for (int64_t i = 0; i + V::kLanes <= len; i += V::kLanes) {
              const __m512 gv = _mm512_loadu_ps(g + i);
              const __m512 hi0 = _mm512_loadu_ps(r0 + i + 16), hi1 = _mm512_loadu_ps(r1 + i + 16),
                           hi2 = _mm512_loadu_ps(r2 + i + 16);
              row(lo0, hi0, gv, a0, a1, a2);
              row(lo1, hi1, gv, a3, a4, a5);
              row(lo2, hi2, gv, a6, a7, a8);
              lo0 = hi0, lo1 = hi1, lo2 = hi2;
            }
            return;
          }
#endif
          for (int64_t i = 0; i + V::kLanes <= len; i += V::kLanes) {
            const vec gv = V::load(g + i);
            a0 = multiply_add(gv, V::load(r0 + i), a0);
            a1 = multiply_add(gv, V::load(r0 + i + 1), a1);
            a2 = multiply_add(gv, V::load(r0 + i + 2), a2);
            a3 = multiply_add(gv, V::load(r1 + i), a3);
            a4 = multiply_add(gv, V::load(r1 + i + 1), a4);
            a5 = multiply_add(gv, V::load(r1 + i + 2), a5);
            a6 = multiply_add(gv, V::load(r2 + i), a6);
            a7 = multiply_add(gv, V::load(r2 + i + 1), a7);
            a8 = multiply_add(gv, V::load(r2 + i + 2), a8);
          }
        });
        acc_t tail[9] = {};
        for_each_run([&](const acc_t* r0, const acc_t* g, int64_t len) {
          for (int64_t i = len / V::kLanes * V::kLanes; i < len; ++i)
            for (int k = 0; k < 9; ++k) tail[k] += g[i] * r0[(k / 3) * p.R + k % 3 + i];
        });
        const vec acc[9] = {a0, a1, a2, a3, a4, a5, a6, a7, a8};
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

bool in_conv_layout(const at::Tensor& pooled) { return padded_base<float>(pooled) != nullptr; }

at::Tensor conv_forward(const at::Tensor& pooled, const at::Tensor& weight) {
  const ConvDims d = conv_dims(pooled);
  at::Tensor z = at::empty({d.N, d.D1, d.D2, d.D3}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "aia_native_conv_cpu", [&] {
    conv_forward_kernel(padded_pooled<scalar_t>(pooled, d), weight.data_ptr<scalar_t>(), d, z.data_ptr<scalar_t>(),
                        [](scalar_t*, int64_t) {});
  });
  return z;
}

at::Tensor conv_forward_value(const at::Tensor& pooled, const at::Tensor& weight, double scale, double shift) {
  TORCH_CHECK(pooled.scalar_type() == at::kFloat, "aia_native: conv_forward_value takes float gates");
  const ConvDims d = conv_dims(pooled);
  at::Tensor value = at::empty({d.N, d.D1, d.D2, d.D3}, pooled.options());
  const float a = static_cast<float>(scale), b = static_cast<float>(shift);
  // The block buffer has a block of slack past its run (conv_forward_kernel): room for the
  // last partial vector.
  conv_forward_kernel(padded_pooled<float>(pooled, d), weight.data_ptr<float>(), d, value.data_ptr<float>(),
                      [&](float* block, int64_t run) { gate_values_lanes(block, block, run, a, b); });
  return value;
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
    conv_weight_grad_kernel(padded_pooled<scalar_t>(pooled, d), dz.data_ptr<scalar_t>(), d, dw.data_ptr<scalar_t>());
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

// Several such sums over one walk, 8 entries at a time: eight(i) returns the terms of
// entries i..i+7, a vector of 8 doubles per sum (lane l: partial sum l), one(i) those of
// entry i (the tail); each sum's bits are ordered_sum's. (GCC left a walk of two such sums
// partly scalar; for batch_stats' one sum its own loop was faster than this with AVX2.)
typedef double Doubles8 __attribute__((vector_size(64)));  // values in registers (no unaligned loads)

template <typename acc_t>
using Lanes8 = Vec<acc_t, 8 * sizeof(acc_t)>;  // 8 entries of a float or double tensor

template <typename acc_t>
AIA_INLINE Doubles8 doubles8(const typename Lanes8<acc_t>::type& x) {
  return __builtin_convertvector(x, Doubles8);
}

template <int kSums, typename Eight, typename One>
std::array<double, kSums> ordered_sums(int64_t m, Eight&& eight, One&& one) {
  std::array<Doubles8, kSums> part{};
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    const auto terms = eight(i);
    for (int k = 0; k < kSums; ++k) part[k] += terms[k];
  }
  for (; i < m; ++i) {
    const auto terms = one(i);
    for (int k = 0; k < kSums; ++k) part[k][i % 8] += terms[k];
  }
  std::array<double, kSums> total{};
  for (int k = 0; k < kSums; ++k)
    for (int l = 0; l < 8; ++l) total[k] += part[k][l];
  return total;
}

}  // namespace

at::Tensor gate_value(const at::Tensor& z, double scale, double shift) {
  const at::Tensor zc = z.contiguous();
  at::Tensor value = at::empty_like(zc, at::MemoryFormat::Contiguous);
  if (zc.scalar_type() != at::kFloat) {  // not the speed target: a * z + b, then ATen's sigmoid
    AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "aia_native_gate_value_cpu", [&] {
      const auto a = static_cast<scalar_t>(scale), b = static_cast<scalar_t>(shift);
      const scalar_t* zp = zc.data_ptr<scalar_t>();
      scalar_t* out = value.data_ptr<scalar_t>();
      for (int64_t k = 0, m = zc.numel(); k < m; ++k) out[k] = zp[k] * a + b;
    });
    return value.sigmoid_();
  }
  using V = Vec<float>;
  const float a = static_cast<float>(scale), b = static_cast<float>(shift);
  const float* zp = zc.data_ptr<float>();
  float* out = value.data_ptr<float>();
  const int64_t m = zc.numel(), k = m / V::kLanes * V::kLanes;
  gate_values_lanes(zp, out, k, a, b);
  if (k < m) {  // the tail through a whole vector
    float buf[V::kLanes] = {};
    std::copy(zp + k, zp + m, buf);
    gate_values_lanes(buf, buf, V::kLanes, a, b);
    std::copy(buf, buf + (m - k), out + k);
  }
  return value;
}

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

GateZGrad gate_z_grad(const at::Tensor& gate_grad, const at::Tensor& z, const at::Tensor& value, double scale,
                      double shift, bool has_bn, bool batch, double mean, double var, double gamma, double eps) {
  const at::Tensor g = value.defined() ? value.contiguous() : gate_value(z, scale, shift);
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
    const auto dy_at = [&](int64_t i) AIA_LAMBDA_INLINE { return ggp[i] * gp[i] * (acc_t(1) - gp[i]); };
    if (!has_bn) {
      for (int64_t i = 0; i < m; ++i) dzp[i] = dy_at(i);
      return;
    }
    const double rstd = 1.0 / std::sqrt(var + eps);
    // dy, stored, and its two BN sums in one walk.
    using L8 = Lanes8<acc_t>;
    const auto [sum_dy, sum_dy_zhat] = ordered_sums<2>(
        m,
        [&](int64_t i) AIA_LAMBDA_INLINE {
          const typename L8::type g8 = L8::load(gp + i);
          const typename L8::type dy = L8::load(ggp + i) * g8 * (acc_t(1) - g8);
          L8::store(dzp + i, dy);
          const Doubles8 dyd = doubles8<acc_t>(dy);
          return std::array<Doubles8, 2>{dyd, dyd * ((doubles8<acc_t>(L8::load(zp + i)) - mean) * rstd)};
        },
        [&](int64_t i) AIA_LAMBDA_INLINE {
          const acc_t dy = dy_at(i);
          dzp[i] = dy;
          return std::array<double, 2>{dy, dy * ((zp[i] - mean) * rstd)};
        });
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
