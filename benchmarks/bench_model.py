"""Model-level benchmark on this machine; a thin wrapper over
``resnet-fused bench --level model`` (see ``resnet-fused bench --help``). Example:

    python benchmarks/bench_model.py --device cpu --out benchmarks/results
"""

import sys

from resnet_fused.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--level", "model", *sys.argv[1:]]))
