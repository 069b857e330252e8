// The whole forward / backward of an AIA module in one op: aia_native::plan_forward
// and aia_native::plan_backward walk a variant's plan (aia_kernels/plan.py, encoded
// as ints by its encode_plan) over the same device entry points as the
// six primitive ops, in the order of the generic executor (aia_kernels/executor.py).
//
// Why a second walker: at small shapes (7x7, 14x14 planes) a train step's 26 primitive
// calls from Python, each re-deriving its gate values, were a large share of the step
// (profiled, not recorded). Here every gate value is computed once per direction and nothing
// returns to Python between primitives. The kernels are the same; only the loop over
// stages moved. tests/test_native_backend.py checks both paths against the reference
// and against each other (bitwise).
//
// On CUDA, small problems skip this walk: plan_forward runs as one cooperative launch
// (aia_cuda_persistent.cu; AIA_NATIVE_CUDA_PERSISTENT selects, see aia_plan.h).
//
// The plan arrives as ints: the encoding and the limits checked here are defined in
// aia_kernels/plan.py (encode_plan, MAX_*); aia_native::plan_encoding_roundtrip re-encodes
// what parse_plan read and aia_native::plan_limits returns the limits, so tests check that
// both sides agree.
#include <torch/library.h>

#include <atomic>
#include <tuple>
#include <vector>

#include "aia_plan.h"

namespace aia {
namespace {

class PlanReader {
 public:
  explicit PlanReader(at::IntArrayRef desc) : desc_(desc) {}

  int next() {
    TORCH_CHECK(pos_ < desc_.size(), "aia_native: plan encoding too short");
    return static_cast<int>(desc_[pos_++]);
  }

  int gate(int n_gates) {
    const int id = next();
    TORCH_CHECK(id >= 0 && id < n_gates, "aia_native: plan names gate ", id, " of ", n_gates);
    return id;
  }

  WeightSpec weight(const Plan& plan) {
    WeightSpec w;
    const int combine = next();
    TORCH_CHECK(combine == 0 || combine == 1, "aia_native: a weight combines its factors by product (0) or mean (1)");
    w.mean = combine == 1;
    const int n_factors = next();
    TORCH_CHECK(n_factors >= 0 && n_factors <= kMaxFactors, "aia_native: a weight has 0 to 2 factors");
    for (int k = 0; k < n_factors; ++k) {
      const int size = next();
      std::vector<int> ids;
      for (int j = 0; j < size; ++j) ids.push_back(gate(static_cast<int>(plan.gate_axis.size())));
      const auto axis = [&](int j) { return plan.gate_axis[ids[j]]; };
      TORCH_CHECK(size == 1 ? axis(0) == kAxisC
                            : size == 3 && axis(0) == kAxisT && axis(1) == kAxisH && axis(2) == kAxisW,
                  "aia_native: a factor is one C gate or the (T, H, W) gates");
      w.factors.push_back(ids);
    }
    return w;
  }

  bool done() const { return pos_ == desc_.size(); }

