// resnet_fused._C.bn_act_train: the fused BatchNorm -> (residual add) -> activation of the
// "cpu" and "cuda" backends with its autograd in C++, in one call from Python:
//
//   bn_act_train(input, weight, bias, residual, running_mean, running_var, momentum, eps,
//                act, act_param, batch_stats, update)
//
// makes the calls of resnet_fused/functional/batch_norm_act.py's BatchNormPlan.run: with
// batch statistics, bn_stats of the (detached) input, updating the running statistics
// where `update`; else the running statistics themselves; then bn_act_forward, and where
// autograd records the call, one node (BnActFunction, a torch::autograd::Function) whose
// backward is _BatchNormAct.backward's: bn_act_backward_reduce and bn_act_backward_elemt,
// the same arguments in the same cases. The ops run through the dispatcher, so that
// dispatch modes and tensor subclasses below Python see them as they see the Python
// path's calls. What it saves is host time: the Python autograd.Function's apply and
// backward cost about 40 us per BatchNorm per training step, more than the kernels
// themselves at 7x7 and 14x14. Tensors with __torch_function__ and an active
// TorchFunctionMode get NotImplemented back, nothing done: the caller then takes the
// Python path.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/utils/python_numbers.h>

#include <optional>
#include <tuple>

#include "act.h"
#include "py_functions.h"

namespace resnet_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using StatsFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                   const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&, double);
using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, double, int64_t, double);
using ReduceFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, int64_t, double, bool,
    const std::optional<at::Tensor>&);
using ElemtFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           double, int64_t, double, bool);

template <typename F>
c10::TypedOperatorHandle<F> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<F>();
}

// (one handle per op, found once)
const auto& stats_op() {
  static const auto h = find_op<StatsFn>("resnet_fused::bn_stats");
  return h;
}
const auto& forward_op() {
  static const auto h = find_op<ForwardFn>("resnet_fused::bn_act_forward");
  return h;
}
const auto& reduce_op() {
  static const auto h = find_op<ReduceFn>("resnet_fused::bn_act_backward_reduce");
  return h;
}
const auto& elemt_op() {
  static const auto h = find_op<ElemtFn>("resnet_fused::bn_act_backward_elemt");
  return h;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// SiLU, the GELUs and Sigmoid: their derivative costs an exp or erf per element
// (resnet_fused.activations.Act.transcendental).
bool transcendental(int64_t act) {
  return act == kActSiLU || act == kActGELU || act == kActGELUTanh || act == kActSigmoid;
}

struct BnActFunction : public torch::autograd::Function<BnActFunction> {
  static constexpr bool is_traceable = false;

  // (weight, bias and residual: None -> nullopt; the node's inputs are the tensors given,
  // in this order, which needs_input_grad counts)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& var, double eps, int64_t act, double act_param,
                            bool batch_stats) {
    at::Tensor out = forward_op().call(input, mean, var, weight, bias, residual, eps, act,
                                       act_param);
    // act' from `out` (a residual and an activation that allows it), else at the
    // pre-activation recomputed from input, bias [and the residual] (_BatchNormAct.forward).
    const bool active = act != kActIdentity;
    const bool has_residual = residual.has_value();
    const bool keep_out = active && has_residual && act_from_output(act, act_param);
    const bool keep_bias = active && !keep_out;
    // (a residual made under inference_mode cannot be saved: a copy, as _BatchNormAct)
    at::Tensor saved_residual;
    if (keep_bias && has_residual) {
      saved_residual = residual->is_inference() ? residual->clone() : *residual;
    }
    ctx->save_for_backward({input, mean, var, weight.value_or(at::Tensor()),
                            keep_bias ? bias.value_or(at::Tensor()) : at::Tensor(),
                            keep_out ? out : at::Tensor(), saved_residual});
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["act_param"] = act_param;
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["has_residual"] = has_residual;
    ctx->saved_data["bias_dtype"] =
        bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& mean = saved[1];
    const at::Tensor& var = saved[2];
    const at::Tensor& weight = saved[3];
    const at::Tensor& bias = saved[4];
    const at::Tensor& out = saved[5];
    const at::Tensor& residual = saved[6];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double act_param = ctx->saved_data["act_param"].toDouble();
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    // The node's inputs: input, then weight, bias and residual where given.
    size_t edge = 0;
    auto needs = [&](bool given) { return given && ctx->needs_input_grad(edge++); };
    const bool need_input = needs(true);
    const bool need_weight = needs(ctx->saved_data["has_weight"].toBool());
    const bool need_bias = needs(bias_dtype >= 0);
    const bool need_residual = needs(has_residual);
    const at::Tensor& grad_out = grad_outputs[0];
    const bool active = act != kActIdentity;
    // With residual + act the reduction pass also writes the gradient through act, which is
    // d_residual and the gradient the elementwise pass normalises.
    bool write_masked = active && has_residual && (need_input || need_residual);
    const bool need_sums = (batch_stats && need_input) || need_weight || need_bias;
    // SiLU/GELU on the CPU: the reduction pass also writes g = grad_out * act'(pre), which
    // the elementwise pass reads instead of evaluating act' again (_BatchNormAct.backward).
    const bool masked_once =
        transcendental(act) && need_sums && need_input && input.device().is_cpu();
    write_masked = write_masked || masked_once;
    at::Tensor sum_dy, sum_dy_xhat;
    at::Tensor masked = grad_out;
    if (need_sums || write_masked) {
      at::Tensor masked_grad;
      std::tie(sum_dy, sum_dy_xhat, masked_grad) =
          reduce_op().call(grad_out, input, mean, var, opt(weight), opt(bias), opt(out), eps, act,
                           act_param, write_masked, opt(residual));
      if (write_masked) {
        masked = masked_grad;
      }
    }
    at::Tensor grad_input;
    if (need_input) {
      at::Tensor sum_dy_e = sum_dy, sum_dy_xhat_e = sum_dy_xhat;
      if (!sum_dy.defined()) {  // running statistics, no parameter gradients: sums unused
        const at::ScalarType dtype =
            input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
        sum_dy_e = sum_dy_xhat_e = at::zeros_like(mean, mean.options().dtype(dtype));
      }
      const bool plain = has_residual || masked_once;  // (act' already applied)
      grad_input = elemt_op().call(masked, input, mean, var, opt(weight), opt(bias), sum_dy_e,
                                   sum_dy_xhat_e, eps, plain ? kActIdentity : act,
                                   plain ? 0.0 : act_param, batch_stats);
    }
    at::Tensor grad_weight = need_weight ? sum_dy_xhat.to(weight.scalar_type()) : at::Tensor();
    at::Tensor grad_bias;
    if (need_bias) {
      grad_bias = sum_dy.to(static_cast<at::ScalarType>(bias_dtype));
    }
    at::Tensor grad_residual = need_residual ? masked : at::Tensor();
    return {grad_input, grad_weight, grad_bias, grad_residual, at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(),  at::Tensor(), at::Tensor()};
  }
};

