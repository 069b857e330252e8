// The aia_native ops: schemas, argument parsing and checks, and the device-generic
// parts (BN folding and its backward on the small conv outputs, with ATen ops).
// The full-size passes and the 3x3x3 conv run in aia_cpu_*.cpp / aia_cuda.cu.
//
// The primitive contract's NamedTuples are flattened (see aia_kernels/native/__init__.py):
//   gates:    Tensor[] gate_z, Tensor[] gate_ss, str gate_axes   (one entry per gate use)
//   weights:  int[] weight_desc = per weight [combine (0 prod, 1 mean), n_factors,
//             gates in factor 0, ...]; gate uses are consumed in order
//   upstream: Tensor[] douts, Tensor[] up_grads, Tensor[] up_argmax, str up_axes,
//             int[] up_counts = per term -1 (next dout) or the number of pooled items
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "aia_host.h"

namespace aia {
namespace {

constexpr int64_t kBnNone = 0, kBnBatch = 1, kBnRunning = 2;

std::vector<int> axis_codes(c10::string_view axes) {
  std::vector<int> codes;
  for (char a : axes) codes.push_back(axis_code(a));
  return codes;
}

at::ScalarType acc_type(const at::Tensor& v) { return aia::acc_type(v.scalar_type()); }

void check_full(const at::Tensor& t, const at::Tensor& v, const char* name) {
  TORCH_CHECK(t.dim() == 5, "aia_native: ", name, " must be 5-D (N, T, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.sizes() == v.sizes(), "aia_native: ", name, " has shape ", t.sizes(), ", expected ", v.sizes());
  TORCH_CHECK(t.device() == v.device(), "aia_native: ", name, " is on ", t.device(), ", expected ", v.device());
  TORCH_CHECK(t.scalar_type() == v.scalar_type(), "aia_native: ", name, " has dtype ", t.scalar_type(),
              ", expected ", v.scalar_type());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "aia_native: ", name, " must be floating point");
}


// Entry i of a small CPU tensor (BN parameters and statistics, scale/shift), read in place,
// and small CPU tensors written in place: item(), to() and at::tensor() are dispatched ATen
// calls of a microsecond or more each, and a module step made dozens over its gates.
double host_value(const at::Tensor& t, int64_t i = 0) {
  TORCH_CHECK(t.device().is_cpu() && i < t.numel(), "aia_native: expected a CPU tensor of more than ", i, " values");
  double out = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "aia_native_host_value", [&] {
    out = static_cast<double>(t.data_ptr<scalar_t>()[t.dim() == 0 ? 0 : i * t.stride(0)]);
  });
  return out;
}

// A gate BN's parameter or running statistic (BatchNorm3d(1)): one value.
void check_bn_scalar(const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "aia_native: BN parameters and statistics hold one value, got shape ", t.sizes());
}

// host_value of an optional BN scalar, `fallback` where it is absent.
double host_value_or(const c10::optional<at::Tensor>& t, double fallback) {
  if (!t.has_value() || !t->defined()) return fallback;
  check_bn_scalar(*t);
  return host_value(*t);
}

at::Tensor host_tensor(std::initializer_list<double> values, const at::TensorOptions& options) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, options);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "aia_native_host_tensor", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (double v : values) *p++ = static_cast<scalar_t>(v);
  });
  return t;
}

}  // namespace

void check_small(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& v, at::ScalarType dtype,
                 c10::string_view name) {
  TORCH_CHECK(t.defined(), "aia_native: ", name, " is missing (an undefined tensor)");
  TORCH_CHECK(t.sizes() == shape, "aia_native: ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.scalar_type() == dtype, "aia_native: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == v.device(), "aia_native: ", name, " is on ", t.device(), ", expected ", v.device());
  TORCH_CHECK(t.is_contiguous(), "aia_native: ", name, " must be contiguous");
}

at::Tensor gate_value(const at::Tensor& z, const at::Tensor& scale_shift) {
  if (runs_on_cuda(z)) return at::sigmoid(z * scale_shift[0] + scale_shift[1]).contiguous();
  return cpu::gate_value(z, host_value(scale_shift, 0), host_value(scale_shift, 1));
}

