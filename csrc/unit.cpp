// resnet_fused::conv_bn_act_eager: the eager Conv -> BatchNorm -> (add) -> activation unit as ONE
// op call and, with autograd, ONE autograd node.
//
// The maths are eager PyTorch's own ops, called as F.conv2d, F.batch_norm, Tensor.add_ and
// Tensor.relu_ (or the activation's own op) call them (at::conv2d; at::batch_norm's
// at::_batch_norm_impl_index with torch's cuDNN switch, which off CUDA is
// at::native_batch_norm; add_; relu_), so outputs,
// running statistics and num_batches_tracked are bit-identical to the unconverted modules'.
// The backward applies the derivative formulas autograd runs for those ops, in the same
// order and with the same masks (ReluBackward0: threshold_backward; AddBackward0: the
// gradient as is; NativeBatchNormBackward0 / CudnnBatchNormBackward0 /
// MiopenBatchNormBackward0; ConvolutionBackward0: convolution_backward), so every gradient
// is bit-identical too. What it saves is host time: one dispatcher call instead of three
// Python calls, one autograd node instead of three (resnet_fused/functional/conv_bn_act.py:
// `_eager_unit`, the plans; resnet_fused/modules.py: `_run_plan`).
//
// Kernels: at the Autograd key, a node of its own (ConvBnActEagerBackward, built as
// autograd's generated nodes are: next edges, saved variables, set_history) when autograd
// records the call, and eager's ops below autograd otherwise; at CompositeExplicitAutograd
// the forward for calls that never reach the Autograd key (inference tensors). Inputs with
// forward-mode gradients run eager's ops with autograd on, so eager's own nodes and
// forward-mode formulas apply. A gradient of the gradient (double backward) is refused
// with an error naming the op.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_batch_norm_impl_index.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/hardswish_backward.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/hardtanh_backward.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/cudnn_batch_norm_backward.h>
#include <ATen/ops/miopen_batch_norm_backward.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/python_numbers.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "act.h"
#include "py_functions.h"

#include <array>
#include <optional>
#include <type_traits>

namespace resnet_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

constexpr const char* kOpName = "resnet_fused::conv_bn_act_eager";

bool given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

bool requires_grad(const std::optional<at::Tensor>& t) {
  return given(t) && t->requires_grad();
}

bool has_forward_grad(const std::optional<at::Tensor>& t) {
  return given(t) && t->_fw_grad(/*level=*/0).defined();
}

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return given(t) ? *t : at::Tensor();
}

void check_per_channel(const std::optional<at::Tensor>& t, const char* name,
                       const c10::SymInt& channels) {
  if (given(t)) {
    TORCH_CHECK(t->sym_numel() == channels, kOpName, ": ", name, " should contain ", channels,
                " elements (one per output channel), got ", t->sym_numel());
  }
}

// What the forward computed: the output and what the backward needs.
struct UnitForward {
  at::Tensor out;        // act(bn(y) [+ residual])
  at::Tensor pre;        // bn(y) [+ residual], kept where act's derivative needs it
  at::Tensor y;          // the convolution's output (BatchNorm's input)
  at::Tensor save_mean;  // BatchNorm's saved statistics (result1, result2)
  at::Tensor save_var;
  at::Tensor reserve;      // cuDNN's reserve space (undefined or empty elsewhere)
  int64_t impl_index = 0;  // 0: native, 1: cuDNN, 2: MIOpen (at::_batch_norm_impl_index)
};

// The activation with eager's op, in place where its derivative reads the output (as
// nn.ReLU(inplace=True) etc.); else out of place, keeping the pre-activation (what eager's
// SiLU, Hardswish and GELU save).
void apply_act(UnitForward& f, int64_t act, double param) {
  if (act == kActIdentity) {
    return;
  }
  if (act_from_output(act, param)) {
    if (act == kActReLU) {
      f.out.relu_();
    } else if (act == kActReLU6) {
      at::hardtanh_(f.out, 0.0, 6.0);
    } else {
      at::leaky_relu_(f.out, param);
    }
    return;
  }
  f.pre = f.out;
  switch (act) {
    case kActLeakyReLU:
      f.out = at::leaky_relu(f.pre, param);
      break;
    case kActSiLU:
      f.out = at::silu(f.pre);
      break;
    case kActHardswish:
      f.out = at::hardswish(f.pre);
      break;
    case kActSigmoid:
      f.out = at::sigmoid(f.pre);
      break;
    default:
      f.out = at::gelu(f.pre, act == kActGELUTanh ? "tanh" : "none");
  }
}

// grad * act' with eager's backward ops, from `saved`: the output where act_from_output,
// else the pre-activation.
at::Tensor act_backward(const at::Tensor& grad, const at::Tensor& saved, int64_t act,
                        double param) {
  switch (act) {
    case kActIdentity:
      return grad;
    case kActReLU:
      return at::threshold_backward(grad, saved, 0);  // ReluBackward0
    case kActReLU6:
      return at::hardtanh_backward(grad, saved, 0.0, 6.0);
    case kActLeakyReLU:
      return at::leaky_relu_backward(grad, saved, param, act_from_output(act, param));
    case kActSigmoid:  // (eager's SigmoidBackward0 reads its output: the same values)
      return at::sigmoid_backward(grad, at::sigmoid(saved));
    case kActSiLU:
      return at::silu_backward(grad, saved);
    case kActHardswish:
      return at::hardswish_backward(grad, saved);
    default:
      return at::gelu_backward(grad, saved, act == kActGELUTanh ? "tanh" : "none");
  }
}

