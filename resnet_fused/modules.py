"""Drop-in modules built on the fused functions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import batch_norm_act

__all__ = ["FusedBatchNormAct2d"]


class FusedBatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an optional residual add and ReLU, fused.

    A subclass of :class:`torch.nn.BatchNorm2d` with the same parameters, buffers and
    ``state_dict`` keys, and the same meaning of every option (``affine``,
    ``track_running_stats``, ``momentum=None`` for a cumulative average through
    ``num_batches_tracked``, ``eps``). ``forward(input, residual=None)`` computes
    ``relu(bn(input) + residual)`` (ReLU when ``relu=True``).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        relu: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_batch_norm(
        cls, bn: nn.BatchNorm2d, *, relu: bool = True, backend: str = "auto"
    ) -> FusedBatchNormAct2d:
        """A fused module sharing ``bn``'s parameters and buffers (not copies)."""
        fused = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device="meta",
            relu=relu,
            backend=backend,
        )
        for name in ("weight", "bias"):
            setattr(fused, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            fused._buffers[name] = bn._buffers.get(name)
        return fused.train(bn.training)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        # The same bookkeeping as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm_act(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
            residual=residual,
            relu=self.relu,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"


torch.serialization.add_safe_globals([FusedBatchNormAct2d])
