"""A/B of the CPU eval plan's oneDNN weight: ResNet-50 inference (batch 8, 224x224,
channels_last, fp32) converted twice, one model's plans keeping the folded weights
reordered for oneDNN (the library's behaviour), the other's handing oneDNN the dense
folded weights (the behaviour before), timed in alternating rounds in one process with
the fused kernels forced. Writes ``onednn_weight_<machine>.csv`` and ``.md`` to the folder
given (default: benchmarks/results)."""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time

os.environ["RESNET_FUSED_AUTO"] = "fused"
os.environ["RESNET_FUSED_CACHE_DIR"] = ""

import torch
import torchvision

import resnet_fused
import resnet_fused.functional.conv_bn_act as cba
from resnet_fused.bench.timing import device_name


def main(out_dir: str = "benchmarks/results", rounds: int = 9) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224).to(memory_format=torch.channels_last)
    models = {"reordered": resnet_fused.convert(model), "dense": resnet_fused.convert(model)}
    reorder = cba._REORDER

    def run(name: str) -> float:
        cba._REORDER = reorder if name == "reordered" else None  # (read when a plan packs)
        with torch.no_grad():
            start = time.perf_counter()
            models[name](x)
            return time.perf_counter() - start

    for name in models:  # plans made, each with its own weights
        run(name), run(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name in list(models)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(run(name))
    cba._REORDER = reorder
    ratios = [a / b for a, b in zip(times["reordered"], times["dense"], strict=True)]
    device = device_name(torch.device("cpu"))
    tag = device.split("(")[0].strip().lower().replace(" ", "-")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"onednn_weight_{tag}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "reordered_ms", "dense_ms", "time_ratio"])
        for i, (a, b) in enumerate(zip(times["reordered"], times["dense"], strict=True)):
            w.writerow([i, round(a * 1e3, 2), round(b * 1e3, 2), round(a / b, 4)])
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    text = (
        "# oneDNN weight kept by the CPU eval plan: A/B\n\n"
        f"Device: **{device}**; torch {torch.__version__}. ResNet-50 inference, batch 8, "
        "224x224, channels_last, fp32, `RESNET_FUSED_AUTO=fused`; the two converted models "
        f"timed in {rounds} alternating rounds in one process "
        "(`python benchmarks/onednn_weight_ab.py`).\n\n"
        "| plans keep | median ms |\n|---|---|\n"
        f"| weights reordered for oneDNN | {med['reordered']:.1f} |\n"
        f"| dense folded weights | {med['dense']:.1f} |\n\n"
        f"Time ratio reordered/dense: median **{statistics.median(ratios):.3f}** "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}, below 1 in "
        f"{sum(r < 1 for r in ratios)} of {rounds} rounds).\n"
    )
    with open(os.path.join(out_dir, f"onednn_weight_{tag}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:2])
