"""Layer-level benchmark on this machine; a thin wrapper over
``resnet-fused bench --level layer`` (see ``resnet-fused bench --help``). Example:

    python benchmarks/bench_layer.py --device cpu --out benchmarks/results
"""

import sys

from resnet_fused.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--level", "layer", *sys.argv[1:]]))