// The unit with eager's ops. Autograd records these ops (eager's own nodes) unless the
// caller dispatches below autograd.
UnitForward unit_forward(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& conv_bias,
                         const std::optional<at::Tensor>& bn_weight,
                         const std::optional<at::Tensor>& bn_bias,
                         const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var,
                         const std::optional<at::Tensor>& num_batches_tracked,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups, bool training, std::optional<double> momentum, double eps,
                         const std::optional<at::Tensor>& residual, int64_t act,
                         double act_param) {
  check_act(act);
  TORCH_CHECK(input.dim() == 4, kOpName, ": input must be a 4-D tensor (N, C, H, W), got ",
              input.dim(), "-D with shape ", input.sizes());
  // nn.BatchNorm2d.forward's bookkeeping: num_batches_tracked += 1, and momentum=None is
  // the cumulative average 1/num_batches_tracked (the caller passes the counter only
  // where the module counts: in training, with track_running_stats).
  double factor = momentum.value_or(0.0);
  if (given(num_batches_tracked)) {
    num_batches_tracked->add_(1);
    if (!momentum.has_value()) {
      factor = 1.0 / num_batches_tracked->item<double>();  // Python's 1.0 / float(tracked)
    }
  }
  UnitForward f;
  f.y = at::conv2d(input, weight, conv_bias, stride, padding, dilation, groups);
  // F.batch_norm -> at::batch_norm -> at::_batch_norm_impl_index (with torch's cuDNN
  // switch), which for a non-empty input off CUDA checks the per-channel sizes and calls
  // at::native_batch_norm: done here directly (no reserve-space allocation, one dispatch).
  if (f.y.is_cuda() || f.y.sym_numel() == 0) {
    std::tie(f.out, f.save_mean, f.save_var, f.reserve, f.impl_index) =
        at::_batch_norm_impl_index(f.y, bn_weight, bn_bias, running_mean, running_var, training,
                                   factor, eps, at::globalContext().userEnabledCuDNN());
  } else {
    const c10::SymInt channels = f.y.sym_size(1);
    TORCH_CHECK(training || (given(running_mean) && given(running_var)), kOpName,
                ": running_mean and running_var must be defined in evaluation mode");
    check_per_channel(running_mean, "running_mean", channels);
    check_per_channel(running_var, "running_var", channels);
    check_per_channel(bn_weight, "bn_weight", channels);
    check_per_channel(bn_bias, "bn_bias", channels);
    std::tie(f.out, f.save_mean, f.save_var) = at::native_batch_norm(
        f.y, bn_weight, bn_bias, running_mean, running_var, training, factor, eps);
  }
  if (training) {
    // The running statistics were written through their data pointers: bump their
    // version counters, as the library's other ops that write them do (an eval fold
    // cached on the versions then sees the change). Inference tensors have none.
    for (const auto* stat : {&running_mean, &running_var}) {
      if (given(*stat) && !(*stat)->is_inference()) {
        (*stat)->unsafeGetTensorImpl()->bump_version();
      }
    }
  }
  if (given(residual)) {
    TORCH_CHECK(residual->sym_sizes() == f.out.sym_sizes(), kOpName,
                ": residual must have the output's shape ", f.out.sym_sizes(), ", got ",
                residual->sym_sizes());
    f.out.add_(*residual);
  }
  apply_act(f, act, act_param);
  return f;
}

// The forward-only kernel (CompositeExplicitAutograd: calls that do not reach the
// Autograd key).
at::Tensor conv_bn_act_eager(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& conv_bias,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& num_batches_tracked,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool training,
                             std::optional<double> momentum, double eps,
                             const std::optional<at::Tensor>& residual, int64_t act,
                             double act_param) {
  return unit_forward(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                      num_batches_tracked, stride, padding, dilation, groups, training,
                      momentum, eps, residual, act, act_param)
      .out;
}

// What the backward reads besides the saved tensors.
struct UnitParams {
  std::array<int64_t, 2> stride{}, padding{}, dilation{};
  int64_t groups = 1;
  std::optional<c10::SymInt> c_out;  // the conv bias's size (none without a conv bias)
  int64_t impl_index = 0;
  double eps = 0.0;
  bool training = true;
  int64_t act = kActReLU;
  double act_param = 0.0;
};

struct Saved {
  // out: the unit's output, or its pre-activation where act's derivative needs that.
  at::Tensor x, w, y, out, bn_w, save_mean, save_var, reserve, running_mean, running_var;
};

// The gradients of (input, conv weight, conv bias, BN weight, BN bias, residual): the
// formulas autograd runs for the eager ops, in the same order, with the same masks.
std::array<at::Tensor, 6> unit_backward(const at::Tensor& grad_out, const Saved& s,
                                        const UnitParams& p, std::array<bool, 6> need) {
  const auto [need_x, need_w, need_cb, need_bw, need_bb, need_res] = need;
  std::array<at::Tensor, 6> grads;
  // The activation's node (ReluBackward0 and the like).
  const at::Tensor g = act_backward(grad_out, s.out, p.act, p.act_param);
  // AddBackward0: the same gradient for the BN output and the residual.
  if (need_res) {
    grads[5] = g;
  }
  const bool need_y = need_x || need_w || need_cb;
  if (!(need_y || need_bw || need_bb)) {
    return grads;
  }
  at::Tensor gy, gbw, gbb;
  if (p.training && p.impl_index == 1) {
    // CudnnBatchNormBackward0 (the reserve space copied: cuDNN may write it).
    std::tie(gy, gbw, gbb) = at::cudnn_batch_norm_backward(
        s.y, g.contiguous(s.y.suggest_memory_format()), s.bn_w, s.running_mean, s.running_var,
        s.save_mean, s.save_var, p.eps, s.reserve.clone());
  } else if (p.training && p.impl_index == 2) {
    // MiopenBatchNormBackward0.
    std::tie(gy, gbw, gbb) =
        at::miopen_batch_norm_backward(s.y, g.contiguous(), s.bn_w, s.running_mean,
                                       s.running_var, s.save_mean, s.save_var, p.eps);
  } else {
    // NativeBatchNormBackward0 (and the eval-mode branch of the other two).
    std::tie(gy, gbw, gbb) = at::native_batch_norm_backward(
        g, s.y, s.bn_w, s.running_mean, s.running_var, s.save_mean, s.save_var, p.training,
        p.eps, {need_y, need_bw, need_bb});
  }
  if (need_bw) {
    grads[3] = gbw;
  }
  if (need_bb) {
    grads[4] = gbb;
  }
  if (need_y) {
    // ConvolutionBackward0.
    at::OptionalSymIntArrayRef bias_sizes;
    if (p.c_out.has_value()) {
      bias_sizes = c10::SymIntArrayRef(&*p.c_out, 1);
    }
    const std::array<c10::SymInt, 2> output_padding{0, 0};
    auto [gx, gw, gcb] = at::convolution_backward_symint(
        gy, s.x, s.w, bias_sizes, c10::fromIntArrayRefSlow(p.stride),
        c10::fromIntArrayRefSlow(p.padding), c10::fromIntArrayRefSlow(p.dilation),
        /*transposed=*/false, output_padding, p.groups, {need_x, need_w, need_cb});
    grads[0] = need_x ? gx : at::Tensor();
    grads[1] = need_w ? gw : at::Tensor();
    grads[2] = need_cb ? gcb : at::Tensor();
  }
  return grads;
}

// What the backward returns when its graph is recorded (backward(create_graph=True)): the
// gradients, through a node whose own backward refuses to run. Its outputs are the
// defined gradients, their positions in `positions`.
struct UnitDoubleBackward : public torch::autograd::Function<UnitDoubleBackward> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out,
                               const at::Tensor& x, const at::Tensor& w,
                               const std::optional<at::Tensor>& bn_w, const Saved& s,
                               const UnitParams& p, std::array<bool, 6> need,
                               std::vector<size_t>* positions) {
    const auto grads = unit_backward(grad_out, s, p, need);
    variable_list defined;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (grads[i].defined()) {
        defined.push_back(grads[i]);
        positions->push_back(i);
      }
    }
    return defined;
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false, kOpName,
                ": double backward is not supported (a gradient of this unit's gradient); "
                "where second derivatives are needed, run the model unconverted "
                "(resnet_fused.unfuse).");
    return {};
  }
};

