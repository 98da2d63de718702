"""Synchronised BatchNorm over several ranks on this machine; a thin wrapper over
``resnet-fused bench --level sync`` (see ``resnet-fused bench --help``). Example:

    python benchmarks/bench_sync.py --world 2 --device cpu --out benchmarks/results
"""

import sys

from resnet_fused.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--level", "sync", *sys.argv[1:]]))