 private:
  at::IntArrayRef desc_;
  size_t pos_ = 0;
};

Plan parse_plan(at::IntArrayRef desc) {
  PlanReader r(desc);
  Plan plan;
  const int n_gates = r.next();
  TORCH_CHECK(n_gates > 0 && n_gates <= kMaxPlanGates, "aia_native: a plan has 1 to ", kMaxPlanGates, " gates");
  for (int g = 0; g < n_gates; ++g) {
    const int axis = r.next();
    TORCH_CHECK(axis >= kAxisC && axis <= kAxisW, "aia_native: unknown axis code ", axis);
    plan.gate_axis.push_back(axis);
  }
  const int n_stages = r.next();
  // input_grad sums one term for the output and one per stage, in fixed arrays of kMaxTerms.
  TORCH_CHECK(n_stages >= 0 && n_stages < kMaxTerms, "aia_native: a plan has 0 to ", kMaxTerms - 1, " stages");
  for (int s = 0; s < n_stages; ++s) {
    PlanStage stage;
    const int kind = r.next();
    TORCH_CHECK(kind == 0 || kind == 1, "aia_native: a stage pools along C (0) or T, H, W (1)");
    stage.axes = kind == 0 ? std::vector<int>{kAxisC} : std::vector<int>{kAxisT, kAxisH, kAxisW};
    stage.weight = r.weight(plan);
    TORCH_CHECK(r.next() == static_cast<int>(stage.axes.size()), "aia_native: a stage has one gate per axis");
    for (int axis : stage.axes) {
      const int g = r.gate(n_gates);
      TORCH_CHECK(plan.gate_axis[g] == axis, "aia_native: stage gate ", g, " pools another axis");
      stage.gates.push_back(g);
    }
    const int recompute = r.next();
    TORCH_CHECK(recompute == 0 || recompute == 1, "aia_native: a stage is kept (0) or recomputed (1)");
    stage.recompute = recompute == 1;
    plan.stages.push_back(stage);
  }
  plan.output = r.weight(plan);
  TORCH_CHECK(r.done(), "aia_native: plan encoding too long");
  return plan;
}

void encode_weight(const WeightSpec& w, std::vector<int64_t>& out) {
  out.push_back(w.mean ? 1 : 0);
  out.push_back(static_cast<int64_t>(w.factors.size()));
  for (const auto& factor : w.factors) {
    out.push_back(static_cast<int64_t>(factor.size()));
    out.insert(out.end(), factor.begin(), factor.end());
  }
}

// parse_plan's inverse: aia_native::plan_encoding_roundtrip(plan) returns encode_plan(parse_plan(plan)).
std::vector<int64_t> plan_encoding_roundtrip(at::IntArrayRef desc) {
  const Plan plan = parse_plan(desc);
  std::vector<int64_t> out = {static_cast<int64_t>(plan.gate_axis.size())};
  out.insert(out.end(), plan.gate_axis.begin(), plan.gate_axis.end());
  out.push_back(static_cast<int64_t>(plan.stages.size()));
  for (const PlanStage& stage : plan.stages) {
    out.push_back(stage.axes.size() == 1 ? 0 : 1);
    encode_weight(stage.weight, out);
    out.push_back(static_cast<int64_t>(stage.gates.size()));
    out.insert(out.end(), stage.gates.begin(), stage.gates.end());
    out.push_back(stage.recompute ? 1 : 0);
  }
  encode_weight(plan.output, out);
  return out;
}

// The limits parse_plan and the kernels assume, in the order of aia_kernels/plan.py's check:
// factors per weight, gates per factor, pooled-gradient items per upstream, input_grad terms, gates per plan.
std::vector<int64_t> plan_limits() { return {kMaxFactors, kMaxFactorGates, kMaxItems, kMaxTerms, kMaxPlanGates}; }

// x as (N, T, C, H, W): a 4-D (N*T, C, H, W) split by num_segments, or already that view
// (a 5-D input in any layout, aia_kernels/layouts.py), any strides: never a copy.
at::Tensor view5(const at::Tensor& x, int64_t num_segments) {
  if (x.dim() == 5) {
    TORCH_CHECK(x.size(1) == num_segments, "aia_native: the (N, T, C, H, W) view ", x.sizes(), " has T = ",
                x.size(1), " but num_segments = ", num_segments);
    return x;
  }
  TORCH_CHECK(x.dim() == 4, "aia_native: x must be (N*T, C, H, W) or (N, T, C, H, W), got ", x.sizes());
  TORCH_CHECK(num_segments > 0 && x.size(0) % num_segments == 0, "aia_native: N*T = ", x.size(0),
              " is not divisible by num_segments = ", num_segments);
  return x.view({x.size(0) / num_segments, num_segments, x.size(1), x.size(2), x.size(3)});
}

c10::optional<at::Tensor> at_or_none(const c10::List<c10::optional<at::Tensor>>& list, size_t i) {
  if (i >= list.size()) return c10::nullopt;
  const c10::optional<at::Tensor> t = list.get(i);
  return t.has_value() && t->defined() ? t : c10::nullopt;
}

void check_lengths(size_t n_gates, size_t conv, size_t modes, size_t eps) {
  TORCH_CHECK(conv == n_gates && modes == n_gates && eps == n_gates, "aia_native: the plan has ", n_gates,
              " gates but ", conv, " conv weights, ", modes, " BN modes and ", eps, " eps values");
}

// How many CUDA plan_forward / plan_backward calls took each path since the library
// loaded: [multi-launch walk, one cooperative launch]; read by aia_native::plan_*_cuda_paths.
std::atomic<int64_t> cuda_forward_paths[2] = {{0}, {0}};
std::atomic<int64_t> cuda_backward_paths[2] = {{0}, {0}};

std::vector<int64_t> plan_forward_cuda_paths() { return {cuda_forward_paths[0].load(), cuda_forward_paths[1].load()}; }
std::vector<int64_t> plan_backward_cuda_paths() {
  return {cuda_backward_paths[0].load(), cuda_backward_paths[1].load()};
}

#ifdef AIA_WITH_CUDA
std::vector<GateParams> gate_params(size_t n_gates, at::TensorList conv_weights,
                                    const c10::List<c10::optional<at::Tensor>>& bn_weights,
                                    const c10::List<c10::optional<at::Tensor>>& bn_biases,
                                    const c10::List<c10::optional<at::Tensor>>& running_means,
                                    const c10::List<c10::optional<at::Tensor>>& running_vars,
                                    at::IntArrayRef bn_modes, at::ArrayRef<double> eps) {
  std::vector<GateParams> params;
  for (size_t g = 0; g < n_gates; ++g) {
    params.push_back(GateParams{conv_weights[g], at_or_none(bn_weights, g), at_or_none(bn_biases, g),
                                at_or_none(running_means, g), at_or_none(running_vars, g), bn_modes[g], eps[g]});
  }
  return params;
}
#endif

// A stage's pooled tensors. Those of a stage the backward pools again are read only by its
// convs in this call (neither kept nor returned): on the CPU they are written straight into
// the convs' padded volumes (cpu::pool_for_conv), no padded copy made of them.
std::vector<at::Tensor> pool_stage(const at::Tensor& v, const GateSet& gates, const PlanStage& stage,
                                   bool with_argmax) {
#ifndef AIA_CUDA_EMULATION
  if (stage.recompute && !runs_on_cuda(v)) return cpu::pool_for_conv(v, gates, stage.weight, stage.axes, with_argmax);
#endif
  return on_device::pool(v, gates, stage.weight, stage.axes, with_argmax);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> plan_forward_op(
    const at::Tensor& x, int64_t num_segments, at::IntArrayRef plan_desc, at::TensorList conv_weights,
    const c10::List<c10::optional<at::Tensor>>& bn_weights, const c10::List<c10::optional<at::Tensor>>& bn_biases,
    const c10::List<c10::optional<at::Tensor>>& running_means,
    const c10::List<c10::optional<at::Tensor>>& running_vars, at::IntArrayRef bn_modes, at::ArrayRef<double> eps) {
  const Plan plan = parse_plan(plan_desc);
  const size_t n_gates = plan.gate_axis.size();
  check_lengths(n_gates, conv_weights.size(), bn_modes.size(), eps.size());
  const at::Tensor v = view5(x, num_segments);
#ifdef AIA_WITH_CUDA
  if (runs_on_cuda(x) && cuda::persistent_forward_applies(v, plan)) {  // small shapes: one launch
    const auto params = gate_params(n_gates, conv_weights, bn_weights, bn_biases, running_means, running_vars,
                                    bn_modes, eps);
    auto result = cuda::plan_forward_persistent(x, v, plan, params);
    ++cuda_forward_paths[1];
    return result;
  }
#endif
  if (runs_on_cuda(x)) ++cuda_forward_paths[0];
  GateSet gates;
  gates.axis = plan.gate_axis;
  gates.values.resize(n_gates);
  std::vector<at::Tensor> saved(kSavedPerGate * n_gates), stats(n_gates);
  for (const PlanStage& stage : plan.stages) {
    // The max positions of a stage the backward pools again are not kept, so not tracked.
    const std::vector<at::Tensor> pooled = pool_stage(v, gates, stage, !stage.recompute);
    for (size_t i = 0; i < stage.gates.size(); ++i) {
      const int g = stage.gates[i];
      const at::Tensor &P = pooled[2 * i], &argmax = pooled[2 * i + 1];
      // A recomputed stage's P, argmax and z are pooled again by the backward (recompute_stages):
      // its z is not kept, so its gate values may come without it.
      const auto gate_step = stage.recompute ? gate_forward_value_op : gate_forward_op;
      auto [z_or_value, scale_shift, bn_stats] =
          gate_step(P, conv_weights[g], bn_modes[g], at_or_none(bn_weights, g), at_or_none(bn_biases, g),
                    at_or_none(running_means, g), at_or_none(running_vars, g), eps[g]);
      gates.values[g] = stage.recompute ? z_or_value : gate_value(z_or_value, scale_shift);
      saved[kSavedPerGate * g] = stage.recompute ? at::empty({0}, P.options()) : P;
      saved[kSavedPerGate * g + 1] = stage.recompute ? at::empty({0}, argmax.options()) : argmax;
      saved[kSavedPerGate * g + 2] = stage.recompute ? at::empty({0}, z_or_value.options()) : z_or_value;
      saved[kSavedPerGate * g + 3] = scale_shift;
      stats[g] = bn_stats;
    }
  }
  at::Tensor out = at::empty_like(x);
  const at::Tensor out5 = out.view(v.sizes());
  on_device::apply(v, gates, plan.output, out5);
  return {out, saved, at::stack(stats)};
}

// The saved tensors with those of every recomputed stage filled in (executor.recompute): the
// stage pooled again in plan order with the forward's kernels (its weight's gates are kept or
// recomputed before it), its gates' z the conv of the pooled tensor; the kept scale_shift
// folds the BN as in the forward, so no BN statistic is computed. `gates` receives every
// gate's value.
std::vector<at::Tensor> recompute_stages(const at::Tensor& v, const Plan& plan, at::TensorList saved,
                                         at::TensorList conv_weights, GateSet& gates) {
  std::vector<at::Tensor> full(saved.begin(), saved.end());
  gates.axis = plan.gate_axis;
  gates.values.assign(plan.gate_axis.size(), at::Tensor());
  for (const PlanStage& stage : plan.stages) {
    if (stage.recompute) continue;
    for (int g : stage.gates) gates.values[g] = gate_value(full[kSavedPerGate * g + 2], full[kSavedPerGate * g + 3]);
  }
  for (const PlanStage& stage : plan.stages) {
    if (!stage.recompute) continue;
    const std::vector<at::Tensor> pooled = pool_stage(v, gates, stage, /*with_argmax=*/true);
    for (size_t i = 0; i < stage.gates.size(); ++i) {
      const int g = stage.gates[i];
      const at::Tensor& ss = full[kSavedPerGate * g + 3];
      const at::Tensor z = std::get<0>(gate_forward_step(pooled[2 * i], conv_weights[g], /*bn_mode none*/ 0,
                                                         c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, 0.0));
      full[kSavedPerGate * g] = pooled[2 * i];
      full[kSavedPerGate * g + 1] = pooled[2 * i + 1];
      full[kSavedPerGate * g + 2] = z;
      gates.values[g] = gate_value(z, ss);
    }
  }
  return full;
}

// The forward's saved tensors as this plan reads them: every gate's scale_shift, and P,
// argmax and z of every stage the backward does not pool again (a list from another plan,
// input or module would otherwise be read out of bounds).
void check_saved(const Plan& plan, const at::Tensor& v, at::TensorList saved) {
  const Dims d = dims_of(v);
  const at::ScalarType acc = acc_type(v.scalar_type());
  for (const PlanStage& stage : plan.stages) {
    for (int g : stage.gates) {
      const std::vector<int64_t> shape = gate_shape(plan.gate_axis[g], d);
      std::vector<int64_t> pooled_shape = shape;
      pooled_shape.insert(pooled_shape.begin() + 1, 2);
      const auto check = [&](int k, at::IntArrayRef expected, at::ScalarType dtype, const char* name) {
        check_small(saved[kSavedPerGate * g + k], expected, v, dtype,
                    std::string("saved ") + name + " of gate " + std::to_string(g));
      };
      check(3, {2}, acc, "scale_shift");
      if (stage.recompute) continue;
      check(0, pooled_shape, acc, "pooled tensor");
      check(1, shape, at::kInt, "argmax");
      check(2, shape, acc, "z");
    }
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> plan_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, int64_t num_segments, at::IntArrayRef plan_desc,
    at::TensorList conv_weights, const c10::List<c10::optional<at::Tensor>>& bn_weights, at::IntArrayRef bn_modes,
    at::ArrayRef<double> eps, at::TensorList saved, const at::Tensor& bn_stats, at::IntArrayRef needs) {
  const Plan plan = parse_plan(plan_desc);
  const size_t n_gates = plan.gate_axis.size();
  check_lengths(n_gates, conv_weights.size(), bn_modes.size(), eps.size());
  TORCH_CHECK(saved.size() == kSavedPerGate * n_gates, "aia_native: expected ", kSavedPerGate * n_gates,
              " saved tensors, got ", saved.size());
  TORCH_CHECK(needs.size() == 1 + 3 * n_gates, "aia_native: needs = [x] + [conv, bn weight, bn bias] per gate");
  const at::Tensor v = view5(x, num_segments);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "aia_native: grad_out must match x");
  const at::Tensor dout = view5(grad_out, num_segments);
  check_saved(plan, v, saved);
  TORCH_CHECK(bn_stats.dim() == 2 && bn_stats.size(0) == static_cast<int64_t>(n_gates) && bn_stats.size(1) == 2,
              "aia_native: bn_stats must be (gates, 2) = (", n_gates, ", 2), got ", bn_stats.sizes());
#ifdef AIA_WITH_CUDA
  if (runs_on_cuda(x) && cuda::persistent_backward_applies(v, plan)) {  // small shapes: one launch
    const c10::List<c10::optional<at::Tensor>> none;  // the backward reads no bias or running stats
    const auto params = gate_params(n_gates, conv_weights, bn_weights, none, none, none, bn_modes, eps);
    auto result = cuda::plan_backward_persistent(grad_out, x, v, plan, params, saved, bn_stats, needs);
    ++cuda_backward_paths[1];
    return result;
  }
#endif
  if (runs_on_cuda(x)) ++cuda_backward_paths[0];
  const bool need_x = needs[0] != 0;
  const auto need = [&](int k, size_t g) -> int64_t { return needs[1 + k * n_gates + g] != 0; };  // k: 0 conv, 1 bn w, 2 bn b

  GateSet gates;
  const std::vector<at::Tensor> kept = recompute_stages(v, plan, saved, conv_weights, gates);
  std::vector<at::Tensor> gate_grads(n_gates);  // d loss / d gate, summed over its uses

  std::vector<Term> terms;
  const auto add_weight_grads = [&](const WeightSpec& weight, const UpstreamSpec& upstream) {
    if (weight.factors.empty()) return;
    const Term term{weight, upstream};
    const std::vector<at::Tensor> grads = on_device::weight_grad(v, term, gates);
    size_t i = 0;
    for (const auto& factor : weight.factors) {
      for (int g : factor) {
        // In place: each sum is a fresh tensor of this call (an out-of-place add was 6 allocations a step).
        if (gate_grads[g].defined()) gate_grads[g].add_(grads[i]);
        else gate_grads[g] = grads[i];
        ++i;
      }
    }
  };

  UpstreamSpec output_upstream;
  output_upstream.dout = dout;
  add_weight_grads(plan.output, output_upstream);
  terms.push_back(Term{plan.output, output_upstream});
  std::vector<at::Tensor> d_conv(n_gates), d_bn_w(n_gates), d_bn_b(n_gates);
  // Reverse order: a gate's gradient is complete once every later stage is done.
  for (auto it = plan.stages.rbegin(); it != plan.stages.rend(); ++it) {
    const PlanStage& stage = *it;
    const bool need_pooled = need_x || !stage.weight.factors.empty();
    UpstreamSpec pooled_grads;
    for (int g : stage.gates) {
      const at::Tensor& z = kept[kSavedPerGate * g + 2];
      const at::Tensor gate_grad = gate_grads[g].defined() ? gate_grads[g] : at::zeros_like(z);
      const std::vector<int64_t> flags = {need_pooled, need(0, g), need(1, g), need(2, g)};
      auto [d_pooled, dc, dw, db] =
          gate_backward_with_value(gate_grad, kept[kSavedPerGate * g], z, kept[kSavedPerGate * g + 3],
                                   gates.values[g], bn_stats[g], conv_weights[g], bn_modes[g],
                                   at_or_none(bn_weights, g), eps[g], flags);
      d_conv[g] = dc;
      d_bn_w[g] = dw;
      d_bn_b[g] = db;
      pooled_grads.grad.push_back(d_pooled);
      pooled_grads.argmax.push_back(kept[kSavedPerGate * g + 1]);
      pooled_grads.axis.push_back(plan.gate_axis[g]);
    }
    if (need_pooled) {
      add_weight_grads(stage.weight, pooled_grads);
      terms.push_back(Term{stage.weight, pooled_grads});
    }
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_x) {
    grad_x = at::empty_like(x);
    const at::Tensor gx5 = grad_x.view(v.sizes());
    on_device::input_grad(terms, gates, gx5);
  }
  return {grad_x, d_conv, d_bn_w, d_bn_b};
}

}  // namespace
}  // namespace aia

TORCH_LIBRARY_FRAGMENT(aia_native, m) {
  m.def("plan_forward(Tensor x, int num_segments, int[] plan, Tensor[] conv_weights, Tensor?[] bn_weights, "
        "Tensor?[] bn_biases, Tensor?[] running_means, Tensor?[] running_vars, int[] bn_modes, float[] eps) "
        "-> (Tensor, Tensor[], Tensor)");
  m.def("plan_backward(Tensor grad_out, Tensor x, int num_segments, int[] plan, Tensor[] conv_weights, "
        "Tensor?[] bn_weights, int[] bn_modes, float[] eps, Tensor[] saved, Tensor bn_stats, int[] needs) "
        "-> (Tensor, Tensor[], Tensor[], Tensor[])");
  // Debug counters (no tensors, one kernel for all devices): [multi-launch, persistent].
  m.def("plan_forward_cuda_paths() -> int[]", &aia::plan_forward_cuda_paths);
  m.def("plan_backward_cuda_paths() -> int[]", &aia::plan_backward_cuda_paths);
  // The plan encoding and limits as this library reads them (tests compare them with aia_kernels/plan.py).
  m.def("plan_encoding_roundtrip(int[] plan) -> int[]", &aia::plan_encoding_roundtrip);
  m.def("plan_limits() -> int[]", &aia::plan_limits);
}

TORCH_LIBRARY_IMPL(aia_native, CPU, m) {
  m.impl("plan_forward", &aia::plan_forward_op);
  m.impl("plan_backward", &aia::plan_backward_op);
}

#ifdef AIA_WITH_CUDA
TORCH_LIBRARY_IMPL(aia_native, CUDA, m) {
  m.impl("plan_forward", &aia::plan_forward_op);
  m.impl("plan_backward", &aia::plan_backward_op);
}
#endif