// The unit's autograd node. Next edges: input, conv weight, conv bias, BN weight, BN
// bias, residual (invalid where absent or not requiring grad).
struct ConvBnActEagerBackward : public torch::autograd::Node {
  SavedVariable x_, w_, y_, out_, bn_w_, save_mean_, save_var_, reserve_, running_mean_,
      running_var_;
  UnitParams params_;
  bool out_is_output_ = false;  // out_ saved as the node's own output (not the pre-activation)

  std::string name() const override {
    return "ConvBnActEagerBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &w_, &y_, &out_, &bn_w_, &save_mean_, &save_var_, &reserve_,
                             &running_mean_, &running_var_}) {
      v->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::array<bool, 6> need{};
    for (size_t i = 0; i < need.size(); ++i) {
      need[i] = task_should_compute_output(i);
    }
    const Saved s{x_.unpack(),         w_.unpack(),         y_.unpack(),
                  out_.unpack(getptr()), bn_w_.unpack(),      save_mean_.unpack(),
                  save_var_.unpack(),  reserve_.unpack(),   running_mean_.unpack(),
                  running_var_.unpack()};
    std::array<at::Tensor, 6> g;
    if (at::GradMode::is_enabled()) {  // backward(create_graph=True)
      std::vector<size_t> positions;
      const auto r = UnitDoubleBackward::apply(grads[0], s.x, s.w,
                                               std::optional<at::Tensor>(s.bn_w), s, params_, need,
                                               &positions);
      for (size_t i = 0; i < positions.size(); ++i) {
        g[positions[i]] = r[i];
      }
    } else {
      g = unit_backward(grads[0], s, params_, need);
    }
    return variable_list(g.begin(), g.end());
  }

  // Compiled autograd (torch._dynamo.compiled_autograd): the node's key -- its saved
  // tensors (or their unpack hooks) and parameters -- and, when the backward graph is
  // traced, one opaque call of unit_backward on the swapped-in saved tensors (as a C++
  // autograd Function that is not traceable is run), which the compiled graph runs as is.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(std::string("resnet_fused::ConvBnActEagerBackward"));
    args.collect(x_, false);
    args.collect(w_, false);
    args.collect(y_, false);
    args.collect(out_, out_is_output_);
    args.collect(bn_w_, false);
    args.collect(save_mean_, false);
    args.collect(save_var_, false);
    args.collect(reserve_, false);
    args.collect(running_mean_, false);
    args.collect(running_var_, false);
    for (const auto* a : {&params_.stride, &params_.padding, &params_.dilation}) {
      args.collect((*a)[0]);
      args.collect((*a)[1]);
    }
    args.collect(params_.groups);
    args.collect(params_.c_out);
    args.collect(params_.impl_index);
    args.collect(params_.eps);
    args.collect(params_.training);
    args.collect(params_.act);
    args.collect(params_.act_param);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    std::array<SavedVariable*, 10> vars{&x_,        &w_,        &y_,       &out_,
                                        &bn_w_,     &save_mean_, &save_var_, &reserve_,
                                        &running_mean_, &running_var_};
    for (SavedVariable* v : vars) {
      saved.before(*v);
    }
    saved.before(params_.c_out);
    std::vector<c10::IValue> packed;
    packed.reserve(vars.size() + 12);
    for (SavedVariable* v : vars) {
      packed.emplace_back(v == &out_ ? v->unpack(getptr()) : v->unpack());
    }
    auto pair = [](const std::array<int64_t, 2>& a) { return std::vector<int64_t>{a[0], a[1]}; };
    packed.emplace_back(pair(params_.stride));
    packed.emplace_back(pair(params_.padding));
    packed.emplace_back(pair(params_.dilation));
    packed.emplace_back(params_.groups);
    packed.emplace_back(params_.c_out.has_value() ? c10::IValue(*params_.c_out) : c10::IValue());
    packed.emplace_back(params_.impl_index);
    packed.emplace_back(params_.eps);
    packed.emplace_back(params_.training);
    packed.emplace_back(params_.act);
    packed.emplace_back(params_.act_param);
    c10::List<bool> need;
    for (size_t i = 0; i < num_outputs(); ++i) {
      need.push_back(task_should_compute_output(i));
    }
    packed.emplace_back(std::move(need));
    std::vector<at::TypePtr> schema;
    schema.reserve(packed.size());
    for (const auto& iv : packed) {
      schema.emplace_back(iv.isTensor() ? at::TensorType::get() : iv.type());
    }
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    const std::string fn = py->bind_function(saved.get_py_compiler(), name(),
                                             &unit_backward_functional, schema,
                                             /*is_custom_function=*/true,
                                             /*is_traceable=*/false);
    const auto metadata =
        torch::dynamo::autograd::IValuePacker<std::vector<std::optional<
            torch::autograd::InputMetadata>>>::pack(torch::dynamo::autograd::get_input_metadata(
            next_edges()));
    variable_list out =
        py->call_function(saved.get_py_compiler(), "apply_functional", fn, grads, packed, metadata);
    for (SavedVariable* v : vars) {
      saved.after(*v);
    }
    saved.after(params_.c_out);
    return out;
  }

  // The compiled graph's call: unit_backward from the packed arguments above.
  static variable_list unit_backward_functional(const variable_list& grads,
                                                const std::vector<c10::IValue>& args) {
    TORCH_CHECK(args.size() == 21, kOpName, ": compiled autograd passed ", args.size(),
                " arguments to the unit's backward, expected 21");
    auto tensor = [&](size_t i) { return args[i].isTensor() ? args[i].toTensor() : at::Tensor(); };
    const Saved s{tensor(0), tensor(1), tensor(2), tensor(3), tensor(4),
                  tensor(5), tensor(6), tensor(7), tensor(8), tensor(9)};
    UnitParams p;
    auto pair = [&](size_t i, std::array<int64_t, 2>& out) {
      const auto v = args[i].toIntVector();
      TORCH_CHECK(v.size() == 2, kOpName, ": expected two values");
      out = {v[0], v[1]};
    };
    pair(10, p.stride);
    pair(11, p.padding);
    pair(12, p.dilation);
    p.groups = args[13].toInt();
    if (!args[14].isNone()) {
      p.c_out = args[14].toSymInt();
    }
    p.impl_index = args[15].toInt();
    p.eps = args[16].toDouble();
    p.training = args[17].toBool();
    p.act = args[18].toInt();
    p.act_param = args[19].toDouble();
    const auto flags = args[20].toBoolList();
    std::array<bool, 6> need{};
    for (size_t i = 0; i < need.size() && i < flags.size(); ++i) {
      need[i] = flags.get(i);
    }
    const auto g = unit_backward(grads[0], s, p, need);
    return variable_list(g.begin(), g.end());
  }
};

