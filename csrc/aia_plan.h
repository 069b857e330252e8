// The parsed plan of aia_native::plan_forward / plan_backward (its int encoding is
// documented at the top of aia_plan.cpp), shared by the plan walker (aia_plan.cpp) and
// the one-launch CUDA forward (aia_cuda_persistent.cu), and that forward's entry points.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "aia_host.h"

namespace aia {

constexpr int kMaxPlanGates = 16;  // gates in one plan (aia_kernels/plan.py: MAX_GATES)

struct PlanStage {
  std::vector<int> axes;  // pooled axes, in gate order
  WeightSpec weight;
  std::vector<int> gates;
  // The backward pools it again instead of reading its P, argmax and z from the forward's
  // saved tensors (empty for such a stage; its scale_shift is kept). aia_kernels/plan.py decides.
  bool recompute = false;
};

constexpr int kSavedPerGate = 4;  // pooled P, argmax, z, scale_shift (as executor.SAVED_PER_GATE)

struct Plan {
  std::vector<int> gate_axis;
  std::vector<PlanStage> stages;
  WeightSpec output;
};

// One gate's conv weight and BN settings, as plan_forward receives them.
struct GateParams {
  at::Tensor conv_weight;                                  // (1, 2, 3, 3, 3), any floating dtype
  c10::optional<at::Tensor> bn_weight, bn_bias, running_mean, running_var;  // one value each, or none
  int64_t bn_mode;                                         // 0 none, 1 batch statistics, 2 running statistics
  double eps;
};

namespace cuda {
// Whether plan_forward of `v` (the (N, T, C, H, W) view of x) runs as one cooperative
// launch: AIA_NATIVE_CUDA_PERSISTENT=0 never, =1 whenever possible, unset when x has at
// most AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS elements (default in aia_cuda_persistent.cu);
// "possible" = CUDA tensor of a supported dtype, a device with cooperative launch, a
// plan within the kernel's fixed limits.
bool persistent_forward_applies(const at::Tensor& v, const Plan& plan);

// plan_forward in one launch: the same outputs as the multi-launch walk in aia_plan.cpp
// (out, saved P/argmax/z/scale_shift per gate, those of a recomputed stage empty but its
// scale_shift, stacked BN statistics).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> plan_forward_persistent(
    const at::Tensor& x, const at::Tensor& v, const Plan& plan, const std::vector<GateParams>& params);

// The same for plan_backward (the same switch and threshold; at most 4 stages).
bool persistent_backward_applies(const at::Tensor& v, const Plan& plan);

// plan_backward in one launch: (grad_x, d conv weights, d BN weights, d BN biases), the
// walk's outputs, empty where `needs` says not needed. `dout` is grad_out, x-shaped. The
// recomputed stages are pooled again inside the launch, with the forward launch's code.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
plan_backward_persistent(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& v, const Plan& plan,
                         const std::vector<GateParams>& params, at::TensorList saved, const at::Tensor& bn_stats,
                         at::IntArrayRef needs);
}  // namespace cuda

}  // namespace aia
