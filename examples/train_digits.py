"""Train a small ResNet on scikit-learn's handwritten digits, unfused and fused.

The digits dataset (1797 8x8 greyscale images, 10 classes) ships inside scikit-learn, so
nothing is downloaded. The model is torchvision's ``ResNet`` class with one BasicBlock
per stage and a 3x3 stem without max-pooling (the images are 8x8). Both runs start from
the same initial weights and see the same batches; the fused one is
``resnet_fused.convert(model)``. Prints both loss curves and the held-out accuracies.

    python examples/train_digits.py [--epochs 6] [--backend auto] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

import resnet_fused


def load_data(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): images as [N, 1, 8, 8] floats in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(seed: int = 0) -> nn.Module:
    """torchvision's ResNet with layers [1, 1, 1, 1], a 1-channel 3x3 stem, no max-pool."""
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def train(model, x, y, *, epochs=6, batch_size=64, lr=0.05, seed=0, max_steps=None, fmt=None):
    """SGD with momentum; the batch order depends only on ``seed``. Returns the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * ((len(x) + batch_size - 1) // batch_size)
    )
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx] if fmt is None else x[idx].to(memory_format=fmt)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if max_steps is not None and len(losses) >= max_steps:
                return losses
    return losses


@torch.no_grad()
def accuracy(model, x, y, fmt=None) -> float:
    model.eval()
    xb = x if fmt is None else x.to(memory_format=fmt)
    return (model(xb).argmax(1) == y).float().mean().item()


def parse_args(argv, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    return parser.parse_args(argv)


def compare(unfused: nn.Module, fused: nn.Module, data, args) -> None:
    """Trains both models on the same batches; prints both loss curves side by side, the
    held-out accuracies and the training times."""
    x_train, y_train, x_test, y_test = data
    fmt = torch.channels_last if args.channels_last else None
    if fmt is not None:
        unfused, fused = unfused.to(memory_format=fmt), fused.to(memory_format=fmt)
    print(
        f"digits: {len(x_train)} training / {len(x_test)} held-out images; "
        f"{args.epochs} epochs, batch {args.batch_size}, backend {args.backend!r}"
    )
    curves, accs, times = {}, {}, {}
    for name, model in (("unfused", unfused), ("fused", fused)):
        start = time.perf_counter()
        curves[name] = train(
            model, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, fmt=fmt,
        )  # fmt: skip
        times[name] = time.perf_counter() - start
        accs[name] = accuracy(model, x_test, y_test, fmt)
    steps = len(curves["unfused"])
    print(f"\n{'step':>5} {'unfused loss':>13} {'fused loss':>11} {'|diff|':>9}")
    for i in sorted({*range(0, steps, max(1, steps // 20)), steps - 1}):
        lu, lf = curves["unfused"][i], curves["fused"][i]
        print(f"{i + 1:5d} {lu:13.5f} {lf:11.5f} {abs(lu - lf):9.2e}")
    print(
        f"\nheld-out accuracy: unfused {100 * accs['unfused']:.2f}%, "
        f"fused {100 * accs['fused']:.2f}%"
    )
    print(f"training time: unfused {times['unfused']:.1f} s, fused {times['fused']:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0])
    unfused = make_model()
    fused = resnet_fused.convert(copy.deepcopy(unfused), backend=args.backend)
    compare(unfused, fused, load_data(), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