// A new autograd node as this torch holds them: torch 2.14 keeps nodes in
// c10::intrusive_ptr (Node derives from c10::intrusive_ptr_target), earlier releases in
// std::shared_ptr (Node derives from std::enable_shared_from_this). The branch not taken
// is never instantiated (it depends on N).
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>) {
    return c10::make_intrusive<N>();
  } else {
    return std::make_shared<N>();
  }
}

at::Tensor conv_bn_act_eager_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    std::optional<double> momentum, double eps, const std::optional<at::Tensor>& residual,
    int64_t act, double act_param) {
  const bool record =
      at::GradMode::is_enabled() &&
      (input.requires_grad() || weight.requires_grad() || requires_grad(conv_bias) ||
       requires_grad(bn_weight) || requires_grad(bn_bias) || requires_grad(residual));
  if (!record) {
    at::AutoDispatchBelowAutograd below;  // (ADInplaceOrView still bumps the counter's version)
    return unit_forward(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                        num_batches_tracked, stride, padding, dilation, groups, training,
                        momentum, eps, residual, act, act_param)
        .out;
  }
  if (input._fw_grad(/*level=*/0).defined() || weight._fw_grad(/*level=*/0).defined() ||
      has_forward_grad(conv_bias) || has_forward_grad(bn_weight) || has_forward_grad(bn_bias) ||
      has_forward_grad(residual)) {
    // Forward-mode AD: eager's ops with autograd on (their nodes, their tangents).
    return unit_forward(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                        num_batches_tracked, stride, padding, dilation, groups, training,
                        momentum, eps, residual, act, act_param)
        .out;
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOpName,
              ": stride, padding and dilation must have two values each");
  auto node = make_node<ConvBnActEagerBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(
      input, weight, value_or_undefined(conv_bias), value_or_undefined(bn_weight),
      value_or_undefined(bn_bias), value_or_undefined(residual)));
  UnitForward f;
  {
    at::AutoDispatchBelowAutograd below;  // eager's ops, recorded by this node only
    f = unit_forward(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                     num_batches_tracked, stride, padding, dilation, groups, training, momentum,
                     eps, residual, act, act_param);
  }
  torch::autograd::set_history(f.out, node);
  UnitParams& p = node->params_;
  std::copy(stride.begin(), stride.end(), p.stride.begin());
  std::copy(padding.begin(), padding.end(), p.padding.begin());
  std::copy(dilation.begin(), dilation.end(), p.dilation.begin());
  p.groups = groups;
  if (given(conv_bias)) {
    p.c_out = conv_bias->sym_size(0);
  }
  p.impl_index = f.impl_index;
  p.eps = eps;
  p.training = training;
  p.act = act;
  p.act_param = act_param;
  node->x_ = SavedVariable(input, false);
  node->w_ = SavedVariable(weight, false);
  node->y_ = SavedVariable(f.y, false);
  node->bn_w_ = SavedVariable(bn_weight, false);
  node->save_mean_ = SavedVariable(f.save_mean, false);
  node->save_var_ = SavedVariable(f.save_var, false);
  if (f.impl_index == 1) {
    node->reserve_ = SavedVariable(f.reserve, false);
  }
  if (!training) {
    // Eval mode's BatchNorm backward reads the running statistics (saved, as eager's node
    // saves them); training's reads the saved batch statistics only.
    node->running_mean_ = SavedVariable(running_mean, false);
    node->running_var_ = SavedVariable(running_var, false);
  }
  if (f.pre.defined()) {
    node->out_ = SavedVariable(f.pre, false);
  } else if (act != kActIdentity) {
    node->out_ = SavedVariable(f.out, true);
    node->out_is_output_ = true;
  }
  return f.out;
}

// Under autocast (torch.autocast, either device's): the casts eager's ops would make --
// input, convolution weight and bias, and the residual to the autocast dtype where
// eligible (floating point, on this device, not fp64), the weight through autocast's cast
// cache as eager's conv2d does -- then the unit with autocast off, so that its ops run in
// that dtype once (BatchNorm with its fp32 parameters, as eager's batch_norm under
// autocast). What modules._run_plan did in Python around the same call.
// The op through the dispatcher (typed call), from the Autocast kernels and from Python.
const c10::TypedOperatorHandle<decltype(conv_bn_act_eager)>& eager_unit_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fused::conv_bn_act_eager", "")
                             .typed<decltype(conv_bn_act_eager)>();
  return op;
}

template <c10::DeviceType D>
at::Tensor conv_bn_act_eager_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    std::optional<double> momentum, double eps, const std::optional<at::Tensor>& residual,
    int64_t act, double act_param) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(D));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(D);
  return eager_unit_op().call(at::autocast::cached_cast(dtype, input, D),
                 at::autocast::cached_cast(dtype, weight, D),
                 at::autocast::cached_cast(dtype, conv_bias, D), bn_weight, bn_bias, running_mean,
                 running_var, num_batches_tracked, stride, padding, dilation, groups, training,
                 momentum, eps, at::autocast::cached_cast(dtype, residual, D), act, act_param);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Python entry points of the plans' hot path, as METH_FASTCALL functions (pybind11's
