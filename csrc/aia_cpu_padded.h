// The gate conv's zero-padded volumes (aia_cpu_gate.cpp), and pooled tensors that live in
// them: the pool of a T/H/W stage can write its results straight into the padded layout
// (aia_cpu_pool.cpp), so that the conv forward and its weight gradient read them without a
// padded copy of their own (at 7x7 those copies were about 5% of an eval module step).
#pragma once

#include "aia_cpu_chunks.h"

#include <vector>

namespace aia {
namespace cpu {
namespace detail {

constexpr int kTapBlock = 2 * kVectorBytes;  // outputs per register block in tap_sums (8 vectors of floats)
constexpr int kTapSlack = kTapBlock + 16;    // entries tap_sums may read past a run's end (tap_rows_avx512: a vector more)

// A (D1, D2, D3) volume padded for the conv: rows R = D3 + 1 apart (one zero column serves
// as the right pad of a row and the left pad of the next), slices (D2 + 1) * R (one zero
// row, top pad of a slice and bottom pad of the one before), volumes D1 + 2 slices (zero
// slices first and last). Entry (a, b, c) sits at first + a * slice + b * R + c.
struct Padded {
  int64_t R, slice, volume;  // row pitch, padded (D2, D3) slice, padded volume
  int64_t run;               // flat length covering every valid (b, c): (D2 - 1) * R + D3
  int64_t first;             // offset of entry (0, 0, 0) in its volume
};

inline Padded padded(const ConvDims& d) {
  Padded p;
  p.R = d.D3 + 1;
  p.slice = (d.D2 + 1) * p.R;
  p.volume = (d.D1 + 2) * p.slice;
  p.run = (d.D2 - 1) * p.R + d.D3;
  p.first = p.slice + p.R + 1;
  return p;
}

// Zeros past `count` padded volumes that the conv reads: up to a tap block past a run's end
// (kTapSlack), and R + 1 entries past the last volume (a tap of the last slice's last entry
// reads the bottom pad's next row).
inline int64_t padded_slack(const Padded& p) { return kTapSlack + p.R + 1; }

// A pooled tensor (N, 2, D1, D2, D3) of floats as the interior of count = 2N padded volumes:
// a strided view (volume, slice, R, 1) of a buffer whose pads and slack are zero. Its
// entries are for the pool to write.
//
// The buffers are kept per thread between calls and reused once no tensor refers to them: a
// step's pooled tensors then land in memory that the caches and the TLB hold, with the pads
// still zero (nothing but the pool's interior writes touches them). Fresh buffers cost the
// first touch of every line and page. At most kKeptPaddedBytes are kept.
constexpr int64_t kKeptPaddedBytes = int64_t(32) << 20;

inline at::Tensor empty_padded_pooled(at::IntArrayRef shape, const at::TensorOptions& options) {
  const ConvDims d{shape[0], shape[2], shape[3], shape[4]};
  const Padded p = padded(d);
  const int64_t count = 2 * d.N, numel = count * p.volume + padded_slack(p);
  const auto view = [&](const at::Tensor& buffer) {
    return buffer.as_strided({d.N, 2, d.D1, d.D2, d.D3}, {2 * p.volume, p.volume, p.slice, p.R, 1}, p.first);
  };
  // Each buffer with its volumes' dims: another shape of as many entries has its pads elsewhere
  // (at 7x7 an H gate's (T, C, W) volumes and a W gate's (T, H, C) ones).
  struct Kept {
    at::Tensor buffer;
    int64_t N, D1, D2, D3;
  };
  thread_local std::vector<Kept> kept;
  const auto unused = [](const Kept& k) { return k.buffer.storage().use_count() == 1; };  // only `kept`
  for (const Kept& k : kept)
    if (k.N == d.N && k.D1 == d.D1 && k.D2 == d.D2 && k.D3 == d.D3 && unused(k)) return view(k.buffer);
  at::Tensor buffer = at::empty({numel}, options);
  float* b = buffer.data_ptr<float>();
  for (int64_t v = 0; v < count; ++v) {  // the pads only: the interior is the pool's
    float* vol = b + v * p.volume;
    std::fill(vol, vol + p.slice, 0.f);
    std::fill(vol + (d.D1 + 1) * p.slice, vol + p.volume, 0.f);
    for (int64_t a = 1; a <= d.D1; ++a) {
      float* slice = vol + a * p.slice;
      std::fill(slice, slice + p.R, 0.f);
      for (int64_t r = 1; r <= d.D2; ++r) slice[r * p.R] = 0.f;
    }
  }
  std::fill(b + count * p.volume, b + buffer.numel(), 0.f);
  int64_t bytes = buffer.nbytes();
  for (const Kept& k : kept) bytes += k.buffer.nbytes();
  for (auto it = kept.begin(); it != kept.end() && bytes > kKeptPaddedBytes;) {  // the oldest unused go first
    if (unused(*it)) {
      bytes -= it->buffer.nbytes();
      it = kept.erase(it);
    } else {
      ++it;
    }
  }
  if (bytes <= kKeptPaddedBytes) kept.push_back({buffer, d.N, d.D1, d.D2, d.D3});
  return view(buffer);
}

// The padded volumes' base if `P` is such a view (empty_padded_pooled's layout), else null
// (a contiguous pooled tensor: the conv pads a copy). Only the plan ops make these views;
// the primitive ops take contiguous pooled tensors (check_pooled).
template <typename acc_t>
const acc_t* padded_base(const at::Tensor& P) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return nullptr;
  } else {
    if (P.scalar_type() != at::kFloat || P.dim() != 5 || P.is_contiguous()) return nullptr;
    const ConvDims d{P.size(0), P.size(2), P.size(3), P.size(4)};
    const Padded p = padded(d);
    const bool layout = P.stride(0) == 2 * p.volume && P.stride(1) == p.volume && P.stride(2) == p.slice &&
                        P.stride(3) == p.R && P.stride(4) == 1 && P.storage_offset() == p.first &&
                        static_cast<int64_t>(P.storage().nbytes() / sizeof(float)) >=
                            2 * d.N * p.volume + padded_slack(p);
    return layout ? P.data_ptr<float>() - p.first : nullptr;
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace aia