namespace {

// Gate values sigmoid(a * z + b), computed once per call on the small tensors.
GateSet make_gates(at::TensorList gate_z, at::TensorList gate_ss, c10::string_view gate_axes, const at::Tensor& v) {
  TORCH_CHECK(gate_z.size() == gate_ss.size() && gate_z.size() == gate_axes.size(),
              "aia_native: gate_z, gate_ss and gate_axes differ in length");
  const Dims d = dims_of(v);
  const at::ScalarType acc = acc_type(v);
  GateSet gates;
  gates.axis = axis_codes(gate_axes);
  for (size_t i = 0; i < gate_z.size(); ++i) {
    check_small(gate_z[i], gate_shape(gates.axis[i], d), v, acc, "gate z");
    check_small(gate_ss[i], {2}, v, acc, "gate scale_shift");
    // A gate used by several weights of one call (input_grad) is evaluated once.
    at::Tensor value;
    for (size_t j = 0; j < i && !value.defined(); ++j) {
      if (gate_z[j].is_same(gate_z[i]) && gate_ss[j].is_same(gate_ss[i])) value = gates.values[j];
    }
    gates.values.push_back(value.defined() ? value : gate_value(gate_z[i], gate_ss[i]));
  }
  return gates;
}

// Parses weights from `desc` starting at `pos`, consuming gate ids from `next_gate`.
WeightSpec parse_weight(at::IntArrayRef desc, size_t& pos, int& next_gate, const GateSet& gates) {
  TORCH_CHECK(pos + 2 <= desc.size(), "aia_native: weight_desc too short");
  WeightSpec w;
  w.mean = desc[pos++] == 1;
  const int64_t n_factors = desc[pos++];
  TORCH_CHECK(n_factors >= 0 && n_factors <= kMaxFactors, "aia_native: a weight has 0 to 2 factors");
  for (int64_t k = 0; k < n_factors; ++k) {
    TORCH_CHECK(pos < desc.size(), "aia_native: weight_desc too short");
    const int64_t size = desc[pos++];
    TORCH_CHECK(size == 1 || size == 3, "aia_native: a factor has 1 (C) or 3 (T, H, W) gates");
    std::vector<int> ids;
    for (int64_t j = 0; j < size; ++j) {
      TORCH_CHECK(next_gate < static_cast<int>(gates.axis.size()), "aia_native: too few gates for weight_desc");
      ids.push_back(next_gate++);
    }
    const int a0 = gates.axis[ids[0]];
    TORCH_CHECK(size == 1 ? a0 == kAxisC
                          : (a0 == kAxisT && gates.axis[ids[1]] == kAxisH && gates.axis[ids[2]] == kAxisW),
                "aia_native: a factor is one C gate or the (T, H, W) gates");
    w.factors.push_back(ids);
  }
  return w;
}

std::vector<WeightSpec> parse_weights(at::IntArrayRef desc, const GateSet& gates) {
  std::vector<WeightSpec> weights;
  size_t pos = 0;
  int next_gate = 0;
  while (pos < desc.size()) weights.push_back(parse_weight(desc, pos, next_gate, gates));
  TORCH_CHECK(next_gate == static_cast<int>(gates.axis.size()), "aia_native: more gates than weight_desc uses");
  return weights;
}

std::vector<UpstreamSpec> parse_upstreams(at::TensorList douts, at::TensorList up_grads, at::TensorList up_argmax,
                                          c10::string_view up_axes, at::IntArrayRef up_counts, const at::Tensor& v) {
  TORCH_CHECK(up_grads.size() == up_argmax.size() && up_grads.size() == up_axes.size(),
              "aia_native: up_grads, up_argmax and up_axes differ in length");
  const Dims d = dims_of(v);
  const std::vector<int> axes = axis_codes(up_axes);
  std::vector<UpstreamSpec> ups;
  size_t next_dout = 0, next_item = 0;
  for (int64_t count : up_counts) {
    UpstreamSpec u;
    if (count < 0) {
      TORCH_CHECK(next_dout < douts.size(), "aia_native: too few douts for up_counts");
      u.dout = douts[next_dout++];
      check_full(u.dout, v, "dout");
    } else {
      TORCH_CHECK(count <= kMaxItems, "aia_native: at most ", kMaxItems, " pooled gradients per upstream");
      for (int64_t i = 0; i < count; ++i, ++next_item) {
        TORCH_CHECK(next_item < up_grads.size(), "aia_native: too few pooled gradients for up_counts");
        std::vector<int64_t> shape = gate_shape(axes[next_item], d);
        check_small(up_argmax[next_item], shape, v, at::kInt, "argmax");
        shape.insert(shape.begin() + 1, 2);
        check_small(up_grads[next_item], shape, v, acc_type(v), "pooled gradient");
        u.grad.push_back(up_grads[next_item]);
        u.argmax.push_back(up_argmax[next_item]);
        u.axis.push_back(axes[next_item]);
      }
    }
    ups.push_back(u);
  }
  TORCH_CHECK(next_dout == douts.size() && next_item == up_grads.size(),
              "aia_native: more upstream tensors than up_counts uses");
  return ups;
}

void check_v(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 5, "aia_native: v must be 5-D (N, T, C, H, W), got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "aia_native: v must be floating point, got ", v.scalar_type());
  TORCH_CHECK(v.numel() > 0, "aia_native: v is empty");
  TORCH_CHECK(v.numel() < (int64_t(1) << 31) * 64, "aia_native: v too large");
}

// ---- the six primitives ----

std::vector<at::Tensor> pool_op(const at::Tensor& v, at::TensorList gate_z, at::TensorList gate_ss,
                                c10::string_view gate_axes, at::IntArrayRef weight_desc, c10::string_view axes,
                                bool with_argmax) {
  check_v(v);
  const GateSet gates = make_gates(gate_z, gate_ss, gate_axes, v);
  const auto weights = parse_weights(weight_desc, gates);
  TORCH_CHECK(weights.size() == 1, "aia_native::pool takes one weight");
  const std::vector<int> codes = axis_codes(axes);
  return on_device::pool(v, gates, weights[0], codes, with_argmax);
}

void apply_op(const at::Tensor& v, at::TensorList gate_z, at::TensorList gate_ss, c10::string_view gate_axes,
              at::IntArrayRef weight_desc, const at::Tensor& out) {
  check_v(v);
  check_full(out, v, "out");
  const GateSet gates = make_gates(gate_z, gate_ss, gate_axes, v);
  const auto weights = parse_weights(weight_desc, gates);
  TORCH_CHECK(weights.size() == 1, "aia_native::apply takes one weight");
  on_device::apply(v, gates, weights[0], out);
}

std::vector<Term> make_terms(const at::Tensor& v, at::TensorList douts, at::TensorList up_grads,
                             at::TensorList up_argmax, c10::string_view up_axes, at::IntArrayRef up_counts,
                             const GateSet& gates, at::IntArrayRef weight_desc) {
  const auto weights = parse_weights(weight_desc, gates);
  const auto ups = parse_upstreams(douts, up_grads, up_argmax, up_axes, up_counts, v);
  TORCH_CHECK(weights.size() == ups.size(), "aia_native: ", weights.size(), " weights but ", ups.size(),
              " upstream gradients");
  TORCH_CHECK(weights.size() <= static_cast<size_t>(kMaxTerms), "aia_native: at most ", kMaxTerms, " terms");
  std::vector<Term> terms;
  for (size_t i = 0; i < weights.size(); ++i) terms.push_back(Term{weights[i], ups[i]});
  return terms;
}

std::vector<at::Tensor> weight_grad_op(const at::Tensor& v, at::TensorList douts, at::TensorList up_grads,
                                       at::TensorList up_argmax, c10::string_view up_axes, at::IntArrayRef up_counts,
                                       at::TensorList gate_z, at::TensorList gate_ss, c10::string_view gate_axes,
                                       at::IntArrayRef weight_desc) {
  check_v(v);
  const GateSet gates = make_gates(gate_z, gate_ss, gate_axes, v);
  const auto terms = make_terms(v, douts, up_grads, up_argmax, up_axes, up_counts, gates, weight_desc);
  TORCH_CHECK(terms.size() == 1, "aia_native::weight_grad takes one (weight, upstream) term");
  return on_device::weight_grad(v, terms[0], gates);
}

void input_grad_op(at::TensorList douts, at::TensorList up_grads, at::TensorList up_argmax, c10::string_view up_axes,
                   at::IntArrayRef up_counts, at::TensorList gate_z, at::TensorList gate_ss,
                   c10::string_view gate_axes, at::IntArrayRef weight_desc, const at::Tensor& out) {
  check_v(out);
  const GateSet gates = make_gates(gate_z, gate_ss, gate_axes, out);
  const auto terms = make_terms(out, douts, up_grads, up_argmax, up_axes, up_counts, gates, weight_desc);
  on_device::input_grad(terms, gates, out);
}

// `in_conv_layout_ok`: the plan ops' callers also pass the padded view of cpu::pool_for_conv.
void check_pooled(const at::Tensor& pooled, bool in_conv_layout_ok = false) {
  TORCH_CHECK(pooled.dim() == 5 && pooled.size(1) == 2, "aia_native: pooled must be (N, 2, D1, D2, D3), got ",
              pooled.sizes());
  TORCH_CHECK(pooled.scalar_type() == at::kFloat || pooled.scalar_type() == at::kDouble,
              "aia_native: pooled must be float32 or float64");
  TORCH_CHECK(pooled.is_contiguous() || (in_conv_layout_ok && !runs_on_cuda(pooled) && cpu::in_conv_layout(pooled)),
              "aia_native: pooled must be contiguous");
}

at::Tensor conv_weight_as(const at::Tensor& conv_weight, const at::Tensor& pooled) {
  TORCH_CHECK(conv_weight.numel() == 54, "aia_native: conv_weight must be (1, 2, 3, 3, 3)");
  TORCH_CHECK(conv_weight.device() == pooled.device(), "aia_native: conv_weight on another device");
  return conv_weight.to(pooled.scalar_type()).contiguous();
}

at::Tensor scalar_of(const c10::optional<at::Tensor>& t, const at::Tensor& like, double fallback) {
  if (!t.has_value() || !t->defined()) return at::full({}, fallback, like.options());
  check_bn_scalar(*t);
  return t->to(like.scalar_type()).reshape({});
}

}  // namespace