// argument dispatch costs about a microsecond at 17 arguments: as much as the rest of the
// call's Python).
//
// resnet_fused._C.conv_bn_act_eager: the op through the dispatcher (typed call), without
// torch.ops' boxed argument parsing, which costs more than the unit's three eager calls at
// small shapes. Tensors whose Python type defines __torch_function__ (anything but Tensor
// and Parameter) and an active TorchFunctionMode get NotImplemented back, nothing done:
// the caller then runs eager's ops one by one, which honour them as eager's modules do.
// ---------------------------------------------------------------------------------------
namespace {

std::optional<at::Tensor> optional_tensor(PyObject* obj) {
  if (obj == Py_None) {
    return std::nullopt;
  }
  return THPVariable_Unpack(obj);
}

// An int[2] argument: a tuple or list of two ints.
std::array<int64_t, 2> int_pair(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE((PyTuple_Check(obj) || PyList_Check(obj)) && PySequence_Fast_GET_SIZE(obj) == 2,
                   kOpName, ": ", name, " must be a tuple or list of two ints");
  PyObject** items = PySequence_Fast_ITEMS(obj);
  return {THPUtils_unpackLong(items[0]), THPUtils_unpackLong(items[1])};
}

// conv_bn_act_eager(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
//                   running_var, num_batches_tracked, stride, padding, dilation, groups,
//                   training, momentum, eps, residual, act, act_param), as the schema.
PyObject* conv_bn_act_eager_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 18, kOpName, " takes 18 positional arguments, got ", nargs);
  const bool plain = plain_tensor_args(args, {0, 1, 2, 3, 4, 5, 6, 7, 15}, 2, kOpName,
                                       "input and conv_weight must be tensors");
  const auto stride = int_pair(args[8], "stride");
  const auto padding = int_pair(args[9], "padding");
  const auto dilation = int_pair(args[10], "dilation");
  const int64_t groups = THPUtils_unpackLong(args[11]);
  const bool training = as_bool(args[12]);
  const std::optional<double> momentum =
      args[13] == Py_None ? std::nullopt : std::optional<double>(as_double(args[13]));
  const double eps = as_double(args[14]);
  const int64_t act = THPUtils_unpackLong(args[16]);
  const double act_param = as_double(args[17]);
  if (!plain) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const auto& op = eager_unit_op();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings of aten ops
    out = op.call(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                  optional_tensor(args[2]), optional_tensor(args[3]), optional_tensor(args[4]),
                  optional_tensor(args[5]), optional_tensor(args[6]), optional_tensor(args[7]),
                  stride, padding, dilation, groups, training, momentum, eps,
                  optional_tensor(args[15]), act, act_param);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// Appends dim, dtype, device, requires_grad, sizes and strides of `obj` (a tensor, or -1
// for None) to `words`; false when `obj` is neither (or a tensor without plain sizes and
// strides).
bool append_tensor_words(c10::SmallVector<int64_t, 160>& words, PyObject* obj) {
  if (obj == Py_None) {
    words.push_back(-1);
    return true;
  }
  if (!THPVariable_Check(obj)) {
    return false;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.layout() != at::kStrided || t.is_nested() ||
      t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    return false;
  }
  try {
    const c10::Device device = t.device();
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    words.push_back(t.dim());
    words.push_back(static_cast<int64_t>(t.scalar_type()));
    words.push_back(static_cast<int64_t>(device.type()));
    words.push_back(device.index());
    words.push_back(t.requires_grad());
    words.append(sizes.begin(), sizes.end());
    words.append(strides.begin(), strides.end());
  } catch (const c10::Error&) {
    return false;  // (a subclass that cannot give them)
  }
  return true;
}

PyObject* words_bytes(const c10::SmallVector<int64_t, 160>& words) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

// The tensor part of a plan's signature (resnet_fused/modules.py, _TENSORS): for each
// argument, None -> one marker; a tensor -> dim, dtype, device, requires_grad, sizes and
// strides, as one bytes object (compared with ==; it holds the values themselves, so two
// equal signatures mean equal metadata). None when an argument is neither (or a tensor
// without plain sizes and strides): the caller then takes the checked path.
PyObject* tensor_signature(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  c10::SmallVector<int64_t, 160> words;
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!append_tensor_words(words, args[i])) {
      Py_RETURN_NONE;
    }
  }
  return words_bytes(words);
  END_HANDLE_TH_ERRORS
}

// The attribute names plan_signature reads, interned once (as hook_names_ready below).
enum SigName {
  kParameters, kBuffers, kWeight, kBias, kRunningMean, kRunningVar, kTraining, kMomentum,
  kEps, kTrackRunningStats, kStride, kPadding, kDilation, kGroups, kPaddingMode,
  // (planned_unit's)
  kPlan, kUnit, kGeometry, kBatchStats, kNumBatchesTracked, kKind, kParam, kGetattribute,
  kSigNames
};
PyObject* g_sig_names[kSigNames] = {};

bool sig_names_ready() {
  if (g_sig_names[kSigNames - 1] != nullptr) {
    return true;
  }
  static const char* const kNames[kSigNames] = {
      "_parameters", "_buffers", "weight", "bias", "running_mean", "running_var", "training",
      "momentum", "eps", "track_running_stats", "stride", "padding", "dilation", "groups",
      "padding_mode", "plan", "unit", "geometry", "batch_stats", "num_batches_tracked", "kind",
      "param", "__getattribute__"};
  for (int i = 0; i < kSigNames; ++i) {
    if (g_sig_names[i] == nullptr &&
        (g_sig_names[i] = PyUnicode_InternFromString(kNames[i])) == nullptr) {
      return false;
    }
  }
  return true;
}

// A new reference to `mapping[key]` (a dict: a module's _parameters or _buffers), or to
// None where the key is absent; null with the Python error set where `mapping` is not a
// dict or the lookup fails.
PyObject* dict_get(PyObject* mapping, PyObject* key) {
  if (!PyDict_Check(mapping)) {
    PyErr_SetString(PyExc_TypeError, "plan_signature: a module's _parameters or _buffers is not a dict");
    return nullptr;
  }
  PyObject* value = PyDict_GetItemWithError(mapping, key);
  if (value == nullptr) {
    if (PyErr_Occurred()) {
      return nullptr;
    }
    value = Py_None;
  }
  Py_INCREF(value);
  return value;
}

// A new reference to attribute `name` of `obj` (null with the Python error set where it
// cannot be read), as attribute access finds it: from `dict` (obj's __dict__, or null)
// unless obj's class has a data descriptor (a property) of that name, else by attribute
// access. (nn.Module defines __getattr__, which makes every attribute access of a module
// take CPython's slower path: most of the time of reading a dozen attributes.)
PyObject* read_attr(PyObject* obj, PyObject* dict, PyObject* name) {
  if (dict != nullptr) {
    PyObject* descr = _PyType_Lookup(Py_TYPE(obj), name);  // (borrowed)
    if (descr == nullptr || Py_TYPE(descr)->tp_descr_set == nullptr) {
      PyObject* value = PyDict_GetItemWithError(dict, name);
      if (value != nullptr) {
        return Py_NewRef(value);
      }
      if (PyErr_Occurred()) {
        return nullptr;
      }
    }
  }
  return PyObject_GetAttr(obj, name);
}

// Whether attribute access on `obj` is object.__getattribute__'s (nn.Module's __getattr__
// aside, which runs only where that finds nothing): read_attr's dict reads assume it.
bool default_getattribute(PyObject* obj) {
  static PyObject* const base = _PyType_Lookup(&PyBaseObject_Type, g_sig_names[kGetattribute]);
  return _PyType_Lookup(Py_TYPE(obj), g_sig_names[kGetattribute]) == base;
}

// Owned references, released together.
struct Refs {
  c10::SmallVector<PyObject*, 24> held;
  ~Refs() {
    for (PyObject* o : held) {
      Py_XDECREF(o);
    }
  }
  PyObject* keep(PyObject* o) {
    held.push_back(o);
    return o;
  }
};

