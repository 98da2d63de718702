"""Argument checks for the public API: clear errors that name the argument."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_floating(t: torch.Tensor, name: str) -> None:
    check_tensor(t, name)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
            f"float64), got {t.dtype}"
        )


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` must match ``ref`` in shape, device and dtype."""
    check_floating(t, name)
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
        )
    check_device_dtype(t, name, ref, ref_name)


def check_device_dtype(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` must be on ``ref``'s device and have its dtype."""
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
        )
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_optional_per_channel(
    t: object, name: str, input: torch.Tensor, channels: int | None = None, what: str = ""
) -> None:
    """A per-channel tensor (weight, bias, running statistics) or None: shape (C,), on
    input's device, floating (any float dtype: fp32 with half input is autocast's mix).
    C is input's channel count unless ``channels`` is given (``what`` then says whose)."""
    if t is None:
        return
    check_floating(t, name)
    c = input.shape[1] if channels is None else channels
    if t.dim() != 1 or t.shape[0] != c:
        whose = what or f"input with C = {c} channels"
        raise ValueError(f"{name} must have shape (C,) = ({c},) for {whose}, got {tuple(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on the device of input ({input.device}), got {t.device}")


def check_bn_input(input: object) -> None:
    check_floating(input, "input")
    if input.dim() != 4:
        raise ValueError(
            f"input must be a 4-D tensor (N, C, H, W), got {input.dim()}-D with shape "
            f"{tuple(input.shape)}"
        )


def act_argument(relu: object, activation: object):
    """The activation of a fused call: ``activation`` when given, else ReLU or identity
    per ``relu`` (a bool)."""
    from .activations import as_act

    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    return as_act(relu if activation is None else activation, "activation")


def check_bn_options(running_mean, running_var, momentum, eps, training, act) -> None:
    """The BatchNorm arguments shared by batch_norm_act and conv_bn_act (``act`` from
    :func:`act_argument`)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    check_number(momentum, "momentum")
    check_number(eps, "eps", minimum=0.0)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def check_number(value: object, name: str, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