namespace {

void check_bn_mode(int64_t bn_mode, const c10::optional<at::Tensor>& running_mean,
                   const c10::optional<at::Tensor>& running_var) {
  TORCH_CHECK(bn_mode == kBnNone || bn_mode == kBnBatch || bn_mode == kBnRunning, "aia_native: unknown bn_mode ",
              bn_mode);
  TORCH_CHECK(bn_mode != kBnRunning || (running_mean.has_value() && running_var.has_value()),
              "aia_native: eval BN needs running stats");
}

// BN with (mean, var) folded into the gate's (scale, shift), and (mean, var) as used: two
// host tensors.
std::pair<at::Tensor, at::Tensor> host_bn_fold(double mean, double var, const c10::optional<at::Tensor>& bn_weight,
                                               const c10::optional<at::Tensor>& bn_bias, double eps,
                                               const at::TensorOptions& options) {
  const double scale = host_value_or(bn_weight, 1.0) / std::sqrt(var + eps);
  const double shift = host_value_or(bn_bias, 0.0) - mean * scale;
  return {host_tensor({scale, shift}, options), host_tensor({mean, var}, options)};
}

// The same for a BN that needs no statistics of z: none (the identity) or running statistics.
std::pair<at::Tensor, at::Tensor> host_bn_fold_without_z(int64_t bn_mode, const c10::optional<at::Tensor>& bn_weight,
                                                         const c10::optional<at::Tensor>& bn_bias,
                                                         const c10::optional<at::Tensor>& running_mean,
                                                         const c10::optional<at::Tensor>& running_var, double eps,
                                                         const at::TensorOptions& options) {
  if (bn_mode == kBnNone) return {host_tensor({1.0, 0.0}, options), host_tensor({0.0, 0.0}, options)};
  return host_bn_fold(host_value_or(running_mean, 0.0), host_value_or(running_var, 1.0), bn_weight, bn_bias, eps,
                      options);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward_op(
    const at::Tensor& pooled, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps) {
  check_pooled(pooled);
  return gate_forward_step(pooled, conv_weight, bn_mode, bn_weight, bn_bias, running_mean, running_var, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward_step(
    const at::Tensor& pooled, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps) {
  check_pooled(pooled, /*in_conv_layout_ok=*/true);
  const at::Tensor w = conv_weight_as(conv_weight, pooled);
  at::Tensor z = on_device::conv_forward(pooled, w);
  check_bn_mode(bn_mode, running_mean, running_var);
  TORCH_CHECK(bn_mode != kBnBatch || z.numel() > 1, "aia_native: batch statistics need more than one value");
  if (!runs_on_cuda(z)) {  // CPU: the few scalars on the host, no small ATen ops
    if (bn_mode != kBnBatch) {
      const auto [ss, stats] =
          host_bn_fold_without_z(bn_mode, bn_weight, bn_bias, running_mean, running_var, eps, z.options());
      return {z, ss, stats};
    }
    const cpu::BatchStats st = cpu::batch_stats(z);
    const auto [ss, stats] = host_bn_fold(st.mean, st.var, bn_weight, bn_bias, eps, z.options());
    return {z, ss, stats};
  }
  if (bn_mode == kBnNone) return {z, at::tensor({1.0, 0.0}, z.options()), at::zeros({2}, z.options())};
  at::Tensor mean, var;
  if (bn_mode == kBnBatch) {
    mean = z.mean();
    var = (z - mean).square().mean();  // biased, as BatchNorm normalises
  } else {
    mean = scalar_of(running_mean, z, 0.0);
    var = scalar_of(running_var, z, 1.0);
  }
  const at::Tensor scale = scalar_of(bn_weight, z, 1.0) * at::rsqrt(var + eps);
  const at::Tensor shift = scalar_of(bn_bias, z, 0.0) - mean * scale;
  return {z, at::stack({scale, shift}), at::stack({mean, var})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward_value_op(
    const at::Tensor& pooled, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps) {
  if (runs_on_cuda(pooled) || pooled.scalar_type() != at::kFloat || bn_mode == kBnBatch) {
    auto [z, scale_shift, bn_stats] =
        gate_forward_step(pooled, conv_weight, bn_mode, bn_weight, bn_bias, running_mean, running_var, eps);
    return {gate_value(z, scale_shift), scale_shift, bn_stats};
  }
  check_pooled(pooled, /*in_conv_layout_ok=*/true);
  check_bn_mode(bn_mode, running_mean, running_var);
  const auto [ss, stats] =
      host_bn_fold_without_z(bn_mode, bn_weight, bn_bias, running_mean, running_var, eps, pooled.options());
  const at::Tensor value =
      cpu::conv_forward_value(pooled, conv_weight_as(conv_weight, pooled), host_value(ss, 0), host_value(ss, 1));
  return {value, ss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward_op(
    const at::Tensor& gate_grad, const at::Tensor& pooled, const at::Tensor& z, const at::Tensor& scale_shift,
    const at::Tensor& bn_stats, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, double eps, at::IntArrayRef needs) {
  check_pooled(pooled);
  return gate_backward_with_value(gate_grad, pooled, z, scale_shift, at::Tensor(), bn_stats, conv_weight, bn_mode,
                                  bn_weight, eps, needs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward_with_value(
    const at::Tensor& gate_grad, const at::Tensor& pooled, const at::Tensor& z, const at::Tensor& scale_shift,
    const at::Tensor& value, const at::Tensor& bn_stats, const at::Tensor& conv_weight, int64_t bn_mode,
    const c10::optional<at::Tensor>& bn_weight, double eps, at::IntArrayRef needs) {
  check_pooled(pooled, /*in_conv_layout_ok=*/true);
  TORCH_CHECK(needs.size() == 4, "aia_native: needs = (pooled, conv, bn weight, bn bias)");
  TORCH_CHECK(z.dim() == 4 && z.size(0) == pooled.size(0) && z.sizes().slice(1) == pooled.sizes().slice(2),
              "aia_native: z must be (N, D1, D2, D3) of pooled");
  TORCH_CHECK(gate_grad.sizes() == z.sizes(), "aia_native: gate_grad must have z's shape");
  at::Tensor dz, dbn_w, dbn_b;
  if (!runs_on_cuda(z)) {
    const cpu::GateZGrad r =
        cpu::gate_z_grad(gate_grad, z, value, host_value(scale_shift, 0), host_value(scale_shift, 1),
                         bn_mode != kBnNone, bn_mode == kBnBatch, host_value(bn_stats, 0), host_value(bn_stats, 1),
                         host_value_or(bn_weight, 1.0), eps);
    dz = r.dz;
    if (bn_mode != kBnNone && needs[2]) dbn_w = host_tensor({r.dbn_weight}, z.options());
    if (bn_mode != kBnNone && needs[3]) dbn_b = host_tensor({r.dbn_bias}, z.options());
  } else {  // the same formulas as ATen ops (device-generic)
    const at::Tensor g = at::sigmoid(z * scale_shift[0] + scale_shift[1]);
    const at::Tensor dy = gate_grad.to(z.scalar_type()) * g * (1 - g);  // d loss / d (BN output)
    dz = dy;
    if (bn_mode != kBnNone) {
      const at::Tensor mean = bn_stats[0], rstd = at::rsqrt(bn_stats[1] + eps);
      const at::Tensor zhat = (z - mean) * rstd;
      const at::Tensor dzhat = dy * scalar_of(bn_weight, z, 1.0);
      if (bn_mode == kBnBatch) {  // mean and var depend on z too
        dz = rstd * (dzhat - dzhat.mean() - zhat * (dzhat * zhat).mean());
      } else {
        dz = dzhat * rstd;
      }
      if (needs[2]) dbn_w = (dy * zhat).sum().reshape({1});
      if (needs[3]) dbn_b = dy.sum().reshape({1});
    }
  }
  dz = dz.contiguous();
  const auto empty = [&] { return at::empty({0}, z.options()); };
  at::Tensor d_pooled = empty(), d_conv = empty();
  if (needs[0] || needs[1]) {
    const at::Tensor w = conv_weight_as(conv_weight, pooled);
    if (needs[0]) d_pooled = on_device::conv_input_grad(dz, w);
    if (needs[1]) d_conv = on_device::conv_weight_grad(pooled, dz);
  }
  return {d_pooled, d_conv, dbn_w.defined() ? dbn_w : empty(), dbn_b.defined() ? dbn_b : empty()};
}

// The gate BNs' running statistics after a training step, for float32 buffers on the CPU:
// what running_stats.update_running_stats's foreach ops compute, in the same roundings
// (statistics scaled in their own dtype, then float; buffers times (float)(1 - momentum),
// plus that), in one call instead of about ten tiny ops. `gates` picks rows of `stats`.
void update_running_stats_op(const at::Tensor& stats, at::TensorList running_means, at::TensorList running_vars,
                             at::TensorList num_batches_tracked, at::ArrayRef<double> momentum, at::IntArrayRef gates,
                             at::IntArrayRef counts) {
  const size_t n = gates.size();
  TORCH_CHECK(running_means.size() == n && running_vars.size() == n && num_batches_tracked.size() == n &&
                  momentum.size() == n && counts.size() == n,
              "aia_native: update_running_stats takes one buffer set, momentum and count per gate");
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && stats.size(1) == 2,
              "aia_native: update_running_stats takes CPU statistics of shape (gates, 2)");
  for (size_t i = 0; i < n; ++i) {
    for (const at::Tensor* t : {&running_means[i], &running_vars[i]})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 1,
                  "aia_native: update_running_stats takes one-element float32 CPU buffers");
    TORCH_CHECK(num_batches_tracked[i].device().is_cpu() && num_batches_tracked[i].scalar_type() == at::kLong &&
                    num_batches_tracked[i].numel() == 1,
                "aia_native: update_running_stats takes one-element int64 CPU num_batches_tracked");
    TORCH_CHECK(gates[i] >= 0 && gates[i] < stats.size(0) && counts[i] > 1,
                "aia_native: update_running_stats: gate out of range or count below 2");
  }
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "update_running_stats", [&] {
    const auto s = stats.accessor<scalar_t, 2>();
    for (size_t i = 0; i < n; ++i) {
      const double m = momentum[i];
      const auto count = static_cast<double>(counts[i]);
      const float mean = static_cast<float>(s[gates[i]][0] * static_cast<scalar_t>(m));
      const float var = static_cast<float>(s[gates[i]][1] * static_cast<scalar_t>(m * count / (count - 1)));
      const auto keep = static_cast<float>(1.0 - m);
      float* rm = running_means[i].data_ptr<float>();
      float* rv = running_vars[i].data_ptr<float>();
      *rm = *rm * keep;
      *rm = *rm + mean;
      *rv = *rv * keep;
      *rv = *rv + var;
      *num_batches_tracked[i].data_ptr<int64_t>() += 1;
    }
  });
}

#ifndef AIA_WITH_CUDA
// CPU-only build: the CUDA entry points exist but cannot be reached (no CUDA tensors).
namespace cuda {
std::vector<at::Tensor> pool(const at::Tensor&, const GateSet&, const WeightSpec&, const std::vector<int>&, bool) {
  TORCH_CHECK(false, "aia_native was built without CUDA");
}
void apply(const at::Tensor&, const GateSet&, const WeightSpec&, const at::Tensor&) {
  TORCH_CHECK(false, "aia_native was built without CUDA");
}
std::vector<at::Tensor> weight_grad(const at::Tensor&, const Term&, const GateSet&) {
  TORCH_CHECK(false, "aia_native was built without CUDA");
}
void input_grad(const std::vector<Term>&, const GateSet&, const at::Tensor&) {
  TORCH_CHECK(false, "aia_native was built without CUDA");
}
at::Tensor conv_forward(const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "aia_native was built without CUDA"); }
at::Tensor conv_input_grad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "aia_native was built without CUDA");
}
at::Tensor conv_weight_grad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "aia_native was built without CUDA");
}
}  // namespace cuda
#endif

}  // namespace aia

TORCH_LIBRARY(aia_native, m) {
  // with_argmax=False: the max positions are not tracked; each argmax is empty.
  m.def("pool(Tensor v, Tensor[] gate_z, Tensor[] gate_ss, str gate_axes, int[] weight_desc, str axes, "
        "bool with_argmax=True) -> Tensor[]");
  m.def("apply(Tensor v, Tensor[] gate_z, Tensor[] gate_ss, str gate_axes, int[] weight_desc, Tensor(a!) out) -> ()");
  m.def("weight_grad(Tensor v, Tensor[] douts, Tensor[] up_grads, Tensor[] up_argmax, str up_axes, int[] up_counts, "
        "Tensor[] gate_z, Tensor[] gate_ss, str gate_axes, int[] weight_desc) -> Tensor[]");
  m.def("input_grad(Tensor[] douts, Tensor[] up_grads, Tensor[] up_argmax, str up_axes, int[] up_counts, "
        "Tensor[] gate_z, Tensor[] gate_ss, str gate_axes, int[] weight_desc, Tensor(a!) out) -> ()");
  m.def("gate_forward(Tensor pooled, Tensor conv_weight, int bn_mode, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? running_mean, Tensor? running_var, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gate_backward(Tensor gate_grad, Tensor pooled, Tensor z, Tensor scale_shift, Tensor bn_stats, "
        "Tensor conv_weight, int bn_mode, Tensor? bn_weight, float eps, int[] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("update_running_stats(Tensor stats, Tensor(a!)[] running_means, Tensor(b!)[] running_vars, "
        "Tensor(c!)[] num_batches_tracked, float[] momentum, int[] gates, int[] counts) -> ()");
}

// The same host functions serve both devices; they dispatch to aia::cpu / aia::cuda.
#define AIA_REGISTER_IMPLS(m)                    \
  m.impl("pool", &aia::pool_op);                 \
  m.impl("apply", &aia::apply_op);               \
  m.impl("weight_grad", &aia::weight_grad_op);   \
  m.impl("input_grad", &aia::input_grad_op);     \
  m.impl("gate_forward", &aia::gate_forward_op); \
  m.impl("gate_backward", &aia::gate_backward_op);

TORCH_LIBRARY_IMPL(aia_native, CPU, m) {
  AIA_REGISTER_IMPLS(m)
  m.impl("update_running_stats", &aia::update_running_stats_op);  // CUDA buffers take the foreach ops
}

#ifdef AIA_WITH_CUDA
TORCH_LIBRARY_IMPL(aia_native, CUDA, m) { AIA_REGISTER_IMPLS(m) }
#endif