// resnet_fused/modules.py's _unit_signature (conv given) and _bn_signature (conv None)
// outside torch.compile, in one call:
//   plan_signature(env, policy_key, conv_backend_key, conv, bn, input, residual, act,
//                  backend)
// returns the same tuple the Python versions build (items in their order, the tensors'
// part as tensor_signature's bytes), or None where they return None (a tensor argument
// that is not a tensor; a unit under autocast with float64 or non-float input). `env` is
// os.environ's mapping of encoded names (read_env's), the keys the encoded names of the
// policy and convolution-backend variables. Attributes are read where attribute
// access finds them (read_attr).
PyObject* plan_signature(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9) {
    PyErr_SetString(PyExc_TypeError,
                    "plan_signature(env, policy_key, conv_backend_key, conv, bn, input, "
                    "residual, act, backend): takes 9 arguments");
    return nullptr;
  }
  if (!sig_names_ready()) {
    return nullptr;
  }
  PyObject* const env = args[0];
  PyObject* const conv = args[3];
  PyObject* const bn = args[4];
  PyObject* const input = args[5];
  PyObject* const residual = args[6];
  const bool unit = conv != Py_None;
  if (!PyDict_Check(env) || !THPVariable_Check(input)) {
    Py_RETURN_NONE;
  }
  PyObject* const* n = g_sig_names;
  Refs refs;
  // The autocast dtype of the input's device type (None while autocast is off there).
  PyObject* amp = Py_None;
  {
    const at::Tensor& x = THPVariable_Unpack(input);
    bool enabled = false;
    try {
      const c10::DeviceType type = x.device().type();
      enabled = at::autocast::is_autocast_available(type) && at::autocast::is_autocast_enabled(type);
    } catch (const c10::Error&) {
      Py_RETURN_NONE;  // (a device type autocast does not know: the checked path)
    }
    if (enabled) {
      if (unit && (x.scalar_type() == at::kDouble || !x.is_floating_point())) {
        Py_RETURN_NONE;
      }
      amp = reinterpret_cast<PyObject*>(
          torch::getTHPDtype(at::autocast::get_autocast_dtype(x.device().type())));
    }
  }
  // The modules' __dict__ (null without one, or for a class with a __getattribute__ of its
  // own: attribute access throughout).
  auto instance_dict = [&](PyObject* obj) -> PyObject* {
    if (!default_getattribute(obj)) {
      return nullptr;
    }
    PyObject* dict = PyObject_GenericGetDict(obj, nullptr);
    if (dict == nullptr) {
      PyErr_Clear();
    }
    return refs.keep(dict);
  };
  PyObject* const bn_dict = instance_dict(bn);
  PyObject* const conv_dict = unit ? instance_dict(conv) : nullptr;
  PyObject* bp = refs.keep(read_attr(bn, bn_dict, n[kParameters]));
  PyObject* bb = bp ? refs.keep(read_attr(bn, bn_dict, n[kBuffers])) : nullptr;
  if (bb == nullptr) {
    return nullptr;
  }
  PyObject* tensors[8] = {input, residual};
  const int keyed[4][2] = {{0, kWeight}, {0, kBias}, {1, kRunningMean}, {1, kRunningVar}};
  for (int i = 0; i < 4; ++i) {
    tensors[2 + i] = refs.keep(dict_get(keyed[i][0] == 0 ? bp : bb, n[keyed[i][1]]));
    if (tensors[2 + i] == nullptr) {
      return nullptr;
    }
  }
  int count = 6;
  if (unit) {
    PyObject* cp = refs.keep(read_attr(conv, conv_dict, n[kParameters]));
    if (cp == nullptr) {
      return nullptr;
    }
    if (!PyDict_Check(cp)) {
      Py_RETURN_NONE;
    }
    PyObject* w = PyDict_GetItemWithError(cp, n[kWeight]);  // (borrowed; held by cp)
    if (w == nullptr) {
      if (PyErr_Occurred()) {
        return nullptr;
      }
      Py_RETURN_NONE;  // (no weight: the checked path says what is wrong)
    }
    tensors[6] = w;
    tensors[7] = refs.keep(dict_get(cp, n[kBias]));
    if (tensors[7] == nullptr) {
      return nullptr;
    }
    count = 8;
  }
  c10::SmallVector<int64_t, 160> words;
  for (int i = 0; i < count; ++i) {
    if (!append_tensor_words(words, tensors[i])) {
      Py_RETURN_NONE;
    }
  }
  auto env_value = [&](PyObject* key) -> PyObject* {
    PyObject* v = PyDict_GetItemWithError(env, key);
    if (v == nullptr && !PyErr_Occurred()) {
      v = Py_None;
    }
    if (v != nullptr) {
      Py_INCREF(v);
    }
    return v;
  };
  auto boolean = [](bool b) -> PyObject* { return Py_NewRef(b ? Py_True : Py_False); };
  // Items as the Python versions order them (owned until the tuple takes them); the first
  // read that fails ends the call with its error.
  Refs items;
  auto add = [&](PyObject* item) { return items.keep(item) != nullptr; };
  if (!add(words_bytes(words)) || !add(boolean(at::GradMode::is_enabled())) ||
      !add(Py_NewRef(amp))) {
    return nullptr;
  }
  for (int name : {kTraining, kMomentum, kEps, kTrackRunningStats}) {
    if (!add(read_attr(bn, bn_dict, n[name]))) {
      return nullptr;
    }
  }
  if (!add(Py_NewRef(reinterpret_cast<PyObject*>(Py_TYPE(bn)))) ||
      !add(Py_NewRef(args[7])) ||  // act
      !add(Py_NewRef(args[8])) ||  // backend
      !add(env_value(args[1]))) {  // the policy
    return nullptr;
  }
  if (unit) {
    for (int name : {kStride, kPadding, kDilation, kGroups, kPaddingMode}) {
      if (!add(read_attr(conv, conv_dict, n[name]))) {
        return nullptr;
      }
    }
    if (!add(env_value(args[2])) ||  // the convolution backend
        !add(boolean(at::globalContext().userEnabledMkldnn())) ||
        !add(boolean(at::globalContext().allowTF32CuDNN()))) {
      return nullptr;
    }
  }
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(items.held.size()));
  if (result == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < items.held.size(); ++i) {
    PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), items.held[i]);  // (steals)
  }
  items.held.clear();
  return result;
  END_HANDLE_TH_ERRORS
}

