"""Train the tutorial ResNet on scikit-learn's handwritten digits, unfused and converted.

The model is the ResNet every tutorial writes (resnet_fused/bench/tutorial.py: a
user-written ``ResidualBlock`` with ``conv1, bn1, relu, conv2, bn2``, a conv-BN shortcut
and ``out += self.shortcut(x)``), one block per stage, a 1-channel 3x3 stem without
pooling (the images are 8x8). No class of torchvision's or ours: ``resnet_fused.convert``
fuses it through its graph-level pass. Both runs start from the same initial weights and
see the same batches (the data, training loop and accuracy of examples/train_digits.py).
Prints what the conversion fused, both loss curves and the held-out accuracies.

    python examples/train_tutorial_digits.py [--epochs 6] [--backend auto] [--channels-last]
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

import resnet_fused
from resnet_fused.bench.tutorial import TutorialResNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import compare, load_data, parse_args

WIDTHS = (16, 32, 64, 128)


def make_model(seed: int = 0, widths=WIDTHS) -> nn.Module:
    """The tutorial ResNet with one block per stage, a 1-channel 3x3 stem, no pooling."""
    torch.manual_seed(seed)
    return TutorialResNet(
        blocks=(1, 1, 1, 1), widths=widths, num_classes=10, in_channels=1, small_input=True
    )


def report_counts(model: nn.Module) -> dict[str, int]:
    """Counts from ``conversion_report``: fused sites, entries left alone, the model's
    BatchNorm layers and the conv-BN pairs among the fused sites."""
    report = resnet_fused.conversion_report(model)
    return {
        "fused_sites": len(report["fused"]),
        "not_fused": len(report["not_fused"]),
        "batch_norms": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        "conv_bn_fused": sum("(conv-bn" in e for e in report["fused"]),
    }


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0])
    unfused = make_model()
    fused = resnet_fused.convert(copy.deepcopy(unfused), backend=args.backend)
    counts = report_counts(fused)
    print(
        f"conversion: {counts['fused_sites']} fused sites, {counts['not_fused']} left alone; "
        f"{counts['conv_bn_fused']} of {counts['batch_norms']} BatchNorm layers fused with "
        "their convolution"
    )
    for entry in resnet_fused.conversion_report(fused)["not_fused"]:
        print(f"  left alone: {entry}")
    compare(unfused, fused, load_data(), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
