// Host-side descriptions of the primitives' arguments (parsed once from the op
// schemas in aia_ops.cpp) and the device entry points each backend file defines:
// aia_cpu_*.cpp (namespace aia::cpu) and aia_cuda.cu (namespace aia::cuda).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "aia_common.h"

namespace aia {

// Gates of one call: their values sigmoid(a * z + b) (accumulation dtype, contiguous)
// and pooled axes, indexed by the gate ids that WeightSpec uses.
struct GateSet {
  std::vector<at::Tensor> values;
  std::vector<int> axis;
};

struct WeightSpec {
  bool mean = false;
  std::vector<std::vector<int>> factors;  // gate ids per factor
};

// Upstream gradient: `dout` when defined, else pooled-gradient items.
struct UpstreamSpec {
  at::Tensor dout;
  std::vector<at::Tensor> grad, argmax;
  std::vector<int> axis;
};

struct Term {
  WeightSpec weight;
  UpstreamSpec upstream;
};

inline int axis_code(char a) {
  switch (a) {
    case 'C': return kAxisC;
    case 'T': return kAxisT;
    case 'H': return kAxisH;
    case 'W': return kAxisW;
  }
  TORCH_CHECK(false, "aia_native: unknown axis '", a, "'");
}

// Accumulation dtype of the small tensors: float64 for float64 inputs, else float32.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline Dims dims_of(const at::Tensor& v) {
  return Dims{v.size(0), v.size(1), v.size(2), v.size(3), v.size(4)};
}

inline Strides5 strides_of(const at::Tensor& t) {
  return Strides5{t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

inline std::vector<int64_t> gate_shape(int axis, const Dims& d) {
  switch (axis) {
    case kAxisC: return {d.N, d.T, d.H, d.W};
    case kAxisT: return {d.N, d.C, d.H, d.W};
    case kAxisH: return {d.N, d.T, d.C, d.W};
    default:     return {d.N, d.T, d.H, d.C};
  }
}

template <typename acc_t>
Weight<acc_t> make_weight(const GateSet& gates, const WeightSpec& spec) {
  Weight<acc_t> w{};
  w.n_factors = static_cast<int>(spec.factors.size());
  w.mean = spec.mean;
  for (int k = 0; k < w.n_factors; ++k) {
    w.size[k] = static_cast<int>(spec.factors[k].size());
    for (int j = 0; j < w.size[k]; ++j) {
      const int id = spec.factors[k][j];
      w.axis[k][j] = gates.axis[id];
      w.gate[k][j] = gates.values[id].data_ptr<acc_t>();
    }
  }
  return w;
}

template <typename scalar_t, typename acc_t>
Upstream<scalar_t, acc_t> make_upstream(const UpstreamSpec& spec) {
  Upstream<scalar_t, acc_t> u{};
  if (spec.dout.defined()) {
    u.dout = spec.dout.data_ptr<scalar_t>();
    u.dout_strides = strides_of(spec.dout);
    return u;
  }
  u.n_items = static_cast<int>(spec.grad.size());
  for (int i = 0; i < u.n_items; ++i) {
    u.axis[i] = spec.axis[i];
    u.grad[i] = spec.grad[i].data_ptr<acc_t>();
    u.argmax[i] = spec.argmax[i].data_ptr<int32_t>();
  }
  return u;
}

// Entry points, one set per device. Full-size tensors are (N, T, C, H, W) views with
// any strides; pooled/gate tensors are contiguous in the accumulation dtype.
#define AIA_DECLARE_DEVICE_ENTRY_POINTS                                                                      \
  /* For each axis: P (N, 2, D1, D2, D3) and argmax (N, D1, D2, D3) of weight * v; with_argmax false: */     \
  /* the positions are not tracked and each argmax is empty. */                                            \
  std::vector<at::Tensor> pool(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,         \
                               const std::vector<int>& axes, bool with_argmax);                            \
  void apply(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight, const at::Tensor& out);    \
  /* d loss / d gate for every gate of every factor, in factor order. */                                   \
  std::vector<at::Tensor> weight_grad(const at::Tensor& v, const Term& term, const GateSet& gates);         \
  void input_grad(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out);             \
  at::Tensor conv_forward(const at::Tensor& pooled, const at::Tensor& weight);                              \
  at::Tensor conv_input_grad(const at::Tensor& dz, const at::Tensor& weight);                               \
  at::Tensor conv_weight_grad(const at::Tensor& pooled, const at::Tensor& dz);

// A small tensor argument (gate tensors, pooled tensors and their gradients, argmaxes) as the
// kernels read it: this shape and dtype, on v's device, contiguous; else an error naming it.
void check_small(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& v, at::ScalarType dtype,
                 c10::string_view name);

// Device-generic gate steps (aia_ops.cpp), used by the primitive ops and by the plan
// executor (aia_plan.cpp): the gate values sigmoid(a * z + b); the conv + BN of a pooled
// tensor -> (z, folded (a, b), BN statistics used); and its backward -> (d pooled,
// d conv weight, d BN weight, d BN bias), empty where `needs` says not needed.
at::Tensor gate_value(const at::Tensor& z, const at::Tensor& scale_shift);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward_op(
    const at::Tensor& pooled, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps);
// gate_forward_op for the plan ops: `pooled` may also be cpu::pool_for_conv's padded view.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward_step(
    const at::Tensor& pooled, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps);
// gate_forward_op's (scale_shift, BN statistics) with the gate's value in place of z, for a
// caller that keeps no z: where BN needs no statistics of z (running statistics or none)
// and the gates are floats on the CPU, computed without z (cpu::conv_forward_value).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward_value_op(
    const at::Tensor& pooled, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward_op(
    const at::Tensor& gate_grad, const at::Tensor& pooled, const at::Tensor& z, const at::Tensor& scale_shift,
    const at::Tensor& bn_stats, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, double eps, at::IntArrayRef needs);
// gate_backward_op given the gate's value, gate_value(z, scale_shift), where the caller has it
// (the plan's backward); undefined: computed here. `pooled` may be cpu::pool_for_conv's view
// (as for gate_forward_value_op and gate_forward_step).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward_with_value(
    const at::Tensor& gate_grad, const at::Tensor& pooled, const at::Tensor& z, const at::Tensor& scale_shift,
    const at::Tensor& value, const at::Tensor& bn_stats, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, double eps, at::IntArrayRef needs);