// resnet_fused/modules.py's conv_bn_forward for a unit whose plan runs eager's ops as one
// op call (plan.unit: conv_bn_act_eager), outside torch.compile:
//   planned_unit(cache, env, policy_key, conv_backend_key, conv, bn, input, residual, act,
//                backend)
// computes the call's signature (plan_signature); where it equals the signature of
// cache.plan = (signature, plan) and plan.unit is set, it makes the call that _run_plan
// makes (the modules' parameters and buffers read now, nn.BatchNorm2d.forward's choice of
// running statistics and counter) and returns its output. Otherwise, and where the op
// declines (NotImplemented: tensors with __torch_function__), it returns the signature
// (or None), and the caller goes on in Python.
PyObject* planned_unit(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) {
    PyErr_SetString(PyExc_TypeError,
                    "planned_unit(cache, env, policy_key, conv_backend_key, conv, bn, input, "
                    "residual, act, backend): takes 10 arguments");
    return nullptr;
  }
  PyObject* const signature = plan_signature(nullptr, args + 1, 9);
  if (signature == nullptr || signature == Py_None || args[4] == Py_None) {
    return signature;
  }
  PyObject* const* n = g_sig_names;  // (ready: plan_signature interned them)
  PyObject* const conv = args[4];
  PyObject* const bn = args[5];
  Refs refs;
  refs.keep(signature);
  auto keep_signature = [&]() -> PyObject* { return Py_NewRef(signature); };
  PyObject* planned = refs.keep(PyObject_GetAttr(args[0], n[kPlan]));
  if (planned == nullptr) {
    return nullptr;
  }
  if (!PyTuple_Check(planned) || PyTuple_GET_SIZE(planned) != 2) {
    return keep_signature();
  }
  const int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(planned, 0), signature, Py_EQ);
  if (same <= 0) {
    return same < 0 ? nullptr : keep_signature();
  }
  PyObject* const plan = PyTuple_GET_ITEM(planned, 1);  // (held by planned)
  PyObject* unit = refs.keep(PyObject_GetAttr(plan, n[kUnit]));
  if (unit == nullptr) {
    return nullptr;
  }
  PyObject* geometry = unit == Py_None ? nullptr : refs.keep(PyObject_GetAttr(plan, n[kGeometry]));
  if (geometry == nullptr) {
    return PyErr_Occurred() ? nullptr : keep_signature();
  }
  if (!PyTuple_Check(geometry) || PyTuple_GET_SIZE(geometry) != 4) {
    return keep_signature();
  }
  // _run_plan's reads, in its order (from the instance dicts: read_attr; a class with a
  // __getattribute__ of its own takes the Python path).
  if (!default_getattribute(bn) || !default_getattribute(conv) ||
      !default_getattribute(args[8])) {
    return keep_signature();
  }
  PyObject* const bn_dict = refs.keep(PyObject_GenericGetDict(bn, nullptr));
  PyObject* const conv_dict = bn_dict ? refs.keep(PyObject_GenericGetDict(conv, nullptr)) : nullptr;
  PyObject* const act_dict =
      conv_dict ? refs.keep(PyObject_GenericGetDict(args[8], nullptr)) : nullptr;
  if (act_dict == nullptr) {
    PyErr_Clear();  // (a module or activation without __dict__: the Python path)
    return keep_signature();
  }
  PyObject* bb = refs.keep(read_attr(bn, bn_dict, n[kBuffers]));
  PyObject* training = bb ? refs.keep(read_attr(bn, bn_dict, n[kTraining])) : nullptr;
  if (training == nullptr) {
    return nullptr;
  }
  if (!PyDict_Check(bb)) {
    return keep_signature();
  }
  const int train = PyObject_IsTrue(training);
  if (train < 0) {
    return nullptr;
  }
  PyObject* rm = Py_None;
  PyObject* rv = Py_None;
  PyObject* tracked = Py_None;
  int track = 1;
  if (train) {
    PyObject* t = refs.keep(read_attr(bn, bn_dict, n[kTrackRunningStats]));
    if (t == nullptr || (track = PyObject_IsTrue(t)) < 0) {
      return nullptr;
    }
  }
  if (track) {  // (eval: the running statistics; training: also the counter, if tracked)
    rm = refs.keep(dict_get(bb, n[kRunningMean]));
    rv = rm ? refs.keep(dict_get(bb, n[kRunningVar])) : nullptr;
    if (rv == nullptr) {
      return nullptr;
    }
    if (train && (tracked = refs.keep(dict_get(bb, n[kNumBatchesTracked]))) == nullptr) {
      return nullptr;
    }
  }
  PyObject* cp = refs.keep(read_attr(conv, conv_dict, n[kParameters]));
  PyObject* bp = cp ? refs.keep(read_attr(bn, bn_dict, n[kParameters])) : nullptr;
  if (bp == nullptr) {
    return nullptr;
  }
  if (!PyDict_Check(cp) || !PyDict_Check(bp)) {
    return keep_signature();
  }
  PyObject* w = PyDict_GetItemWithError(cp, n[kWeight]);
  if (w == nullptr) {
    return PyErr_Occurred() ? nullptr : keep_signature();
  }
  refs.keep(Py_NewRef(w));  // (held: the reads below may run Python code)
  PyObject* conv_b = refs.keep(dict_get(cp, n[kBias]));
  PyObject* bn_w = conv_b ? refs.keep(dict_get(bp, n[kWeight])) : nullptr;
  PyObject* bn_b = bn_w ? refs.keep(dict_get(bp, n[kBias])) : nullptr;
  PyObject* batch_stats = bn_b ? refs.keep(PyObject_GetAttr(plan, n[kBatchStats])) : nullptr;
  PyObject* momentum = batch_stats ? refs.keep(read_attr(bn, bn_dict, n[kMomentum])) : nullptr;
  PyObject* eps = momentum ? refs.keep(read_attr(bn, bn_dict, n[kEps])) : nullptr;
  PyObject* kind = eps ? refs.keep(read_attr(args[8], act_dict, n[kKind])) : nullptr;
  PyObject* param = kind ? refs.keep(read_attr(args[8], act_dict, n[kParam])) : nullptr;
  if (param == nullptr) {
    return nullptr;
  }
  PyObject* const call[18] = {
      args[6], w, conv_b, bn_w, bn_b, rm, rv, tracked,
      PyTuple_GET_ITEM(geometry, 0), PyTuple_GET_ITEM(geometry, 1),
      PyTuple_GET_ITEM(geometry, 2), PyTuple_GET_ITEM(geometry, 3),
      batch_stats, momentum, eps, args[7], kind, param};
  PyObject* out = PyObject_Vectorcall(unit, call, 18, nullptr);  // (plan.unit, as _run_plan)
  if (out == Py_NotImplemented) {
    Py_DECREF(out);
    return keep_signature();
  }
  return out;  // (the output, or null with the error set)
  END_HANDLE_TH_ERRORS
}

