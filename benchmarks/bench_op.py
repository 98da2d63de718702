"""Op-level benchmark (add+ReLU, BN+ReLU, BN+add+ReLU) on this machine; a thin wrapper over
``resnet-fused bench --level op``. Example:

    python benchmarks/bench_op.py --device cpu --batch 8 --out benchmarks/results
"""

import sys

from resnet_fused.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--level", "op", *sys.argv[1:]]))
