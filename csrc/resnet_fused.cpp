// resnet_fused._C: operator schemas (defined once, here) and build information.
//
// Each device registers its kernels in its own TORCH_LIBRARY_IMPL file
// (csrc/cpu/*.cpp, csrc/cuda/*.cu). The Python package adds fake (meta) kernels and
// wraps the ops in autograd Functions; see ARCHITECTURE.md.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "py_functions.h"

#include <string>

#include "cpu/isa.h"

#ifndef RESNET_FUSED_WITH_CUDA
#define RESNET_FUSED_WITH_CUDA 0
#endif
#ifndef RESNET_FUSED_CUDA_ARCH_LIST
#define RESNET_FUSED_CUDA_ARCH_LIST ""
#endif
#ifndef RESNET_FUSED_TORCH_VERSION
#define RESNET_FUSED_TORCH_VERSION ""
#endif
#ifndef RESNET_FUSED_CUDA_VERSION
#define RESNET_FUSED_CUDA_VERSION ""
#endif

TORCH_LIBRARY(resnet_fused, m) {
  // out = relu(x + residual); out has the layout of x.
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  // x <- relu(x + residual), in place.
  m.def("add_relu_(Tensor(a!) x, Tensor residual) -> ()");
  // grad_in = grad_out where out > 0 (torch's threshold_backward rule), else 0.
  m.def("relu_backward(Tensor grad_out, Tensor out) -> Tensor");

  // The eager Conv -> BatchNorm -> (add) -> ReLU unit as one op and one autograd node
  // (csrc/unit.cpp): relu(batch_norm(conv2d(input, conv_weight, conv_bias), ...) +
  // residual) with eager's own ops, bit-identical to F.conv2d, F.batch_norm, add_, relu_.
  // `training`: batch statistics (F.batch_norm's flag); the running statistics update
  // in place when given. num_batches_tracked, when given, is nn.BatchNorm2d's counter:
  // incremented, and momentum=None then means the cumulative average 1/count.
  m.def(
      "conv_bn_act_eager(Tensor input, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool training, float? momentum, float eps, Tensor? residual, int act, "
      "float act_param) "
      "-> Tensor");

  // BatchNorm -> (residual add) -> activation, as four kernels (see resnet_fused/reference.py
  // for the exact maths of each). Statistics are fp32 (fp64 for fp64 input).
  //
  // `int act, float act_param` everywhere below: the activation (csrc/act.h's ActKind,
  // resnet_fused/activations.py: 0 identity, 1 ReLU, 2 ReLU6, 3 LeakyReLU(act_param),
  // 4 SiLU, 5 Hardswish, 6 GELU, 7 GELU tanh).
  //
  // Per-channel batch mean and biased variance; updates the running statistics in place
  // (running_var with the unbiased variance) when given.
  m.def(
      "bn_stats(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum) -> (Tensor mean, Tensor var)");
  // out = act((input - mean) * rsqrt(var + eps) * weight + bias [+ residual]).
  m.def(
      "bn_act_forward(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor? residual, float eps, int act, float act_param) -> Tensor");
  // (sum g, sum g*xhat, g if write_masked_grad else empty) with g = grad_out * act'(pre):
  // from `out` when given (the activation must allow it: identity, ReLU, ReLU6, LeakyReLU
  // with a positive slope), else from the pre-activation recomputed from the input and,
  // when given, the forward's `residual` (out and residual: one or neither).
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor? out, float eps, int act, float act_param, "
      "bool write_masked_grad, Tensor? residual=None) "
      "-> (Tensor sum_dy, Tensor sum_dy_xhat, Tensor masked_grad)");
  // grad_input from the gradient and the two sums; `act` is the activation whose derivative
  // is applied to `grad` at the pre-activation recomputed from the input (identity when
  // `grad` is already the gradient at the pre-activation).
  m.def(
      "bn_act_backward_elemt(Tensor grad, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xhat, float eps, "
      "int act, float act_param, bool batch_stats) -> Tensor");

  // Eval-mode epilogue of a convolution whose BatchNorm is folded into its weight and bias:
  // out = act(input + bias[c] [+ residual]) in one pass (the accumulation type: fp32, fp64
  // for fp64 input; rounded once). bias is (C,) in input's dtype or fp32; out has input's
  // BN layout (NCHW or channels_last, see bn_memory_format in common.h).
  m.def(
      "bias_act(Tensor input, Tensor? bias, Tensor? residual, int act, float act_param) "
      "-> Tensor");
  // The same in place on input (which must be dense in NCHW or channels_last).
  m.def(
      "bias_act_(Tensor(a!) input, Tensor? bias, Tensor? residual, int act, float act_param) "
      "-> ()");

  // A 64-bit hash of the tensors' bytes (in logical order), CPU only: what the eval fold
  // cache compares to notice writes that bump no version counter (`.data`, numpy).
  // Any change of one 32-bit word changes it (see cpu/fingerprint.cpp).
  m.def("fingerprint(Tensor[] tensors) -> int");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["with_cuda"] = static_cast<bool>(RESNET_FUSED_WITH_CUDA);
  info["cuda_version"] = std::string(RESNET_FUSED_CUDA_VERSION);
  info["cuda_arch_list"] = std::string(RESNET_FUSED_CUDA_ARCH_LIST);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["torch_version"] = std::string(RESNET_FUSED_TORCH_VERSION);
  return info;
}

}  // namespace

// The ops that write their arguments in place (running statistics, add_relu_'s x,
// bias_act_'s input) bump those tensors' version counters, as aten's in-place ops do, at
// the ADInplaceOrView key (what torch.library.custom_op registers for the Triton ops).
// Without it a kernel's write through a data pointer leaves the version unchanged:
// caches keyed on versions (the modules' folded weights) and autograd's check of saved
// tensors would not see the change.
namespace {

void bump_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                            torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const c10::IValue& value = (*stack)[first + i];
    if (alias != nullptr && alias->isWrite() && value.isTensor()) {
      const at::Tensor& t = value.toTensor();
      if (t.defined()) {
        t.unsafeGetTensorImpl()->bump_version();
      }
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, ADInplaceOrView, m) {
  for (const char* name : {"bn_stats", "add_relu_", "bias_act_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_arguments>());
  }
}

namespace resnet_fused {
// resnet_fused._C.conv_bn_act_eager, the Python entry point of that op (csrc/unit.cpp).
void bind_unit(pybind11::module_& m);
// resnet_fused._C.fold_key / fold_key_check, the eval fold cache's key (csrc/fold_key.cpp).
void bind_fold_key(pybind11::module_& m);
// resnet_fused._C.bn_act_train, the fused BatchNorm+act with its autograd in C++
// (csrc/bn_act_autograd.cpp).
void bind_bn_act_autograd(pybind11::module_& m);
}  // namespace resnet_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  resnet_fused::init_parameter_type();  // (the METH_FASTCALL entry points' plain-tensor check)
  resnet_fused::bind_unit(m);
  resnet_fused::bind_fold_key(m);
  resnet_fused::bind_bn_act_autograd(m);
  m.doc() = "resnet_fused C++/CUDA kernels (ops register with the dispatcher on import)";
  m.def("build_info", &build_info, "How this extension was built: CUDA, archs, compiler.");
  m.def(
      "cpu_isa", [] { return std::string(resnet_fused::cpu::isa_name(resnet_fused::cpu::active_isa())); },
      "Instruction set the CPU kernels use here (AVX512, AVX2 or DEFAULT).");
}