// Whether a context that the fused path must leave to eager's ops is active (the checks
// of resnet_fused/functional/_common.py: runs_eagerly, which reads torch.compile's flag
// first): torch.jit.trace recording, a torch.func transform (functorch's layer keys),
// make_fx's proxy mode, or pre-dispatch tracing (make_fx(pre_dispatch=True)). One call
// instead of four Python-level queries: it is read on every fused site's call.
bool in_eager_only_context() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return torch::jit::tracer::isTracing() ||
         // (torch._C._are_functorch_transforms_active's test: a transform's layer keys)
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) ||
         c10::impl::TorchDispatchModeTLS::get_mode(c10::impl::TorchDispatchModeKey::PROXY)
             .has_value() ||
         included.has(c10::DispatchKey::PreDispatch);
}

PyObject* eager_only_context(PyObject* /*self*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  if (in_eager_only_context()) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

// Whether any of the attributes `names` of `obj` is truthy (a non-empty hooks dict);
// -1 with the Python error set when one cannot be read. Each is read from obj's
// __dict__ where it is there (what attribute access finds for these attributes, which no
// class defines: a dict lookup instead of a walk of the class hierarchy), else by
// attribute access.
int any_truthy(PyObject* obj, PyObject* const* names, int n) {
  PyObject* dict = PyObject_GenericGetDict(obj, nullptr);  // (new reference)
  if (dict == nullptr) {
    PyErr_Clear();  // (no __dict__: attribute access below says what is wrong)
  }
  int result = 0;
  for (int i = 0; i < n && result == 0; ++i) {
    PyObject* value = dict != nullptr ? PyDict_GetItemWithError(dict, names[i]) : nullptr;
    if (value != nullptr) {
      Py_INCREF(value);  // (borrowed from the dict: held while its truth is asked)
    } else if (PyErr_Occurred()) {
      result = -1;
      break;
    } else {
      value = PyObject_GetAttr(obj, names[i]);
      if (value == nullptr) {
        result = -1;
        break;
      }
    }
    result = PyObject_IsTrue(value);
    Py_DECREF(value);
  }
  Py_XDECREF(dict);
  return result;
}

// The attribute names any_module_hooks reads, interned once: false (with the Python
// error set) if interning fails, and tried again at the next call.
PyObject* g_global_hooks[4] = {};
PyObject* g_own_hooks[4] = {};

bool hook_names_ready() {
  if (g_own_hooks[3] != nullptr) {
    return true;
  }
  static const char* const kGlobal[] = {"_global_forward_hooks", "_global_forward_pre_hooks",
                                        "_global_backward_hooks", "_global_backward_pre_hooks"};
  static const char* const kOwn[] = {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                     "_backward_pre_hooks"};
  for (int i = 0; i < 4; ++i) {
    if (g_global_hooks[i] == nullptr &&
        (g_global_hooks[i] = PyUnicode_InternFromString(kGlobal[i])) == nullptr) {
      return false;
    }
  }
  for (int i = 0; i < 4; ++i) {
    if (g_own_hooks[i] == nullptr &&
        (g_own_hooks[i] = PyUnicode_InternFromString(kOwn[i])) == nullptr) {
      return false;
    }
  }
  return true;
}

// resnet_fused/modules.py: has_hooks outside torch.compile, in one call:
// any_module_hooks(torch.nn.modules.module, *modules) is True in an eager-only context
// (above), when one of torch.nn's global module hooks is registered, or when a module
// of `modules` (None skipped) has forward, forward-pre, backward or backward-pre hooks of
// its own. The attributes are read at every call, as the Python version reads them (from
// the instance's __dict__, where nn.Module keeps them: a module class that made them
// properties, or overrode __getattribute__ for them, would not be seen).
PyObject* any_module_hooks(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook_names_ready()) {
    return nullptr;
  }
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError,
                    "any_module_hooks(torch.nn.modules.module, *modules): missing argument");
    return nullptr;
  }
  if (in_eager_only_context()) {
    Py_RETURN_TRUE;
  }
  int found = any_truthy(args[0], g_global_hooks, 4);
  for (Py_ssize_t i = 1; found == 0 && i < nargs; ++i) {
    if (args[i] != Py_None) {
      found = any_truthy(args[i], g_own_hooks, 4);
    }
  }
  if (found < 0) {
    return nullptr;
  }
  if (found) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"eager_only_context", &eager_only_context, METH_NOARGS,
     "True while torch.jit.trace records, a torch.func transform is active, or make_fx "
     "traces (also pre-dispatch): where fused sites run eager's ops."},
    {"any_module_hooks", fastcall(&any_module_hooks), METH_FASTCALL,
     "any_module_hooks(torch.nn.modules.module, *modules): resnet_fused.modules.has_hooks "
     "(an eager-only context, a global module hook, or a module's own hooks) in one call."},
    {"conv_bn_act_eager", fastcall(&conv_bn_act_eager_py), METH_FASTCALL,
     "torch.ops.resnet_fused.conv_bn_act_eager through the dispatcher with less argument "
     "parsing (positional arguments, as the schema); NotImplemented for tensors with "
     "__torch_function__ or under a TorchFunctionMode."},
    {"plan_signature", fastcall(&plan_signature), METH_FASTCALL,
     "plan_signature(env, policy_key, conv_backend_key, conv, bn, input, residual, act, "
     "backend): resnet_fused.modules' _unit_signature (conv given) or _bn_signature (conv "
     "None) outside torch.compile, the same tuple in one call."},
    {"planned_unit", fastcall(&planned_unit), METH_FASTCALL,
     "planned_unit(cache, env, policy_key, conv_backend_key, conv, bn, input, residual, act, "
     "backend): a planned eager unit's call (resnet_fused.modules.conv_bn_forward's) in one "
     "call: its output, or the call's signature where the plan does not apply."},
    {"tensor_signature", fastcall(&tensor_signature), METH_FASTCALL,
     "dim, dtype, device, requires_grad, sizes and strides of each tensor argument (None "
     "kept) as one bytes object; None when an argument is neither a tensor nor None."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

void bind_unit(pybind11::module_& m) {
  add_functions(m, kMethods);
}

}  // namespace resnet_fused

TORCH_LIBRARY_IMPL(resnet_fused, CompositeExplicitAutograd, m) {
  m.impl("conv_bn_act_eager", &resnet_fused::conv_bn_act_eager);
}

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) {
  m.impl("conv_bn_act_eager", &resnet_fused::conv_bn_act_eager_autograd);
}

TORCH_LIBRARY_IMPL(resnet_fused, Autocast, m) {  // (CUDA's autocast)
  m.impl("conv_bn_act_eager", &resnet_fused::conv_bn_act_eager_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(resnet_fused, AutocastCPU, m) {
  m.impl("conv_bn_act_eager", &resnet_fused::conv_bn_act_eager_autocast<c10::DeviceType::CPU>);
}
