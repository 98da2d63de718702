"""``resnet-fused check``: a quick correctness self-check on this machine.

Every usable backend runs each fused function on fresh random inputs (odd shapes, NCHW
and channels_last, training and eval) and is compared with the fp64 reference: forward
and every gradient must be within twice eager PyTorch's own fp32 error plus a small
floor. Prints one line per case; the exit code is 1 if anything mismatched, or if no
fused backend could be checked. The ``"torch"`` backend *is* the reference's code, so it
is reported as the reference, never counted as a checked backend.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from . import reference
from .backends import CONCRETE_BACKENDS, is_available

FLOOR = 1e-6  # fp32: a few units of the last place, relative to the reference's size


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref).abs().max().item()


def _compare(name, fused, eager, ref, grads_f, grads_e, grads_r) -> tuple[bool, str]:
    worst = ""
    ok = True
    for what, a, e, r in [("out", fused, eager, ref), *zip(
        [f"grad{i}" for i in range(len(grads_r))], grads_f, grads_e, grads_r, strict=True
    )]:  # fmt: skip
        err, err_e = _err(a, r), _err(e, r)
        bound = 2 * err_e + FLOOR * max(r.abs().max().item(), 1.0)
        if not err <= bound:
            ok = False
            worst = f"{what}: error {err:.2e} > bound {bound:.2e}"
    return ok, worst


def _cases(device: str) -> list[tuple[str, Callable]]:
    import resnet_fused as rf

    def add_relu(backend, layout):
        x = _t((3, 5, 7, 9), device, layout).requires_grad_()
        r = _t((3, 5, 7, 9), device, layout).requires_grad_()
        return (lambda *a: rf.add_relu(*a, backend=backend)), reference.add_relu, [x, r], {}

    def bn(training, residual):
        def case(backend, layout):
            x = _t((4, 6, 5, 7), device, layout, offset=0.5).requires_grad_()
            w = (torch.rand(6, device=device) + 0.5).requires_grad_()
            b = torch.randn(6, device=device).requires_grad_()
            r = _t((4, 6, 5, 7), device, layout).requires_grad_() if residual else None
            rm, rv = torch.randn(6, device=device) * 0.1, torch.rand(6, device=device) + 0.5
            leaves = [x, w, b] + ([r] if residual else [])

            def fn(x, w, b, *rest, impl=None):
                return rf.batch_norm_act(
                    x, rm.clone(), rv.clone(), w, b, training, residual=rest[0] if rest else None,
                    backend=impl,
                )  # fmt: skip

            def ref(x, w, b, *rest):
                return reference.batch_norm_act(
                    x, rm.clone().to(x.dtype), rv.clone().to(x.dtype), w, b, training,
                    residual=rest[0] if rest else None,
                )  # fmt: skip

            return (lambda *a: fn(*a, impl=backend)), ref, leaves, {}

        return case

    def conv(training, residual):
        def case(backend, layout):
            x = _t((2, 5, 9, 7), device, layout).requires_grad_()
            cw = (torch.randn(6, 5, 3, 3, device=device) / 6).requires_grad_()
            w = (torch.rand(6, device=device) + 0.5).requires_grad_()
            b = torch.randn(6, device=device).requires_grad_()
            r = _t((2, 6, 5, 4), device, layout).requires_grad_() if residual else None
            rm, rv = torch.randn(6, device=device) * 0.1, torch.rand(6, device=device) + 0.5
            leaves = [x, cw, w, b] + ([r] if residual else [])
            kw = dict(stride=2, padding=1, training=training)

            def fn(x, cw, w, b, *rest, impl=None):
                return rf.conv_bn_act(
                    x, cw, w, b, rm.clone(), rv.clone(), residual=rest[0] if rest else None,
                    backend=impl, **kw,
                )  # fmt: skip

            def ref(x, cw, w, b, *rest):
                return reference.conv_bn_act(
                    x, cw, w, b, rm.clone().to(x.dtype), rv.clone().to(x.dtype),
                    residual=rest[0] if rest else None, **kw,
                )  # fmt: skip

            return (lambda *a: fn(*a, impl=backend)), ref, leaves, {}

        return case

    return [
        ("add_relu", add_relu),
        ("bn_relu train", bn(True, False)),
        ("bn_add_relu train", bn(True, True)),
        ("bn_add_relu eval", bn(False, True)),
        ("conv_bn_relu train", conv(True, False)),
        ("conv_bn_add_relu eval", conv(False, True)),
    ]


def _t(shape, device, layout, offset=0.0):
    t = (torch.randn(shape, dtype=torch.float64) + offset).float().to(device)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def run_check(devices: list[str] | None = None, out=None) -> int:
    """Runs the self-check; returns 0 when everything matched, else 1."""
    out = sys.stdout if out is None else out  # the stream of now, not of import time
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = total = 0
    saved_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device in devices:
            backends = [b for b in CONCRETE_BACKENDS if is_available(b, device)]
            if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                backends = [b for b in backends if b != "triton"]
            if "torch" in backends:  # the reference itself: comparing it proves nothing
                backends.remove("torch")
                print(f"{device:5s} torch   the reference (not counted as checked)", file=out)
            for name, make in _cases(device):
                for backend in backends:
                    for layout in ("nchw", "channels_last"):
                        torch.manual_seed(total)
                        fn, ref_fn, leaves, _ = make(backend, layout)
                        fused = fn(*leaves)
                        eager = ref_fn(*leaves)
                        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
                        ref = ref_fn(*leaves64)
                        g = torch.randn_like(ref, dtype=torch.float32).to(fused.dtype)
                        gf = torch.autograd.grad(fused, leaves, g)
                        ge = torch.autograd.grad(eager, leaves, g)
                        gr = torch.autograd.grad(ref, leaves64, g.double())
                        ok, why = _compare(name, fused, eager, ref, gf, ge, gr)
                        total += 1
                        failures += not ok
                        status = "ok" if ok else f"MISMATCH ({why})"
                        print(
                            f"{device:5s} {backend:7s} {layout:13s} {name:22s} {status}", file=out
                        )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    if total == 0:
        print("check: no fused backend is usable here; nothing was checked", file=out)
        return 1
    print(f"check: {total - failures}/{total} cases match the fp64 reference", file=out)
    return 1 if failures else 0