namespace cpu {
AIA_DECLARE_DEVICE_ENTRY_POINTS

// pool() with each pooled tensor written straight into the gate conv's zero-padded volumes
// when they are float and the axes are T, H, W only (both pool walks): a strided view of
// them (aia_cpu_padded.h), which the convs here read without a padded copy. Else the same
// contiguous tensors as pool(). For the plan ops only: the primitive ops take contiguous
// pooled tensors.
std::vector<at::Tensor> pool_for_conv(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                                      const std::vector<int>& axes, bool with_argmax);
// Whether a pooled tensor is such a view.
bool in_conv_layout(const at::Tensor& pooled);

// CPU fast paths of the gate's BN on the small conv output (the CUDA path composes
// ATen ops in aia_ops.cpp): sequential double sums, so fixed order and few passes.
struct BatchStats {
  double mean, var;  // biased variance, as BatchNorm normalises
};
BatchStats batch_stats(const at::Tensor& z);

// Gate values sigmoid(scale * z + shift), contiguous; floats through a vectorised sigmoid.
at::Tensor gate_value(const at::Tensor& z, double scale, double shift);

// gate_value(conv_forward(pooled, weight), scale, shift) without z, for floats: each block
// of conv outputs turned into gate values where it is computed (a pass over z and z saved).
at::Tensor conv_forward_value(const at::Tensor& pooled, const at::Tensor& weight, double scale, double shift);

// d loss / d z of gate = sigmoid(scale * z + shift), where BN folded into (scale, shift)
// normalised z with (mean, var) (batch: they depend on z too). Also the BN parameter
// gradients: sum(dy * zhat) and sum(dy), dy = d loss / d (BN output). `value`: the gate's
// value, gate_value(z, (scale, shift)), or undefined (then computed).
struct GateZGrad {
  at::Tensor dz;
  double dbn_weight, dbn_bias;
};
GateZGrad gate_z_grad(const at::Tensor& gate_grad, const at::Tensor& z, const at::Tensor& value, double scale,
                      double shift, bool has_bn, bool batch, double mean, double var, double gamma, double eps);
}
namespace cuda {
AIA_DECLARE_DEVICE_ENTRY_POINTS
}

// Whether `t` takes the CUDA code path. In the CUDA emulation build (AIA_CUDA_EMULATION,
// csrc/emulation/) every tensor does: the CUDA kernels run on CPU tensors there.
inline bool runs_on_cuda(const at::Tensor& t) {
#ifdef AIA_CUDA_EMULATION
  (void)t;
  return true;
#else
  return t.is_cuda();
#endif
}

// The entry points for a tensor's device: CUDA tensors to aia::cuda, others to aia::cpu
// (shared by the primitive ops, aia_ops.cpp, and the plan walker, aia_plan.cpp). The
// emulation build, where every tensor takes the CUDA path, names no CPU pass: it leaves
// their sources out (build_config.EMULATION_SOURCES), a minute less to compile.
#ifdef AIA_CUDA_EMULATION
#define AIA_ON_DEVICE(t, call) cuda::call
#else
#define AIA_ON_DEVICE(t, call) (runs_on_cuda(t) ? cuda::call : cpu::call)
#endif
namespace on_device {
inline std::vector<at::Tensor> pool(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight,
                                    const std::vector<int>& axes, bool with_argmax = true) {
  return AIA_ON_DEVICE(v, pool(v, gates, weight, axes, with_argmax));
}
inline void apply(const at::Tensor& v, const GateSet& gates, const WeightSpec& weight, const at::Tensor& out) {
  AIA_ON_DEVICE(v, apply(v, gates, weight, out));
}
inline std::vector<at::Tensor> weight_grad(const at::Tensor& v, const Term& term, const GateSet& gates) {
  return AIA_ON_DEVICE(v, weight_grad(v, term, gates));
}
inline void input_grad(const std::vector<Term>& terms, const GateSet& gates, const at::Tensor& out) {
  AIA_ON_DEVICE(out, input_grad(terms, gates, out));
}
inline at::Tensor conv_forward(const at::Tensor& pooled, const at::Tensor& weight) {
  return AIA_ON_DEVICE(pooled, conv_forward(pooled, weight));
}
inline at::Tensor conv_input_grad(const at::Tensor& dz, const at::Tensor& weight) {
  return AIA_ON_DEVICE(dz, conv_input_grad(dz, weight));
}
inline at::Tensor conv_weight_grad(const at::Tensor& pooled, const at::Tensor& dz) {
  return AIA_ON_DEVICE(pooled, conv_weight_grad(pooled, dz));
}
}  // namespace on_device
#undef AIA_ON_DEVICE

}  // namespace aia