at::Tensor tensor_or_undefined(PyObject* obj) {
  return obj == Py_None ? at::Tensor() : THPVariable_Unpack(obj);
}

constexpr const char* kName = "bn_act_train";

// bn_act_train(input, weight, bias, residual, running_mean, running_var, momentum, eps, act,
//              act_param, batch_stats, update): see the top of this file. The caller has
// checked the arguments (shapes, dtypes, devices: batch_norm_act's checks, or a plan made
// by them).
PyObject* bn_act_train_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 12, kName, " takes 12 positional arguments, got ", nargs);
  const bool plain =
      plain_tensor_args(args, {0, 1, 2, 3, 4, 5}, 1, kName, "input must be a tensor");
  const double momentum = as_double(args[6]);
  const double eps = as_double(args[7]);
  const int64_t act = THPUtils_unpackLong(args[8]);
  const double act_param = as_double(args[9]);
  const bool batch_stats = as_bool(args[10]);
  const bool update = as_bool(args[11]);
  check_act(act);
  if (!plain) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor input = THPVariable_Unpack(args[0]);
  const at::Tensor weight = tensor_or_undefined(args[1]);
  const at::Tensor bias = tensor_or_undefined(args[2]);
  const at::Tensor residual = tensor_or_undefined(args[3]);
  const at::Tensor running_mean = tensor_or_undefined(args[4]);
  const at::Tensor running_var = tensor_or_undefined(args[5]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings of aten ops
    at::Tensor mean = running_mean, var = running_var;
    if (batch_stats) {
      std::tie(mean, var) = stats_op().call(input.detach(),
                                            update ? opt(running_mean) : std::nullopt,
                                            update ? opt(running_var) : std::nullopt, momentum);
    }
    const bool record =
        at::GradMode::is_enabled() &&
        (input.requires_grad() || (weight.defined() && weight.requires_grad()) ||
         (bias.defined() && bias.requires_grad()) ||
         (residual.defined() && residual.requires_grad()));
    if (!record) {
      out = forward_op().call(input, mean, var, opt(weight), opt(bias), opt(residual), eps, act,
                              act_param);
    } else {
      out = BnActFunction::apply(input, opt(weight), opt(bias), opt(residual), mean, var, eps,
                                 act, act_param, batch_stats);
    }
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {kName, fastcall(&bn_act_train_py), METH_FASTCALL,
     "bn_act_train(input, weight, bias, residual, running_mean, running_var, momentum, eps, "
     "act, act_param, batch_stats, update): the statistics (or the running ones), the fused "
     "forward and, where autograd records it, one C++ autograd node for the backward; "
     "NotImplemented for tensors with __torch_function__ or under a TorchFunctionMode."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

void bind_bn_act_autograd(pybind11::module_& m) {
  add_functions(m, kMethods);
}

}  // namespace resnet_fused
